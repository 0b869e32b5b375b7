//! The result files of `nvcim eval`, and reading them back.
//!
//! [`write_eval_outputs`] writes into one directory:
//! - `eval.json`: the nvcim version, the whole resolved configuration ([`EvalConfig`]), the
//!   clean accuracy and, per sigma, the [`Summary`] and every run's accuracy;
//! - `eval.csv`: one row per sigma (the summary);
//! - `runs.csv`: one row per (sigma, run);
//! - `accuracy_vs_sigma.png`: the mean with its 95% interval as a band, and the clean accuracy;
//! - `histogram_sigma_<sigma>.png`: the runs' accuracies at each sigma.
//!
//! Accuracies are in percent everywhere.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::{
    mc::{SigmaRuns, percent},
    stats::{Summary, summarize},
};
use crate::plot::{self, Point, Series};

/// The name of the main result file; its presence marks a finished evaluation.
pub const EVAL_JSON: &str = "eval.json";

/// Crossbar tile and ADC options of the integer engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileOptions {
    /// Crossbar rows per tile.
    pub rows: usize,
    /// Crossbar columns per tile.
    pub cols: usize,
    /// ADC resolution in bits; `None` for an ideal ADC.
    pub adc_bits: Option<u8>,
}

/// The whole resolved configuration of one evaluation: enough to rerun it, and what `nvcim
/// report` groups runs by. Training fields come from the checkpoint's training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// The evaluated checkpoint.
    pub checkpoint: String,
    /// Model name (`vgg8`, `resnet18`, ...).
    pub model: String,
    /// Dataset name.
    pub dataset: String,
    /// Training method (`vanilla`, `noise`, `nft`, ...).
    pub method: String,
    /// Negative-feedback strength alpha (NFT methods only).
    pub alpha: Option<f64>,
    /// Sigma the model was trained at (noise injection), in `sigma_unit`.
    pub train_sigma: Option<f32>,
    /// The training seed.
    pub train_seed: Option<u64>,
    /// The exit removed during training (Table V's ablation), if any.
    #[serde(default)]
    pub drop_exit: Option<usize>,
    /// Whether training injected weight noise; `None` means "as the method implies".
    #[serde(default)]
    pub noise_injection: Option<bool>,
    /// Training's per-layer weight clipping in standard deviations (`--clip-weights`), when
    /// it clipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_weights: Option<f32>,
    /// How the test images were brought to the model's input (an imported model's fit and
    /// normalization, and where the normalization came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<String>,
    /// The sigma convention, `range` or `level`.
    pub sigma_unit: String,
    /// Variation profile name.
    pub profile: String,
    /// Weight magnitude bits M.
    pub m_bits: u8,
    /// Bits per device N.
    pub n_bits: u8,
    /// Fraction of devices stuck at level 0.
    pub stuck_low: f32,
    /// Fraction of devices stuck at the top level.
    pub stuck_high: f32,
    /// `layer` or `model` quantization scale.
    pub scale_mode: String,
    /// `float` or `int`.
    pub engine: String,
    /// Tile and ADC options (integer engine only).
    pub tile: Option<TileOptions>,
    /// Evaluated sigma values, in `sigma_unit`.
    pub sigmas: Vec<f32>,
    /// Monte Carlo runs per sigma.
    pub mc: u32,
    /// Seed of the variation streams.
    pub seed: u64,
    /// The first this many test examples were used (`None`: the whole test set).
    pub test_subset: Option<usize>,
    /// Training images each run's BatchNorm statistics were re-estimated on
    /// (`--bn-recalibrate`; `None`: the checkpoint's statistics).
    #[serde(default)]
    pub bn_recalibrate: Option<usize>,
}

/// The results at one sigma.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SigmaResult {
    /// sigma, in the configuration's unit.
    pub sigma: f32,
    /// Summary of the runs' accuracies (percent).
    pub summary: Summary,
    /// Every run's accuracy (percent), indexed by run.
    pub accuracies: Vec<f64>,
    /// Every run's number of correct classifications.
    pub correct: Vec<usize>,
}

/// Everything `nvcim eval` produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The nvcim version that wrote the file.
    pub nvcim_version: String,
    /// The resolved configuration.
    pub config: EvalConfig,
    /// Test examples classified per run.
    pub test_examples: usize,
    /// Accuracy of the clean weights (percent).
    pub clean_accuracy: f64,
    /// Results per sigma, in the order of `config.sigmas`.
    pub results: Vec<SigmaResult>,
    /// Wall time of the Monte Carlo evaluation, seconds.
    pub wall_seconds: f64,
    /// Monte Carlo throughput: runs x test examples classified per second of wall time.
    #[serde(default)]
    pub images_per_second: f64,
}

