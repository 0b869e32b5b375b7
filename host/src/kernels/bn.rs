//! Training-mode batch normalization over `f32` NCHW tensors, fused: the batch statistics, the
//! normalized output, and the three gradients, each in one or two passes over the activations
//! (Burn's default composes them from reductions over a transposed copy).
//!
//! Statistics are summed in `f64` per channel (channels in parallel, each in image order, so the
//! bits do not depend on the thread count); the elementwise passes run over `(image, channel)`
//! planes in parallel.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Isa;
use super::lanes::per_isa;

per_isa! {
    /// `y = x s + b` (the loop compiled for the CPU's vectors; the same bits), written into
    /// uninitialized memory: the output needs no zeroing pass first.
    fn scale_shift<V>(y: &mut [MaybeUninit<f32>], x: &[f32], s: f32, b: f32) {
        for (d, &v) in y.iter_mut().zip(x) {
            d.write(v * s + b);
        }
    }
}

per_isa! {
    /// `dx = k (g - mb - (x - mu) is mg)`, `c = [k, mb, mu, is, mg]` (the loop compiled for the
    /// CPU's vectors; the same bits), written into uninitialized memory.
    fn input_grad<V>(dx: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32], c: [f32; 5]) {
        let [k, mb, mu, is, mg] = c;
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(g) {
            d.write(k * (g - mb - (v - mu) * is * mg));
        }
    }
}

/// A vector of `len` values, each written by `fill` over `plane`-long pieces in parallel (piece
/// `q` is plane `q` of the `[n][c]` planes).
///
/// # Safety
/// `len` is a multiple of `plane` (zero when `plane` is), and `fill` writes every value of each
/// piece it gets.
unsafe fn planes_out(
    len: usize,
    plane: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: the `plane`-long pieces cover the `len` values, and `fill` writes every value of
    // each (the caller's promises).
    unsafe {
        super::written(len, |out| {
            if plane > 0 {
                out.par_chunks_mut(plane)
                    .enumerate()
                    .for_each(|(q, p)| fill(q, p));
            }
        })
    }
}

/// `f64` lanes of a plane's partial sums: value `j` of a plane goes to lane `j % L`, the lanes are
/// added in a fixed tree, then the planes in image order. The order depends on nothing but the
/// plane size (not on the thread count or the CPU). With AVX-512 the lane loops are written out
/// with intrinsics (`wide`), 8 lanes per register; elsewhere the compiler vectorizes them.
const L: usize = 16;

/// `sum f(v)` over one plane in [`L`] lanes.
#[inline(always)]
fn plane_sum(p: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    plane_sum_from(p, chunk_lanes(p, &f), f)
}

