//! `nvcim export CKPT -o model.onnx`: the backbone of a checkpoint as ONNX (exits never appear),
//! with `metadata_props` from the run's training configuration.
//!
//! `--noisy-instance --sigma S --seed K --run R` exports the weights of Monte Carlo run R of
//! `nvcim eval --engine float --seed K` at sigma S (same streams, noise applied to the unfolded
//! weights before any folding); `--qdq` adds QuantizeLinear/DequantizeLinear pairs for the
//! 8-bit weight quantization; `--fold-bn` folds BatchNorm into the convolutions.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use burn::tensor::Device;
use clap::Args;

use crate::{
    ir::convert::load_checkpoint,
    onnx::export::{ExportOptions, NoisyInstance, export},
    options::DeviceArgs,
};

/// Arguments of `nvcim export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// A run directory written by `nvcim train` (its best backbone), or a `backbone.bpk` in one.
    pub checkpoint: PathBuf,
    /// The ONNX file to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Fold BatchNorm into the preceding convolutions.
    #[arg(long)]
    pub fold_bn: bool,
    /// Express the weight quantization (--m bits) as QuantizeLinear/DequantizeLinear pairs.
    #[arg(long)]
    pub qdq: bool,
    /// Export one sampled device instance (Monte Carlo run --run under --seed at --sigma).
    #[arg(long)]
    pub noisy_instance: bool,
    /// Sigma of the noisy instance, in the unit of --sigma-unit.
    #[arg(long, requires = "noisy_instance")]
    pub sigma: Option<f32>,
    /// Seed of the noisy instance (`nvcim eval --seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Monte Carlo run index of the noisy instance.
    #[arg(long, default_value_t = 0)]
    pub run: u32,
    /// The device model of --noisy-instance and --qdq.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `nvcim export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let noisy = if args.noisy_instance {
        let sigma = args
            .sigma
            .context("--noisy-instance needs --sigma S (the device variation to sample)")?;
        ensure!(
            sigma.is_finite() && sigma >= 0.0,
            "--sigma must be finite and >= 0"
        );
        Some(NoisyInstance {
            variation: args.device.variation(sigma)?,
            seed: args.seed,
            run: args.run,
        })
    } else {
        None
    };
    let qdq = if args.qdq {
        Some(args.device.quant()?)
    } else {
        None
    };
    let loaded = load_checkpoint(&args.checkpoint, &Device::flex())?;
    let net = loaded.network()?;
    let opts = ExportOptions {
        fold_batchnorm: args.fold_bn,
        qdq,
        noisy,
    };
    export(&net, &opts, &args.output)
        .with_context(|| format!("exporting to -o {}", args.output.display()))?;
    eprintln!(
        "exported {} -> {}",
        loaded.path.display(),
        args.output.display()
    );
    Ok(())
}
