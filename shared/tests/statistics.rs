//! Statistical properties of the sampler and of the variation model, with fixed seeds.
//!
//! Tolerances come from the sample size: a moment is accepted within 5 standard errors of its
//! expected value; the Kolmogorov–Smirnov statistic must stay below the alpha = 0.001 critical
//! value `1.949 / sqrt(n)`; an empirical std within 1% of the closed form is checked with
//! enough samples that 1% is more than 4 standard errors (`se(s)/s ≈ 1/sqrt(2n)`).

use nvcim_shared::{
    quant::{QuantConfig, Quantized},
    rng::{standard_normal, stream},
    variation::{Faults, Profile, SigmaUnit, VariationConfig},
};

const N: usize = 1_000_000;

fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

#[test]
fn gaussian_moments_and_ks() {
    let mut rng = stream(2024, 0, 0);
    let mut xs: Vec<f64> = (0..N)
        .map(|_| f64::from(standard_normal(&mut rng)))
        .collect();
    let n = N as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let m4 = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n;
    let kurt = m4 / (var * var);
    // Standard errors of the mean, the variance and the kurtosis of a normal sample.
    let (se_mean, se_var, se_kurt) = (1.0 / n.sqrt(), (2.0 / n).sqrt(), (24.0 / n).sqrt());
    assert!(mean.abs() < 5.0 * se_mean, "mean {mean}");
    assert!((var - 1.0).abs() < 5.0 * se_var, "variance {var}");
    assert!((kurt - 3.0).abs() < 5.0 * se_kurt, "kurtosis {kurt}");

    xs.sort_by(f64::total_cmp);
    let d = xs
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = normal_cdf(x);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0f64, f64::max);
    assert!(d < 1.949 / n.sqrt(), "KS statistic {d}");

    // Tails: P(|z| > 3) = 0.0026998; count within 5 binomial standard errors.
    let tail = xs.iter().filter(|x| x.abs() > 3.0).count() as f64;
    let p = 2.0 * (1.0 - normal_cdf(3.0));
    assert!(
        (tail - n * p).abs() < 5.0 * (n * p * (1.0 - p)).sqrt(),
        "tail count {tail}"
    );
    // The ziggurat's tail branch (|z| > 3.44) must be reached and be right too.
    let far = xs.iter().filter(|x| x.abs() > 3.442_62).count() as f64;
    let p = 2.0 * (1.0 - normal_cdf(3.442_62));
    assert!(
        (far - n * p).abs() < 5.0 * (n * p * (1.0 - p)).sqrt(),
        "far tail count {far}"
    );
}

/// Empirical std of the read-back error for weights of magnitudes drawn from `mags`.
fn empirical_std(var: &VariationConfig, mags: &[u16], n: usize, seed: u64) -> (f64, f64) {
    let mut rng = stream(seed, 1, 2);
    let cfg = var.quant();
    let (mut s2, mut expect2) = (0.0f64, 0.0f64);
    for i in 0..n {
        let q = Quantized {
            negative: i % 2 == 1,
            magnitude: mags[i % mags.len()],
        };
        let e = f64::from(var.sample(q, &mut rng).delta_weight(1.0, cfg));
        s2 += e * e;
        expect2 += var.weight_rms(q.magnitude).powi(2);
    }
    ((s2 / n as f64).sqrt(), (expect2 / n as f64).sqrt())
}

#[test]
fn effective_std_matches_closed_form_for_both_conventions_and_every_profile() {
    let cfg = QuantConfig::DEFAULT;
    // Magnitudes inside the profiles' band (0.25, 0.75) of 255 and outside it.
    let inside: Vec<u16> = (64..=191).collect();
    let outside: Vec<u16> = (0..=63).chain(192..=255).collect();
    for unit in [SigmaUnit::Range, SigmaUnit::Level] {
        for profile in Profile::ALL {
            let var = VariationConfig::new(cfg, 0.4, unit, profile, Faults::NONE).unwrap();
            for (band, mags) in [("in band", &inside), ("out of band", &outside)] {
                let (emp, closed) = empirical_std(&var, mags, 200_000, 7);
                let exact = var.weight_std(mags[0]);
                assert!(
                    (closed - exact).abs() < 1e-12,
                    "closed form varies within a band"
                );
                assert!(
                    (emp / closed - 1.0).abs() < 0.01,
                    "{unit:?} {profile:?} {band}: empirical {emp} vs closed form {closed}"
                );
            }
        }
    }
    // The design's constants.
    let range = VariationConfig::paper(0.4).unwrap();
    assert!((range.weight_std(0) / 0.4 - 0.7776).abs() < 1e-4);
}

#[test]
fn faults_match_their_closed_form() {
    let cfg = QuantConfig::DEFAULT;
    let faults = Faults::new(0.05, 0.02).unwrap();
    let var = VariationConfig::new(cfg, 0.2, SigmaUnit::Range, Profile::Rram4, faults).unwrap();
    let mags: Vec<u16> = (0..=255).collect();
    let (emp, closed) = empirical_std(&var, &mags, 400_000, 11);
    assert!(
        (emp / closed - 1.0).abs() < 0.01,
        "empirical {emp} vs closed form {closed}"
    );
}

#[test]
fn other_bit_widths_match_the_general_formula() {
    for (m, n) in [(8, 1), (8, 4), (6, 2), (4, 1), (2, 2)] {
        let cfg = QuantConfig::new(m, n).unwrap();
        for unit in [SigmaUnit::Range, SigmaUnit::Level] {
            let var = VariationConfig::new(cfg, 0.3, unit, Profile::Uniform, Faults::NONE).unwrap();
            let mags = [0u16, cfg.max_magnitude() / 3, cfg.max_magnitude()];
            let (emp, _) = empirical_std(&var, &mags, 200_000, 3);
            // sigma * max|W| * sqrt(sum_j 4^(jN)) / (2^M - 1), times 2^N - 1 for `range`.
            let sum: f64 = (0..u32::from(m / n))
                .map(|j| 4f64.powi((j * u32::from(n)) as i32))
                .sum();
            let unit_factor = if unit == SigmaUnit::Range {
                f64::from(cfg.max_level())
            } else {
                1.0
            };
            let formula = 0.3 * unit_factor * sum.sqrt() / f64::from(cfg.max_magnitude());
            assert!(
                (emp / formula - 1.0).abs() < 0.01,
                "M={m} N={n} {unit:?}: {emp} vs {formula}"
            );
        }
    }
}
