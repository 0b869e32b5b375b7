//! Training-mode batch normalization over `f32` NCHW tensors, fused: the batch statistics, the
//! normalized output, and the three gradients, each in one or two passes over the activations
//! (Burn's default composes them from reductions over a transposed copy).
//!
//! Statistics are summed in `f64` per channel (channels in parallel, each in image order, so the
//! bits do not depend on the thread count); the elementwise passes run over `(image, channel)`
//! planes in parallel.

use rayon::prelude::*;

use super::lanes::per_isa;
use crate::engine::gemm::Isa;

per_isa! {
    /// `y = x s + b` (the loop compiled for the CPU's vectors; the same bits).
    fn scale_shift<V>(y: &mut [f32], x: &[f32], s: f32, b: f32) {
        for (d, &v) in y.iter_mut().zip(x) {
            *d = v * s + b;
        }
    }
}

per_isa! {
    /// `dx = k (g - mb - (x - mu) is mg)`, `c = [k, mb, mu, is, mg]` (the loop compiled for the
    /// CPU's vectors; the same bits).
    fn input_grad<V>(dx: &mut [f32], x: &[f32], g: &[f32], c: [f32; 5]) {
        let [k, mb, mu, is, mg] = c;
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(g) {
            *d = k * (g - mb - (v - mu) * is * mg);
        }
    }
}

/// Channels summed side by side: each channel's sum keeps its own order (the same bits), and
/// `CB` independent chains keep the adder busy instead of one waiting on each add.
const CB: usize = 8;

/// For channels `c0..c0 + k` (`k <= CB`) of `x` (`n x c` planes of `plane` values): per channel
/// `q`, the sum over images of the sum over the plane of `f(q, x)`, each sum folded in order
/// from `Iterator::sum`'s starting value, as `planes.map(|p| p.map(f).sum()).sum()` would.
#[inline(always)]
fn nested_sums(
    x: &[f32],
    (n, c, plane): (usize, usize, usize),
    (c0, k): (usize, usize),
    f: impl Fn(usize, f32) -> f64,
) -> [f64; CB] {
    let start = std::iter::empty::<f64>().sum::<f64>();
    let mut total = [start; CB];
    for i in 0..n {
        let rows: [&[f32]; CB] = std::array::from_fn(|q| {
            if q < k {
                &x[(i * c + c0 + q) * plane..][..plane]
            } else {
                &[]
            }
        });
        let mut part = [start; CB];
        for px in 0..plane {
            for q in 0..k {
                part[q] += f(q, rows[q][px]);
            }
        }
        for q in 0..k {
            total[q] += part[q];
        }
    }
    total
}

