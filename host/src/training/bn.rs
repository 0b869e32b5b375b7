//! Training-mode batch normalization over `f32` NCHW tensors, fused: the batch statistics, the
//! normalized output, and the three gradients, each in one or two passes over the activations
//! (Burn's default composes them from reductions over a transposed copy).
//!
//! Statistics are summed in `f64` per channel (channels in parallel, each in image order, so the
//! bits do not depend on the thread count); the elementwise passes run over `(image, channel)`
//! planes in parallel.

use rayon::prelude::*;

/// Per channel: the mean and the biased variance of `x` (`n x c` planes of `plane` values).
pub fn stats(x: &[f32], n: usize, c: usize, plane: usize) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), n * c * plane, "batch norm input length");
    let m = (n * plane).max(1) as f64;
    let per: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..n).map(|i| &x[(i * c + ch) * plane..][..plane]);
            let mean = planes()
                .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>())
                .sum::<f64>()
                / m;
            let var = planes()
                .map(|p| {
                    p.iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                })
                .sum::<f64>()
                / m;
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
                for (d, &v) in yp.iter_mut().zip(xp) {
                    *d = v * s + b;
                }
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
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mu, is) = (f64::from(mean[ch]), f64::from(inv[ch]));
            let (mut sd, mut sdx) = (0f64, 0f64);
            for i in 0..n {
                let at = (i * c + ch) * plane;
                for (&g, &v) in dy[at..at + plane].iter().zip(&x[at..at + plane]) {
                    sd += f64::from(g);
                    sdx += f64::from(g) * (f64::from(v) - mu) * is;
                }
            }
            (sd, sdx)
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
                for ((d, &v), &g) in dp.iter_mut().zip(xp).zip(gp) {
                    *d = k * (g - mb - (v - mu) * is * mg);
                }
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
}
