//! `nvcim eval CKPT`: Monte Carlo robustness evaluation (Algorithm 2) of a trained checkpoint,
//! with the float engine (the network with perturbed weights in `f32`,
//! [`crate::layerwise_f32`]) or the integer CiM engine (the packed model the firmware runs,
//! [`crate::layerwise`]).
//!
//! Both engines follow the contract of [`crate::mc`]: run `r` under seed `s` perturbs weight
//! layer `l` from `stream(s, r, l)`, one `VariationConfig::sample` per weight in canonical order,
//! quantized against the layer's `max|W|` (or the model's, `--scale model`). The float engine
//! classifies with `read_weight` of those draws in `f32`; the integer engine programs the same
//! draws into its tiles (fixed point) and runs integer inference with calibrated 8-bit
//! activations, so the two differ only by activation quantization and the tile's fixed point.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use burn::tensor::Device;
use clap::Args;
use nvcim_shared::{
    exec::{Scratch, count_correct_with, program},
    format::{
        Model,
        build::{self, PackConfig, Readback, TestBatch, act_scales, activation_max, pack},
    },
    quant::{ScaleMode, layer_scale},
    rng::stream,
    tile::{Adc, Path as TilePath},
    variation::VariationConfig,
};

use crate::{
    convert::{Loaded, desc_nodes, load_checkpoint, model_desc},
    data::{self, Batch, Dataset},
    evaluation::{Engine, EvalOptions, ModelInfo, evaluate},
    ir::Network,
    kernel::HostKernel,
    layerwise, layerwise_f32,
    mc::NoisyClassifier,
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
        return crate::commands::eval_onnx::run(onnx, args);
    }
    let ckpt = args
        .checkpoint
        .as_deref()
        .context("give a checkpoint or --onnx FILE")?;
    let device = Device::flex();
    let loaded = load_checkpoint(ckpt, &device)?;
    let (train, test) = loaded.data(args.data_dir.as_deref())?;
    let test = subset(&test, args.eval.test_subset);
    let info = model_info(&loaded, ckpt);
    match args.eval.engine {
        Engine::Float => {
            let (engine, data) = float_engine(&loaded, &test, args.eval.scale_mode(), FLOAT_BATCH)?;
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
            )?;
            evaluate(&args.eval, &info, &engine, &())?;
        }
    }
    Ok(())
}

/// Images per batch of the float engine in `nvcim eval` ([`layerwise_f32::BATCH`]).
pub const FLOAT_BATCH: usize = layerwise_f32::BATCH;

/// The float engine of `nvcim eval` over the checkpoint's backbone, and its test data in
/// batches of `batch` images.
pub fn float_engine(
    loaded: &Loaded,
    test: &Dataset,
    mode: ScaleMode,
    batch: usize,
) -> Result<(FloatEngine, FloatData)> {
    let engine = FloatEngine::new(loaded.network()?, mode)?;
    let data = FloatData::new(&batches(test, batch));
    Ok((engine, data))
}

/// The integer engine of `nvcim eval`: the checkpoint packed with `test` and activation scales
/// calibrated on `calibration` training images (see [`pack_checkpoint`]), with an ideal ADC or
/// one of `adc_bits`.
pub fn int_engine(
    loaded: &Loaded,
    train: &Dataset,
    test: &Dataset,
    calibration: usize,
    cfg: &PackConfig,
    adc_bits: Option<u8>,
    noisy_sigma: f32,
) -> Result<IntEngine> {
    let blob = pack_checkpoint(loaded, train, test, calibration, cfg, noisy_sigma)?;
    IntEngine::new(blob, adc_bits)
}

/// The first `n` examples of `test` (all when `None` or larger).
pub fn subset(test: &Dataset, n: Option<usize>) -> Dataset {
    match n {
        Some(n) if n < test.len() => test.subset(&(0..n).collect::<Vec<_>>()),
        _ => test.clone(),
    }
}

/// The checkpoint's description for the result files.
pub fn model_info(loaded: &Loaded, given: &Path) -> ModelInfo {
    let c = &loaded.config;
    let method = c["method"].as_str().unwrap_or("unknown").to_string();
    ModelInfo {
        checkpoint: given.display().to_string(),
        model: format!("{:?}", loaded.spec.arch).to_lowercase(),
        dataset: loaded.dataset.display_name().to_string(),
        noise_injection: Some(method != "vanilla"),
        method,
        alpha: c["alpha"].as_f64(),
        train_sigma: c["variation"]["sigma"].as_f64().map(|s| s as f32),
        train_seed: c["seed"].as_u64(),
        drop_exit: c["drop_exit"].as_u64().map(|d| d as usize),
    }
}

