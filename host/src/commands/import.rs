//! `nvcim import`: load a PyTorch state dict (`.pt`/`.pth`) or safetensors file (the authors'
//! names or nvcim's) into a backbone and save it as `--out/backbone.bpk` with `model.json`, so
//! it can be evaluated, exported and packed like a backbone nvcim trained.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use clap::Args;

use crate::data::DatasetKind;
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
    /// nvcim pads 28x28 images instead; an imported MNIST model's BatchNorm statistics were
    /// measured on resized images (see the README's Fidelity section).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
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
    };
    let backbone = import::import_backbone(&args.weights, &spec, &Device::flex())?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("backbone.bpk");
    backbone
        .save_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    write_json_atomic(&args.out.join("model.json"), &serde_json::to_value(&spec)?)?;
    println!("imported {} -> {}", args.weights.display(), path.display());
    Ok(())
}
