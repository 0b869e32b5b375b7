//! `nvcim alpha-search`: the paper's five-step search for the feedback weight alpha.
//!
//! Trains one network per alpha (each in `--out/alpha-<value>/`, same seed and flags otherwise)
//! and picks the alpha with the best noisy validation accuracy. The test set is never used for
//! the choice. Writes `--out/alpha-search.json` and prints a table.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;

use super::train::TrainFlags;
use crate::training::{self, RunOptions};

/// Arguments of `nvcim alpha-search`.
#[derive(Debug, Clone, Args)]
pub struct AlphaSearchArgs {
    /// The run (its --alpha is replaced by each searched value).
    #[command(flatten)]
    pub flags: TrainFlags,
    /// The alphas to try.
    #[arg(long, default_value = "1,0.1,0.01,0.001,0.0001")]
    pub alphas: String,
    /// Output directory (one subdirectory per alpha).
    #[arg(long, value_name = "DIR", default_value = "runs/alpha-search")]
    pub out: PathBuf,
    /// Continue interrupted runs from their checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One searched alpha.
#[derive(Debug, Clone, Serialize)]
pub struct AlphaRow {
    /// The alpha.
    pub alpha: f64,
    /// Best noisy validation accuracy.
    pub val_noisy_acc: f64,
    /// Clean validation accuracy at that epoch.
    pub val_clean_acc: f64,
    /// Its epoch.
    pub best_epoch: usize,
    /// The run's directory.
    pub dir: PathBuf,
}

fn parse_alphas(list: &str) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let a: f64 = p
            .parse()
            .with_context(|| format!("--alphas: `{p}` is not a number"))?;
        ensure!(
            a.is_finite() && a >= 0.0,
            "--alphas: {p} must be finite and >= 0"
        );
        out.push(a);
    }
    ensure!(!out.is_empty(), "--alphas needs at least one value");
    Ok(out)
}

/// Runs `nvcim alpha-search`.
pub fn run(args: &AlphaSearchArgs) -> Result<()> {
    if !args.flags.method.negative_feedback() {
        bail!(
            "--method {:?} has no alpha; alpha-search needs nft or nft-ovf",
            args.flags.method
        );
    }
    let alphas = parse_alphas(&args.alphas)?;
    let mut rows = Vec::new();
    for &alpha in &alphas {
        let mut flags = args.flags.clone();
        flags.alpha = Some(alpha);
        let cfg = flags.config()?;
        let dir = args.out.join(format!("alpha-{alpha}"));
        if !args.quiet {
            eprintln!("alpha-search: alpha = {alpha} -> {}", dir.display());
        }
        let opts = RunOptions {
            out: dir.clone(),
            resume: args.resume,
            stop_after: None,
            quiet: args.quiet,
        };
        let s =
            training::train(&cfg, &opts).with_context(|| format!("training with alpha {alpha}"))?;
        rows.push(AlphaRow {
            alpha,
            val_noisy_acc: s.best_val_noisy_acc,
            val_clean_acc: s.best_val_clean_acc,
            best_epoch: s.best_epoch,
            dir,
        });
    }
    let best = rows
        .iter()
        .max_by(|a, b| a.val_noisy_acc.total_cmp(&b.val_noisy_acc))
        .expect("at least one alpha")
        .clone();
    let cfg = args.flags.config()?;
    let report = serde_json::json!({
        "sigma": cfg.variation.sigma(),
        "sigma_unit": cfg.variation.unit().name(),
        "mc_val": cfg.mc_val,
        "rows": rows,
        "best_alpha": best.alpha,
    });
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    crate::training::checkpoint::write_json_atomic(&args.out.join("alpha-search.json"), &report)?;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "alpha search, {:?} on {}, sigma {} ({}), {} Monte Carlo validation runs",
        cfg.method,
        cfg.dataset.display_name(),
        cfg.variation.sigma(),
        cfg.variation.unit().name(),
        cfg.mc_val
    );
    println!(
        "{:>8}  {:>14}  {:>14}  {:>5}",
        "alpha", "val noisy %", "val clean %", "epoch"
    );
    for r in &rows {
        let mark = if r.alpha == best.alpha {
            "  <- best"
        } else {
            ""
        };
        println!(
            "{:>8}  {:>14.2}  {:>14.2}  {:>5}{mark}",
            r.alpha,
            100.0 * r.val_noisy_acc,
            100.0 * r.val_clean_acc,
            r.best_epoch
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_lists() {
        assert_eq!(parse_alphas("1, 0.1,0.01").unwrap(), vec![1.0, 0.1, 0.01]);
        assert!(parse_alphas("").is_err());
        assert!(parse_alphas("-1").is_err());
        assert!(parse_alphas("x").unwrap_err().to_string().contains("`x`"));
    }
}