/// The test set as normalized batches of at most `size` images.
pub fn batches(test: &Dataset, size: usize) -> Vec<Batch> {
    let idx: Vec<usize> = (0..test.len()).collect();
    idx.chunks(size.max(1))
        .map(|c| data::make_batch(test, c, None))
        .collect()
}

/// The quantization scale of every weight layer (`max|W|` of the layer, or of the model).
pub fn weight_scales(weights: &[Vec<f32>], mode: ScaleMode) -> Result<Vec<f32>> {
    let mut scales = weights
        .iter()
        .enumerate()
        .map(|(l, w)| layer_scale(w).with_context(|| format!("weight layer {l}")))
        .collect::<Result<Vec<f32>>>()?;
    if mode == ScaleMode::PerModel {
        let max = scales.iter().copied().fold(0.0f32, f32::max);
        scales.iter_mut().for_each(|s| *s = max);
    }
    Ok(scales)
}

/// The weights of Monte Carlo run `run` under `seed` (the contract's streams).
pub fn noisy_weights(
    clean: &[Vec<f32>],
    scales: &[f32],
    var: &VariationConfig,
    seed: u64,
    run: u32,
) -> Result<Vec<Vec<f32>>> {
    clean
        .iter()
        .zip(scales)
        .enumerate()
        .map(|(l, (w, &scale))| {
            let mut out = vec![0.0; w.len()];
            var.perturb_f32(w, scale, &mut stream(seed, run, l as u32), &mut out)
                .with_context(|| format!("perturbing weight layer {l}"))?;
            Ok(out)
        })
        .collect()
}

/// The float engine: the checkpoint's network ([`crate::ir`]) with each run's perturbed
/// weights, classified by [`layerwise_f32`] (an `f32` engine that matches Burn's forward pass
/// to `1e-4` of the logits' scale; see the test below).
pub struct FloatEngine {
    net: Network,
    clean: Vec<Vec<f32>>,
    scales: Vec<f32>,
}

impl FloatEngine {
    /// An engine over `net`, its weights quantized against per-layer or per-model `max|W|`.
    pub fn new(net: Network, mode: ScaleMode) -> Result<Self> {
        let clean: Vec<Vec<f32>> = net.weights().into_iter().map(<[f32]>::to_vec).collect();
        let scales = weight_scales(&clean, mode)?;
        Ok(FloatEngine { net, clean, scales })
    }

    /// The network with the weights of run `run` under `seed`.
    pub fn noisy_network(&self, var: &VariationConfig, seed: u64, run: u32) -> Result<Network> {
        let noisy = noisy_weights(&self.clean, &self.scales, var, seed, run)?;
        let mut net = self.net.clone();
        net.set_weights(noisy)?;
        Ok(net)
    }

    fn count(&self, net: &Network, data: &FloatData) -> Result<usize> {
        layerwise_f32::Prepared::new(net, layerwise_f32::Isa::detect())?
            .count_correct(&data.batches)
    }
}

/// The float engine's test set: normalized `[n][c][h][w]` batches and their labels, converted
/// once for every run.
pub struct FloatData {
    batches: Vec<(Vec<f32>, Vec<i64>)>,
}

impl FloatData {
    /// The batches' images and labels.
    pub fn new(batches: &[Batch]) -> Self {
        FloatData {
            batches: batches
                .iter()
                .map(|b| (b.images.clone(), b.labels.clone()))
                .collect(),
        }
    }
}

impl NoisyClassifier for FloatEngine {
    type Data = FloatData;

    fn num_layers(&self) -> usize {
        self.clean.len()
    }

    fn num_examples(&self, data: &FloatData) -> usize {
        data.batches.iter().map(|(_, l)| l.len()).sum()
    }

    fn clean(&self, data: &FloatData) -> Result<usize> {
        self.count(&self.net, data)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, data: &FloatData) -> Result<usize> {
        let net = self.noisy_network(var, seed, run)?;
        self.count(&net, data)
    }
}

/// The seed of the Monte Carlo runs that activation calibration looks at: fixed, and kept away
/// from the small seeds users evaluate with.
pub const CALIBRATION_SEED: u64 = 0x00ca_11b8_a7e5_eed5;
/// Noisy runs per calibration sigma.
pub const CALIBRATION_RUNS: u32 = 2;

