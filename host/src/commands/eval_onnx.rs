//! `nvcim eval --onnx FILE`: the Monte Carlo evaluation of an external ONNX CNN through tract,
//! with the same outputs as a checkpoint's (see [`crate::onnx::mc`] for which weights are
//! perturbed and how: the contract's streams, in the file's node order).
//!
//! Test images come from the IDX test files of `--data-dir` (as `nvcim check-onnx` reads them:
//! padded to the model's size, normalized with the model's `nvcim.normalization.*` metadata).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use nvcim_shared::variation::VariationConfig;
use tract_onnx::pb::ModelProto;

use crate::{
    commands::{check_onnx::idx_images, eval::EvalArgs},
    evaluation::{Engine, ModelInfo as EvalInfo, evaluate},
    mc::{NoisyClassifier, argmax},
    onnx::{
        ModelInfo,
        mc::{ForeignLayer, logits_of, perturbed_model, weight_layers},
        read_model,
        run::TractRunner,
    },
};

/// An external ONNX model whose Conv/Gemm/MatMul weights are perturbed per run.
pub struct OnnxEngine {
    model: ModelProto,
    layers: Vec<ForeignLayer>,
    what: String,
}

/// Normalized test images (flat NCHW) and their labels.
pub struct OnnxData {
    images: Vec<f32>,
    labels: Vec<u32>,
}

impl OnnxEngine {
    /// Reads `path` and finds its weight layers (an op it cannot perturb is named in the error).
    pub fn new(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let model = read_model(path)?;
        let layers = weight_layers(&model, &what)?;
        Ok(OnnxEngine {
            model,
            layers,
            what,
        })
    }

    fn count(&self, model: &ModelProto, data: &OnnxData) -> Result<usize> {
        let mut runner = TractRunner::from_proto(model, &self.what)?;
        let logits = logits_of(&mut runner, &data.images, data.labels.len())?;
        let classes = logits.len() / data.labels.len().max(1);
        ensure!(classes > 0, "{}: no logits", self.what);
        Ok(logits
            .chunks(classes)
            .zip(&data.labels)
            .filter(|&(row, &y)| argmax(row) == y as usize)
            .count())
    }
}

impl NoisyClassifier for OnnxEngine {
    type Data = OnnxData;

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn num_examples(&self, data: &OnnxData) -> usize {
        data.labels.len()
    }

    fn clean(&self, data: &OnnxData) -> Result<usize> {
        self.count(&self.model, data)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, data: &OnnxData) -> Result<usize> {
        let noisy = perturbed_model(&self.model, &self.layers, var, seed, run, &self.what)?;
        self.count(&noisy, data)
    }
}

/// Runs `nvcim eval --onnx FILE`.
pub fn run(path: &Path, args: &EvalArgs) -> Result<()> {
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
    let info = ModelInfo::of(&engine.model, &engine.what)?;
    let limit = args.eval.test_subset.unwrap_or(usize::MAX);
    let (images, labels) = idx_images(dir, &engine.model, &info, limit)?;
    let meta = |k: &str| {
        engine
            .model
            .metadata_props
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    let eval_info = EvalInfo {
        checkpoint: path.display().to_string(),
        model: meta("nvcim.architecture").unwrap_or_else(|| "onnx".into()),
        dataset: meta("nvcim.dataset").unwrap_or_else(|| dir.display().to_string()),
        method: meta("nvcim.method").unwrap_or_else(|| "external".into()),
        alpha: meta("nvcim.alpha").and_then(|a| a.parse().ok()),
        train_sigma: meta("nvcim.train_sigma").and_then(|a| a.parse().ok()),
        ..EvalInfo::default()
    };
    evaluate(
        &args.eval,
        &eval_info,
        &engine,
        &OnnxData { images, labels },
    )?;
    Ok(())
}