/// Per channel: the mean and the biased variance of `x` (`n x c` planes of `plane` values).
pub fn stats(x: &[f32], n: usize, c: usize, plane: usize) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), n * c * plane, "batch norm input length");
    let m = (n * plane).max(1) as f64;
    let per: Vec<(f32, f32)> = (0..c.div_ceil(CB))
        .into_par_iter()
        .flat_map_iter(|b| {
            let (c0, k) = (b * CB, CB.min(c - b * CB));
            let sums = nested_sums(x, (n, c, plane), (c0, k), |_, v| f64::from(v));
            let mean = sums.map(|s| s / m);
            let sq = nested_sums(x, (n, c, plane), (c0, k), |q, v| {
                (f64::from(v) - mean[q]).powi(2)
            });
            (0..k).map(move |q| (mean[q] as f32, (sq[q] / m) as f32))
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
    let mut y = vec![0f32; x.len()];
    if plane > 0 {
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(q, (yp, xp))| {
                let ch = q % c;
                let (s, b) = (
                    inv[ch] * gamma[ch],
                    beta[ch] - mean[ch] * inv[ch] * gamma[ch],
                );
                scale_shift(Isa::detect(), yp, xp, s, b);
            });
    }
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
    // Channels side by side as in `stats`, each channel's two sums in image and pixel order.
    let sums: Vec<(f64, f64)> = (0..c.div_ceil(CB))
        .into_par_iter()
        .flat_map_iter(|b| {
            let (c0, k) = (b * CB, CB.min(c - b * CB));
            let mu: [f64; CB] = std::array::from_fn(|q| f64::from(mean[(c0 + q).min(c - 1)]));
            let is: [f64; CB] = std::array::from_fn(|q| f64::from(inv[(c0 + q).min(c - 1)]));
            let (mut sd, mut sdx) = ([0f64; CB], [0f64; CB]);
            for i in 0..n {
                let at = |q: usize| (i * c + c0 + q) * plane;
                let rows: [(&[f32], &[f32]); CB] = std::array::from_fn(|q| {
                    if q < k {
                        (&dy[at(q)..at(q) + plane], &x[at(q)..at(q) + plane])
                    } else {
                        (&[][..], &[][..])
                    }
                });
                for px in 0..plane {
                    for q in 0..k {
                        let (g, v) = (f64::from(rows[q].0[px]), f64::from(rows[q].1[px]));
                        sd[q] += g;
                        sdx[q] += g * (v - mu[q]) * is[q];
                    }
                }
            }
            (0..k).map(move |q| (sd[q], sdx[q]))
        })
        .collect();
    let m = (n * plane).max(1) as f32;
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    let mut dx = vec![0f32; x.len()];
    if plane > 0 {
        dx.par_chunks_mut(plane)
            .zip(x.par_chunks(plane).zip(dy.par_chunks(plane)))
            .enumerate()
            .for_each(|(q, (dp, (xp, gp)))| {
                let ch = q % c;
                let (mu, is, k) = (mean[ch], inv[ch], gamma[ch] * inv[ch]);
                let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
                input_grad(Isa::detect(), dp, xp, gp, [k, mb, mu, is, mg]);
            });
    }
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

    /// The side-by-side sums give the bits of one channel at a time, summed as `Iterator::sum`
    /// does (the previous implementation, kept here as the reference), for channel counts
    /// around the block size.
    #[test]
    fn side_by_side_sums_are_the_sequential_bits() {
        for (n, c, plane) in [(3, 1, 7), (2, 8, 5), (4, 11, 9), (2, 19, 16)] {
            let x: Vec<f32> = (0..n * c * plane)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0)
                .collect();
            let dy: Vec<f32> = (0..x.len())
                .map(|i| ((i * 31 % 53) as f32 - 26.0) / 11.0)
                .collect();
            let (mean, var) = stats(&x, n, c, plane);
            let (_, dgamma, dbeta) = backward(&x, &vec![1.0; c], &mean, &var, 1e-5, &dy, n, plane);
            let inv = inv_std(&var, 1e-5);
            let m = (n * plane) as f64;
            for ch in 0..c {
                let planes = || (0..n).map(|i| &x[(i * c + ch) * plane..][..plane]);
                let mu = planes()
                    .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>())
                    .sum::<f64>()
                    / m;
                let v = planes()
                    .map(|p| p.iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>())
                    .sum::<f64>()
                    / m;
                assert_eq!(
                    mean[ch].to_bits(),
                    (mu as f32).to_bits(),
                    "mean {ch} of {c}"
                );
                assert_eq!(var[ch].to_bits(), (v as f32).to_bits(), "var {ch} of {c}");
                let (mu, is) = (f64::from(mean[ch]), f64::from(inv[ch]));
                let (mut sd, mut sdx) = (0f64, 0f64);
                for i in 0..n {
                    let at = (i * c + ch) * plane;
                    for (&g, &v) in dy[at..at + plane].iter().zip(&x[at..at + plane]) {
                        sd += f64::from(g);
                        sdx += f64::from(g) * (f64::from(v) - mu) * is;
                    }
                }
                assert_eq!(
                    dbeta[ch].to_bits(),
                    (sd as f32).to_bits(),
                    "dbeta {ch} of {c}"
                );
                assert_eq!(
                    dgamma[ch].to_bits(),
                    (sdx as f32).to_bits(),
                    "dgamma {ch} of {c}"
                );
            }
        }
    }
}