impl EvalReport {
    /// Builds the report from the driver's runs; the runs must match `config.sigmas` and
    /// `config.mc`.
    pub fn new(
        config: EvalConfig,
        clean_correct: usize,
        runs: &[SigmaRuns],
        wall_seconds: f64,
    ) -> Result<Self> {
        ensure!(
            runs.len() == config.sigmas.len(),
            "{} sigma results for {} sigma values",
            runs.len(),
            config.sigmas.len()
        );
        let examples = runs.first().map_or(0, |r| r.examples);
        let mut results = Vec::with_capacity(runs.len());
        for (r, &sigma) in runs.iter().zip(&config.sigmas) {
            ensure!(
                r.sigma == sigma && r.correct.len() == config.mc as usize && r.examples == examples,
                "the runs at sigma {} do not match the configuration",
                r.sigma
            );
            let accuracies = r.accuracies();
            results.push(SigmaResult {
                sigma,
                summary: summarize(&accuracies)?,
                accuracies,
                correct: r.correct.clone(),
            });
        }
        let classified = (config.sigmas.len() * config.mc as usize * examples) as f64;
        Ok(EvalReport {
            nvcim_version: env!("CARGO_PKG_VERSION").to_string(),
            test_examples: examples,
            clean_accuracy: percent(clean_correct, examples),
            config,
            images_per_second: if wall_seconds > 0.0 {
                classified / wall_seconds
            } else {
                0.0
            },
            results,
            wall_seconds,
        })
    }

    /// Checks the internal consistency of a report read from a file: one result per sigma,
    /// `mc` runs each, summaries that match the runs.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        ensure!(
            self.results.len() == c.sigmas.len(),
            "{} results for {} sigma values",
            self.results.len(),
            c.sigmas.len()
        );
        for (r, &s) in self.results.iter().zip(&c.sigmas) {
            ensure!(
                r.sigma == s,
                "result for sigma {} where {s} was expected",
                r.sigma
            );
            ensure!(
                r.accuracies.len() == c.mc as usize && r.correct.len() == c.mc as usize,
                "sigma {s}: {} runs where mc is {}",
                r.accuracies.len(),
                c.mc
            );
            let again = summarize(&r.accuracies)?;
            ensure!(
                (again.mean - r.summary.mean).abs() < 1e-9,
                "sigma {s}: the summary does not match the runs"
            );
        }
        Ok(())
    }

    /// The result at `sigma`, if evaluated.
    pub fn at(&self, sigma: f32) -> Option<&SigmaResult> {
        self.results.iter().find(|r| (r.sigma - sigma).abs() < 1e-6)
    }
}

/// Reads and checks an `eval.json`.
pub fn read_eval_report(path: &Path) -> Result<EvalReport> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: EvalReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an nvcim eval.json", path.display()))?;
    report
        .validate()
        .with_context(|| format!("inconsistent results in {}", path.display()))?;
    Ok(report)
}

/// The histogram file of one sigma.
pub fn histogram_name(sigma: f32) -> String {
    format!("histogram_sigma_{sigma}.png")
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// `eval.csv`: one row per sigma.
pub fn eval_csv(report: &EvalReport) -> String {
    let mut s = String::from(
        "sigma,sigma_unit,engine,mc,test_examples,clean_accuracy,mean,std,ci95_low,ci95_high,ci95_half_width,min,max\n",
    );
    for r in &report.results {
        let m = &r.summary;
        writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.sigma,
            report.config.sigma_unit,
            report.config.engine,
            m.n,
            report.test_examples,
            report.clean_accuracy,
            m.mean,
            m.std,
            m.ci95_low,
            m.ci95_high,
            opt(m.ci95_half_width),
            m.min,
            m.max
        )
        .expect("writing to a String");
    }
    s
}

/// `runs.csv`: one row per (sigma, run).
pub fn runs_csv(report: &EvalReport) -> String {
    let mut s = String::from("sigma,run,correct,examples,accuracy\n");
    for r in &report.results {
        for (i, (a, c)) in r.accuracies.iter().zip(&r.correct).enumerate() {
            writeln!(s, "{},{i},{c},{},{a}", r.sigma, report.test_examples)
                .expect("writing to a String");
        }
    }
    s
}

/// The table printed on stdout.
pub fn table(report: &EvalReport) -> String {
    let c = &report.config;
    let mut s = String::new();
    writeln!(
        s,
        "{} {} ({}), engine {}, sigma unit {}, profile {}, M = {}, N = {}, mc {}, seed {}, {} test examples",
        c.model,
        c.method,
        c.dataset,
        c.engine,
        c.sigma_unit,
        c.profile,
        c.m_bits,
        c.n_bits,
        c.mc,
        c.seed,
        report.test_examples
    )
    .expect("writing to a String");
    if let Some(p) = &c.preprocess {
        writeln!(s, "input: {p}").expect("writing to a String");
    }
    writeln!(
        s,
        "clean accuracy {:.2}%; {:.1} s, {:.0} images/s (runs x examples)",
        report.clean_accuracy, report.wall_seconds, report.images_per_second
    )
    .expect("writing to a String");
    writeln!(
        s,
        "{:>8} {:>8} {:>7} {:>18} {:>8} {:>8}",
        "sigma", "mean %", "std", "95% CI", "min", "max"
    )
    .expect("writing to a String");
    for r in &report.results {
        let m = &r.summary;
        writeln!(
            s,
            "{:>8} {:>8.2} {:>7.2} {:>18} {:>8.2} {:>8.2}",
            r.sigma,
            m.mean,
            m.std,
            format!("[{:.2}, {:.2}]", m.ci95_low, m.ci95_high),
            m.min,
            m.max
        )
        .expect("writing to a String");
    }
    s
}

