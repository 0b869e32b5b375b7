//! The host's CPU kernels.

pub mod backend;
pub mod bn;
pub mod conv;
pub mod dot;
pub mod gemm;
mod lanes;
pub mod pool;
