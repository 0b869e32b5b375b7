//! Monte Carlo evaluation (Algorithm 2), engine-independent: the `nvcim eval` flags, and the
//! pipeline from a [`NoisyClassifier`] to the result files.
//!
//! - [`mc`]: the driver, runs spread over threads, per-run counts independent of scheduling;
//! - [`stats`]: mean, std, Student-t 95% interval, min, max;
//! - [`results`]: `eval.json`, CSVs, plots;
//! - this module: the flags ([`EvalOptions`]), the resolved configuration and [`evaluate`].
//!
//! A verb that has loaded a checkpoint into an engine calls [`evaluate`] with the flags and the
//! checkpoint's description ([`ModelInfo`]); everything else — the sigma list, the device model,
//! the Monte Carlo runs, the summary, the files in `--out`, the table or JSON on stdout — is here.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};
use nvcim_shared::{quant::ScaleMode, variation::Profile};

pub mod mc;
pub mod results;
pub mod stats;

use self::{
    mc::{McPlan, monte_carlo},
    results::{EvalConfig, EvalReport, TileOptions, table, write_eval_outputs},
};
use crate::{
    engine::NoisyClassifier,
    ir::convert::Loaded,
    options::{DeviceArgs, parse_sigmas},
};

/// The inference engine of a Monte Carlo evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Engine {
    /// `f32` inference with perturbed weights (AVX-512 FMA where the CPU has it; equal to
    /// Burn's forward pass within 1e-4 of the logits' scale).
    #[default]
    Float,
    /// The shared integer CiM engine (what the firmware computes, bit for bit).
    Int,
    /// tract running the ONNX file with its weights perturbed (`--onnx` only): the
    /// independent cross-check of the float engine.
    Tract,
}

impl Engine {
    /// The name in result files.
    pub const fn name(self) -> &'static str {
        match self {
            Engine::Float => "float",
            Engine::Int => "int",
            Engine::Tract => "tract",
        }
    }
}

/// The flags of `nvcim eval` other than the checkpoint.
#[derive(Debug, Clone, Args)]
pub struct EvalOptions {
    /// Comma-separated sigma values, in the unit of --sigma-unit.
    #[arg(
        long,
        default_value = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8",
        allow_hyphen_values = true
    )]
    pub sigma: String,
    /// Monte Carlo runs per sigma.
    #[arg(long, default_value_t = 200)]
    pub mc: u32,
    /// Seed of the variation streams.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The device model.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Quantize each layer against its own max|W| (`layer`) or the model's (`model`).
    #[arg(long, value_parser = ["layer", "model"], default_value = "layer")]
    pub scale: String,
    /// The inference engine.
    #[arg(long, value_enum, default_value_t = Engine::Float)]
    pub engine: Engine,
    /// Crossbar rows per tile (int engine).
    #[arg(long, default_value_t = 128)]
    pub tile_rows: usize,
    /// Crossbar columns per tile (int engine).
    #[arg(long, default_value_t = 128)]
    pub tile_cols: usize,
    /// ADC resolution in bits (int engine; default: ideal ADC).
    #[arg(long, value_name = "BITS")]
    pub adc_bits: Option<u8>,
    /// Evaluate on the first N test examples only (a quick look).
    #[arg(long, value_name = "N")]
    pub test_subset: Option<usize>,
    /// BatchNorm recalibration after programming: before each Monte Carlo run classifies,
    /// re-estimate every BatchNorm's mean and variance on N training images (a seeded choice,
    /// the same for every run) through that run's perturbed weights, as a chip's digital
    /// periphery can once after its arrays are programmed. No weight changes; the clean
    /// accuracy keeps the checkpoint's statistics. Float and int engines (the int engine
    /// also re-derives each run's activation ranges) and --onnx (from --data-dir's IDX
    /// training files; BatchNorm kept in the file); not the firmware. Off by default (the
    /// paper's protocol); see the README for what it does to the demo's models.
    #[arg(long, value_name = "N")]
    pub bn_recalibrate: Option<usize>,
    /// Worker threads for the Monte Carlo runs (one run at a time each, single-threaded);
    /// results do not depend on it. Default: the number of cores.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Output directory of eval.json, eval.csv, runs.csv and the plots.
    #[arg(long, value_name = "DIR", default_value = "runs/eval")]
    pub out: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl EvalOptions {
    /// Monte Carlo worker threads: `--jobs`, or the number of cores.
    pub fn jobs(&self) -> usize {
        self.jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The quantization scale mode.
    pub fn scale_mode(&self) -> ScaleMode {
        if self.scale == "model" {
            ScaleMode::PerModel
        } else {
            ScaleMode::PerLayer
        }
    }

    /// Checks the flags that do not need the model.
    pub fn check(&self) -> Result<Vec<f32>> {
        let sigmas = parse_sigmas(&self.sigma)?;
        ensure!(self.mc > 0, "--mc must be at least 1");
        ensure!(self.jobs != Some(0), "--jobs must be at least 1");
        ensure!(
            self.test_subset != Some(0),
            "--test-subset must be at least 1"
        );
        ensure!(
            self.bn_recalibrate != Some(0),
            "--bn-recalibrate must be at least 1 image (leave it out for no recalibration)"
        );
        if self.engine == Engine::Int {
            ensure!(
                self.tile_rows > 0 && self.tile_cols > 0,
                "--tile-rows and --tile-cols must be at least 1"
            );
        }
        self.device.variation(0.0)?;
        Ok(sigmas)
    }
}

/// What the checkpoint says about the model and its training.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelInfo {
    /// The checkpoint path, as given.
    pub checkpoint: String,
    /// Model name.
    pub model: String,
    /// Dataset name.
    pub dataset: String,
    /// Training method.
    pub method: String,
    /// Alpha (negative feedback methods).
    pub alpha: Option<f64>,
    /// Training sigma.
    pub train_sigma: Option<f32>,
    /// Training seed.
    pub train_seed: Option<u64>,
    /// Dropped exit.
    pub drop_exit: Option<usize>,
    /// Whether training injected noise, when the training config says so.
    pub noise_injection: Option<bool>,
    /// Training's per-layer weight clipping (`--clip-weights K`), when it clipped.
    pub clip_weights: Option<f32>,
    /// How the test images were prepared, for an imported model (fit and normalization).
    pub preprocess: Option<String>,
}

