//! The Monte Carlo driver of Algorithm 2, generic over the inference engine.
//!
//! For each sigma and each run `r = 0 .. mc`, an engine programs its noisy weights — layer `l`
//! drawn from `nvcim_shared::rng::stream(seed, r, l)`, weights in canonical order, one
//! `VariationConfig::sample` per weight (the cross-component contract) — then classifies its
//! test set and reports how many examples it got right.
//!
//! Runs are independent, so [`monte_carlo`] spreads them over `jobs` threads; each result is
//! stored under its (sigma, run) index, so the per-run numbers do not depend on `jobs` or on
//! scheduling. The same seed is used for every sigma: run `r` at two sigma values draws the same
//! standard normals, scaled differently (common random numbers, which makes curves over sigma
//! smoother than independent draws would).
//!
//! Engines implement [`NoisyClassifier`] ([`crate::engine`]).

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nvcim_shared::variation::VariationConfig;

use crate::engine::NoisyClassifier;

/// What a Monte Carlo evaluation runs.
#[derive(Debug, Clone)]
pub struct McPlan {
    /// The device model; its sigma is replaced by each of `sigmas`.
    pub variation: VariationConfig,
    /// Sigma values, in `variation`'s unit.
    pub sigmas: Vec<f32>,
    /// Runs per sigma.
    pub mc: u32,
    /// Seed of the variation streams.
    pub seed: u64,
    /// Worker threads (at least 1).
    pub jobs: usize,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

/// The runs at one sigma.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaRuns {
    /// sigma, in the plan's unit.
    pub sigma: f32,
    /// Correct classifications of each run, indexed by run.
    pub correct: Vec<usize>,
    /// Examples classified per run.
    pub examples: usize,
}

impl SigmaRuns {
    /// Each run's accuracy in percent, indexed by run.
    pub fn accuracies(&self) -> Vec<f64> {
        self.correct
            .iter()
            .map(|&c| percent(c, self.examples))
            .collect()
    }
}

/// `100 * correct / total` (0 for an empty set).
pub fn percent(correct: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * correct as f64 / total as f64
    }
}

/// Runs `plan.mc` runs at every sigma of `plan` on `engine` (Algorithm 2).
///
/// Fails on an empty sigma list, `mc == 0`, `jobs == 0`, an empty test set, or the first error
/// an engine reports (the other workers stop at their next run).
pub fn monte_carlo<C: NoisyClassifier>(
    engine: &C,
    data: &C::Data,
    plan: &McPlan,
) -> Result<Vec<SigmaRuns>> {
    ensure!(!plan.sigmas.is_empty(), "--sigma needs at least one value");
    ensure!(plan.mc > 0, "--mc must be at least 1");
    ensure!(plan.jobs > 0, "--jobs must be at least 1");
    let examples = engine.num_examples(data);
    ensure!(examples > 0, "the test set is empty");
    let configs: Vec<VariationConfig> = plan
        .sigmas
        .iter()
        .map(|&s| {
            plan.variation
                .with_sigma(s)
                .with_context(|| format!("invalid --sigma {s}"))
        })
        .collect::<Result<_>>()?;

    let mc = plan.mc as usize;
    let total = configs.len() * mc;
    let results: Mutex<Vec<Option<usize>>> = Mutex::new(vec![None; total]);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let bar = progress_bar(total as u64, plan.progress);

    let worker = || {
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= total {
                return;
            }
            let (s, r) = (i / mc, (i % mc) as u32);
            match engine
                .run(&configs[s], plan.seed, r, data)
                .with_context(|| format!("sigma {} run {r}", plan.sigmas[s]))
            {
                Ok(c) => {
                    results.lock().expect("no worker panics holding the lock")[i] = Some(c);
                    bar.inc(1);
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error
                        .lock()
                        .expect("no worker panics holding the lock")
                        .get_or_insert(e);
                    return;
                }
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..plan.jobs.min(total) {
            scope.spawn(worker);
        }
        worker();
    });
    bar.finish_and_clear();
    if let Some(e) = first_error.into_inner().expect("workers finished") {
        return Err(e);
    }
    let results = results.into_inner().expect("workers finished");
    let mut out = Vec::with_capacity(configs.len());
    for (s, chunk) in results.chunks(mc).enumerate() {
        let correct = chunk
            .iter()
            .map(|c| c.context("a Monte Carlo run produced no result"))
            .collect::<Result<Vec<_>>>()?;
        out.push(SigmaRuns {
            sigma: plan.sigmas[s],
            correct,
            examples,
        });
    }
    Ok(out)
}

fn progress_bar(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix}[{bar:40}] {pos}/{len} runs ({per_sec}, eta {eta})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix("monte carlo ");
    bar
}

