//! The one error type of `nvcim-shared`.

use core::fmt;

/// Everything that can be wrong with a configuration or an input of this crate.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// `m_bits` is not one of 2, 4, 6, 8.
    UnsupportedWeightBits {
        /// The requested number of magnitude bits M.
        m_bits: u8,
    },
    /// `n_bits` is not one of 1, 2, 4.
    UnsupportedDeviceBits {
        /// The requested bits per device N.
        n_bits: u8,
    },
    /// M is not a multiple of N, so the magnitude cannot be cut into whole devices.
    BitsNotDivisible {
        /// Magnitude bits M.
        m_bits: u8,
        /// Bits per device N.
        n_bits: u8,
    },
    /// sigma is negative, NaN or infinite.
    InvalidSigma {
        /// The rejected value.
        sigma: f32,
    },
    /// A quantization scale (`max|W|`) is zero, negative, NaN or infinite.
    InvalidScale {
        /// The rejected value.
        scale: f32,
    },
    /// A weight is NaN or infinite.
    NonFiniteWeight {
        /// Index of the weight in its layer.
        index: usize,
    },
    /// A stuck-at fault rate is outside [0, 1], or the two rates add up to more than 1.
    InvalidFaultRate {
        /// Rate of devices stuck at level 0.
        stuck_low: f32,
        /// Rate of devices stuck at the top level.
        stuck_high: f32,
    },
    /// A device level is above `2^N - 1`.
    LevelOutOfRange {
        /// The rejected level.
        level: u8,
        /// Bits per device N.
        n_bits: u8,
    },
    /// A magnitude is above `2^M - 1`.
    MagnitudeOutOfRange {
        /// The rejected magnitude.
        magnitude: u16,
        /// Magnitude bits M.
        m_bits: u8,
    },
    /// Two buffers that must have the same length do not.
    LengthMismatch {
        /// The length required.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A packed model does not start with the format's magic bytes.
    BadMagic,
    /// A packed model has a format version this build does not read.
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// A packed model is shorter than its header or layout says it must be.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// The CRC-32 stored at the end of a packed model does not match its contents.
    ChecksumMismatch {
        /// The checksum stored in the model.
        stored: u32,
        /// The checksum computed over the model.
        computed: u32,
    },
    /// A field of a packed model (or of a model description) has a value that is not allowed.
    InvalidField {
        /// Which field, e.g. `"op.kernel"`.
        field: &'static str,
        /// The rejected value (floats as their bit pattern).
        value: i64,
    },
    /// A caller-provided buffer is too small.
    BufferTooSmall {
        /// Which buffer.
        what: &'static str,
        /// Elements needed.
        needed: usize,
        /// Elements given.
        found: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::UnsupportedWeightBits { m_bits } => {
                write!(
                    f,
                    "weight bits M = {m_bits} is not supported (use 2, 4, 6 or 8)"
                )
            }
            Error::UnsupportedDeviceBits { n_bits } => {
                write!(
                    f,
                    "device bits N = {n_bits} is not supported (use 1, 2 or 4)"
                )
            }
            Error::BitsNotDivisible { m_bits, n_bits } => write!(
                f,
                "weight bits M = {m_bits} is not a multiple of device bits N = {n_bits}"
            ),
            Error::InvalidSigma { sigma } => {
                write!(f, "sigma = {sigma} is invalid (it must be finite and >= 0)")
            }
            Error::InvalidScale { scale } => write!(
                f,
                "quantization scale max|W| = {scale} is invalid (it must be finite and > 0)"
            ),
            Error::NonFiniteWeight { index } => write!(f, "weight {index} is NaN or infinite"),
            Error::InvalidFaultRate {
                stuck_low,
                stuck_high,
            } => write!(
                f,
                "stuck-at fault rates low = {stuck_low}, high = {stuck_high} are invalid \
                 (each must be in [0, 1] and their sum at most 1)"
            ),
            Error::LevelOutOfRange { level, n_bits } => write!(
                f,
                "device level {level} does not fit a {n_bits}-bit device (max {})",
                (1u16 << n_bits) - 1
            ),
            Error::MagnitudeOutOfRange { magnitude, m_bits } => write!(
                f,
                "magnitude {magnitude} does not fit {m_bits} bits (max {})",
                (1u32 << m_bits) - 1
            ),
            Error::LengthMismatch { expected, found } => {
                write!(f, "length mismatch: expected {expected}, found {found}")
            }
            Error::BadMagic => write!(f, "not a packed nvcim model (bad magic bytes)"),
            Error::UnsupportedVersion { version } => write!(
                f,
                "packed model format version {version} is not supported (this build reads {} \
                 and {})",
                crate::version::VERSION_1,
                crate::version::VERSION
            ),
            Error::Truncated { needed, found } => {
                write!(
                    f,
                    "packed model is truncated: needs {needed} bytes, has {found}"
                )
            }
            Error::ChecksumMismatch { stored, computed } => write!(
                f,
                "packed model is corrupt: CRC-32 {computed:#010x} does not match the stored \
                 {stored:#010x}"
            ),
            Error::InvalidField { field, value } => {
                write!(f, "invalid value {value} for `{field}`")
            }
            Error::BufferTooSmall {
                what,
                needed,
                found,
            } => {
                write!(
                    f,
                    "buffer `{what}` too small: needs {needed} elements, has {found}"
                )
            }
        }
    }
}

impl core::error::Error for Error {}

/// The result type of this crate.
pub type Result<T> = core::result::Result<T, Error>;
