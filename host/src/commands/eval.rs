//! `nvcim eval CKPT`: Monte Carlo robustness evaluation (Algorithm 2) of a trained checkpoint,
//! with the float engine (the network with perturbed weights in `f32`, [`crate::engine::float`])
//! or the integer CiM engine (the packed model the firmware runs, [`crate::engine::int`]); and
//! `nvcim eval --onnx FILE`, any ONNX CNN the importer takes ([`crate::onnx::import`]) on the
//! same engines, or through tract (`--engine tract`, [`crate::engine::onnx`]: which weights are
//! perturbed and how), its images from `--data-dir` brought to the model's input and normalized
//! as the file's metadata or `--mean`/`--std` say ([`crate::onnx::data`]).
//!
//! All engines follow the contract of [`crate::engine`]: run `r` under seed `s` perturbs weight
//! layer `l` from `stream(s, r, l)`, one `VariationConfig::sample` per weight in canonical order,
//! quantized against the layer's `max|W|` (or the model's, `--scale model`). The float engine
//! classifies with `read_weight` of those draws in `f32`; the integer engine programs the same
//! draws into its tiles (fixed point) and runs integer inference with calibrated 8-bit
//! activations, so the two differ only by activation quantization and the tile's fixed point.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use burn::tensor::Device;
use clap::Args;
use nvcim_shared::format::build::PackConfig;
use tract_onnx::pb::ModelProto;

use crate::{
    data::subset,
    engine::{
        BnRecalibration,
        float::{FLOAT_BATCH, FloatData, FloatEngine, float_engine},
        int::{int_engine, int_engine_for},
        onnx::{OnnxData, OnnxEngine},
    },
    eval::{Engine, EvalOptions, EvalPlan, ModelInfo, Output, checkpoint_info, evaluate},
    ir::convert::load_checkpoint,
    onnx::data,
    options::InputArgs,
};

/// Arguments of `nvcim eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A run directory written by `nvcim train` (its best backbone), or a `backbone.bpk` in one.
    #[arg(required_unless_present = "onnx")]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate an ONNX model instead (imported; the float engine by default, `--engine int`
    /// for the CiM engine, `--engine tract` for tract; needs --data-dir).
    #[arg(long, value_name = "FILE", conflicts_with = "checkpoint")]
    pub onnx: Option<PathBuf>,
    /// Dataset directory (default: the one the checkpoint was trained on).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Training images used to calibrate the integer engine's activation scales.
    #[arg(long, default_value_t = 256)]
    pub calibration_images: usize,
    /// How an ONNX model's images are prepared (its normalization, size and channels).
    #[command(flatten)]
    pub input: InputArgs,
    /// The evaluation flags.
    #[command(flatten)]
    pub eval: EvalOptions,
}

/// Runs `nvcim eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    crate::kernels::Isa::log_choice();
    let plan = args.eval.plan()?;
    let out = args.eval.output();
    if let Some(onnx) = &args.onnx {
        return run_onnx(onnx, args, &plan, &out);
    }
    ensure!(
        plan.engine != Engine::Tract,
        "--engine tract runs an ONNX file (--onnx FILE); a checkpoint runs on the float or int \
         engine"
    );
    let ckpt = args
        .checkpoint
        .as_deref()
        .context("give a checkpoint or --onnx FILE")?;
    let device = Device::flex();
    let loaded = load_checkpoint(ckpt, &device)?;
    let (train, test) = loaded.data(args.data_dir.as_deref())?;
    let test = subset(&test, plan.test_subset);
    let info = checkpoint_info(&loaded, ckpt);
    let recal = plan
        .bn_recalibrate
        .map(|n| BnRecalibration::new(&train, n, plan.seed))
        .transpose()?;
    match plan.engine {
        Engine::Float => {
            let (mut engine, data) = float_engine(&loaded, &test, plan.scale_mode, FLOAT_BATCH)?;
            if let Some(r) = recal {
                engine = engine.with_recalibration(r)?;
            }
            evaluate(&plan, &out, &info, &engine, &data)?;
        }
        Engine::Int => {
            let engine = int_engine(
                &loaded,
                &train,
                &test,
                args.calibration_images,
                &pack_config(&plan),
                plan.tiles.adc_bits,
                plan.max_sigma(),
                recal,
            )?;
            evaluate(&plan, &out, &info, &engine, &())?;
        }
        Engine::Tract => unreachable!("refused above"),
    }
    Ok(())
}

/// What an ONNX file's `metadata_props` say about the model, for the result files (`dataset`
/// names the data when the file does not).
pub fn onnx_model_info(engine: &OnnxEngine, path: &Path, dataset: &str) -> ModelInfo {
    onnx_info(engine.model(), path, dataset)
}