/// Packs a checkpoint: IR -> description -> activation scales calibrated on the first
/// `calibration` training images -> the packed blob, with `test` appended.
///
/// With `noisy_sigma > 0` the scales are the largest activations over the clean weights and
/// [`CALIBRATION_RUNS`] noisy runs at that sigma (seed [`CALIBRATION_SEED`], the tile's
/// fixed-point read-back), so that device variation does not clip the 8-bit activations; with
/// clean-only scales the integer engine loses accuracy at large sigma that the float engine
/// keeps (measured: 19% vs 41% at sigma 0.6 on the integration test's model).
pub fn pack_checkpoint(
    loaded: &Loaded,
    train: &Dataset,
    test: &Dataset,
    calibration: usize,
    cfg: &PackConfig,
    noisy_sigma: f32,
) -> Result<Vec<u8>> {
    ensure!(calibration > 0, "--calibration-images must be at least 1");
    let net = loaded.network()?;
    let mut nodes = desc_nodes(&net)?;
    let n = calibration.min(train.len());
    let images = &train.images[..n * train.image_bytes()];
    // With noisy calibration the first pass only makes a probe model whose weights the noisy
    // runs read (its scales are replaced below), so a few images do.
    let len = images.len() / n.max(1);
    let first = if noisy_sigma > 0.0 {
        &images[..n.min(8) * len]
    } else {
        images
    };
    let act = calibrate_parallel(&model_desc(&net, &nodes), &[None], first)?;
    for (node, a) in nodes.iter_mut().zip(act) {
        node.act_max = a;
    }
    if noisy_sigma > 0.0 {
        let probe = pack(&model_desc(&net, &nodes), cfg, None)
            .map_err(|e| anyhow::anyhow!("packing {}: {e}", loaded.path.display()))?;
        let model = Model::parse(&probe).map_err(|e| anyhow::anyhow!("packed model: {e}"))?;
        let var = cfg.variation.with_sigma(noisy_sigma)?;
        let sets = (0..CALIBRATION_RUNS)
            .map(|r| build::noisy_weights(&model, &var, CALIBRATION_SEED, r, Readback::Fixed))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("noisy calibration weights: {e}"))?;
        let mut weights: Vec<Option<&[Vec<f64>]>> = vec![None];
        weights.extend(sets.iter().map(|w| Some(w.as_slice())));
        let act = calibrate_parallel(&model_desc(&net, &nodes), &weights, images)?;
        for (node, a) in nodes.iter_mut().zip(act) {
            node.act_max = a;
        }
    }
    let labels: Vec<u16> = test.labels.iter().map(|&l| u16::from(l)).collect();
    let batch = (!test.is_empty()).then_some(TestBatch {
        images: &test.images,
        labels: &labels,
    });
    pack(&model_desc(&net, &nodes), cfg, batch)
        .map_err(|e| anyhow::anyhow!("packing {}: {e}", loaded.path.display()))
}

