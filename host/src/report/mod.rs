//! The paper's tables from evaluation results (`nvcim report RUNS...`).
//!
//! Each RUN is an `nvcim eval --out` directory (or its `eval.json`). The training `config.json`
//! beside the checkpoint, when present, fills in training fields the evaluation did not record
//! (method, alpha, training sigma and seed, dropped exit).
//!
//! - **Table II** (methods x sigma): mean noisy accuracy ± 95% interval. A row is a (dataset,
//!   model, method[, alpha]) setting. With `--match train` (default) the column at sigma takes
//!   the runs trained at that sigma, plus runs trained without noise (as in the paper, where each
//!   column's models were trained at its sigma); `--match any` takes every run at every sigma,
//!   one row per training sigma (a model trained at 0.4 evaluated at 0.2 ... 0.8, as the demo
//!   does). One run: its Monte Carlo mean ± its interval. Several runs (seeds): the mean of
//!   their means ± the 95% interval over runs, and the run count.
//! - **Table III** (convergence): per setting (including its training sigma), the runs whose
//!   mean noisy accuracy is more than `--threshold` (5) points below the best run of the
//!   setting (`--convergence-ref max`, default: the paper's reading), or from the mean over its
//!   runs (`mean`), or below a fixed accuracy (a number), out of the number of runs; each run's
//!   accuracy is listed in the table's notes.
//! - **Table IV**: nft with and without noise injection (training sigma > 0 versus 0, or the
//!   recorded `noise_injection`).
//! - **Table V**: nft with all exits versus each dropped exit (`drop_exit`).
//!
//! Output: `report.md` (also printed), `table2.csv` ... `table5.csv` (long format) and
//! `table2.png` ... `table5.png` in `--out`. Tables without data (no ablation runs, ...) are
//! skipped with a note.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::eval::results::{EVAL_JSON, EvalReport, read_eval_report};

mod tables;

pub use tables::{CellValue, Reference, Table, non_converged, table2, table3, table4, table5};

/// Which runs fill a sigma column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Match {
    /// Runs trained at the column's sigma, and runs trained without noise.
    #[default]
    Train,
    /// Every run at every sigma it was evaluated at; runs trained at different sigmas are
    /// different rows (labelled with their training sigma).
    Any,
}

/// Arguments of `nvcim report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Evaluation directories (or their eval.json files).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Output directory of the tables and plots.
    #[arg(long, value_name = "DIR", default_value = "report")]
    pub out: PathBuf,
    /// Which runs fill a sigma column.
    #[arg(long = "match", value_enum, default_value_t = Match::Train)]
    pub matching: Match,
    /// Skip RUNS without an eval.json (unfinished cells) with a warning instead of failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// Table III: points from the reference beyond which a run has not converged.
    #[arg(long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Table III's reference: `max` (the setting's best run; a run more than --threshold
    /// below it has not converged; the paper's reading), `mean` (more than --threshold from the
    /// mean over runs, either side; miscounts the bimodal case) or an accuracy in percent.
    #[arg(long, value_name = "max|mean|PERCENT", default_value = "max")]
    pub convergence_ref: Reference,
}

/// One evaluation with its (merged) training fields.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The eval.json it came from.
    pub path: PathBuf,
    /// Its contents, training fields filled from the training config where missing.
    pub report: EvalReport,
}

impl Entry {
    fn train_sigma(&self) -> f32 {
        self.report.config.train_sigma.unwrap_or(0.0)
    }

    /// Whether training injected noise: a noise-injection method at a training sigma above 0,
    /// unless the result file says it did not. (Files written before the fix of issue #19
    /// recorded `true` for every non-vanilla run, sigma 0 included; the sigma decides.)
    pub fn noise_injection(&self) -> bool {
        let c = &self.report.config;
        c.noise_injection.unwrap_or(true)
            && crate::eval::injected_noise(&c.method, Some(self.train_sigma()))
    }

    fn uses_sigma(&self, sigma: f32, m: Match) -> bool {
        m == Match::Any || !self.noise_injection() || (self.train_sigma() - sigma).abs() < 1e-6
    }

    fn mean_at(&self, sigma: f32) -> Option<f64> {
        self.report.at(sigma).map(|r| r.summary.mean)
    }
}

/// Resolves RUN to its eval.json.
fn eval_json(run: &Path) -> PathBuf {
    if run.is_dir() {
        run.join(EVAL_JSON)
    } else {
        run.to_path_buf()
    }
}

/// Looks a key up at the top level or under any of `parents`.
fn lookup<'a>(v: &'a Value, key: &str, parents: &[&str]) -> Option<&'a Value> {
    v.get(key)
        .or_else(|| parents.iter().find_map(|p| v.get(p)?.get(key)))
        .filter(|x| !x.is_null())
}