#[cfg(test)]
mod tests {
    use nvcim_shared::{
        quant::{ScaleMode, layer_scale},
        rng::stream,
    };

    use super::*;
    use crate::engine::{
        argmax,
        dense::{DenseData, DenseLayer, DenseNetwork, dot, fixture},
    };

    fn plan(sigmas: &[f32], mc: u32, jobs: usize) -> McPlan {
        McPlan {
            variation: VariationConfig::paper(0.0).unwrap(),
            sigmas: sigmas.to_vec(),
            mc,
            seed: 11,
            jobs,
            progress: false,
        }
    }

    #[test]
    fn jobs_do_not_change_per_run_numbers() {
        let (net, data) = fixture::separable(1, 16, 12, 4, 200);
        let one = monte_carlo(&net, &data, &plan(&[0.2, 0.5], 6, 1)).unwrap();
        let two = monte_carlo(&net, &data, &plan(&[0.2, 0.5], 6, 2)).unwrap();
        let five = monte_carlo(&net, &data, &plan(&[0.2, 0.5], 6, 5)).unwrap();
        assert_eq!(one, two);
        assert_eq!(one, five);
        // The runs differ from each other (the noise matters at sigma 0.5).
        let runs = &one[1].correct;
        assert!(runs.iter().any(|&c| c != runs[0]), "{runs:?}");
    }

    #[test]
    fn runs_use_the_contract_streams() {
        let (net, data) = fixture::separable(2, 8, 6, 3, 60);
        let var = VariationConfig::paper(0.3).unwrap();
        // Reproduce run 4's layer 1 by hand: stream(seed, run, layer), canonical order.
        let w = net.noisy_weights(&var, 9, 4).unwrap();
        let layer = &net.layers()[1];
        let scale = layer_scale(&layer.weights).unwrap();
        let mut rng = stream(9, 4, 1);
        for (i, &wi) in layer.weights.iter().enumerate() {
            let q = nvcim_shared::quant::quantize(wi, scale, var.quant()).unwrap();
            let expect = wi + var.sample(q, &mut rng).delta_weight(scale, var.quant());
            assert_eq!(w[1][i], expect, "weight {i}");
        }
        let runs = monte_carlo(
            &net,
            &data,
            &McPlan {
                seed: 9,
                ..plan(&[0.3], 5, 2)
            },
        )
        .unwrap();
        assert_eq!(runs[0].correct[4], net.count_correct(&w, &data).unwrap());
    }

    #[test]
    fn sigma_zero_is_the_clean_network_and_noise_hurts() {
        let (net, data) = fixture::separable(3, 16, 12, 4, 400);
        let clean = net.clean(&data).unwrap();
        assert!(clean as f64 > 0.8 * 400.0, "clean {clean}");
        let r = monte_carlo(&net, &data, &plan(&[0.0, 1.0], 8, 2)).unwrap();
        assert!(r[0].correct.iter().all(|&c| c == clean));
        let noisy: f64 = r[1].accuracies().iter().sum::<f64>() / 8.0;
        assert!(noisy < percent(clean, 400) - 5.0, "noisy {noisy}");
    }

    #[test]
    fn bad_plans_and_shapes_are_errors() {
        let (net, data) = fixture::separable(4, 4, 4, 2, 10);
        assert!(monte_carlo(&net, &data, &plan(&[], 5, 1)).is_err());
        assert!(monte_carlo(&net, &data, &plan(&[0.1], 0, 1)).is_err());
        assert!(monte_carlo(&net, &data, &plan(&[0.1], 1, 0)).is_err());
        assert!(monte_carlo(&net, &data.subset(0), &plan(&[0.1], 1, 1)).is_err());
        let wrong = DenseData::new(3, vec![0.0; 6], vec![0, 1]).unwrap();
        let err = monte_carlo(&net, &wrong, &plan(&[0.1], 2, 2)).unwrap_err();
        assert!(format!("{err:#}").contains("features"), "{err:#}");
        let bad = DenseLayer {
            inputs: 2,
            outputs: 2,
            weights: vec![0.0; 3],
            bias: vec![0.0; 2],
            relu: false,
        };
        assert!(DenseNetwork::new(vec![bad], ScaleMode::PerLayer).is_err());
        let zero = DenseLayer {
            inputs: 1,
            outputs: 1,
            weights: vec![0.0],
            bias: vec![0.0],
            relu: false,
        };
        assert!(DenseNetwork::new(vec![zero], ScaleMode::PerLayer).is_err());
        assert!(DenseData::new(2, vec![0.0; 3], vec![0]).is_err());
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        for n in [0usize, 1, 7, 8, 9, 31, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-5, "n {n}");
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }
}
