//! One module per CLI verb, each with `pub fn run(args) -> anyhow::Result<()>`.

pub mod check_onnx;
pub mod variation;