/// `calibrate_with` over the images split between the available cores: the elementwise
/// maximum of the parts' raw maxima is exactly one pass over all images.
fn calibrate_parallel(
    desc: &build::ModelDesc<'_>,
    weights: &[Option<&[Vec<f64>]>],
    images: &[u8],
) -> Result<Vec<f32>> {
    let len = desc.input.channels * desc.input.height * desc.input.width;
    let n = images.len() / len.max(1);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, n.max(1));
    let per = n.div_ceil(threads) * len;
    let parts: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(per.max(1))
            .map(|chunk| {
                s.spawn(move || {
                    activation_max(desc, weights, chunk)
                        .map_err(|e| anyhow::anyhow!("calibrating activation scales: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("calibration threads do not panic"))
            .collect()
    });
    let mut max = vec![0.0f64; desc.nodes.len()];
    for part in parts {
        for (m, v) in max.iter_mut().zip(part?) {
            *m = m.max(v);
        }
    }
    Ok(act_scales(&max))
}

/// The integer engine over a packed model and its packed test images.
pub struct IntEngine {
    blob: Vec<u8>,
    path: TilePath,
}

impl IntEngine {
    /// An engine over `blob`, with an ideal ADC or one of `adc_bits`.
    pub fn new(blob: Vec<u8>, adc_bits: Option<u8>) -> Result<Self> {
        let model = Model::parse(&blob).map_err(|e| anyhow::anyhow!("packed model: {e}"))?;
        ensure!(
            model.test_len() > 0,
            "the packed model holds no test images"
        );
        let path = match adc_bits {
            None => TilePath::Collapsed,
            Some(bits) => TilePath::Sliced(
                Adc::with_full_scale(
                    bits,
                    nvcim_firmware::mc::adc_full_scale(model.quant(), model.tile_rows()),
                )
                .map_err(|e| anyhow::anyhow!("--adc-bits {bits}: {e}"))?,
            ),
        };
        Ok(IntEngine { blob, path })
    }

    fn model(&self) -> Result<Model<'_>> {
        Model::parse(&self.blob).map_err(|e| anyhow::anyhow!("packed model: {e}"))
    }

    fn count(&self, var: &VariationConfig, seed: u64, run: u32) -> Result<usize> {
        int_run(&self.model()?, self.path, var, seed, run)
    }
}

/// One Monte Carlo run of the integer engine: programs run `run`'s tiles under `seed` and
/// counts the packed test batch's correct classifications, the same bits as the firmware's: on
/// the collapsed path by the layer-at-a-time [`layerwise`] engine, with a non-ideal ADC image by
/// image through `exec` on the host's tile kernel. `nvcim eval --engine int` and `nvcim firmware run`'s comparison both
/// call it.
pub fn int_run(
    m: &Model<'_>,
    path: TilePath,
    var: &VariationConfig,
    seed: u64,
    run: u32,
) -> Result<usize> {
    let mut state = vec![0i16; m.state_len(path)];
    program(m, var, seed, run, path, &mut state)
        .map_err(|e| anyhow::anyhow!("programming run {run}: {e}"))?;
    if layerwise::unsupported(m, path).is_none() {
        return layerwise::count_correct(m, &state, layerwise::BATCH, layerwise::Isa::detect())
            .with_context(|| format!("classifying run {run}"));
    }
    let s = m.scratch();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let mut scratch = Scratch {
        act: &mut act,
        patch: &mut patch,
    };
    count_correct_with::<HostKernel>(m, path, &state, &mut scratch, &mut logits)
        .map_err(|e| anyhow::anyhow!("classifying run {run}: {e}"))
}

impl NoisyClassifier for IntEngine {
    type Data = ();

    fn num_layers(&self) -> usize {
        self.model().map_or(0, |m| m.layer_count())
    }

    fn num_examples(&self, _: &()) -> usize {
        self.model().map_or(0, |m| m.test_len())
    }

    fn clean(&self, _: &()) -> Result<usize> {
        let var = self.model()?.variation().with_sigma(0.0)?;
        self.count(&var, 0, 0)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, _: &()) -> Result<usize> {
        self.count(var, seed, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::to_network;
    use crate::ir::{Normalization, Provenance};
    use crate::model::{Arch, ModelSpec};
    use burn::tensor::{Distribution, Tensor};
    use nvcim_shared::quant::QuantConfig;
    use nvcim_shared::variation::{Faults, Profile, SigmaUnit};

    #[test]
    fn float_engine_run_equals_burn_with_the_perturbed_weights() {
        for arch in [Arch::Vgg8, Arch::Resnet18] {
            let spec = ModelSpec {
                arch,
                width: 0.0625,
                in_channels: 1,
                image_size: 16,
                num_classes: 10,
            };
            let dev = Device::flex();
            dev.seed(4);
            let b = spec.init_backbone(&dev);
            let net =
                to_network(&b, &spec, Normalization::identity(1), Provenance::default()).unwrap();
            let engine = FloatEngine::new(net.clone(), ScaleMode::PerLayer).unwrap();
            let var = VariationConfig::new(
                QuantConfig::new(8, 2).unwrap(),
                0.5,
                SigmaUnit::Range,
                Profile::Uniform,
                Faults::NONE,
            )
            .unwrap();
            // Burn's backbone with the run's weights: the float engine's definition.
            let clean = b.weights();
            let scales = weight_scales(&clean, ScaleMode::PerLayer).unwrap();
            let mut noisy = b.clone();
            noisy
                .set_weights(&noisy_weights(&clean, &scales, &var, 7, 3).unwrap())
                .unwrap();
            let x = Tensor::<4>::random([3, 1, 16, 16], Distribution::Default, &dev);
            let input: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap();
            let want: Vec<f32> = noisy.forward(x).into_data().try_to_vec::<f32>().unwrap();
            let run = engine.noisy_network(&var, 7, 3).unwrap();
            for isa in layerwise_f32::Isa::available() {
                let got = layerwise_f32::Prepared::new(&run, isa)
                    .unwrap()
                    .logits(&input, 3)
                    .unwrap();
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Random init: BatchNorm is the identity, so logits grow with depth; compare
                // relatively.
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                assert!(
                    diff < 1e-4 * scale,
                    "{arch:?} {isa:?}: max diff {diff} at logit scale {scale}"
                );
            }
            // And the run's weights differ from the clean ones (the test can fail).
            assert_ne!(noisy.weights(), clean);
        }
    }
}