/// [`plane_sum`]'s lanes over the plane's whole chunks of [`L`] values.
#[inline(always)]
fn chunk_lanes(p: &[f32], f: impl Fn(f32) -> f64) -> [f64; L] {
    let mut a = [0f64; L];
    for ch in p.chunks_exact(L) {
        for (a, &v) in a.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    a
}

/// [`plane_sum`] from its chunks' lanes `a`: their tree, then the values past the last chunk.
#[inline(always)]
fn plane_sum_from(p: &[f32], a: [f64; L], f: impl Fn(f32) -> f64) -> f64 {
    let rest = p.chunks_exact(L).remainder();
    rest.iter().fold(tree_sum(a), |s, &v| s + f(v))
}

/// The lane loops of [`channel_sum`] and [`grad_sums`] on AVX-512 registers, each lane's
/// operations the scalar loop's, in its order (so the same bits): the compiler had vectorized
/// them two `f64` lanes at a time.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::{
        __m512d, _mm256_loadu_ps, _mm512_add_pd, _mm512_cvtps_pd, _mm512_mul_pd, _mm512_set1_pd,
        _mm512_setzero_pd, _mm512_storeu_pd, _mm512_sub_pd,
    };

    use super::L;

    /// Values `at..at + 16` of `p` as two `f64` vectors (lanes 0-7, 8-15).
    ///
    /// # Safety
    /// AVX-512 F; `at + 16 <= p.len()`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: &[f32], at: usize) -> [__m512d; 2] {
        debug_assert!(at + L <= p.len());
        // SAFETY: values `at..at + 16` are in `p` (the caller's promise).
        unsafe {
            [
                _mm512_cvtps_pd(_mm256_loadu_ps(p.as_ptr().add(at))),
                _mm512_cvtps_pd(_mm256_loadu_ps(p.as_ptr().add(at + 8))),
            ]
        }
    }

    fn lanes(a: [__m512d; 2]) -> [f64; L] {
        let mut out = [0f64; L];
        // SAFETY: `out` holds 16 values; two stores of 8.
        unsafe {
            _mm512_storeu_pd(out.as_mut_ptr(), a[0]);
            _mm512_storeu_pd(out.as_mut_ptr().add(8), a[1]);
        }
        out
    }

    /// `chunk_lanes(p, f64::from)`, or with `mu`, `chunk_lanes(p, |v| (v - mu)^2)`.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum(p: &[f32], mu: Option<f64>) -> [f64; L] {
        let mut a = [_mm512_setzero_pd(); 2];
        let m = _mm512_set1_pd(mu.unwrap_or(0.0));
        let mut at = 0;
        while at + L <= p.len() {
            // SAFETY: `at + 16 <= p.len()`.
            let v = unsafe { load(p, at) };
            for (a, v) in a.iter_mut().zip(v) {
                *a = match mu {
                    None => _mm512_add_pd(*a, v),
                    Some(_) => {
                        let d = _mm512_sub_pd(v, m);
                        _mm512_add_pd(*a, _mm512_mul_pd(d, d))
                    }
                };
            }
            at += L;
        }
        lanes(a)
    }

    /// `(chunk_lanes(g, f64::from), chunk_lanes over (g, v) of g (v - mu) is)`.
    ///
    /// # Safety
    /// AVX-512 F; `g.len() == v.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn grad(g: &[f32], v: &[f32], mu: f64, is: f64) -> ([f64; L], [f64; L]) {
        assert_eq!(g.len(), v.len());
        let (mut sd, mut sdx) = ([_mm512_setzero_pd(); 2], [_mm512_setzero_pd(); 2]);
        let (m, k) = (_mm512_set1_pd(mu), _mm512_set1_pd(is));
        let mut at = 0;
        while at + L <= g.len() {
            // SAFETY: `at + 16 <= g.len() = v.len()`.
            let (gv, vv) = unsafe { (load(g, at), load(v, at)) };
            for h in 0..2 {
                sd[h] = _mm512_add_pd(sd[h], gv[h]);
                let t = _mm512_mul_pd(_mm512_mul_pd(gv[h], _mm512_sub_pd(vv[h], m)), k);
                sdx[h] = _mm512_add_pd(sdx[h], t);
            }
            at += L;
        }
        (lanes(sd), lanes(sdx))
    }
}

/// The lanes of [`plane_sum`] added in their fixed tree (halves, then quarters, ...).
#[inline(always)]
fn tree_sum(mut a: [f64; L]) -> f64 {
    let mut w = L;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            a[j] += a[j + w];
        }
    }
    a[0]
}

per_isa! {
    /// Channel `ch` of `x` (`n x c` planes of `plane` values): `sum x` (`mean` `None`) or
    /// `sum (x - mean)^2`, in `f64`.
    fn channel_sum<V>(x: &[f32], shape: (usize, usize, usize), ch: usize, mean: Option<f64>) -> f64 {
        let (n, c, plane) = shape;
        let planes = (0..n).map(|i| &x[(i * c + ch) * plane..][..plane]);
        let f = |v: f32| match mean {
            None => f64::from(v),
            Some(mu) => (f64::from(v) - mu).powi(2),
        };
        planes
            .map(|p| {
                // `V::N == 16`: this body is the AVX-512 one.
                #[cfg(target_arch = "x86_64")]
                if V::N == 16 {
                    // SAFETY: AVX-512 F (this body's features).
                    return plane_sum_from(p, unsafe { wide::sum(p, mean) }, f);
                }
                plane_sum(p, f)
            })
            .sum()
    }
}

