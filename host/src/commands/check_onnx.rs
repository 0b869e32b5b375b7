//! `nvcim check-onnx MODEL`: runs an ONNX file in tract, in ONNX Runtime and (when the importer
//! takes it) as nvcim's IR on the float engine, on the same images; prints the largest logit
//! difference between each pair and, with labels, each one's accuracy.
//!
//! Images come from the IDX test files of `--data-dir` (MNIST / Fashion-MNIST layout,
//! `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`), scaled to `[0, 1]`, padded
//! to the model's size (28 -> 32 for MNIST), repeated over channels for RGB models, and
//! normalized with the model's `nvcim.normalization.*` metadata; or they are `--random N`
//! standard-normal inputs from the host stream of `--seed`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail, ensure};
use clap::Args;
use nvcim_shared::rng::{Purpose, standard_normal, stream_for};

use crate::engine::float::layers::{Isa, Prepared};
use crate::onnx::{ModelInfo, check::check_onnx, idx_images, read_model};

/// Arguments of `nvcim check-onnx`.
#[derive(Debug, Clone, Args)]
pub struct CheckOnnxArgs {
    /// The ONNX file to check.
    pub model: PathBuf,
    /// Directory with IDX test files (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).
    #[arg(long, conflicts_with = "random")]
    pub data_dir: Option<PathBuf>,
    /// Use N random inputs instead of test images.
    #[arg(long, value_name = "N")]
    pub random: Option<usize>,
    /// Test images used from --data-dir (the first N).
    #[arg(long, default_value_t = 256)]
    pub limit: usize,
    /// Images per runtime call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fail when the runtimes differ by more than this (max abs logit difference).
    #[arg(long, default_value_t = 1e-4)]
    pub max_diff: f32,
    /// Also compare with Burn's logits of this checkpoint (the one the file was exported from;
    /// noisy or QDQ exports differ from it by design).
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the check.
pub fn run(args: &CheckOnnxArgs) -> Result<()> {
    ensure!(args.batch > 0, "--batch must be at least 1");
    let what = args.model.display().to_string();
    let model = read_model(&args.model)?;
    let info = ModelInfo::of(&model, &what)?;
    let (images, labels, n) = match (&args.data_dir, args.random) {
        (Some(dir), _) => {
            ensure!(args.limit > 0, "--limit must be at least 1");
            let (x, y) = idx_images(dir, &model, &info, args.limit)?;
            let n = y.len();
            (x, Some(y), n)
        }
        (None, Some(n)) => {
            ensure!(n > 0, "--random must be at least 1");
            let per: usize = info.image.iter().product();
            let mut rng = stream_for(Purpose::Host, args.seed, 0, 0);
            let x = (0..n * per).map(|_| standard_normal(&mut rng)).collect();
            (x, None, n)
        }
        (None, None) => {
            bail!("give test images with --data-dir DIR or random inputs with --random N")
        }
    };
    let mut report = check_onnx(&args.model, &images, n, labels.as_deref(), args.batch)?;
    // The importer's network, run by the float engine of `nvcim eval --onnx`.
    match crate::onnx::import::import(&model, &what) {
        Ok(imported) => {
            let prepared = Prepared::new(&imported.network, Isa::detect())?;
            let per: usize = info.image.iter().product();
            let mut logits = Vec::with_capacity(n * imported.network.num_classes);
            for start in (0..n).step_by(args.batch) {
                let b = args.batch.min(n - start);
                logits.extend(prepared.logits(&images[start * per..(start + b) * per], b)?);
            }
            if let Some(op) = &imported.dropped_output {
                // Compare what the file outputs: that function of the logits.
                let k = imported.network.num_classes;
                for row in logits.chunks_mut(k) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                    for v in row.iter_mut() {
                        *v = if op == "LogSoftmax" {
                            *v - max - sum.ln()
                        } else {
                            (*v - max).exp() / sum
                        };
                    }
                }
            }
            report.compare_reference("nvcim-ir", logits, labels.as_deref())?;
        }
        Err(e) => {
            eprintln!("note: the importer refuses {what} ({e:#}); only the runtimes compared")
        }
    }
    if let Some(ckpt) = &args.checkpoint {
        let logits = burn_logits(ckpt, &images, n, args.batch)?;
        report.compare_reference("burn", logits, labels.as_deref())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model        {}", report.model);
        println!("images       {} (batch {})", report.images, report.batch);
        println!("onnxruntime  {}", report.onnxruntime);
        for r in &report.runtimes {
            match r.accuracy {
                Some(a) => println!("{:<12} accuracy {:.2}%", r.name, 100.0 * a),
                None => println!("{:<12} (no labels)", r.name),
            }
        }
        for (a, b, d) in &report.max_abs_diff {
            println!("max |{a} - {b}| = {d:.3e}");
        }
    }
    let worst = report.worst_diff();
    ensure!(
        worst <= args.max_diff,
        "the runtimes disagree: max abs logit difference {worst:.3e} > --max-diff {:.1e}",
        args.max_diff
    );
    Ok(())
}

/// Burn's logits of the checkpoint at `ckpt` on `n` normalized images, `batch` at a time.
fn burn_logits(ckpt: &Path, images: &[f32], n: usize, batch: usize) -> Result<Vec<f32>> {
    use burn::tensor::{Tensor, TensorData};
    let device = burn::tensor::Device::flex();
    let loaded = crate::ir::convert::load_checkpoint(ckpt, &device)?;
    let s = &loaded.spec;
    let shape = [s.in_channels, s.image_size, s.image_size];
    let per: usize = shape.iter().product();
    ensure!(
        images.len() == n * per,
        "checkpoint {} takes {shape:?} images, the ONNX model's are {} values each",
        ckpt.display(),
        images.len() / n.max(1)
    );
    let mut out = Vec::with_capacity(n * s.num_classes);
    for start in (0..n).step_by(batch) {
        let b = batch.min(n - start);
        let x = Tensor::<4>::from_data(
            TensorData::new(
                images[start * per..(start + b) * per].to_vec(),
                [b, shape[0], shape[1], shape[2]],
            ),
            &device,
        );
        let y = loaded.backbone.forward(x);
        out.extend(
            y.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
    }
    Ok(out)
}