/// Fills missing training fields of `report` from the training `config.json` beside its
/// checkpoint (the checkpoint's directory or its parents up to two levels), if there is one.
fn merge_training_config(report: &mut EvalReport, eval_path: &Path) -> Result<()> {
    let ckpt = PathBuf::from(&report.config.checkpoint);
    let ckpt = if ckpt.is_relative() && !ckpt.exists() {
        // A relative path recorded by a run in another directory: try beside the eval.
        eval_path.parent().map_or(ckpt.clone(), |p| p.join(&ckpt))
    } else {
        ckpt
    };
    let Some(cfg_path) = ckpt
        .ancestors()
        .take(4)
        .map(|d| d.join("config.json"))
        .find(|p| p.is_file())
    else {
        return Ok(());
    };
    let text =
        fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    let c = &mut report.config;
    if c.alpha.is_none() && c.method.starts_with("nft") {
        c.alpha = lookup(&v, "alpha", &["train"]).and_then(Value::as_f64);
    }
    if c.train_sigma.is_none() {
        c.train_sigma = lookup(&v, "sigma", &["variation", "train"])
            .and_then(Value::as_f64)
            .map(|s| s as f32);
    }
    if c.train_seed.is_none() {
        c.train_seed = lookup(&v, "seed", &["train"]).and_then(Value::as_u64);
    }
    if c.drop_exit.is_none() {
        c.drop_exit = lookup(&v, "drop_exit", &["train"])
            .and_then(Value::as_u64)
            .map(|d| d as usize);
    }
    if c.noise_injection.is_none() {
        c.noise_injection = lookup(&v, "noise_injection", &["train"]).and_then(Value::as_bool);
    }
    if c.clip_weights.is_none() {
        c.clip_weights = lookup(&v, "clip_weights", &["train"])
            .and_then(Value::as_f64)
            .map(|k| k as f32);
    }
    Ok(())
}

/// Reads every run.
pub fn load_runs(runs: &[PathBuf]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for run in runs {
        let path = eval_json(run);
        ensure!(
            path.is_file(),
            "no {EVAL_JSON} in {} (is it an `nvcim eval --out` directory?)",
            run.display()
        );
        let mut report = read_eval_report(&path)?;
        merge_training_config(&mut report, &path)?;
        out.push(Entry { path, report });
    }
    Ok(out)
}

/// Renders every table of `args.runs` and writes `report.md`, the CSVs and the plots to
/// `args.out` (`nvcim report`).
pub fn write(args: &ReportArgs) -> Result<()> {
    ensure!(
        args.threshold.is_finite() && args.threshold > 0.0,
        "--threshold must be > 0"
    );
    let runs: Vec<PathBuf> = if args.allow_missing {
        let (present, missing): (Vec<&PathBuf>, Vec<&PathBuf>) =
            args.runs.iter().partition(|r| eval_json(r).is_file());
        for m in missing {
            eprintln!("warning: no {EVAL_JSON} in {}, skipped", m.display());
        }
        ensure!(!present.is_empty(), "none of the RUNS has an {EVAL_JSON}");
        present.into_iter().cloned().collect()
    } else {
        args.runs.clone()
    };
    let entries = load_runs(&runs)?;
    let units: Vec<&str> = entries
        .iter()
        .map(|e| e.report.config.sigma_unit.as_str())
        .collect();
    let unit = units[0];
    if let Some(e) = entries.iter().find(|e| e.report.config.sigma_unit != unit) {
        bail!(
            "{} uses sigma unit `{}` but {} uses `{unit}`; report runs of one convention together",
            e.path.display(),
            e.report.config.sigma_unit,
            entries[0].path.display()
        );
    }
    fs::create_dir_all(&args.out).with_context(|| {
        format!(
            "cannot create the report directory --out {}",
            args.out.display()
        )
    })?;
    let tables: Vec<(&str, Option<Table>)> = vec![
        ("table2", Some(table2(&entries, args.matching)?)),
        (
            "table3",
            table3(
                &entries,
                args.matching,
                args.threshold,
                args.convergence_ref,
            )?,
        ),
        ("table4", table4(&entries, args.matching)?),
        ("table5", table5(&entries, args.matching)?),
    ];
    let mut md = format!(
        "# nvcim report\n\n{} evaluations; sigma in the `{unit}` convention; accuracies in percent.\n\n",
        entries.len()
    );
    for (name, t) in &tables {
        match t {
            Some(t) => {
                md.push_str(&t.markdown());
                md.push('\n');
                let csv = args.out.join(format!("{name}.csv"));
                crate::fsx::write_atomic(&csv, t.csv().as_bytes())?;
                if !t.values.is_empty() {
                    t.plot(&args.out.join(format!("{name}.png")), unit)?;
                }
            }
            None => {
                let what = match *name {
                    "table3" => "no setting has two or more independent trainings (seeds)",
                    "table4" => "no nft runs both with and without noise injection",
                    _ => "no runs with a dropped exit",
                };
                writeln!(md, "_{name}: skipped, {what}._\n").expect("writing to a String");
            }
        }
    }
    let p = args.out.join("report.md");
    crate::fsx::write_atomic(&p, md.as_bytes())?;
    print!("{md}");
    eprintln!("report written to {}", args.out.display());
    Ok(())
}
