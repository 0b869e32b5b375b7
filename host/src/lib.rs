//! `nvcim`: the host side of nvcim — the command-line tool and its library.
//!
//! Data flows one way; each stage is a folder:
//!
//! ```text
//!  data/          training/ + model/        ir/                      eval/ + engine/
//!  IDX, CIFAR ──► Burn nets, NFT, noise ──► Burn-free network ──┬──► Monte Carlo accuracy
//!  splits         checkpoint (.bpk +        (ir::convert)       │    (eval.json)
//!                 config.json)                                  ├──► onnx/
//!                                                               │    ONNX export, checks
//!                                                               └──► pack/ ──► .cimb ──► firmware/
//!                                                                    calibrated       QEMU or
//!                                                                    integer model    simulated tiles
//!
//!  report/ (the paper's tables from many eval.json) and sweep/ (plans of train + eval cells,
//!  local or Slurm) sit on top; commands/ holds one thin module per CLI verb. kernels/ (the CPU
//!  loops of training and of the engines) sits below them all.
//! ```
//!
//! - [`data`]: datasets (IDX, CIFAR binaries), splits, batches.
//! - [`kernels`]: the CPU kernels of training and of the engines (integer dot products, `f32`
//!   gemm, convolution, batch norm, max pool, the Burn backend extension that runs them) and the
//!   one ISA type, [`kernels::Isa`], that picks their AVX-512 / AVX2 / portable paths; it imports
//!   none of the folders above it.
//! - [`model`]: the Burn networks (VGG-8, ResNet-18, exits) and the training noise;
//!   [`training`]: the training loop, methods, checkpoints. `model/` and `ir/` import nothing
//!   from `training/`.
//! - [`ir`]: the Burn-free [`ir::Network`] a checkpoint converts to ([`ir::convert`]): the hub
//!   that evaluation, export and packing read.
//! - [`engine`]: the inference engines (float, integer, ONNX) behind one trait,
//!   [`engine::NoisyClassifier`]; [`eval`]: Monte Carlo evaluation over any engine (driver,
//!   statistics, result files).
//! - [`onnx`]: export to ONNX and the tract / ONNX Runtime runners.
//! - [`pack`]: the checkpoint as the integer engine's packed model (activation calibration);
//!   [`firmware`]: running it on the Cortex-M4F firmware in QEMU or in process.
//! - [`report`]: the paper's tables; [`sweep`]: experiment plans, local and Slurm.
//! - [`commands`]: one module per CLI verb, each a thin shell (parse, call the library, print);
//!   [`cli`] dispatches. The hardware model itself lives in `nvcim-shared`.
//!
//! The library takes typed values; flags are parsed once, in [`commands`]. A Monte Carlo
//! evaluation of a network under device variation, from Rust:
//!
//! ```
//! use nvcim::data::Batch;
//! use nvcim::engine::float::{FloatData, FloatEngine};
//! use nvcim::eval::{EvalPlan, ModelInfo, compute_report};
//! use nvcim::ir::{Network, RandomArch};
//! use nvcim_shared::{quant::ScaleMode, variation::VariationConfig};
//!
//! // A random-weight VGG-8; `nvcim::onnx::import::import` gives the same for any ONNX CNN.
//! let net = Network::vgg8(&RandomArch::new(1, 0.0625))?;
//! let engine = FloatEngine::new(net, ScaleMode::PerLayer)?;
//! let batch = Batch { images: vec![0.5; 4 * 32 * 32], labels: vec![0, 1, 2, 3], shape: [4, 1, 32, 32] };
//! let plan = EvalPlan::new(vec![0.2, 0.4], 3, 7, VariationConfig::paper(0.0)?)?;
//! let report = compute_report(&plan, &ModelInfo::default(), &engine, &FloatData::new(&[batch]))?;
//! assert_eq!(report.results.len(), 2); // one summary per sigma, 3 runs each
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod cli;
pub mod commands;
pub mod data;
pub mod engine;
pub mod eval;
pub mod firmware;
pub mod fsx;
pub mod ir;
pub mod kernels;
pub mod model;
pub mod onnx;
pub mod options;
pub mod pack;
pub mod plot;
pub mod report;
pub mod sweep;
pub mod training;

/// Serializes the unit tests that seed or draw from Burn's device RNG: Flex keeps one global
/// generator, so tests drawing from it in parallel would change each other's numbers.
#[cfg(test)]
pub(crate) fn burn_rng_guard() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
