//! `nvcim pack CKPT -o model.cimb`: the packed model of the integer CiM engine and the firmware.
//!
//! The checkpoint becomes the Burn-free network ([`crate::ir::convert`]), its description (BatchNorm
//! folded into the requantization records by the packer, never into the weights), per-node
//! activation scales calibrated on the first `--calibration-images` training images, and the
//! packed blob with the device configuration recorded; `--test-images K` appends the first K
//! test images for the firmware. The file is written atomically (temporary file + rename).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use burn::tensor::Device;
use clap::Args;
use nvcim_shared::format::{Model, build::PackConfig};

use crate::{
    data::subset, ir::convert::load_checkpoint, options::DeviceArgs, pack::pack_checkpoint,
    training::checkpoint::write_atomic,
};

/// Arguments of `nvcim pack`.
#[derive(Debug, Clone, Args)]
pub struct PackArgs {
    /// A run directory written by `nvcim train` (its best backbone), or a `backbone.bpk` in one.
    pub checkpoint: PathBuf,
    /// The packed model to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Append the first K test images (and labels) for the firmware.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub test_images: usize,
    /// Training images used to calibrate the activation scales.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub calibration_images: usize,
    /// Also calibrate on noisy runs at this sigma (in --sigma-unit), so that device variation
    /// does not clip the 8-bit activations; 0 calibrates on the clean weights only.
    #[arg(long, value_name = "SIGMA", default_value_t = 0.4)]
    pub calibration_sigma: f32,
    /// Dataset directory (default: the one the checkpoint was trained on).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The device model recorded in the file (its sigma is 0; runs choose theirs).
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Crossbar rows per tile.
    #[arg(long, default_value_t = 128)]
    pub tile_rows: usize,
    /// Crossbar columns per tile.
    #[arg(long, default_value_t = 128)]
    pub tile_cols: usize,
    /// Quantize each layer against its own max|W| (`layer`) or the model's (`model`).
    #[arg(long, value_parser = ["layer", "model"], default_value = "layer")]
    pub scale: String,
}

/// Runs `nvcim pack`.
pub fn run(args: &PackArgs) -> Result<()> {
    let variation = args.device.variation(0.0)?;
    let device = Device::flex();
    let loaded = load_checkpoint(&args.checkpoint, &device)?;
    let (train, test) = loaded.data(args.data_dir.as_deref())?;
    ensure!(
        args.test_images <= test.len(),
        "--test-images {} but the test set has {} images",
        args.test_images,
        test.len()
    );
    let test = subset(&test, Some(args.test_images));
    let scale_mode = if args.scale == "model" {
        nvcim_shared::quant::ScaleMode::PerModel
    } else {
        nvcim_shared::quant::ScaleMode::PerLayer
    };
    let blob = pack_checkpoint(
        &loaded,
        &train,
        &test,
        args.calibration_images,
        &PackConfig {
            variation,
            tile_rows: args.tile_rows,
            tile_cols: args.tile_cols,
            scale_mode,
        },
        args.calibration_sigma,
    )?;
    let model = Model::parse(&blob).map_err(|e| anyhow::anyhow!("the packed model: {e}"))?;
    write_atomic(&args.output, &blob)
        .with_context(|| format!("writing the packed model -o {}", args.output.display()))?;
    eprintln!(
        "packed {} -> {} ({} bytes, {} weight layers, {} test images)",
        loaded.path.display(),
        args.output.display(),
        blob.len(),
        model.layer_count(),
        model.test_len()
    );
    Ok(())
}
