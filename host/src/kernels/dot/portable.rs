//! The portable path: `shared`'s [`Plain`] kernel, which every SIMD path must equal bit for bit.

pub use nvcim_shared::tile::Plain;
