//! One module per CLI verb, each with `pub fn run(args) -> anyhow::Result<()>`.

pub mod firmware;
pub mod report;
pub mod sweep;
pub mod variation;