/// Writes `eval.json`, `eval.csv`, `runs.csv` and the plots into `out_dir` (created if needed);
/// returns the paths written.
pub fn write_eval_outputs(out_dir: &Path, report: &EvalReport) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(out_dir).with_context(|| {
        format!(
            "cannot create the output directory --out {}",
            out_dir.display()
        )
    })?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: String| -> Result<()> {
        let p = out_dir.join(name);
        crate::fsx::write_atomic(&p, text.as_bytes()).context("--out")?;
        written.push(p);
        Ok(())
    };
    write("eval.csv", eval_csv(report))?;
    write("runs.csv", runs_csv(report))?;

    let unit = &report.config.sigma_unit;
    let mean = Series {
        name: format!("mean of {} runs, 95% CI", report.config.mc),
        points: report
            .results
            .iter()
            .map(|r| Point {
                x: f64::from(r.sigma),
                y: r.summary.mean,
                band: r
                    .summary
                    .ci95_half_width
                    .map(|_| (r.summary.ci95_low, r.summary.ci95_high)),
            })
            .collect(),
    };
    let clean = Series {
        name: "clean".into(),
        points: report
            .results
            .iter()
            .map(|r| Point {
                x: f64::from(r.sigma),
                y: report.clean_accuracy,
                band: None,
            })
            .collect(),
    };
    let path = out_dir.join("accuracy_vs_sigma.png");
    plot::lines(
        &path,
        &format!(
            "{} {} on {} ({} engine)",
            report.config.model, report.config.method, report.config.dataset, report.config.engine
        ),
        &format!("sigma ({unit})"),
        "accuracy (%)",
        &[mean, clean],
    )?;
    written.push(path);
    for r in &report.results {
        let path = out_dir.join(histogram_name(r.sigma));
        plot::histogram(
            &path,
            &format!("{} runs at sigma {} ({unit})", r.accuracies.len(), r.sigma),
            "accuracy (%)",
            &r.accuracies,
        )?;
        written.push(path);
    }
    // eval.json last: its presence marks a complete result directory.
    let json = serde_json::to_string_pretty(report).expect("a report serialises");
    let p = out_dir.join(EVAL_JSON);
    crate::fsx::write_atomic(&p, json.as_bytes()).context("--out")?;
    written.push(p);
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A configuration for tests.
    pub(crate) fn config(sigmas: &[f32], mc: u32) -> EvalConfig {
        EvalConfig {
            checkpoint: "runs/x/model.mpk".into(),
            model: "dense".into(),
            dataset: "synthetic".into(),
            method: "nft".into(),
            alpha: Some(0.01),
            train_sigma: Some(0.4),
            train_seed: Some(1),
            drop_exit: None,
            noise_injection: None,
            clip_weights: None,
            preprocess: None,
            sigma_unit: "range".into(),
            profile: "uniform".into(),
            m_bits: 8,
            n_bits: 2,
            stuck_low: 0.0,
            stuck_high: 0.0,
            scale_mode: "layer".into(),
            engine: "float".into(),
            tile: None,
            sigmas: sigmas.to_vec(),
            mc,
            seed: 3,
            test_subset: None,
            bn_recalibrate: None,
        }
    }

    #[test]
    fn report_from_runs_and_csv_rows() {
        let runs = vec![
            SigmaRuns {
                sigma: 0.2,
                correct: vec![9, 10],
                examples: 10,
            },
            SigmaRuns {
                sigma: 0.4,
                correct: vec![5, 7],
                examples: 10,
            },
        ];
        let r = EvalReport::new(config(&[0.2, 0.4], 2), 10, &runs, 0.5).unwrap();
        r.validate().unwrap();
        assert_eq!(r.clean_accuracy, 100.0);
        assert_eq!(r.results[1].accuracies, vec![50.0, 70.0]);
        assert!((r.results[1].summary.mean - 60.0).abs() < 1e-12);
        assert_eq!(eval_csv(&r).lines().count(), 3);
        let runs_csv = runs_csv(&r);
        assert_eq!(runs_csv.lines().count(), 5);
        assert!(runs_csv.contains("\n0.4,1,7,10,70\n"), "{runs_csv}");
        assert!(r.at(0.4).is_some() && r.at(0.3).is_none());
        // Mismatched runs are refused.
        assert!(EvalReport::new(config(&[0.2], 2), 10, &runs, 0.5).is_err());
        assert!(EvalReport::new(config(&[0.2, 0.4], 3), 10, &runs, 0.5).is_err());
    }

    #[test]
    fn unwritable_out_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, "x").unwrap();
        let runs = vec![SigmaRuns {
            sigma: 0.2,
            correct: vec![1],
            examples: 2,
        }];
        let r = EvalReport::new(config(&[0.2], 1), 2, &runs, 0.0).unwrap();
        let err = write_eval_outputs(&file.join("sub"), &r).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("--out") && msg.contains("a-file"), "{msg}");
    }
}