per_isa! {
    /// Channel `ch`: `(sum dy, sum dy (x - mu) is)` in `f64`, `[mu, is] = k`.
    fn grad_sums<V>(x: &[f32], dy: &[f32], shape: (usize, usize, usize), ch: usize, k: [f64; 2]) -> (f64, f64) {
        let (n, c, plane) = shape;
        let [mu, is] = k;
        let (mut sd, mut sdx) = (0f64, 0f64);
        for i in 0..n {
            let at = (i * c + ch) * plane;
            let (g, v) = (&dy[at..at + plane], &x[at..at + plane]);
            let (gc, vc) = (g.chunks_exact(L), v.chunks_exact(L));
            let (gr, vr) = (gc.remainder(), vc.remainder());
            // `V::N == 16`: this body is the AVX-512 one; both lane sums in one pass.
            #[cfg(target_arch = "x86_64")]
            let lanes = (V::N == 16).then(|| {
                // SAFETY: AVX-512 F (this body's features); `g` and `v` are `plane` long.
                unsafe { wide::grad(g, v, mu, is) }
            });
            #[cfg(not(target_arch = "x86_64"))]
            let lanes = None;
            let (sd_lanes, a) = lanes.unwrap_or_else(|| {
                // `dy (x - mu) is` pairs up `g` and `v`: summed in the same lanes over their zip.
                let mut a = [0f64; L];
                for (gc, vc) in gc.zip(vc) {
                    for ((a, &g), &v) in a.iter_mut().zip(gc).zip(vc) {
                        *a += f64::from(g) * (f64::from(v) - mu) * is;
                    }
                }
                (chunk_lanes(g, f64::from), a)
            });
            sd += plane_sum_from(g, sd_lanes, f64::from);
            sdx += gr
                .iter()
                .zip(vr)
                .fold(tree_sum(a), |s, (&g, &v)| s + f64::from(g) * (f64::from(v) - mu) * is);
        }
        (sd, sdx)
    }
}

/// Per channel: the mean and the biased variance of `x` (`n x c` planes of `plane` values).
pub fn stats(x: &[f32], n: usize, c: usize, plane: usize) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), n * c * plane, "batch norm input length");
    let m = (n * plane).max(1) as f64;
    let isa = Isa::detect();
    let per: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = channel_sum(isa, x, (n, c, plane), ch, None) / m;
            let var = channel_sum(isa, x, (n, c, plane), ch, Some(mean)) / m;
            (mean as f32, var as f32)
        })
        .collect();
    per.into_iter().unzip()
}

fn inv_std(var: &[f32], epsilon: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (f64::from(v) + epsilon).sqrt()) as f32)
        .collect()
}

/// `y = (x - mean) / sqrt(var + epsilon) * gamma + beta` with the batch's statistics; returns
/// `(y, mean, var)`.
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    n: usize,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let (mean, var) = stats(x, n, c, plane);
    let inv = inv_std(&var, epsilon);
    let isa = Isa::detect();
    // SAFETY: `x.len() = n c plane` (checked by `stats`), and `scale_shift` writes one value
    // per value of its `plane`-long piece of `x`.
    let y = unsafe {
        planes_out(x.len(), plane, |q, yp| {
            let ch = q % c;
            let (s, b) = (
                inv[ch] * gamma[ch],
                beta[ch] - mean[ch] * inv[ch] * gamma[ch],
            );
            scale_shift(isa, yp, &x[q * plane..(q + 1) * plane], s, b);
        })
    };
    (y, mean, var)
}