/// The resolved configuration of an evaluation.
pub fn resolve(opts: &EvalOptions, info: &ModelInfo, sigmas: Vec<f32>) -> EvalConfig {
    let d = &opts.device;
    EvalConfig {
        checkpoint: info.checkpoint.clone(),
        model: info.model.clone(),
        dataset: info.dataset.clone(),
        method: info.method.clone(),
        alpha: info.alpha,
        train_sigma: info.train_sigma,
        train_seed: info.train_seed,
        drop_exit: info.drop_exit,
        noise_injection: info.noise_injection,
        clip_weights: info.clip_weights,
        preprocess: info.preprocess.clone(),
        sigma_unit: nvcim_shared::variation::SigmaUnit::from(d.unit)
            .name()
            .to_string(),
        profile: Profile::from(d.profile).name().to_string(),
        m_bits: d.m_bits,
        n_bits: d.n_bits,
        stuck_low: d.stuck_low,
        stuck_high: d.stuck_high,
        scale_mode: opts.scale_mode().name().to_string(),
        engine: opts.engine.name().to_string(),
        tile: (opts.engine == Engine::Int).then_some(TileOptions {
            rows: opts.tile_rows,
            cols: opts.tile_cols,
            adc_bits: opts.adc_bits,
        }),
        sigmas,
        mc: opts.mc,
        seed: opts.seed,
        test_subset: opts.test_subset,
        bn_recalibrate: opts.bn_recalibrate,
    }
}

/// Runs the Monte Carlo evaluation of `engine` on `data` (already cut to `--test-subset`),
/// writes the result files into `--out` and prints the table (or JSON) on stdout.
pub fn evaluate<C: NoisyClassifier>(
    opts: &EvalOptions,
    info: &ModelInfo,
    engine: &C,
    data: &C::Data,
) -> Result<EvalReport> {
    let report = evaluate_quiet(opts, info, engine, data)?;
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        print!("{}", table(&report));
        eprintln!(
            "results in {} ({:.1} s)",
            opts.out.display(),
            report.wall_seconds
        );
    }
    Ok(report)
}

/// [`evaluate`] without printing.
pub fn evaluate_quiet<C: NoisyClassifier>(
    opts: &EvalOptions,
    info: &ModelInfo,
    engine: &C,
    data: &C::Data,
) -> Result<EvalReport> {
    opts.check()?;
    // Fail on an unwritable --out before spending the Monte Carlo time.
    std::fs::create_dir_all(&opts.out).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the output directory --out {}: {e}",
            opts.out.display()
        )
    })?;
    let report = compute_report(opts, info, engine, data)?;
    write_eval_outputs(&opts.out, &report)?;
    Ok(report)
}

/// The Monte Carlo evaluation of [`evaluate`] as a report, writing no file (`--out` is not
/// used): what the Python package's `evaluate_onnx` returns.
pub fn compute_report<C: NoisyClassifier>(
    opts: &EvalOptions,
    info: &ModelInfo,
    engine: &C,
    data: &C::Data,
) -> Result<EvalReport> {
    let sigmas = opts.check()?;
    let plan = McPlan {
        variation: opts.device.variation(0.0)?,
        sigmas: sigmas.clone(),
        mc: opts.mc,
        seed: opts.seed,
        jobs: opts.jobs(),
        progress: !opts.quiet,
    };
    let clean = engine.clean(data)?;
    let t = Instant::now();
    let runs = monte_carlo(engine, data, &plan)?;
    EvalReport::new(
        resolve(opts, info, sigmas),
        clean,
        &runs,
        t.elapsed().as_secs_f64(),
    )
}

/// Whether a training run perturbed its weights: a noise-injection method at a sigma above 0
/// (an `nft` run at sigma 0 is negative feedback *without* noise injection, Table IV).
pub fn injected_noise(method: &str, train_sigma: Option<f32>) -> bool {
    method != "vanilla" && train_sigma.is_some_and(|s| s > 0.0)
}

/// The checkpoint's description for the result files.
pub fn checkpoint_info(loaded: &Loaded, given: &Path) -> ModelInfo {
    let c = &loaded.config;
    let method = c["method"].as_str().unwrap_or("unknown").to_string();
    let train_sigma = c["variation"]["sigma"].as_f64().map(|s| s as f32);
    ModelInfo {
        checkpoint: given.display().to_string(),
        model: format!("{:?}", loaded.spec.arch).to_lowercase(),
        dataset: loaded.dataset.display_name().to_string(),
        noise_injection: Some(injected_noise(&method, train_sigma)),
        method,
        alpha: c["alpha"].as_f64(),
        train_sigma,
        train_seed: c["seed"].as_u64(),
        drop_exit: c["drop_exit"].as_u64().map(|d| d as usize),
        clip_weights: c["clip_weights"].as_f64().map(|k| k as f32),
        preprocess: None,
    }
}
