//! Summary statistics of Monte Carlo runs: mean, sample standard deviation, a 95% confidence
//! interval of the mean, min and max.
//!
//! The interval is `mean ± t(0.975, n - 1) * s / sqrt(n)`, with `s` the sample standard deviation
//! (divisor `n - 1`) and `t` Student's quantile. Student's t rather than the normal 1.96 because
//! quick looks use small `mc` (with `mc = 5`, t = 2.776: the normal value would understate the
//! interval by 30%). For n - 1 <= 30 the quantile comes from a table (4 decimals); above that
//! from the Cornish-Fisher expansion around z = 1.959964, accurate to better than 1e-4 there.
//! With a single run the standard deviation is reported as 0 and there is no interval.

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

/// `t(0.975, df)` for df = 1 ..= 30.
const T975: [f64; 30] = [
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
    2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687,
    2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
];

/// The 0.975 quantile of the standard normal distribution.
const Z975: f64 = 1.959_963_984_540_054;

/// Student's t quantile `t(0.975, df)` (two-sided 95%), `df >= 1`.
///
/// ```
/// assert!((nvcim::eval::stats::t_975(4) - 2.7764).abs() < 1e-4);
/// assert!((nvcim::eval::stats::t_975(199) - 1.9720).abs() < 1e-4);
/// ```
pub fn t_975(df: usize) -> f64 {
    assert!(df >= 1, "Student's t needs at least one degree of freedom");
    if df <= T975.len() {
        return T975[df - 1];
    }
    // Cornish-Fisher expansion of the t quantile in powers of 1/df (Abramowitz & Stegun 26.7.5).
    let (z, n) = (Z975, df as f64);
    let z3 = z * z * z;
    let z5 = z3 * z * z;
    let z7 = z5 * z * z;
    let z9 = z7 * z * z;
    z + (z3 + z) / (4.0 * n)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * n * n)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * n * n * n)
        + (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z) / (92160.0 * n.powi(4))
}

/// Summary of a sample of accuracies (or any values).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (divisor n - 1); 0 for a single value.
    pub std: f64,
    /// Half width of the 95% confidence interval of the mean; `None` for a single value.
    pub ci95_half_width: Option<f64>,
    /// Lower end of the 95% interval (the mean for a single value).
    pub ci95_low: f64,
    /// Upper end of the 95% interval (the mean for a single value).
    pub ci95_high: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// Summarises `values`; fails on an empty slice or a non-finite value.
pub fn summarize(values: &[f64]) -> Result<Summary> {
    ensure!(!values.is_empty(), "no values to summarise");
    ensure!(
        values.iter().all(|v| v.is_finite()),
        "a value to summarise is not finite"
    );
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if n == 1 {
        return Ok(Summary {
            n,
            mean,
            std: 0.0,
            ci95_half_width: None,
            ci95_low: mean,
            ci95_high: mean,
            min,
            max,
        });
    }
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    let std = (ss / (n - 1) as f64).sqrt();
    let half = t_975(n - 1) * std / (n as f64).sqrt();
    Ok(Summary {
        n,
        mean,
        std,
        ci95_half_width: Some(half),
        ci95_low: mean - half,
        ci95_high: mean + half,
        min,
        max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvcim_shared::rng::{standard_normal, stream};

    #[test]
    fn known_numbers_by_hand() {
        // mean 3, sample variance 10/4 = 2.5, t(4) = 2.7764, half = 2.7764 * sqrt(2.5 / 5).
        let s = summarize(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(s.n, 5);
        assert!((s.mean - 3.0).abs() < 1e-12);
        assert!((s.std - 2.5f64.sqrt()).abs() < 1e-12);
        let half = 2.7764 * 0.5f64.sqrt();
        assert!((s.ci95_half_width.unwrap() - half).abs() < 1e-9);
        assert!((s.ci95_low - (3.0 - half)).abs() < 1e-9);
        assert!((s.ci95_high - (3.0 + half)).abs() < 1e-9);
        assert_eq!((s.min, s.max), (1.0, 5.0));

        // Two values 90 and 92: std sqrt(2), half = 12.7062 * sqrt(2) / sqrt(2).
        let s = summarize(&[92.0, 90.0]).unwrap();
        assert!((s.ci95_half_width.unwrap() - 12.7062).abs() < 1e-9);

        let one = summarize(&[97.5]).unwrap();
        assert_eq!((one.std, one.ci95_half_width), (0.0, None));
        assert_eq!((one.ci95_low, one.ci95_high), (97.5, 97.5));

        assert!(summarize(&[]).is_err());
        assert!(summarize(&[1.0, f64::NAN]).is_err());
    }

    #[test]
    fn t_quantile_table_and_expansion_meet() {
        // Published values: t(0.975, 40) = 2.0211, 60: 2.0003, 120: 1.9799, 1000: 1.9623.
        for (df, t) in [
            (31, 2.0395),
            (40, 2.0211),
            (60, 2.0003),
            (120, 1.9799),
            (1000, 1.9623),
        ] {
            assert!((t_975(df) - t).abs() < 1e-4, "df {df}: {}", t_975(df));
        }
        // The expansion continues the table smoothly.
        assert!((t_975(30) - t_975(31)).abs() < 0.003);
        for df in 1..200 {
            assert!(t_975(df + 1) < t_975(df));
        }
    }

    /// The half width shrinks as 1/sqrt(mc): on fixed-seed standard normal data, quadrupling the
    /// sample halves it. The only randomness in the ratio is s_n / s_4n, whose relative std is
    /// about sqrt(1 / (2(n-1)) + 1 / (2(4n-1))); the tolerance is four of those.
    #[test]
    fn interval_shrinks_as_one_over_sqrt_mc() {
        let mut rng = stream(2024, 0, 0);
        let data: Vec<f64> = (0..8000)
            .map(|_| 90.0 + 2.0 * f64::from(standard_normal(&mut rng)))
            .collect();
        for n in [250usize, 500, 1000, 2000] {
            let small = summarize(&data[..n]).unwrap();
            let large = summarize(&data[..4 * n]).unwrap();
            let ratio = small.ci95_half_width.unwrap() / large.ci95_half_width.unwrap();
            let t_ratio = t_975(n - 1) / t_975(4 * n - 1);
            let rel_sd = (1.0 / (2.0 * (n - 1) as f64) + 1.0 / (2.0 * (4 * n - 1) as f64)).sqrt();
            let expected = 2.0 * t_ratio;
            assert!(
                (ratio / expected - 1.0).abs() < 4.0 * rel_sd,
                "n {n}: ratio {ratio}, expected {expected} ± {}",
                4.0 * rel_sd * expected
            );
            // And exactly: half * sqrt(n) / (t * s) == 1.
            let exact =
                small.ci95_half_width.unwrap() * (n as f64).sqrt() / (t_975(n - 1) * small.std);
            assert!((exact - 1.0).abs() < 1e-12);
        }
    }
}