/// Runs `nvcim eval --onnx FILE`: the file imported into the IR and run by the float (default)
/// or integer engine, or run by tract with its weights perturbed (`--engine tract`, the
/// independent cross-check; the same layers and streams).
fn run_onnx(path: &Path, args: &EvalArgs, plan: &EvalPlan, out: &Output) -> Result<()> {
    let dir = args
        .data_dir
        .as_deref()
        .context("--onnx needs --data-dir DIR with the test images (IDX or CIFAR files)")?;
    let i = &args.input;
    let tract = plan.engine == Engine::Tract;
    let model =
        data::open(path, dir, &i.mean, &i.std, i.fit, i.gray_to_rgb, !tract).map_err(|e| {
            if tract {
                e
            } else {
                e.context(format!(
                    "the {} engine runs the imported model (`--engine tract` runs what tract runs)",
                    plan.engine.name()
                ))
            }
        })?;
    let what = path.display().to_string();
    let norm = model.prepared.normalization.0.clone();
    let test = subset(&model.test, plan.test_subset);
    let recal_images = |n: usize| {
        data::recalibration_batch(
            &model.train,
            n,
            plan.seed,
            &norm,
            &format!(" in {}", dir.display()),
        )
    };
    let mut info = onnx_info(&model.proto, path, &dir.display().to_string());
    info.preprocess = Some(model.prepared.to_string());
    if plan.engine == Engine::Tract {
        ensure!(
            plan.scale_mode == nvcim_shared::quant::ScaleMode::PerLayer,
            "--engine tract quantizes each layer against its own max|W|; --scale model needs the \
             float or int engine"
        );
        let engine = OnnxEngine::new(path)?;
        let engine = match plan.bn_recalibrate {
            None => engine,
            Some(n) => engine.with_recalibration(recal_images(n)?, n)?,
        };
        let data = OnnxData {
            images: data::normalized(&test, &norm),
            labels: test.labels.iter().map(|&l| u32::from(l)).collect(),
        };
        evaluate(plan, out, &info, &engine, &data)?;
        return Ok(());
    }
    let imported = model.imported?;
    for note in &imported.notes {
        eprintln!("note: {what}: {note}");
    }
    let net = imported.network;
    data::check_labels(&test, net.num_classes, &what)?;
    ensure!(
        plan.bn_recalibrate.is_none() || crate::engine::has_batchnorm(&net),
        "--bn-recalibrate: {what} has no BatchNormalization node (exported with BatchNorm \
         folded, or a network without it): there are no statistics to recalibrate; leave the \
         flag out"
    );
    let recal = plan
        .bn_recalibrate
        .map(|n| recal_images(n).map(|x| BnRecalibration::from_images(x, n)))
        .transpose()?;
    match plan.engine {
        Engine::Float => {
            let mut engine = FloatEngine::new(net, plan.scale_mode)?;
            if let Some(r) = recal {
                engine = engine.with_recalibration(r)?;
            }
            let data = FloatData::new(&data::batches(&test, &norm, FLOAT_BATCH));
            evaluate(plan, out, &info, &engine, &data)?;
        }
        Engine::Int => {
            let engine = int_engine_for(
                net,
                path,
                &model.train,
                &test,
                args.calibration_images,
                &pack_config(plan),
                plan.tiles.adc_bits,
                plan.max_sigma(),
                recal,
            )?;
            evaluate(plan, out, &info, &engine, &())?;
        }
        Engine::Tract => unreachable!("handled above"),
    }
    Ok(())
}

/// The packing configuration of `--engine int`.
fn pack_config(plan: &EvalPlan) -> PackConfig {
    PackConfig {
        variation: plan.variation,
        tile_rows: plan.tiles.rows,
        tile_cols: plan.tiles.cols,
        scale_mode: plan.scale_mode,
    }
}

/// What an ONNX file's `metadata_props` say about the model, for the result files (`dataset`
/// names the data when the file does not).
pub fn onnx_info(model: &ModelProto, path: &Path, dataset: &str) -> ModelInfo {
    let meta = |k: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    ModelInfo {
        checkpoint: path.display().to_string(),
        model: meta("nvcim.architecture").unwrap_or_else(|| "onnx".into()),
        dataset: meta("nvcim.dataset").unwrap_or_else(|| dataset.to_string()),
        method: meta("nvcim.method").unwrap_or_else(|| "external".into()),
        alpha: meta("nvcim.alpha").and_then(|a| a.parse().ok()),
        train_sigma: meta("nvcim.train_sigma").and_then(|a| a.parse().ok()),
        ..ModelInfo::default()
    }
}
