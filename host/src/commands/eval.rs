//! `nvcim eval CKPT`: Monte Carlo robustness evaluation (Algorithm 2) of a trained checkpoint,
//! with the float engine (the network with perturbed weights in `f32`, [`crate::engine::float`])
//! or the integer CiM engine (the packed model the firmware runs, [`crate::engine::int`]); and
//! `nvcim eval --onnx FILE`, an external ONNX CNN through tract ([`crate::engine::onnx`]: which
//! weights are perturbed and how), its test images from the IDX test files of `--data-dir`
//! (padded to the model's size, normalized with the model's `nvcim.normalization.*` metadata).
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

use crate::{
    data::subset,
    engine::{
        BnRecalibration,
        float::{FLOAT_BATCH, float_engine},
        int::int_engine,
        onnx::{OnnxData, OnnxEngine},
        recalibration_images,
    },
    eval::{Engine, EvalOptions, ModelInfo, checkpoint_info, evaluate},
    ir::convert::load_checkpoint,
    onnx::{ModelInfo as OnnxInfo, idx_images, idx_split_images},
};

/// Arguments of `nvcim eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A run directory written by `nvcim train` (its best backbone), or a `backbone.bpk` in one.
    #[arg(required_unless_present = "onnx")]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate an external ONNX model instead (through tract; float engine; needs --data-dir).
    #[arg(long, value_name = "FILE", conflicts_with = "checkpoint")]
    pub onnx: Option<PathBuf>,
    /// Dataset directory (default: the one the checkpoint was trained on).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Training images used to calibrate the integer engine's activation scales.
    #[arg(long, default_value_t = 256)]
    pub calibration_images: usize,
    /// The evaluation flags.
    #[command(flatten)]
    pub eval: EvalOptions,
}

/// Runs `nvcim eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let sigmas = args.eval.check()?;
    if let Some(onnx) = &args.onnx {
        return run_onnx(onnx, args);
    }
    let ckpt = args
        .checkpoint
        .as_deref()
        .context("give a checkpoint or --onnx FILE")?;
    let device = Device::flex();
    let loaded = load_checkpoint(ckpt, &device)?;
    let (train, test) = loaded.data(args.data_dir.as_deref())?;
    let test = subset(&test, args.eval.test_subset);
    let info = checkpoint_info(&loaded, ckpt);
    let recal = args
        .eval
        .bn_recalibrate
        .map(|n| BnRecalibration::new(&train, n, args.eval.seed))
        .transpose()?;
    match args.eval.engine {
        Engine::Float => {
            let (mut engine, data) =
                float_engine(&loaded, &test, args.eval.scale_mode(), FLOAT_BATCH)?;
            if let Some(r) = recal {
                engine = engine.with_recalibration(r)?;
            }
            evaluate(&args.eval, &info, &engine, &data)?;
        }
        Engine::Int => {
            let cfg = PackConfig {
                variation: args.eval.device.variation(0.0)?,
                tile_rows: args.eval.tile_rows,
                tile_cols: args.eval.tile_cols,
                scale_mode: args.eval.scale_mode(),
            };
            let engine = int_engine(
                &loaded,
                &train,
                &test,
                args.calibration_images,
                &cfg,
                args.eval.adc_bits,
                sigmas.iter().copied().fold(0.0, f32::max),
                recal,
            )?;
            evaluate(&args.eval, &info, &engine, &())?;
        }
    }
    Ok(())
}

/// What an ONNX file's `metadata_props` say about the model, for the result files (`dataset`
/// names the data when the file does not).
pub fn onnx_model_info(engine: &OnnxEngine, path: &Path, dataset: &str) -> ModelInfo {
    let meta = |k: &str| {
        engine
            .model()
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

/// Runs `nvcim eval --onnx FILE`.
fn run_onnx(path: &Path, args: &EvalArgs) -> Result<()> {
    ensure!(
        args.eval.engine == Engine::Float,
        "--onnx evaluates through tract (float); --engine int needs a checkpoint"
    );
    ensure!(
        args.eval.scale_mode() == nvcim_shared::quant::ScaleMode::PerLayer,
        "--onnx quantizes each layer against its own max|W|; --scale model is not supported"
    );
    let dir = args
        .data_dir
        .as_deref()
        .context("--onnx needs --data-dir DIR with IDX test files")?;
    let engine = OnnxEngine::new(path)?;
    let info = OnnxInfo::of(engine.model(), engine.what())?;
    let limit = args.eval.test_subset.unwrap_or(usize::MAX);
    let (images, labels) = idx_images(dir, engine.model(), &info, limit)?;
    let engine = match args.eval.bn_recalibrate {
        None => engine,
        Some(n) => {
            // The same seeded choice as a checkpoint's evaluation, from --data-dir's training
            // files.
            let where_ = format!(" in {}", dir.display());
            let (recal, _) = idx_split_images(dir, "train", engine.model(), &info, |len| {
                recalibration_images(len, n, args.eval.seed, &where_)
            })?;
            engine.with_recalibration(recal, n)?
        }
    };
    let eval_info = onnx_model_info(&engine, path, &dir.display().to_string());
    evaluate(
        &args.eval,
        &eval_info,
        &engine,
        &OnnxData { images, labels },
    )?;
    Ok(())
}