/// The gradients of [`forward`] for the output gradient `dy`: `(dx, dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
    dy: &[f32],
    n: usize,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    assert!(
        x.len() == n * c * plane && dy.len() == x.len(),
        "batch norm gradient lengths"
    );
    let inv = inv_std(var, epsilon);
    // Per channel: sum dy and sum dy * xhat.
    let isa = Isa::detect();
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let k = [f64::from(mean[ch]), f64::from(inv[ch])];
            grad_sums(isa, x, dy, (n, c, plane), ch, k)
        })
        .collect();
    let m = (n * plane).max(1) as f32;
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    // SAFETY: `x.len() = n c plane` (asserted above), and `input_grad` writes one value per
    // value of its `plane`-long pieces of `x` and `dy`.
    let dx = unsafe {
        planes_out(x.len(), plane, |q, dp| {
            let ch = q % c;
            let (mu, is, k) = (mean[ch], inv[ch], gamma[ch] * inv[ch]);
            let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
            let at = q * plane..(q + 1) * plane;
            input_grad(isa, dp, &x[at.clone()], &dy[at], [k, mb, mu, is, mg]);
        })
    };
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward and gradients against plain `f64` formulas and central differences on a
    /// hand-sized tensor.
    #[test]
    fn forward_and_gradients_match_the_definition() {
        let (n, c, plane) = (3, 2, 5);
        let x: Vec<f32> = (0..n * c * plane)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let gamma = [1.5f32, -0.5];
        let beta = [0.25f32, 2.0];
        let dy: Vec<f32> = (0..x.len())
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let eps = 1e-5;
        let (y, mean, var) = forward(&x, &gamma, &beta, eps, n, plane);
        let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
            let (y, ..) = forward(x, gamma, beta, eps, n, plane);
            y.iter()
                .zip(&dy)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum()
        };
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| {
                    x[(i * c + ch) * plane..][..plane]
                        .iter()
                        .map(|&v| f64::from(v))
                })
                .collect();
            let mu = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|a| (a - mu).powi(2)).sum::<f64>() / vals.len() as f64;
            assert!(
                (f64::from(mean[ch]) - mu).abs() < 1e-6 && (f64::from(var[ch]) - v).abs() < 1e-6
            );
            let want =
                (vals[0] - mu) / (v + eps).sqrt() * f64::from(gamma[ch]) + f64::from(beta[ch]);
            assert!((f64::from(y[ch * plane]) - want).abs() < 1e-5);
        }
        let (dx, dgamma, dbeta) = backward(&x, &gamma, &mean, &var, eps, &dy, n, plane);
        let h = 1e-2f32;
        for j in [0, 7, 12, 29] {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[j] += h;
            b[j] -= h;
            let fd = (loss(&a, &gamma, &beta) - loss(&b, &gamma, &beta)) / f64::from(2.0 * h);
            assert!(
                (fd - f64::from(dx[j])).abs() < 2e-3,
                "dx[{j}] {} vs {fd}",
                dx[j]
            );
        }
        for ch in 0..c {
            let (mut a, mut b) = (gamma, gamma);
            a[ch] += h;
            b[ch] -= h;
            let fd = (loss(&x, &a, &beta) - loss(&x, &b, &beta)) / f64::from(2.0 * h);
            assert!((fd - f64::from(dgamma[ch])).abs() < 1e-3, "dgamma[{ch}]");
            let (mut a, mut b) = (beta, beta);
            a[ch] += h;
            b[ch] -= h;
            let fd = (loss(&x, &gamma, &a) - loss(&x, &gamma, &b)) / f64::from(2.0 * h);
            assert!((fd - f64::from(dbeta[ch])).abs() < 1e-3, "dbeta[{ch}]");
        }
    }

    /// `len` activations and output gradients, spread over a few units, deterministic.
    fn activations(len: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..len)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0)
            .collect();
        let dy = (0..len)
            .map(|i| ((i * 31 % 53) as f32 - 26.0) / 11.0)
            .collect();
        (x, dy)
    }

    /// Every path this CPU has gives the portable path's bits for the three sums (the AVX-512
    /// lane loops are written out with intrinsics), for plane sizes around and well past the
    /// lane count.
    #[test]
    fn lane_sums_are_the_same_bits_on_every_path() {
        for (n, c, plane) in [(3, 2, 7), (2, 3, 16), (4, 2, 37), (2, 2, 64), (3, 1, 1030)] {
            let (x, dy) = activations(n * c * plane);
            for ch in 0..c {
                let run = |isa| {
                    let mu = channel_sum(isa, &x, (n, c, plane), ch, None);
                    let var = channel_sum(isa, &x, (n, c, plane), ch, Some(mu / 3.0));
                    let (sd, sdx) = grad_sums(isa, &x, &dy, (n, c, plane), ch, [0.3, 1.7]);
                    [mu, var, sd, sdx].map(f64::to_bits)
                };
                let want = run(Isa::Portable);
                for isa in Isa::available() {
                    assert_eq!(
                        run(isa),
                        want,
                        "{isa:?} n {n} c {c} plane {plane} channel {ch}"
                    );
                }
            }
        }
    }

    /// The lane sums agree with plain sequential `f64` sums: the `f32` statistics and
    /// parameter gradients come out the same (the `f64` sums differ in their last bits at most),
    /// on every path this CPU has, for plane sizes around the lane count.
    #[test]
    fn lane_sums_give_the_sequential_results() {
        for (n, c, plane) in [(3, 1, 7), (2, 3, 16), (4, 2, 37), (2, 2, 64)] {
            let (x, dy) = activations(n * c * plane);
            let m = (n * plane) as f64;
            for ch in 0..c {
                let planes = || (0..n).map(|i| &x[(i * c + ch) * plane..][..plane]);
                let mu = planes()
                    .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>())
                    .sum::<f64>()
                    / m;
                let var = planes()
                    .map(|p| p.iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>())
                    .sum::<f64>()
                    / m;
                let is = f64::from(inv_std(&[var as f32], 1e-5)[0]);
                let (mut sd, mut sdx) = (0f64, 0f64);
                for i in 0..n {
                    let at = (i * c + ch) * plane;
                    for (&g, &v) in dy[at..at + plane].iter().zip(&x[at..at + plane]) {
                        sd += f64::from(g);
                        sdx += f64::from(g) * (f64::from(v) - f64::from(mu as f32)) * is;
                    }
                }
                for isa in Isa::available() {
                    let got_mu = channel_sum(isa, &x, (n, c, plane), ch, None) / m;
                    let got_var = channel_sum(isa, &x, (n, c, plane), ch, Some(got_mu)) / m;
                    let k = [f64::from(mu as f32), is];
                    let (got_sd, got_sdx) = grad_sums(isa, &x, &dy, (n, c, plane), ch, k);
                    let what = format!("{isa:?} n {n} c {c} plane {plane} channel {ch}");
                    assert_eq!(got_mu as f32, mu as f32, "mean, {what}");
                    assert_eq!(got_var as f32, var as f32, "var, {what}");
                    assert_eq!(got_sd as f32, sd as f32, "dbeta, {what}");
                    // `sum dy` in the one pass: the bits of `plane_sum` over each plane.
                    let lanes: f64 = (0..n)
                        .map(|i| plane_sum(&dy[(i * c + ch) * plane..][..plane], f64::from))
                        .sum();
                    assert_eq!(got_sd.to_bits(), lanes.to_bits(), "sum dy, {what}");
                    assert_eq!(got_sdx as f32, sdx as f32, "dgamma, {what}");
                    assert!((got_mu - mu).abs() <= 1e-14 * mu.abs().max(1.0), "{what}");
                }
            }
        }
    }
}
