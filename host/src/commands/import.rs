//! `nvcim import`: load a PyTorch state dict (`.pt`/`.pth`) or safetensors file (the authors'
//! names or nvcim's) into a backbone and save it as a run directory (`--out/best/backbone.bpk`,
//! `model.json`, and a `config.json` naming the dataset and its preprocessing), so that
//! `nvcim eval --out`, `export` and `pack` take it like a backbone nvcim trained.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use clap::Args;

use crate::data::{DatasetKind, Preprocess};
use crate::model::{Arch, ModelSpec, import};
use crate::training::checkpoint::write_json_atomic;

/// Arguments of `nvcim import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The weights: `.pt`, `.pth` or `.safetensors`.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// The network.
    #[arg(long, value_enum, default_value_t = Arch::Vgg8)]
    pub model: Arch,
    /// Width multiplier the weights were trained with.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    /// The dataset (sets input channels and classes).
    #[arg(long, value_enum, default_value_t = DatasetKind::Mnist)]
    pub dataset: DatasetKind,
    /// Input image size (32 for the authors' MNIST, which they resize from 28, and for CIFAR).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// How evaluation brings 28x28 images to --image-size: `resize` (default: the authors'
    /// bilinear resize and mean/std 0.5, which their BatchNorm statistics were measured on) or
    /// `pad` (nvcim's). Recorded in the run's config.json.
    #[arg(long, value_enum, default_value_t = Preprocess::Resize)]
    pub preprocess: Preprocess,
    /// Where evaluation finds the dataset (default: the dataset's usual location).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "runs/import")]
    pub out: PathBuf,
}

/// Runs `nvcim import`.
pub fn run(args: &ImportArgs) -> Result<()> {
    let spec = ModelSpec {
        arch: args.model,
        width: args.width,
        in_channels: args.dataset.channels(),
        image_size: args.image_size,
        num_classes: args.dataset.classes(),
        graph: None,
    };
    let backbone = import::import_backbone(&args.weights, &spec, &Device::flex())?;
    let best = args.out.join("best");
    std::fs::create_dir_all(&best).with_context(|| format!("creating {}", best.display()))?;
    let path = best.join("backbone.bpk");
    backbone
        .save_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    write_json_atomic(&args.out.join("model.json"), &serde_json::to_value(&spec)?)?;
    let native = if args.dataset.augments() { 32 } else { 28 };
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| args.dataset.default_dir());
    let config = serde_json::json!({
        "dataset": args.dataset,
        "data_dir": data_dir,
        "pad32": args.image_size == 32 && native == 28,
        "preprocess": args.preprocess,
        "model": spec,
        "method": "imported",
        "imported_from": args.weights,
    });
    write_json_atomic(&args.out.join("config.json"), &config)?;
    println!("imported {} -> {}", args.weights.display(), path.display());
    Ok(())
}
