//! `nvcim`: the host side of nvcim — the command-line tool and its library.
//!
//! The binary (`nvcim`) only parses arguments and dispatches to [`commands`]; every verb is a
//! module there with a `run` function. The hardware model itself lives in `nvcim-shared`;
//! [`data`] reads datasets, [`model`] holds the Burn networks and the training noise, and
//! [`training`] the training loop. [`convert`] turns a checkpoint into the Burn-free [`ir`] network
//! and the integer engine's model description (`nvcim eval`, `pack`, `export`).
//!
//! Monte Carlo robustness evaluation (Algorithm 2): [`mc`] (the driver, generic over
//! [`mc::NoisyClassifier`] engines, and a dense float engine), [`stats`] (mean, std, Student-t
//! 95% interval), [`results`] (`eval.json`, CSVs, plots via [`plot`]), [`evaluation`] (the
//! engine-independent `nvcim eval` pipeline) and [`sweep`] (experiment plans for `nvcim sweep`).

pub mod cli;
pub mod commands;
pub mod convert;
pub mod data;
pub mod evaluation;
pub mod firmware;
pub mod ir;
pub mod kernel;
pub mod layerwise;
pub mod layerwise_f32;
pub mod mc;
pub mod model;
pub mod onnx;
pub mod options;
pub mod plot;
pub mod results;
pub mod stats;
pub mod sweep;
pub mod training;
