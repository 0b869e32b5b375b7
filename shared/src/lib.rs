//! `nvcim-shared`: the `no_std` core of nvcim.
//!
//! Every number the hardware model produces comes from this crate, on the host and on the
//! Cortex-M firmware alike:
//! - [`quant`]: M-bit sign-magnitude quantization against `max|W|` (eq. 2);
//! - [`slice`]: magnitudes on M/N devices of N bits, differential pairs (eq. 3);
//! - [`variation`]: Gaussian device variation in the `range` or `level` convention, state-dependent
//!   profiles, stuck-at faults, and the closed-form effective weight noise (eqs. 4-5);
//! - [`rng`]: the xoshiro128++ PRNG with streams keyed by (seed, run, layer) and a ziggurat
//!   Gaussian.
//!
//! It is not a training or inference framework: Burn types never enter it, and it allocates
//! nothing.
//!
//! ```
//! use nvcim_shared::{quant::{quantize, QuantConfig}, rng::stream, variation::VariationConfig};
//! let var = VariationConfig::paper(0.4)?; // M = 8, N = 2, sigma in the `range` convention
//! let q = quantize(-0.25, 1.0, QuantConfig::DEFAULT)?;
//! let read = var.sample(q, &mut stream(42, 0, 0)).read_weight(1.0, var.quant());
//! assert!((read + 0.25).abs() < 2.0); // -0.25 plus noise of std 0.311
//! # Ok::<(), nvcim_shared::Error>(())
//! ```

#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(any(feature = "alloc", test))]
extern crate alloc;

pub mod crc;
pub mod error;
pub mod exec;
pub mod format;
pub mod quant;
pub mod rng;
pub mod slice;
pub mod tile;
pub mod variation;

pub use error::{Error, Result};
