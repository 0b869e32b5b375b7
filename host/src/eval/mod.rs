//! Monte Carlo evaluation (Algorithm 2), engine-independent: the `nvcim eval` flags, and the
//! pipeline from a [`NoisyClassifier`] to the result files.
//!
//! - [`mc`]: the driver, runs spread over threads, per-run counts independent of scheduling;
//! - [`stats`]: mean, std, Student-t 95% interval, min, max;
//! - [`results`]: `eval.json`, CSVs, plots;
//! - this module: the typed plan ([`EvalPlan`]), the flags that build it ([`EvalOptions`],
//!   parsed once by [`EvalOptions::plan`]), the resolved configuration and [`evaluate`].
//!
//! A verb that has loaded a checkpoint into an engine calls [`evaluate`] with the plan and the
//! checkpoint's description ([`ModelInfo`]); everything else — the Monte Carlo runs, the
//! summary, the files in the output directory, the table or JSON on stdout — is here.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};
use nvcim_shared::{quant::ScaleMode, variation::VariationConfig};

pub mod mc;
pub mod results;
pub mod stats;

pub use self::results::TileOptions;
use self::{
    mc::{McPlan, monte_carlo},
    results::{EvalConfig, EvalReport, table, write_eval_outputs},
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

    /// The typed plan these flags describe: the one place `nvcim eval`'s flags are parsed and
    /// checked (the sigma list, the device model, the counts).
    pub fn plan(&self) -> Result<EvalPlan> {
        let plan = EvalPlan {
            sigmas: parse_sigmas(&self.sigma)?,
            mc: self.mc,
            seed: self.seed,
            variation: self.device.variation(0.0)?,
            scale_mode: self.scale_mode(),
            engine: self.engine,
            tiles: TileOptions {
                rows: self.tile_rows,
                cols: self.tile_cols,
                adc_bits: self.adc_bits,
            },
            test_subset: self.test_subset,
            bn_recalibrate: self.bn_recalibrate,
            jobs: self.jobs(),
            progress: !self.quiet,
        };
        ensure!(self.jobs != Some(0), "--jobs must be at least 1");
        plan.check()
            .map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
        Ok(plan)
    }

    /// Where the results go and how they are printed.
    pub fn output(&self) -> Output {
        Output {
            dir: self.out.clone(),
            json: self.json,
        }
    }
}

/// The plan's field names in its messages, as the flags that set them.
fn flag_names(msg: &str) -> String {
    msg.replace("`mc`", "--mc")
        .replace("`test_subset`", "--test-subset")
        .replace("`bn_recalibrate`", "--bn-recalibrate")
        .replace("`jobs`", "--jobs")
        .replace("`tiles`", "--tile-rows and --tile-cols")
        .replace("`sigmas`", "--sigma")
}

