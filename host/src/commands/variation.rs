//! `nvcim variation`: the analytic effective weight-noise std of a device configuration, next
//! to the empirical std of sampled weights, so sigma values can be related across papers.
//!
//! Magnitudes are drawn uniformly over `0 ..= 2^M - 1` with random signs (host stream of
//! `--seed`); each weight's devices are sampled from the variation stream `(seed, 0, 0)`. The
//! analytic figure is the root mean square, over that uniform magnitude distribution, of the
//! closed form per magnitude (`weight_rms`): with the uniform profile and no faults it equals
//! `weight_std`, e.g. 0.7776 sigma for M = 8, N = 2, `range`.

use anyhow::{Result, ensure};
use clap::Args;
use nvcim_shared::{
    quant::Quantized,
    rng::{Purpose, stream, stream_for},
    variation::{SigmaUnit, VariationConfig},
};
use rand_core::RngCore;
use serde::Serialize;

use crate::options::{DeviceArgs, parse_sigmas};

/// Arguments of `nvcim variation`.
#[derive(Debug, Clone, Args)]
pub struct VariationArgs {
    /// Comma-separated sigma values, in the unit of --sigma-unit.
    #[arg(long, default_value = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")]
    pub sigma: String,
    /// The device model.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Weights sampled per sigma for the empirical std.
    #[arg(long, default_value_t = 1_000_000)]
    pub samples: u64,
    /// Seed of the sampled weights and devices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the output.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// sigma in `unit`.
    pub sigma: f32,
    /// The convention of `sigma`.
    pub unit: &'static str,
    /// The same noise expressed in the other convention.
    pub sigma_other_unit: f32,
    /// The other convention's name.
    pub other_unit: &'static str,
    /// Per-device std in conductance levels (outside a profile's band).
    pub device_sigma_levels: f32,
    /// Closed-form effective weight-noise std (RMS error), as a fraction of max|W|.
    pub analytic_std: f64,
    /// Sampled RMS error of the read-back weight, as a fraction of max|W|.
    pub empirical_std: f64,
    /// Sampled mean error (nonzero only with stuck-at faults).
    pub empirical_mean: f64,
    /// `empirical_std / analytic_std - 1`.
    pub relative_error: f64,
}

/// Everything `nvcim variation --json` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The command's configuration.
    pub m_bits: u8,
    /// Bits per device.
    pub n_bits: u8,
    /// Profile name.
    pub profile: &'static str,
    /// Stuck-at-0 rate.
    pub stuck_low: f32,
    /// Stuck-at-top rate.
    pub stuck_high: f32,
    /// Weights sampled per sigma.
    pub samples: u64,
    /// Seed.
    pub seed: u64,
    /// One row per sigma.
    pub rows: Vec<Row>,
}

/// Computes one row.
pub fn row(var: &VariationConfig, samples: u64, seed: u64) -> Row {
    let cfg = var.quant();
    let max = cfg.max_magnitude();
    let analytic = {
        let sum: f64 = (0..=max).map(|q| var.weight_rms(q).powi(2)).sum();
        (sum / f64::from(max + 1)).sqrt()
    };
    let mut pick = stream_for(Purpose::Host, seed, 0, 0);
    let mut dev = stream(seed, 0, 0);
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for _ in 0..samples {
        let r = pick.next_u32();
        let q = Quantized {
            negative: r & 1 == 1,
            magnitude: ((u64::from(r >> 1) * u64::from(max + 1)) >> 31) as u16,
        };
        let err = f64::from(var.sample(q, &mut dev).delta_weight(1.0, cfg));
        let err = if q.negative { -err } else { err };
        s1 += err;
        s2 += err * err;
    }
    let n = samples.max(1) as f64;
    let empirical = (s2 / n).sqrt();
    let (other, factor) = match var.unit() {
        SigmaUnit::Range => (SigmaUnit::Level, f32::from(cfg.max_level())),
        SigmaUnit::Level => (SigmaUnit::Range, 1.0 / f32::from(cfg.max_level())),
    };
    Row {
        sigma: var.sigma(),
        unit: var.unit().name(),
        sigma_other_unit: var.sigma() * factor,
        other_unit: other.name(),
        device_sigma_levels: var.device_sigma(0),
        analytic_std: analytic,
        empirical_std: empirical,
        empirical_mean: s1 / n,
        relative_error: if analytic > 0.0 {
            empirical / analytic - 1.0
        } else {
            0.0
        },
    }
}

/// Runs `nvcim variation`.
pub fn run(args: &VariationArgs) -> Result<()> {
    ensure!(args.samples > 0, "--samples must be at least 1");
    let sigmas = parse_sigmas(&args.sigma)?;
    let mut rows = Vec::new();
    for &s in &sigmas {
        rows.push(row(&args.device.variation(s)?, args.samples, args.seed));
    }
    let report = Report {
        m_bits: args.device.m_bits,
        n_bits: args.device.n_bits,
        profile: nvcim_shared::variation::Profile::from(args.device.profile).name(),
        stuck_low: args.device.stuck_low,
        stuck_high: args.device.stuck_high,
        samples: args.samples,
        seed: args.seed,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "M = {}, N = {} ({} devices/weight), profile {}, stuck-at low {} high {}, {} samples, seed {}",
        report.m_bits,
        report.n_bits,
        report.m_bits / report.n_bits,
        report.profile,
        report.stuck_low,
        report.stuck_high,
        report.samples,
        report.seed
    );
    println!("weight-noise std as a fraction of max|W| (RMS error of the read-back weight)");
    println!(
        "{:>8} {:>6} {:>10} {:>14} {:>12} {:>12} {:>9}",
        "sigma", "unit", "= other", "device sd/lvl", "analytic", "empirical", "rel.err"
    );
    for r in &report.rows {
        println!(
            "{:>8.4} {:>6} {:>10} {:>14.4} {:>12.6} {:>12.6} {:>8.3}%",
            r.sigma,
            r.unit,
            format!("{:.4} {}", r.sigma_other_unit, r.other_unit),
            r.device_sigma_levels,
            r.analytic_std,
            r.empirical_std,
            100.0 * r.relative_error
        );
    }
    Ok(())
}
