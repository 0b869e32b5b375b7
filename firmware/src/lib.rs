//! nvcim firmware: Monte Carlo noisy integer inference on a Cortex-M4F (QEMU `mps2-an386`).
//!
//! This library is the portable half of the firmware; it builds and unit-tests on the host:
//! - [`args`]: the semihosting command line, parsed into a typed [`args::Command`];
//! - [`blob`]: validation of the packed model QEMU loads into PSRAM (`Model::parse`);
//! - [`kernel`]: integer dot products, SMLAD on the M4 and plain Rust as the reference;
//! - [`program`]: tile programming, in assembly on the M4 ([`nvcim_shared::tile::Programmer`]);
//! - [`selftest`]: the bit-exactness check of the kernels and of the programming loop;
//! - [`mc`]: the Monte Carlo loop of `run` (the board and `nvcim firmware run --simulated`);
//! - [`stats`]: output lines and the Monte Carlo summary in integers / fixed point;
//! - [`exit`]: every exit code, documented in one place;
//! - [`fit`]: whether a model fits the board's PSRAM and RAM pools (the board's constants).
//!
//! The binary (`src/main.rs`) is the board: semihosting I/O and exit, the FPGAIO counter, the
//! memory report and the fault handlers. Build it with
//! `cargo build -p nvcim-firmware --target thumbv7em-none-eabihf --profile firmware`;
//! the host runner is `nvcim::firmware`.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

#[cfg(any(test, feature = "testmodel"))]
extern crate alloc;

pub mod args;
pub mod blob;
pub mod exit;
pub mod fit;
pub mod kernel;
pub mod mc;
pub mod program;
pub mod selftest;
pub mod stats;
#[cfg(any(test, feature = "testmodel"))]
pub mod testmodel;
