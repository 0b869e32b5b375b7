//! `nvcim pack CKPT -o model.cimb` (or `--onnx FILE`): the packed model of the integer CiM
//! engine and the firmware.
//!
//! The checkpoint becomes the Burn-free network ([`crate::ir::convert`]), its description (BatchNorm
//! folded into the requantization records by the packer, never into the weights), per-node
//! activation scales calibrated on the first `--calibration-images` training images, and the
//! packed blob with the device configuration recorded; `--test-images K` appends the first K
//! test images for the firmware. The memory plan on the firmware's board (blob and programmed
//! state in PSRAM, activation arena, patch and logits in RAM) is printed, and a model that does
//! not fit fails here, never inside QEMU. The file is written atomically (temporary file +
//! rename).

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::Device;
use clap::Args;
use nvcim_firmware::fit::memory_plan;
use nvcim_shared::format::{Model, build::PackConfig};
use nvcim_shared::tile::Path as TilePath;

use crate::{
    data::subset,
    ir::convert::load_checkpoint,
    onnx::data,
    options::{DeviceArgs, InputArgs},
    pack::{calibrate_network, pack_network},
    training::checkpoint::write_atomic,
};

/// Arguments of `nvcim pack`.
#[derive(Debug, Clone, Args)]
pub struct PackArgs {
    /// A run directory written by `nvcim train` (its best backbone), or a `backbone.bpk` in one.
    #[arg(required_unless_present = "onnx")]
    pub checkpoint: Option<PathBuf>,
    /// Pack an ONNX model instead (imported; needs --data-dir for calibration and test images,
    /// and --mean/--std unless the file records its normalization).
    #[arg(long, value_name = "FILE", conflicts_with = "checkpoint")]
    pub onnx: Option<PathBuf>,
    /// How an ONNX model's images are prepared (its normalization, size and channels).
    #[command(flatten)]
    pub input: InputArgs,
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
    let scale_mode = if args.scale == "model" {
        nvcim_shared::quant::ScaleMode::PerModel
    } else {
        nvcim_shared::quant::ScaleMode::PerLayer
    };
    let cfg = PackConfig {
        variation,
        tile_rows: args.tile_rows,
        tile_cols: args.tile_cols,
        scale_mode,
    };
    let (net, what, train, test) = match (&args.checkpoint, &args.onnx) {
        (_, Some(path)) => {
            let dir = args.data_dir.as_deref().context(
                "--onnx needs --data-dir DIR (training images calibrate the activation scales)",
            )?;
            let i = &args.input;
            let model = data::open(path, dir, &i.mean, &i.std, i.fit, i.gray_to_rgb, true)?;
            let imported = model.imported?;
            for note in &imported.notes {
                eprintln!("note: {}: {note}", path.display());
            }
            data::check_labels(
                &model.test,
                imported.network.num_classes,
                &path.display().to_string(),
            )?;
            eprintln!("input: {}", model.prepared);
            (imported.network, path.clone(), model.train, model.test)
        }
        (Some(ckpt), None) => {
            let device = Device::flex();
            let loaded = load_checkpoint(ckpt, &device)?;
            let (train, test) = loaded.data(args.data_dir.as_deref())?;
            (loaded.network()?, loaded.path.clone(), train, test)
        }
        (None, None) => bail!("give a checkpoint or --onnx FILE"),
    };
    ensure!(
        args.test_images <= test.len(),
        "--test-images {} but the test set has {} images",
        args.test_images,
        test.len()
    );
    let test = subset(&test, Some(args.test_images));
    let c = calibrate_network(
        net,
        &what,
        &train,
        args.calibration_images,
        &cfg,
        args.calibration_sigma,
    )?;
    let blob = pack_network(&c.net, &c.act_max, &test, &cfg, &what)?;
    let model = Model::parse(&blob).map_err(|e| anyhow::anyhow!("the packed model: {e}"))?;
    // The firmware's memory on its board, ideal ADC (`--adc-bits` keeps every slice: more
    // state, checked again by the firmware).
    let plan = memory_plan(&model, TilePath::Collapsed);
    eprintln!("memory plan on the firmware's board (mps2-an386, ideal ADC):");
    for (name, need, cap) in plan.regions() {
        eprintln!(
            "  {name:<34} {need:>10} B of {cap:>10} B{}",
            if need > cap { "  DOES NOT FIT" } else { "" }
        );
    }
    plan.check().map_err(|e| {
        anyhow::anyhow!(
            "{}: the packed model {e}; use a smaller model or input, or fewer --test-images \
             (nothing was written)",
            what.display()
        )
    })?;
    write_atomic(&args.output, &blob)
        .with_context(|| format!("writing the packed model -o {}", args.output.display()))?;
    eprintln!(
        "packed {} -> {} ({} bytes, {} weight layers, {} test images)",
        what.display(),
        args.output.display(),
        blob.len(),
        model.layer_count(),
        model.test_len()
    );
    Ok(())
}
