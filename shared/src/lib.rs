//! `nvcim-shared`: the `no_std` core of nvcim.
//!
//! Every number the hardware model produces comes from this crate, on the host and on the
//! Cortex-M firmware alike:
//! - [`quant`]: M-bit sign-magnitude quantization against `max|W|` (eq. 2);
//! - [`slice`]: magnitudes on M/N devices of N bits, differential pairs (eq. 3);
//! - [`variation`]: Gaussian device variation in the `range` or `level` convention, state-dependent
//!   profiles, stuck-at faults, and the closed-form effective weight noise (eqs. 4-5);
//! - [`rng`]: the xoshiro128++ PRNG with streams keyed by (seed, run, layer) and a ziggurat
//!   Gaussian;
//! - [`tile`]: crossbar tiles programmed in fixed point, the collapsed (ideal-ADC) and per-slice
//!   (ADC) matrix-vector products and their overflow bounds;
//! - [`format`]: the versioned, CRC-checked packed model that the host writes
//!   (`format::build`, feature `alloc`) and the firmware parses in place;
//! - [`exec`]: the integer executor (conv with rectangular kernels, per-axis strides, asymmetric
//!   padding and groups, linear, ReLU, clip, padded max/avg pools, global-avg pool, residual add,
//!   channel concat, flatten), with caller-provided state and scratch;
//! - [`crc`]: CRC-32 (IEEE).
//!
//! It is not a training framework: Burn types never enter it, and without the `alloc` feature it
//! allocates nothing (the executor never does).
//!
//! ```
//! use nvcim_shared::{quant::{quantize, QuantConfig}, rng::stream, variation::VariationConfig};
//! let var = VariationConfig::paper(0.4)?; // M = 8, N = 2, sigma in the `range` convention
//! let q = quantize(-0.25, 1.0, QuantConfig::DEFAULT)?;
//! let read = var.sample(q, &mut stream(42, 0, 0)).read_weight(1.0, var.quant());
//! assert!((read + 0.25).abs() < 2.0); // -0.25 plus noise of std 0.311
//! # Ok::<(), nvcim_shared::Error>(())
//! ```
//!
//! # The integer CiM engine
//!
//! The host packs a float model once; the firmware (or the host's bit-exact path) parses the
//! blob in place, programs the tiles for a Monte Carlo run, and infers images:
//!
//! ```
//! use nvcim_shared::exec::{infer, program, Scratch};
//! use nvcim_shared::format::{Model, build::{pack, InputSpec, Layer, ModelDesc, Node, PackConfig, TestBatch}};
//! use nvcim_shared::tile::Path;
//! use nvcim_shared::variation::VariationConfig;
//!
//! // Host side (feature `alloc`): a 1x2x2 image -> linear 4 -> 2 classes: "left or right column
//! // brighter". `act_max` is the calibrated largest |logit| (`format::build::calibrate`).
//! let w = [1.0, -1.0, 1.0, -1.0, /* class 1: */ -1.0, 1.0, -1.0, 1.0];
//! let nodes = [
//!     Node::new(Layer::Flatten),
//!     Node { act_max: 4.0, ..Node::new(Layer::Linear { weight: &w, bias: None, out_features: 2 }) },
//! ];
//! let desc = ModelDesc {
//!     input: InputSpec { channels: 1, height: 2, width: 2, mean: &[0.0], std: &[1.0] },
//!     classes: 2,
//!     nodes: &nodes,
//! };
//! let cfg = PackConfig::new(VariationConfig::paper(0.1)?);
//! let images = [200, 10, 255, 0, /* label 1: */ 5, 180, 30, 250];
//! let blob = pack(&desc, &cfg, Some(TestBatch { images: &images, labels: &[0, 1] }))?;
//!
//! // Device side: no allocation; buffers sized from the header (static arrays on a board).
//! let model = Model::parse(&blob)?;
//! let mut state = vec![0i16; model.state_len(Path::Collapsed)];
//! program(&model, &model.variation(), /* seed */ 42, /* run */ 0, Path::Collapsed, &mut state)?;
//! let sizes = model.scratch();
//! let (mut act, mut patch) = (vec![0u8; sizes.act_bytes], vec![0i16; sizes.patch]);
//! let mut logits = vec![0i32; sizes.logits];
//! for i in 0..model.test_len() {
//!     let (image, label) = model.test_image(i).expect("i < test_len");
//!     let mut scratch = Scratch { act: &mut act, patch: &mut patch };
//!     let class = infer(&model, Path::Collapsed, &state, image, &mut scratch, &mut logits)?;
//!     assert_eq!(class, usize::from(label));
//! }
//! # Ok::<(), nvcim_shared::Error>(())
//! ```
//!
//! **Design decisions** (details in each module):
//! - *Programmed state* ([`tile`]): each device's `g_j + dg_j` from
//!   [`variation::Readout::devices_fixed`] with [`tile::FRAC_BITS`] = 4 fractional bits (rounding
//!   error at most 2^-5 level per device, 0.36 % of the noise variance at sigma = 0.1 `range`),
//!   saturated so that the collapsed weight `sum_j 2^(jN) d_j` fits an `i16`: 2 bytes per weight
//!   on the collapsed path, `2 M/N` bytes on the per-slice path. With an ideal ADC both paths give
//!   identical bits.
//! - *Programming run r*: weight layer `l` draws from `rng::stream(seed, r, l)`, one
//!   `VariationConfig::sample` per weight in PyTorch's canonical order, each weight quantized
//!   against its layer's `max|W|` (or the model's). [`exec::program`] and [`exec::infer`] are
//!   separate calls.
//! - *Activations*: the raw `u8` pixels go through a per-channel 256-entry table into `i8`
//!   codes (normalization folded in at pack time); after a ReLU activations are `u8`, otherwise
//!   `i8`, each tensor with its own calibrated scale; logits are `i32`. Requantization is an
//!   integer multiplier, shift and bias per output channel; BatchNorm folds there, never into the
//!   conductances.
//! - *Accumulators*: `i32` within a tile of at most 256 rows, `i64` across tiles; bounds in
//!   [`tile`] and [`exec`], tested with all-max inputs and weights.
//! - *Determinism*: only integer arithmetic in [`exec::infer`]; programming uses the crate's
//!   `f32` sampling (IEEE, no fused multiply-add), so x86-64 and Cortex-M4F agree bit for bit.
//! - *Float reference* (`format::build::forward` with `format::build::noisy_weights`): the
//!   same noisy network in `f64` from the same draws. With activation scales calibrated on noisy
//!   runs, the integer logits stay within 3 % of the largest |logit| of the reference that reads
//!   the devices in the tile's fixed point, and within 8 % of the one with exact devices (the
//!   fixed-point rounding is up to `sum_j 2^(jN) / 32` LSB per weight), on the test nets.

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
mod version;

pub use error::{Error, Result};
