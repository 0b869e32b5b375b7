//! One layer's noisy weights on several threads: [`VariationConfig::perturb_f32`]'s values and
//! final generator state, bit for bit, for the callers that perturb one large layer at a time
//! (the Python `nvcim.perturb`). The Monte Carlo engines already run one instance per thread
//! and keep the one-thread function.
//!
//! A layer's weights read one stream in order, so the work cannot simply be cut in pieces:
//! where a piece starts in the stream depends on how many draws the samples before it took
//! (a sample that misses the ziggurat's fast path takes more). Without faults every weight
//! takes exactly `M/N` samples, so thread `j` starts from a copy of the generator, reads past
//! the samples of the weights before its piece ([`DrawsAhead::skip_normals`], the fast path's
//! test alone, which still makes every draw: 0.77 of a sample's cost) and perturbs its piece
//! from there; the last thread's generator is where the whole layer leaves it. The pieces shrink from the first to
//! the last so that all threads finish together (`bounds`). With faults the draws per weight
//! depend on the weight, and the function runs on one thread.
//!
//! ```
//! use nvcim::engine::perturb;
//! use nvcim_shared::{rng::stream, variation::VariationConfig};
//! let cfg = VariationConfig::paper(0.4).unwrap();
//! let w: Vec<f32> = (0..50_000).map(|i| (i as f32 * 0.37).sin()).collect();
//! let (mut a, mut b) = (vec![0.0; w.len()], vec![0.0; w.len()]);
//! let (mut ra, mut rb) = (stream(1, 2, 3), stream(1, 2, 3));
//! perturb::perturb_f32(&cfg, &w, 1.0, &mut ra, &mut a, 2).unwrap();
//! cfg.perturb_f32(&w, 1.0, &mut rb, &mut b).unwrap();
//! assert_eq!(a, b);
//! assert_eq!(ra, rb);
//! ```
//!
//! [`DrawsAhead::skip_normals`]: nvcim_shared::rng::DrawsAhead::skip_normals

use nvcim_shared::{error::Result, rng::Xoshiro128PlusPlus, variation::VariationConfig};

/// Below this many weights a layer runs on one thread (a thread's start costs more than it
/// saves).
const MIN_PER_THREAD: usize = 1 << 16;

/// The cost of reading past a sample relative to drawing and combining it, measured on the
/// AMD EPYC of the development machine (`skip_normals` vs `perturb_f32` per sample,
/// 2026-12-06); it only balances the pieces, the results do not depend on it.
const SKIP_COST: f64 = 0.77;

/// `cfg.perturb_f32(weights, scale, rng, out)` on up to `threads` threads, with the same values
/// and final state of `rng` (module docs).
pub fn perturb_f32(
    cfg: &VariationConfig,
    weights: &[f32],
    scale: f32,
    rng: &mut Xoshiro128PlusPlus,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let threads = threads.min(weights.len() / MIN_PER_THREAD).max(1);
    if threads == 1 || cfg.faults().any() || out.len() != weights.len() {
        return cfg.perturb_f32(weights, scale, rng, out);
    }
    // The one-thread function's checks, once and in its order, so that errors are its own.
    nvcim_shared::quant::check_scale(scale)?;
    nvcim_shared::quant::check_finite(weights)?;
    let slices = cfg.quant().slices();
    let cuts = bounds(weights.len(), threads);
    let start = rng.clone();
    let mut last = None;
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::with_capacity(threads);
        let mut rest = &mut *out;
        for (j, piece) in cuts.windows(2).enumerate() {
            let (lo, hi) = (piece[0], piece[1]);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(hi - lo);
            rest = tail;
            let mut g = start.clone();
            let w = &weights[lo..hi];
            let is_last = j + 1 == threads;
            handles.push(s.spawn(move || -> Result<Option<Xoshiro128PlusPlus>> {
                g.ahead().skip_normals(lo * slices);
                cfg.perturb_f32(w, scale, &mut g, mine)?;
                Ok(is_last.then_some(g))
            }));
        }
        for h in handles {
            if let Some(g) = h.join().expect("a perturbation thread panicked")? {
                last = Some(g);
            }
        }
        Ok(())
    })?;
    *rng = last.expect("the last piece returns its generator");
    Ok(())
}