/// A Monte Carlo evaluation (Algorithm 2) as typed values: what `nvcim eval`'s flags become
/// ([`EvalOptions::plan`]), and what sweeps and the Python package build directly. Nothing
/// below it parses a string.
///
/// ```
/// use nvcim::eval::{Engine, EvalPlan};
/// use nvcim_shared::variation::VariationConfig;
///
/// let mut plan = EvalPlan::new(vec![0.2, 0.4], 50, 7, VariationConfig::paper(0.0)?)?;
/// plan.engine = Engine::Float;
/// plan.jobs = 2;
/// plan.check()?;
/// assert!(EvalPlan::new(vec![], 50, 7, VariationConfig::paper(0.0)?).is_err());
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPlan {
    /// The sigmas, in the device model's unit (each finite and `>= 0`; at least one).
    pub sigmas: Vec<f32>,
    /// Monte Carlo runs per sigma (`>= 1`).
    pub mc: u32,
    /// Seed of the variation streams.
    pub seed: u64,
    /// The device model (bits, sigma unit, profile, faults) at sigma 0; each sigma replaces it.
    pub variation: VariationConfig,
    /// Quantization against each layer's or the model's `max|W|`.
    pub scale_mode: ScaleMode,
    /// The inference engine.
    pub engine: Engine,
    /// Tiles and ADC of the integer engine.
    pub tiles: TileOptions,
    /// Evaluate on the first N test examples only.
    pub test_subset: Option<usize>,
    /// BatchNorm recalibration on N training images after programming (see
    /// [`EvalOptions::bn_recalibrate`]).
    pub bn_recalibrate: Option<usize>,
    /// Worker threads for the runs (`>= 1`; results do not depend on it).
    pub jobs: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl EvalPlan {
    /// A plan with the defaults of `nvcim eval` for everything else (float engine, per-layer
    /// scales, 128 x 128 tiles with an ideal ADC, every test example, no recalibration, one
    /// job per core, no progress bar), checked.
    pub fn new(sigmas: Vec<f32>, mc: u32, seed: u64, variation: VariationConfig) -> Result<Self> {
        let plan = EvalPlan {
            sigmas,
            mc,
            seed,
            variation,
            scale_mode: ScaleMode::PerLayer,
            engine: Engine::Float,
            tiles: TileOptions {
                rows: 128,
                cols: 128,
                adc_bits: None,
            },
            test_subset: None,
            bn_recalibrate: None,
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            progress: false,
        };
        plan.check()?;
        Ok(plan)
    }

    /// Checks the plan's values (every error names the field).
    pub fn check(&self) -> Result<()> {
        ensure!(
            !self.sigmas.is_empty(),
            "`sigmas` is empty: give at least one sigma"
        );
        if let Some(s) = self.sigmas.iter().find(|s| !s.is_finite() || **s < 0.0) {
            anyhow::bail!("`sigmas`: {s} is invalid; sigma must be finite and >= 0");
        }
        ensure!(self.mc > 0, "`mc` must be at least 1");
        ensure!(self.jobs > 0, "`jobs` must be at least 1");
        ensure!(
            self.test_subset != Some(0),
            "`test_subset` must be at least 1"
        );
        ensure!(
            self.bn_recalibrate != Some(0),
            "`bn_recalibrate` must be at least 1 image (leave it out for no recalibration)"
        );
        if self.engine == Engine::Int {
            ensure!(
                self.tiles.rows > 0 && self.tiles.cols > 0,
                "`tiles` must have at least 1 row and 1 column"
            );
        }
        for &s in &self.sigmas {
            self.variation.with_sigma(s)?;
        }
        Ok(())
    }

    /// The largest sigma (what the integer engine calibrates its activation ranges for).
    pub fn max_sigma(&self) -> f32 {
        self.sigmas.iter().copied().fold(0.0, f32::max)
    }
}

/// Where an evaluation's files go and how its summary is printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The directory of `eval.json`, the CSVs and the plots.
    pub dir: PathBuf,
    /// JSON on stdout instead of the table.
    pub json: bool,
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
pub fn resolve(plan: &EvalPlan, info: &ModelInfo) -> EvalConfig {
    let v = &plan.variation;
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
        sigma_unit: v.unit().name().to_string(),
        profile: v.profile().name().to_string(),
        m_bits: v.quant().m_bits(),
        n_bits: v.quant().n_bits(),
        stuck_low: v.faults().stuck_low(),
        stuck_high: v.faults().stuck_high(),
        scale_mode: plan.scale_mode.name().to_string(),
        engine: plan.engine.name().to_string(),
        tile: (plan.engine == Engine::Int).then_some(plan.tiles),
        sigmas: plan.sigmas.clone(),
        mc: plan.mc,
        seed: plan.seed,
        test_subset: plan.test_subset,
        bn_recalibrate: plan.bn_recalibrate,
    }
}

/// Runs the Monte Carlo evaluation of `engine` on `data` (already cut to the plan's
/// `test_subset`), writes the result files into `out.dir` and prints the table (or JSON) on
/// stdout.
pub fn evaluate<C: NoisyClassifier>(
    plan: &EvalPlan,
    out: &Output,
    info: &ModelInfo,
    engine: &C,
    data: &C::Data,
) -> Result<EvalReport> {
    let report = evaluate_quiet(plan, &out.dir, info, engine, data)?;
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        print!("{}", table(&report));
        eprintln!(
            "results in {} ({:.1} s)",
            out.dir.display(),
            report.wall_seconds
        );
    }
    Ok(report)
}

/// [`evaluate`] without printing: the files go into `dir`.
pub fn evaluate_quiet<C: NoisyClassifier>(
    plan: &EvalPlan,
    dir: &Path,
    info: &ModelInfo,
    engine: &C,
    data: &C::Data,
) -> Result<EvalReport> {
    plan.check()?;
    // Fail on an unwritable --out before spending the Monte Carlo time.
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the output directory --out {}: {e}",
            dir.display()
        )
    })?;
    let report = compute_report(plan, info, engine, data)?;
    write_eval_outputs(dir, &report)?;
    Ok(report)
}

/// The Monte Carlo evaluation of [`evaluate`] as a report, writing no file: what the Python
/// package's `evaluate_onnx` returns.
pub fn compute_report<C: NoisyClassifier>(
    plan: &EvalPlan,
    info: &ModelInfo,
    engine: &C,
    data: &C::Data,
) -> Result<EvalReport> {
    plan.check()?;
    let mc = McPlan {
        variation: plan.variation,
        sigmas: plan.sigmas.clone(),
        mc: plan.mc,
        seed: plan.seed,
        jobs: plan.jobs,
        progress: plan.progress,
    };
    let clean = engine.clean(data)?;
    let t = Instant::now();
    let runs = monte_carlo(engine, data, &mc)?;
    EvalReport::new(resolve(plan, info), clean, &runs, t.elapsed().as_secs_f64())
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
