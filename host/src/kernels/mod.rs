//! The host's CPU kernels: the loops that training and the inference engines spend their time
//! in, with one ISA type that chooses their instruction set. Nothing here imports the folders
//! above it (`training/`, `model/`, `engine/`); they import from here.
//!
//! **Instruction sets.** The workspace is built for generic x86-64; [`Isa::detect`] finds the
//! CPU's tier once per process — `Avx512Vnni`, `Avx512`, `Avx2` or `Portable` (every path but
//! `Portable` needs `target_arch = "x86_64"`) — and each kernel takes the best path it has at or
//! below that tier ([`Isa`]'s table). Tests run every tier in [`Isa::available`].
//!
//! **Dispatch.** A kernel takes the [`Isa`] as an argument (or, for the integer dot products,
//! asks [`Isa::detect`]) and matches on it once per call: an `unsafe` call of a
//! `#[target_feature]` function for the tiers that have one (the `SAFETY` line names the
//! features the tier guarantees), portable Rust otherwise. Two ways to write one:
//! - hand-written intrinsics per ISA, in an `avx512` / `avx2` module beside the portable loop
//!   ([`gemm`], [`dot`]);
//! - `per_isa!` (in `lanes.rs`): one body generic over a `Lanes` vector (an AVX-512 or AVX2
//!   register, or one `f32`), compiled once per ISA and dispatched on the [`Isa`]; the copies
//!   give the same bits ([`bn`], [`pool`], parts of [`conv`]).
//!
//! **Layout.**
//! - [`isa`](Isa): the ISA type and the CPU detection;
//! - `lanes.rs`: the `Lanes` vector trait and `per_isa!`;
//! - [`dot`]: the integer engine's tile-column `i16` dot products (AVX-512 VNNI, AVX2, `shared`'s
//!   portable `Plain`), bit-identical on every path;
//! - [`gemm`]: the `f32` register-blocked matrix-product micro-kernels of the float engine and the
//!   training convolutions;
//! - [`conv`], [`bn`], [`pool`]: training's convolution (im2col and Winograd), batch
//!   normalization and 2x2 max pooling, forward and backward;
//! - [`backend`]: the Burn backend extension that routes a model's convolutions, batch norms
//!   and max pools to [`conv`], [`bn`] and [`pool`].
//!
//! **Adding a kernel.** Put it in a file here (or in the one of its kind), take an `isa: Isa`
//! argument, and write it with `per_isa!` when a generic body does, or as per-ISA functions
//! matched on the [`Isa`] when it needs intrinsics; test it against a plain reference on every
//! tier of [`Isa::available`]. A new instruction set is a new [`Isa`] tier, detected in
//! [`Isa::detect`], with a method that the kernels that use it ask.

pub mod act;
pub mod backend;
pub mod bn;
pub mod conv;
pub mod dot;
pub mod gemm;
mod isa;
mod lanes;
pub mod pool;
pub mod profile;

pub use isa::Isa;

/// `len` zeros, written by rayon's threads. `vec![0.0; len]` writes them on the calling thread:
/// with freed memory kept in the process (`training::keep_freed_memory`) every output of the
/// training step was a memset on the step's one thread while the other cores waited (a quarter
/// of that thread's time at width 0.25). Same values, so the same results.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    use rayon::iter::ParallelExtend;
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len));
    v
}

/// `len` values written by `fill` (a kernel's `_uninit` entry point): no zeroing pass before.
///
/// # Safety
/// `fill` must write every value of the slice it gets.
pub(crate) unsafe fn written(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialized the first `len` values (the caller's promise).
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    /// `zeros` has the length asked for and every value `+0.0`, also when the allocator hands
    /// back memory that held other values (the kernels that add into their output rely on it).
    #[test]
    fn zeros_are_zeros() {
        for len in [
            0usize,
            1,
            15,
            (1 << 14) - 1,
            1 << 14,
            (1 << 14) + 1,
            100_003,
        ] {
            drop(vec![f32::NAN; len]);
            let z = super::zeros(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|v| v.to_bits() == 0), "len {len}");
        }
    }
}
