//! One module per CLI verb, each with `pub fn run(args) -> anyhow::Result<()>`.

pub mod alpha_search;
pub mod import;
pub mod train;
pub mod variation;
