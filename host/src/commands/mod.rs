//! One module per CLI verb, each with `pub fn run(args) -> anyhow::Result<()>`.

pub mod alpha_search;
pub mod check_onnx;
pub mod eval;
pub mod export;
pub mod firmware;
pub mod import;
pub mod pack;
pub mod report;
pub mod sweep;
pub mod train;
pub mod variation;