/// `threads + 1` cut points `0 = b_0 < ... < b_k = n` such that every thread's time (skip
/// `b_j` samples' worth, then perturb `b_{j+1} - b_j` weights) is the same:
/// `b_{j+1} = a b_j + t` with `a = 1 - SKIP_COST`, so `b_k = t (1 - a^k) / (1 - a) = n`.
fn bounds(n: usize, threads: usize) -> Vec<usize> {
    let a = 1.0 - SKIP_COST;
    let t = n as f64 * (1.0 - a) / (1.0 - a.powi(threads as i32));
    let mut cuts = vec![0usize; threads + 1];
    let mut b = 0.0f64;
    for c in cuts.iter_mut().skip(1) {
        b = a * b + t;
        *c = (b.round() as usize).min(n);
    }
    cuts[threads] = n;
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvcim_shared::{
        quant::{QuantConfig, layer_scale},
        rng::stream,
        variation::{Faults, Profile, SigmaUnit},
    };

    /// Values and the generator's final state equal the one-thread function's, for 1 to 5
    /// threads, on layers whose pieces cross blocks of draws, with signed zeros, under the
    /// uniform and a non-uniform profile; faults fall back to one thread with the same result.
    #[test]
    fn threads_give_the_one_thread_bits_and_state() {
        let n = 5 * MIN_PER_THREAD + 12_345;
        let w: Vec<f32> = (0..n)
            .map(|i| match i % 97 {
                0 => 0.0,
                1 => -0.0,
                _ => ((i as f32) * 0.618).sin() * 0.05,
            })
            .collect();
        let scale = layer_scale(&w).unwrap();
        let q = QuantConfig::DEFAULT;
        let (range, none) = (SigmaUnit::Range, Faults::NONE);
        let configs = [
            VariationConfig::paper(0.4).unwrap(),
            VariationConfig::new(q, 0.3, range, Profile::Fefet2, none).unwrap(),
            VariationConfig::new(
                q,
                0.2,
                range,
                Profile::Uniform,
                Faults::new(0.01, 0.0).unwrap(),
            )
            .unwrap(),
        ];
        for cfg in &configs {
            let mut expect = vec![0.0f32; n];
            let mut re = stream(3, 1, 4);
            cfg.perturb_f32(&w, scale, &mut re, &mut expect).unwrap();
            let expect: Vec<u32> = expect.iter().map(|x| x.to_bits()).collect();
            for threads in 1..=5 {
                let mut got = vec![0.0f32; n];
                let mut rg = stream(3, 1, 4);
                perturb_f32(cfg, &w, scale, &mut rg, &mut got, threads).unwrap();
                let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                assert!(
                    got == expect,
                    "{threads} threads, {cfg:?}: the weights differ"
                );
                assert_eq!(
                    rg, re,
                    "{threads} threads, {cfg:?}: the final state differs"
                );
            }
        }
    }

    /// A non-finite weight is the one-thread function's error, whichever piece it is in; an
    /// all-zero layer with a valid scale is no error, as on one thread.
    #[test]
    fn errors_are_the_one_thread_errors() {
        let cfg0 = VariationConfig::paper(0.4).unwrap();
        let zeros = vec![0.0f32; 3 * MIN_PER_THREAD];
        let (mut a, mut b) = (vec![1.0f32; zeros.len()], vec![1.0f32; zeros.len()]);
        cfg0.perturb_f32(&zeros, 0.5, &mut stream(2, 0, 0), &mut a)
            .unwrap();
        perturb_f32(&cfg0, &zeros, 0.5, &mut stream(2, 0, 0), &mut b, 3).unwrap();
        assert_eq!(a, b);
        let cfg = VariationConfig::paper(0.4).unwrap();
        let mut w = vec![0.01f32; 3 * MIN_PER_THREAD];
        w[2 * MIN_PER_THREAD + 5] = f32::NAN;
        let mut out = vec![0.0f32; w.len()];
        let one = cfg
            .perturb_f32(&w, 1.0, &mut stream(1, 0, 0), &mut out)
            .unwrap_err();
        let many = perturb_f32(&cfg, &w, 1.0, &mut stream(1, 0, 0), &mut out, 3).unwrap_err();
        assert_eq!(one, many);
    }

    #[test]
    fn bounds_cover_the_layer_and_shrink() {
        for (n, k) in [(1_000_000usize, 2usize), (999_999, 3), (70_000, 4)] {
            let b = bounds(n, k);
            assert_eq!((b.len(), b[0], b[k]), (k + 1, 0, n));
            let sizes: Vec<usize> = b.windows(2).map(|p| p[1] - p[0]).collect();
            assert!(sizes.windows(2).all(|s| s[0] >= s[1]), "{sizes:?}");
            assert!(sizes.iter().all(|&s| s > 0), "{sizes:?}");
        }
    }
}
