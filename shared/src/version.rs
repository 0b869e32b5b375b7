//! The packed model format's version numbers: [`crate::format`] writes and reads them,
//! [`crate::error`] names them when a version is not supported. Re-exported as
//! `format::{VERSION, VERSION_1}`.

/// The format version this build writes (it also reads [`VERSION_1`]).
pub const VERSION: u16 = 2;
/// The first format version, still read.
pub const VERSION_1: u16 = 1;
