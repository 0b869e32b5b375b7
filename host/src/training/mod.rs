//! The training loop: data, model, method, Adam with cosine annealing, per-epoch validation
//! (clean and under Monte Carlo variation), atomic checkpoints and exact resume.
//!
//! **Determinism.** Every random thing of an epoch is derived from `(seed, epoch)`: the shuffle
//! and augmentation streams are `stream_for(Purpose::Host, seed, epoch, tag)`, and the training
//! device's generator (weight noise) is reseeded with `epoch_seed(seed, epoch)` at the start of
//! the epoch. A checkpoint written after epoch `e` therefore holds all the state needed
//! (weights, BN statistics, Adam moments, the epoch counter that drives the scheduler), and a
//! resumed run ends with the same weights as an uninterrupted one.
//!
//! **Validation under variation** uses the float engine's contract: Monte Carlo run `r`
//! perturbs backbone layer `l` with `nvcim_shared::rng::stream(seed, r, l)`, weights visited in
//! canonical order, quantized against the layer's own `max|W|`.

pub mod checkpoint;
pub mod method;
pub mod recipe;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nvcim_shared::rng::{Purpose, mix64, stream_for};
use nvcim_shared::variation::VariationConfig;
use serde::{Deserialize, Serialize};

use crate::data::{self, Dataset, DatasetKind, tags};
use crate::kernels::backend;
use crate::model::noise::{DrawAhead, NoiseMapper, TrainingNoise};
use crate::model::{Backbone, Init, ModelSpec, TrainModel, correct, load_backbone};
pub use method::{BnStats, Method, Select};
pub use recipe::Recipe;

/// Everything that determines a training run (saved as `config.json` beside the checkpoint).
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    /// The dataset.
    pub dataset: DatasetKind,
    /// Where it was read from.
    pub data_dir: PathBuf,
    /// Bring 28x28 images to 32x32 (with `preprocess`).
    pub pad32: bool,
    /// How: zero-pad (nvcim's default) or the authors' resize, and the matching normalization.
    pub preprocess: crate::data::Preprocess,
    /// The network.
    pub model: ModelSpec,
    /// The method.
    pub method: Method,
    /// The feedback weight alpha of eq. 1.
    pub alpha: f64,
    /// The training (and validation) variation model.
    #[serde(serialize_with = "ser_variation")]
    pub variation: VariationConfig,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Initial learning rate (Adam, cosine-annealed to 0 as `lr_schedule` says).
    pub lr: f64,
    /// How often the cosine annealing steps: per epoch (the authors') or per batch.
    pub lr_schedule: LrSchedule,
    /// Fraction of the training set held out for validation.
    pub val_fraction: f64,
    /// The seed of everything.
    pub seed: u64,
    /// Use only this many training images (after the split).
    pub max_train: Option<usize>,
    /// Monte Carlo runs of the noisy validation per epoch.
    pub mc_val: u32,
    /// The model-selection rule as given (`auto` is recorded as `auto`; the summary and
    /// `state.json` name the rule it resolved to).
    pub select: Select,
    /// Where BatchNorm's running statistics come from under noise injection.
    pub bn_stats: BnStats,
    /// How the backbone's linear layers are initialized.
    pub init: Init,
    /// The checkpoint the backbone starts from (`--init-from`), if not random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// The device profile the exits are perturbed with.
    pub exit_profile: ExitProfile,
    /// The exit left out of eq. 1 (1-based, `nft` only; Table V's ablation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_exit: Option<usize>,
    /// Per-layer Gaussian weight clipping after every optimizer step (`--clip-weights K`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_weights: Option<f32>,
    /// The set of defaults the unset flags took (`--recipe`).
    pub recipe: Recipe,
    /// The backend (`flex`, `cuda`, `wgpu`).
    pub backend: Backend,
    /// Where a graph model came from (`--onnx`); `None` for VGG-8 and ResNet-18.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx: Option<OnnxSource>,
}

/// A model read from an ONNX file (`nvcim train --onnx`): its graph is `model.graph`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnnxSource {
    /// The file.
    pub file: PathBuf,
    /// Start from the file's weights (`false`: `--init` random weights of its architecture).
    pub weights: bool,
    /// How images reach the model's input size.
    pub fit: crate::onnx::data::Fit,
    /// Gray images replicated into three channels.
    pub gray_to_rgb: bool,
}

impl OnnxSource {
    /// `train` and `test` brought to `model`'s input and normalized as its graph says.
    pub fn prepare(
        &self,
        model: &ModelSpec,
        train: Dataset,
        test: Dataset,
        dir: &std::path::Path,
    ) -> Result<(Dataset, Dataset)> {
        let graph = model
            .graph
            .as_ref()
            .context("an --onnx run's model.json has no graph")?;
        let (train, test, _, _, _) = crate::onnx::data::fit_images(
            train,
            test,
            dir,
            graph.input,
            self.fit,
            self.gray_to_rgb,
        )?;
        let norm = std::sync::Arc::new((graph.mean.clone(), graph.std.clone()));
        let with = |d: Dataset| Dataset {
            custom_normalization: Some(norm.clone()),
            ..d
        };
        let (train, test) = (with(train), with(test));
        crate::onnx::data::check_labels(
            &test,
            graph.num_classes,
            &self.file.display().to_string(),
        )?;
        Ok((train, test))
    }

    /// The file's network (weights included).
    pub fn network(&self) -> Result<crate::ir::Network> {
        let what = self.file.display().to_string();
        let proto = crate::onnx::read_model(&self.file)?;
        Ok(crate::onnx::import::import(&proto, &what)?.network)
    }
}

/// The backbone of `--init-from`: the checkpoint's, checked to be the same network on the same
/// data (architecture, width, input, classes, dataset and preprocessing).
fn pretrained_backbone(from: &std::path::Path, cfg: &TrainConfig, ad: &Device) -> Result<Backbone> {
    let what = || format!("--init-from {}", from.display());
    let loaded = crate::ir::convert::load_checkpoint(from, ad).with_context(what)?;
    ensure!(
        loaded.spec == cfg.model,
        "{}: the checkpoint is {:?}, this run trains {:?}; give a checkpoint of the same \
         --model, --width and dataset",
        what(),
        loaded.spec,
        cfg.model
    );
    ensure!(
        loaded.dataset == cfg.dataset && loaded.preprocess == cfg.preprocess,
        "{}: the checkpoint was trained on {} ({} preprocessing), this run on {} ({})",
        what(),
        loaded.dataset.display_name(),
        loaded.preprocess.name(),
        cfg.dataset.display_name(),
        cfg.preprocess.name()
    );
    Ok(loaded.backbone)
}

/// The variation the exits are trained under (`--exit-profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExitProfile {
    /// The backbone's device model, profile included: one device model for every perturbed
    /// layer.
    #[default]
    Backbone,
    /// The uniform profile at the same sigma, unit and faults (the authors' code).
    Uniform,
}

impl TrainConfig {
    /// The training noise of the exits.
    pub fn exit_noise(&self) -> Result<TrainingNoise> {
        let v = self.variation;
        Ok(TrainingNoise::new(match self.exit_profile {
            ExitProfile::Backbone => v,
            ExitProfile::Uniform => VariationConfig::new(
                v.quant(),
                v.sigma(),
                v.unit(),
                nvcim_shared::variation::Profile::Uniform,
                v.faults(),
            )?,
        }))
    }

    /// The selection rule this run applies: `auto` resolved for the method, and clean when
    /// there is no noisy validation (`--mc-val 0`).
    pub fn selection(&self) -> Select {
        match self.select.resolve(self.method) {
            Select::Noisy if self.mc_val == 0 => Select::Clean,
            rule => rule,
        }
    }

    /// The epoch's score under [`TrainConfig::selection`].
    pub fn score(&self, m: &EpochMetrics) -> f64 {
        match self.selection() {
            Select::Noisy => m.val_noisy_acc,
            _ => m.val_clean_acc,
        }
    }
}

fn ser_variation<S: serde::Serializer>(v: &VariationConfig, s: S) -> Result<S::Ok, S::Error> {
    variation_json(v).serialize(s)
}

/// A variation model as JSON (sigma always with its unit).
pub fn variation_json(v: &VariationConfig) -> serde_json::Value {
    serde_json::json!({
        "sigma": v.sigma(),
        "sigma_unit": v.unit().name(),
        "m_bits": v.quant().m_bits(),
        "n_bits": v.quant().n_bits(),
        "profile": v.profile().name(),
        "stuck_low": v.faults().stuck_low(),
        "stuck_high": v.faults().stuck_high(),
        "weight_std_per_max_w": v.weight_std(0),
    })
}

/// The compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// NVIDIA CUDA (build with `--features cuda`).
    Cuda,
    /// wgpu: Vulkan / Metal / DX12 (in the default build; without a GPU, Mesa's lavapipe runs
    /// Vulkan on the CPU, slowly).
    Wgpu,
}

impl Backend {
    /// The device, or an error saying how to build with this backend.
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Ok(Device::cuda(0)),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => {
                // Started once per process (Burn refuses a second start of the same runtime):
                // `alpha-search` trains several times.
                static WGPU: std::sync::OnceLock<std::result::Result<Device, String>> =
                    std::sync::OnceLock::new();
                WGPU.get_or_init(|| {
                    Device::wgpu_options().init().map_err(|e| {
                        format!(
                            "--backend wgpu: no wgpu device could be started ({e}). Without a \
                             GPU, Mesa's lavapipe runs Vulkan on the CPU (Debian: `apt-get \
                             install mesa-vulkan-drivers`); or train with --backend flex"
                        )
                    })
                })
                .clone()
                .map_err(anyhow::Error::msg)
            }
            #[allow(unreachable_patterns)]
            other => bail!(
                "--backend {other:?}: this nvcim was built without it; rebuild with \
                 `cargo build --release --features {}`",
                format!("{other:?}").to_lowercase()
            ),
        }
    }
}

/// How this invocation runs (not part of the run's identity).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The output directory.
    pub out: PathBuf,
    /// Continue from `out/checkpoint`.
    pub resume: bool,
    /// Stop after this many epochs of this invocation (as if interrupted).
    pub stop_after: Option<usize>,
    /// No progress bars.
    pub quiet: bool,
}

/// One epoch's metrics (a line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate of the epoch's first step (constant through the epoch with
    /// `--lr-schedule cosine-epoch`).
    pub lr: f64,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (of the backbone, at the perturbed weights when noise is injected).
    pub train_acc: f64,
    /// Validation accuracy, clean weights.
    pub val_clean_acc: f64,
    /// Mean validation accuracy over the Monte Carlo runs.
    pub val_noisy_acc: f64,
    /// Its standard deviation over the runs.
    pub val_noisy_std: f64,
    /// Training throughput.
    pub images_per_s: f64,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// The selection rule applied (`clean` or `noisy`; `auto` resolved).
    pub select: &'static str,
    /// Epochs completed in total.
    pub epochs_done: usize,
    /// The best epoch under the selection rule (1-based).
    pub best_epoch: usize,
    /// Noisy validation accuracy at the best epoch.
    pub best_val_noisy_acc: f64,
    /// Clean validation accuracy at the best epoch.
    pub best_val_clean_acc: f64,
    /// Clean test accuracy of the best backbone (reported only; never used for selection).
    pub test_clean_acc: f64,
    /// Where the best backbone is.
    pub best_backbone: PathBuf,
    /// Wall time of this invocation in seconds.
    pub wall_seconds: f64,
    /// Whether the run stopped early (`--stop-after-epochs`).
    pub interrupted: bool,
}

/// Adam's epsilon: PyTorch's default, which the authors train with (Burn's is 1e-5).
pub const ADAM_EPSILON: f32 = 1e-8;

/// The device generator's seed for an epoch (`u32::MAX` is model initialization).
pub fn epoch_seed(seed: u64, epoch: u32) -> u64 {
    mix64(mix64(seed ^ 0x7472_6169_6e00_0000) ^ u64::from(epoch))
}

/// Cosine annealing from `lr` to 0 over `epochs`, stepped per epoch (PyTorch's
/// `CosineAnnealingLR(T_max=epochs)`, eta_min 0).
pub fn cosine_lr(lr: f64, epoch: usize, epochs: usize) -> f64 {
    lr * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs.max(1) as f64).cos())
}

/// How the cosine annealing of the learning rate steps (`--lr-schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Once per epoch, `lr * (1 + cos(pi * epoch / epochs)) / 2` (the authors' PyTorch
    /// `CosineAnnealingLR(T_max=epochs)`): the last epoch still runs at a sizeable rate when
    /// there are few epochs (2 epochs: 1e-3 then 5e-4).
    #[default]
    CosineEpoch,
    /// After every batch, the same curve over all steps of the run, ending near 0: what the
    /// per-epoch curve approaches with many epochs, for short budgets.
    CosineStep,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based) of epoch `epoch`, `steps` steps per epoch.
    pub fn lr(self, lr: f64, epoch: usize, epochs: usize, step: usize, steps: usize) -> f64 {
        match self {
            LrSchedule::CosineEpoch => cosine_lr(lr, epoch, epochs),
            LrSchedule::CosineStep => {
                cosine_lr(lr, epoch * steps + step, epochs.max(1) * steps.max(1))
            }
        }
    }
}

/// The prepared data of a run.
pub struct RunData {
    /// Training images (after split and `--max-train`).
    pub train: Dataset,
    /// Validation images (held out of the training set).
    pub val: Dataset,
    /// The test set (reporting only).
    pub test: Dataset,
}

/// Loads, pads, splits and subsets the data of `cfg`.
pub fn prepare_data(cfg: &TrainConfig) -> Result<RunData> {
    let (train, test) = data::load(cfg.dataset, &cfg.data_dir)
        .with_context(|| format!("loading {}", cfg.dataset.display_name()))?;
    let pad = |d: Dataset| {
        if cfg.pad32 {
            cfg.preprocess.apply(d, 32)
        } else {
            Ok(d)
        }
    };
    let (train, test) = match &cfg.onnx {
        Some(src) => src.prepare(&cfg.model, train, test, &cfg.data_dir)?,
        None => (pad(train)?, pad(test)?),
    };
    let (mut train, val) = data::split_validation(&train, cfg.val_fraction, cfg.seed)?;
    ensure!(
        !val.is_empty() || cfg.val_fraction == 0.0,
        "the validation split is empty"
    );
    if let Some(n) = cfg.max_train.filter(|&n| n < train.len()) {
        let perm = data::permutation(
            train.len(),
            &mut stream_for(Purpose::Host, cfg.seed, 0, tags::SUBSET),
        );
        let mut idx = perm[..n].to_vec();
        idx.sort_unstable();
        train = train.subset(&idx);
    }
    ensure!(
        !train.is_empty(),
        "no training images left (check --max-train)"
    );
    Ok(RunData { train, val, test })
}

/// Clean accuracy of `backbone` (a validation snapshot) on `data`.
pub fn accuracy(backbone: &Backbone, data: &Dataset, device: &Device) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut right = 0;
    for chunk in idx.chunks(500) {
        let b = data::make_batch(data, chunk, None);
        let (x, _) = data::tensor::to_tensors(&b, device);
        right += correct(backbone.forward(x), &b.labels);
    }
    right as f64 / data.len() as f64
}

/// Accuracies of `backbone` under `runs` Monte Carlo perturbations (the float engine's
/// contract with validation's own streams: run `r`, layer `l` ->
/// `stream_for(Purpose::Validation, seed, r, l)`, so that selection never sees the draws of
/// `nvcim eval --seed` with the training seed). The same `runs` instances every epoch: common
/// random numbers make the epochs' scores comparable.
pub fn noisy_accuracies(
    backbone: &Backbone,
    data: &Dataset,
    variation: &VariationConfig,
    seed: u64,
    runs: u32,
    device: &Device,
) -> Result<Vec<f64>> {
    let clean = backbone.weights();
    let mut out = Vec::new();
    for r in 0..runs {
        let mut noisy = Vec::with_capacity(clean.len());
        for (l, w) in clean.iter().enumerate() {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let mut p = w.clone();
            if scale > 0.0 {
                variation
                    .perturb_f32(
                        w,
                        scale,
                        &mut stream_for(Purpose::Validation, seed, r, l as u32),
                        &mut p,
                    )
                    .with_context(|| format!("perturbing weight layer {l}"))?;
            }
            noisy.push(p);
        }
        let mut b = backbone.clone();
        b.set_weights(&noisy)?;
        out.push(accuracy(&b, data, device));
    }
    Ok(out)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

/// Keeps freed memory in the process (glibc: no `mmap` for large blocks, no trimming), so that a
/// training step's large tensors, freed and allocated again every step, are not returned to the
/// kernel and page-faulted back in each time (VGG-8 w1.0 step: 2.88 -> 2.53 s, measured). A
/// no-op elsewhere. Called by [`train`] and the training benchmark.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; called before the training allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The forward pass of one training step: backbone logits and the feedback terms (noise
/// injected per `method`).
pub fn step_forward(
    model: &TrainModel,
    method: Method,
    noise: &TrainingNoise,
    x: burn::tensor::Tensor<4>,
) -> Result<(burn::tensor::Tensor<2>, Vec<burn::tensor::Tensor<2>>)> {
    step_forward_exits(model, method, noise, noise, x)
}

/// [`step_forward`] with the exits perturbed by `exit_noise` (`--exit-profile`).
pub fn step_forward_exits(
    model: &TrainModel,
    method: Method,
    noise: &TrainingNoise,
    exit_noise: &TrainingNoise,
    x: burn::tensor::Tensor<4>,
) -> Result<(burn::tensor::Tensor<2>, Vec<burn::tensor::Tensor<2>>)> {
    let perturbed = |n: &TrainingNoise| perturb(model.clone(), n);
    Ok(match method {
        Method::Vanilla => model.forward(x),
        Method::Nft if exit_noise != noise => TrainModel {
            backbone: perturb(model.backbone.clone(), noise),
            exits: model
                .exits
                .iter()
                .map(|e| perturb(e.clone(), exit_noise))
                .collect(),
        }
        .forward(x),
        Method::Noise | Method::Nft => perturbed(noise).forward(x),
        Method::NftOvf => {
            let (out, _) = perturbed(noise).forward(x.clone());
            let mut fb = Vec::new();
            for off in Method::OVF_OFFSETS {
                let cfg = noise.config().with_sigma(noise.config().sigma() + off)?;
                fb.push(perturbed(&TrainingNoise::new(cfg)).forward(x.clone()).0);
            }
            (out, fb)
        }
    })
}

/// `module` with every conv/linear weight perturbed by one draw of `noise` (itself when the
/// noise is zero).
fn perturb<M: Module>(module: M, noise: &TrainingNoise) -> M {
    if noise.is_zero() {
        module
    } else {
        module.map(&mut NoiseMapper::new(noise))
    }
}

/// The running statistics `backbone`'s BatchNorms would have after a clean training-mode
/// forward pass of `x` (`--bn-stats clean`). On Flex the pass runs on the inner backend with
/// the extension's batch norm forced to training mode (`backend::with_batch_stats`): the same
/// kernels and the same update as the autodiff pass, without building and dropping an autodiff
/// graph (nft at VGG-8 w0.25: 283 -> 315 images/s). Elsewhere, and with `NVCIM_CONV=burn`, it
/// is the autodiff pass itself.
fn clean_running_stats(
    backbone: &crate::model::Backbone,
    x: burn::tensor::Tensor<4>,
) -> Vec<(burn::tensor::Tensor<1>, burn::tensor::Tensor<1>)> {
    if !backend::on_flex(&x.device()) || backend::burn_kernels_only() {
        let _ = backbone.forward(x.detach());
        return backbone.running_stats();
    }
    let inner = backbone.valid();
    let _ = backend::with_batch_stats(|| inner.forward(x.inner()));
    inner
        .running_stats()
        .into_iter()
        .map(|(m, v)| (m.autodiff(), v.autodiff()))
        .collect()
}

/// One optimizer step on a batch: the forward pass of `method` (noise injected), the loss,
/// the backward pass and Adam's update. Returns the new model, the loss and the backbone's
/// logits (detached).
///
/// With [`BnStats::Clean`] and noise injected, BatchNorm's running statistics are those of a
/// clean forward pass of the same batch at the step's (pre-update) weights: that pass runs
/// first with no backward (it only moves the running statistics), they are kept, and the noisy
/// pass's update of them is undone. Normalization inside the noisy pass still uses the noisy
/// batch's own statistics, as in training mode it must.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: TrainModel,
    optim: &mut burn::optim::ModuleOptimizer,
    cfg: &TrainConfig,
    noise: &TrainingNoise,
    x: burn::tensor::Tensor<4>,
    y: burn::tensor::Tensor<1, burn::tensor::Int>,
    lr: f64,
) -> Result<(TrainModel, f32, burn::tensor::Tensor<2>)> {
    let clean_stats =
        cfg.bn_stats == BnStats::Clean && cfg.method.injects_noise() && !noise.is_zero();
    let kept = if clean_stats {
        Some(clean_running_stats(&model.backbone, x.clone()))
    } else {
        None
    };
    let exit_noise = cfg.exit_noise()?;
    let (out, feedback) = step_forward_exits(&model, cfg.method, noise, &exit_noise, x)?;
    let loss = method::loss(
        cfg.method,
        out.clone(),
        &feedback,
        y,
        cfg.alpha,
        cfg.drop_exit,
    );
    let value = loss.clone().into_scalar::<f32>();
    if !value.is_finite() {
        return Ok((model, value, out.detach()));
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut model = optim.step(lr, model, grads);
    if let Some(k) = cfg.clip_weights {
        model = crate::model::noise::clip_weights(model, k);
    }
    if let Some(stats) = kept {
        model.backbone.set_running_stats(&stats)?;
    }
    Ok((model, value, out.detach()))
}

/// Trains per `cfg`, writing under `opts.out`.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    keep_freed_memory();
    cfg.model.validate()?;
    ensure!(cfg.epochs > 0, "--epochs must be at least 1");
    ensure!(cfg.batch_size > 0, "--batch-size must be at least 1");
    ensure!(
        cfg.lr.is_finite() && cfg.lr > 0.0,
        "--lr must be positive, got {}",
        cfg.lr
    );
    ensure!(cfg.alpha.is_finite(), "--alpha must be finite");
    let run_data = prepare_data(cfg)?;
    let [c, h, w] = cfg.model.input();
    ensure!(
        [
            run_data.train.channels,
            run_data.train.height,
            run_data.train.width
        ] == [c, h, w],
        "the data is {}x{}x{} but the model expects {c}x{h}x{w}",
        run_data.train.channels,
        run_data.train.height,
        run_data.train.width,
    );
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating output directory {}", opts.out.display()))?;
    // One training per output directory at a time; a lock left by a killed run is stale and
    // taken over (see `fsx::DirLock`).
    let lock = crate::fsx::DirLock::acquire(&opts.out, "the training output directory --out")?;
    if let Some(h) = lock.stale_holder() {
        eprintln!(
            "note: {} was left locked by {h}, which ended without finishing; taking it over",
            lock.path().display()
        );
    }
    let config_json = serde_json::to_value(cfg)?;
    let device = cfg.backend.device()?;
    if cfg.backend == Backend::Flex {
        crate::kernels::Isa::log_choice();
    }
    let ad = device.clone().autodiff();
    let ckpt = checkpoint::Checkpoint::new(&opts.out);

    // PyTorch's (and the authors') Adam epsilon; Burn's default is 1e-5.
    let mut optim = AdamConfig::new().with_epsilon(ADAM_EPSILON).init();
    let (mut model, mut state) = match opts.resume.then(|| ckpt.latest()).flatten() {
        Some(dir) => {
            let saved = crate::fsx::read_json(&opts.out.join("config.json"))?;
            checkpoint::ensure_same_config(&saved, &config_json)?;
            let (model, st, o) = ckpt.load(&dir, cfg, &ad, optim)?;
            ckpt.write_metrics(&st)?;
            optim = o;
            eprintln!(
                "resuming from {} (epoch {} done)",
                dir.display(),
                st.epochs_done
            );
            (model, st)
        }
        None => {
            if opts.resume {
                eprintln!(
                    "no checkpoint in {}; starting from scratch",
                    opts.out.display()
                );
            }
            ad.seed(epoch_seed(cfg.seed, u32::MAX));
            let mut backbone = cfg.model.init_backbone(&ad);
            if cfg.init == Init::Authors {
                backbone.authors_linear_init(&ad);
            }
            if let Some(from) = &cfg.init_from {
                backbone = pretrained_backbone(from, cfg, &ad)?;
            }
            if let Some(src) = &cfg.onnx
                && src.weights
            {
                backbone
                    .load_network(&src.network()?)
                    .with_context(|| format!("the weights of {}", src.file.display()))?;
            }
            let exits = if cfg.method.uses_exits() {
                cfg.model.init_exits(&ad)
            } else {
                Vec::new()
            };
            (TrainModel { backbone, exits }, checkpoint::State::default())
        }
    };
    checkpoint::write_json_atomic(&opts.out.join("config.json"), &config_json)?;
    checkpoint::write_json_atomic(
        &opts.out.join("model.json"),
        &serde_json::to_value(&cfg.model)?,
    )?;

    let noise = TrainingNoise::new(cfg.variation);
    let train = &run_data.train;
    let first_epoch = state.epochs_done;
    let mut interrupted = false;
    for epoch in state.epochs_done..cfg.epochs {
        if opts.stop_after.is_some_and(|k| epoch - first_epoch >= k) {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        ad.seed(epoch_seed(cfg.seed, epoch as u32));
        let perm = data::permutation(
            train.len(),
            &mut stream_for(Purpose::Host, cfg.seed, epoch as u32, tags::SHUFFLE),
        );
        let mut aug = cfg
            .dataset
            .augments()
            .then(|| stream_for(Purpose::Host, cfg.seed, epoch as u32, tags::AUGMENT));
        let n_batches = perm.len().div_ceil(cfg.batch_size);
        let lr_at = |step| {
            cfg.lr_schedule
                .lr(cfg.lr, epoch, cfg.epochs, step, n_batches)
        };
        let bar = progress(n_batches, epoch + 1, cfg.epochs, opts.quiet);
        let (mut loss_sum, mut right, mut seen) = (0f64, 0usize, 0usize);
        // The noise of each step but the first is drawn while the step before runs; the scope
        // ends with the epoch, before validation draws.
        let ahead = DrawAhead::scope();
        for (step, chunk) in perm.chunks(cfg.batch_size).enumerate() {
            let batch = data::make_batch(train, chunk, aug.as_mut());
            let (x, y) = data::tensor::to_tensors(&batch, &ad);
            ahead.begin_step(step + 1 < n_batches);
            let (next, value, out) = train_step(model, &mut optim, cfg, &noise, x, y, lr_at(step))?;
            model = next;
            if !value.is_finite() {
                bar.abandon();
                bail!(
                    "the training loss became {value} at epoch {} step {step}; stopping. The last \
                     good checkpoint ({} epochs) is kept in {}; try a lower --lr or --sigma",
                    epoch + 1,
                    state.epochs_done,
                    opts.out.join("checkpoint").display()
                );
            }
            right += correct(out, &batch.labels);
            seen += chunk.len();
            loss_sum += f64::from(value) * chunk.len() as f64;
            let ips = seen as f64 / t0.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% {ips:.0} img/s",
                loss_sum / seen as f64,
                100.0 * right as f64 / seen as f64
            ));
            bar.inc(1);
            crate::fsx::crash_point("train-step");
        }
        drop(ahead);
        bar.finish_and_clear();
        model.backbone.sync_running_stats();
        let train_secs = t0.elapsed().as_secs_f64();
        let backbone = model.backbone.valid();
        let val_clean = accuracy(&backbone, &run_data.val, &device);
        let noisy = noisy_accuracies(
            &backbone,
            &run_data.val,
            &cfg.variation,
            cfg.seed,
            cfg.mc_val,
            &device,
        )?;
        let (val_noisy, val_noisy_std) = mean_std(&noisy);
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr: lr_at(0),
            train_loss: loss_sum / seen as f64,
            train_acc: right as f64 / seen as f64,
            val_clean_acc: val_clean,
            val_noisy_acc: val_noisy,
            val_noisy_std,
            images_per_s: seen as f64 / train_secs,
            seconds: t0.elapsed().as_secs_f64(),
        };
        if !opts.quiet {
            eprintln!(
                "epoch {}/{}: loss {:.4} train {:.2}% | val clean {:.2}% noisy {:.2}% ± {:.2} \
                 ({} runs, sigma {} {}) | {:.0} img/s, {:.1} s",
                m.epoch,
                cfg.epochs,
                m.train_loss,
                100.0 * m.train_acc,
                100.0 * m.val_clean_acc,
                100.0 * m.val_noisy_acc,
                100.0 * m.val_noisy_std,
                cfg.mc_val,
                cfg.variation.sigma(),
                cfg.variation.unit().name(),
                m.images_per_s,
                m.seconds
            );
        }
        state.epochs_done = epoch + 1;
        let score = cfg.score(&m);
        if state.best_epoch == 0 || score > state.best_score {
            state.best_epoch = epoch + 1;
            state.best_score = score;
            state.best_val_clean = val_clean;
            state.best_val_noisy = val_noisy;
            ckpt.save_best(&model.backbone, cfg, &state)?;
            crate::fsx::crash_point("after-best");
        }
        state.history.push(m);
        ckpt.save(&model, &optim, cfg, &state)?;
    }
    let best_path = ckpt.best_backbone_path();
    let test_clean_acc = if best_path.is_file() {
        let best = load_backbone(&best_path, &cfg.model, &device)?;
        accuracy(&best, &run_data.test, &device)
    } else {
        0.0
    };
    Ok(TrainSummary {
        select: cfg.selection().name(),
        epochs_done: state.epochs_done,
        best_epoch: state.best_epoch,
        best_val_noisy_acc: state.best_val_noisy,
        best_val_clean_acc: state.best_val_clean,
        test_clean_acc,
        best_backbone: best_path,
        wall_seconds: started.elapsed().as_secs_f64(),
        interrupted,
    })
}

fn progress(len: usize, epoch: usize, epochs: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {epoch}/{epochs}"));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;
    use burn::optim::SgdConfig;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    #[test]
    fn cosine_schedule() {
        let _rng = crate::burn_rng_guard();
        // Per batch: the same curve over all steps; per epoch: constant within an epoch.
        let step = |e, s| LrSchedule::CosineStep.lr(1e-3, e, 2, s, 50);
        assert_eq!(step(0, 0), 1e-3);
        assert!((step(1, 0) - 5e-4).abs() < 1e-12);
        assert!(step(1, 49) < 1e-6 && step(1, 49) > 0.0);
        assert!(step(0, 10) < step(0, 9));
        let epoch = |e, s| LrSchedule::CosineEpoch.lr(1e-3, e, 2, s, 50);
        assert_eq!(epoch(1, 0), epoch(1, 49));
        assert_eq!(epoch(1, 7), cosine_lr(1e-3, 1, 2));
        assert_eq!(cosine_lr(1e-3, 0, 10), 1e-3);
        assert!((cosine_lr(1e-3, 5, 10) - 5e-4).abs() < 1e-12);
        assert!(cosine_lr(1e-3, 9, 10) > 0.0);
    }

    /// Noise injection: the gradient applied to the clean weights is the gradient of the loss
    /// at the perturbed weights, for one fixed noise sample.
    #[test]
    fn noise_injection_update_is_the_gradient_at_the_perturbed_weights() {
        let _rng = crate::burn_rng_guard();
        let ad = Device::flex().autodiff();
        ad.seed(11);
        let spec = ModelSpec {
            arch: Arch::Vgg8,
            width: 0.125,
            in_channels: 1,
            image_size: 32,
            num_classes: 10,
            graph: None,
        };
        let clean = TrainModel {
            backbone: spec.init_backbone(&ad),
            exits: spec.init_exits(&ad),
        };
        let x = Tensor::<4>::random([4, 1, 32, 32], Distribution::Normal(0.0, 1.0), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 3, 5, 7], [4]), &ad);
        let noise = TrainingNoise::new(VariationConfig::paper(0.4).unwrap());

        // The training path: map a clone, differentiate, collect on the clean module.
        let mut mapper = NoiseMapper::new(&noise);
        let noisy = clean.clone().map(&mut mapper);
        assert_eq!(
            mapper.mapped,
            8 + 2 * 3,
            "every backbone and exit weight is perturbed"
        );
        let perturbed_w = noisy.backbone.weights();
        assert_ne!(perturbed_w, clean.backbone.weights());
        let (out, fb) = noisy.forward(x.clone());
        let loss = method::loss(Method::Nft, out, &fb, y.clone(), 0.1, None);
        let g_train = GradientsParams::from_grads(loss.backward(), &clean);

        // The reference: a model whose weights *are* the perturbed ones (fresh leaves).
        let mut reference = clean.clone();
        reference.backbone.set_weights(&perturbed_w).unwrap();
        let ex: Vec<_> = noisy
            .exits
            .iter()
            .map(|e| (e.fc1.weight.val(), e.fc2.weight.val()))
            .collect();
        for (e, (w1, w2)) in reference.exits.iter_mut().zip(ex) {
            e.fc1.weight = e.fc1.weight.clone().map(|_| w1.detach().require_grad());
            e.fc2.weight = e.fc2.weight.clone().map(|_| w2.detach().require_grad());
        }
        let (out, fb) = reference.forward(x);
        let loss = method::loss(Method::Nft, out, &fb, y, 0.1, None);
        let g_ref = GradientsParams::from_grads(loss.backward(), &reference);

        // VGG-8's graph layers: conv k at 2k, its BatchNorm at 2k + 1, fc1 at 12, fc2 at 13.
        let conv = |b: &Backbone, k: usize| match &b.layers[k] {
            crate::model::graph::GraphLayer::Conv(c) => c.weight.id,
            _ => unreachable!("layer {k} is a conv"),
        };
        let fc1 = |b: &Backbone| match &b.layers[12] {
            crate::model::graph::GraphLayer::Linear(l) => l.weight.clone(),
            _ => unreachable!("layer 12 is fc1"),
        };
        let c = &clean.backbone;
        let ids = [conv(c, 0), conv(c, 10)];
        for id in ids {
            let a = g_train
                .get::<4>(id)
                .expect("gradient on the clean conv weight");
            let b = g_ref.get::<4>(id).expect("reference gradient");
            a.into_data().assert_approx_eq::<f32>(
                &b.into_data(),
                burn::tensor::Tolerance::rel_abs(1e-4, 1e-5),
            );
        }
        let (a, b) = (
            g_train.get::<2>(fc1(c).id).unwrap(),
            g_ref.get::<2>(fc1(c).id).unwrap(),
        );
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), burn::tensor::Tolerance::rel_abs(1e-4, 1e-5));
        let e = &clean.exits[1].fc1.weight.id;
        let (a, b) = (g_train.get::<2>(*e).unwrap(), g_ref.get::<2>(*e).unwrap());
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), burn::tensor::Tolerance::rel_abs(1e-4, 1e-5));

        // The update lands on the clean weights: w_clean - lr * grad(perturbed).
        let g = g_ref.get::<2>(fc1(c).id).unwrap();
        let before = fc1(c).val();
        let mut sgd = SgdConfig::new().init();
        let stepped = sgd.step(0.5, clean.clone(), g_train);
        let expect = before - g.mul_scalar(0.5);
        fc1(&stepped.backbone)
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&expect.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    }
}

#[cfg(test)]
mod bn_stats_tests {
    use super::*;
    use crate::model::Arch;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    fn config(method: Method, bn_stats: BnStats) -> TrainConfig {
        TrainConfig {
            dataset: DatasetKind::FashionMnist,
            data_dir: PathBuf::new(),
            pad32: true,
            preprocess: crate::data::Preprocess::Pad,
            model: ModelSpec {
                arch: Arch::Vgg8,
                width: 0.125,
                in_channels: 1,
                image_size: 16,
                num_classes: 10,
                graph: None,
            },
            method,
            alpha: 0.1,
            variation: VariationConfig::paper(0.4).unwrap(),
            epochs: 1,
            batch_size: 4,
            lr: 1e-3,
            lr_schedule: LrSchedule::CosineEpoch,
            val_fraction: 0.1,
            seed: 0,
            max_train: None,
            mc_val: 1,
            select: Select::Auto,
            bn_stats,
            init: Init::Pytorch,
            init_from: None,
            exit_profile: ExitProfile::Backbone,
            recipe: Recipe::Nvcim,
            onnx: None,
            drop_exit: None,
            clip_weights: None,
            backend: Backend::Flex,
        }
    }

    /// `--exit-profile uniform` trains the exits under the uniform profile at the same sigma,
    /// unit and faults; `backbone` under the backbone's own device model.
    #[test]
    fn exit_profile_choice() {
        let _rng = crate::burn_rng_guard();
        use nvcim_shared::quant::QuantConfig;
        use nvcim_shared::variation::{Faults, Profile, SigmaUnit};
        let mut cfg = config(Method::Nft, BnStats::Clean);
        cfg.variation = VariationConfig::new(
            QuantConfig::DEFAULT,
            0.3,
            SigmaUnit::Range,
            Profile::Rram1,
            Faults::NONE,
        )
        .unwrap();
        assert_eq!(*cfg.exit_noise().unwrap().config(), cfg.variation);
        cfg.exit_profile = ExitProfile::Uniform;
        let e = *cfg.exit_noise().unwrap().config();
        assert_eq!(e.profile(), Profile::Uniform);
        assert_eq!((e.sigma(), e.unit()), (0.3, SigmaUnit::Range));
        assert_ne!(e, cfg.variation);
        // One step with different noise on the exits runs and moves the weights.
        let ad = Device::flex().autodiff();
        ad.seed(1);
        let model = TrainModel {
            backbone: cfg.model.init_backbone(&ad),
            exits: cfg.model.init_exits(&ad),
        };
        let before = model.backbone.weights();
        let x = Tensor::<4>::random([4, 1, 16, 16], Distribution::Normal(0.0, 1.0), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 4, 6], [4]), &ad);
        let mut optim = AdamConfig::new().with_epsilon(ADAM_EPSILON).init();
        let noise = TrainingNoise::new(cfg.variation);
        let (model, loss, _) = train_step(model, &mut optim, &cfg, &noise, x, y, 1e-3).unwrap();
        assert!(loss.is_finite());
        assert_ne!(model.backbone.weights(), before);
    }

    /// `--clip-weights K`: a step leaves every conv/linear weight (backbone and exits) equal to
    /// the unclipped step's weight clamped to `±K` population standard deviations of its layer,
    /// moves no other parameter, and the clipped model trains on (the optimizer keeps its state).
    #[test]
    fn clip_weights_clamps_each_layer_to_k_std() {
        let _rng = crate::burn_rng_guard();
        let ad = Device::flex().autodiff();
        ad.seed(2);
        let x = Tensor::<4>::random([4, 1, 16, 16], Distribution::Normal(0.0, 1.0), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 8, 9], [4]), &ad);
        let k = 1.5f32;
        let step = |clip: Option<f32>| {
            let mut cfg = config(Method::Nft, BnStats::Clean);
            cfg.clip_weights = clip;
            ad.seed(9);
            let model = TrainModel {
                backbone: cfg.model.init_backbone(&ad),
                exits: cfg.model.init_exits(&ad),
            };
            let noise = TrainingNoise::new(cfg.variation);
            let mut optim = AdamConfig::new().with_epsilon(ADAM_EPSILON).init();
            let (model, loss, _) =
                train_step(model, &mut optim, &cfg, &noise, x.clone(), y.clone(), 1e-2).unwrap();
            assert!(loss.is_finite());
            (model, optim, cfg, noise)
        };
        let (plain, _, _, _) = step(None);
        let (clipped, mut optim, cfg, noise) = step(Some(k));
        let exit_weights = |m: &TrainModel| -> Vec<Vec<f32>> {
            m.exits
                .iter()
                .flat_map(|e| [e.fc1.weight.val(), e.fc2.weight.val()])
                .map(|t| t.into_data().try_to_vec::<f32>().unwrap())
                .collect()
        };
        let layers = |m: &TrainModel| {
            let mut v = m.backbone.weights();
            v.extend(exit_weights(m));
            v
        };
        let (a, b) = (layers(&plain), layers(&clipped));
        assert_eq!(a.len(), b.len());
        let mut clamped = 0;
        for (l, (w, c)) in a.iter().zip(&b).enumerate() {
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = w
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let bound = f64::from(k) * var.sqrt();
            for (&wi, &ci) in w.iter().zip(c) {
                let expect = f64::from(wi).clamp(-bound, bound);
                assert!(
                    (f64::from(ci) - expect).abs() <= 1e-5 * bound,
                    "layer {l}: {wi} clipped to {ci}, expected {expect} (bound {bound})"
                );
                clamped += usize::from(f64::from(wi).abs() > bound * (1.0 + 1e-5));
            }
        }
        assert!(
            clamped > 0,
            "K = {k} clamped no weight: the test would not see clipping"
        );
        // Every other float parameter (biases, BatchNorm) is the unclipped step's, bit for bit.
        let others = |m: &TrainModel| crate::model::noise::tests::non_weight_params(m);
        assert!(others(&plain).len() > 10);
        assert_eq!(others(&plain), others(&clipped));
        // A second step from the clipped model.
        let before = layers(&clipped);
        let (after, loss, _) = train_step(
            clipped,
            &mut optim,
            &cfg,
            &noise,
            x.clone(),
            y.clone(),
            1e-2,
        )
        .unwrap();
        assert!(loss.is_finite());
        assert_ne!(layers(&after), before);
    }

    /// `--bn-stats clean`: after a noise-injection step, every BatchNorm's running statistics
    /// equal those a clean forward pass of the same batch leaves on an identical model; with
    /// `noisy` they do not (the noisy pass moved them).
    #[test]
    fn clean_bn_stats_equal_a_clean_pass() {
        let _rng = crate::burn_rng_guard();
        let ad = Device::flex().autodiff();
        let x = Tensor::<4>::random([4, 1, 16, 16], Distribution::Normal(0.0, 1.0), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 3, 5, 7], [4]), &ad);
        let fresh = |cfg: &TrainConfig| {
            ad.seed(5);
            let backbone = cfg.model.init_backbone(&ad);
            TrainModel {
                backbone,
                exits: Vec::new(),
            }
        };
        for method in [Method::Noise, Method::Vanilla] {
            let cfg = config(method, BnStats::Clean);
            let reference = fresh(&cfg);
            let _ = reference.backbone.forward(x.clone());
            let expect = reference.backbone.running_stats();
            let before = fresh(&cfg).backbone.running_stats();

            let noise = TrainingNoise::new(cfg.variation);
            let mut optim = AdamConfig::new().with_epsilon(ADAM_EPSILON).init();
            let (model, loss, _) = train_step(
                fresh(&cfg),
                &mut optim,
                &cfg,
                &noise,
                x.clone(),
                y.clone(),
                1e-3,
            )
            .unwrap();
            assert!(loss.is_finite());
            let got = model.backbone.running_stats();
            assert_eq!(got.len(), 6);
            for (l, ((gm, gv), (em, ev))) in got.iter().zip(&expect).enumerate() {
                let (gm, em) = (gm.to_data(), em.to_data());
                assert_eq!(gm, em, "{method:?}: layer {l} running mean");
                assert_eq!(
                    gv.to_data(),
                    ev.to_data(),
                    "{method:?}: layer {l} running var"
                );
                assert_ne!(gm, before[l].0.to_data(), "layer {l}: the statistics moved");
            }

            if method == Method::Noise {
                let cfg = config(method, BnStats::Noisy);
                let mut optim = AdamConfig::new().with_epsilon(ADAM_EPSILON).init();
                let (model, _, _) = train_step(
                    fresh(&cfg),
                    &mut optim,
                    &cfg,
                    &noise,
                    x.clone(),
                    y.clone(),
                    1e-3,
                )
                .unwrap();
                let got = model.backbone.running_stats();
                assert_ne!(
                    got[5].0.to_data(),
                    expect[5].0.to_data(),
                    "the noisy pass's statistics differ from the clean pass's"
                );
            }
        }
    }

    /// Steps inside a [`DrawAhead`] scope (the noise of each step drawn on a helper thread while
    /// the step before runs) give the bits of steps drawing in place, with and without stuck-at
    /// faults (normal and uniform draws), and the generator ends where it would have.
    #[test]
    fn drawing_the_noise_ahead_gives_the_same_steps() {
        use nvcim_shared::variation::{Faults, Profile, SigmaUnit};
        let _rng = crate::burn_rng_guard();
        let ad = Device::flex().autodiff();
        let faults = VariationConfig::new(
            nvcim_shared::quant::QuantConfig::DEFAULT,
            0.3,
            SigmaUnit::Range,
            Profile::Uniform,
            Faults::new(0.05, 0.02).unwrap(),
        )
        .unwrap();
        for (method, variation) in [
            (Method::Nft, VariationConfig::paper(0.4).unwrap()),
            (Method::Noise, faults),
        ] {
            let mut cfg = config(method, BnStats::Noisy);
            cfg.variation = variation;
            let run = |ahead: bool| {
                ad.seed(4);
                let x = Tensor::<4>::random([4, 1, 16, 16], Distribution::Normal(0.0, 1.0), &ad);
                let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 3, 5, 7], [4]), &ad);
                let mut model = TrainModel {
                    backbone: cfg.model.init_backbone(&ad),
                    exits: cfg.model.init_exits(&ad),
                };
                let mut optim = AdamConfig::new().with_epsilon(ADAM_EPSILON).init();
                let noise = TrainingNoise::new(cfg.variation);
                let scope = ahead.then(DrawAhead::scope);
                let steps = 4;
                for step in 0..steps {
                    if let Some(s) = &scope {
                        s.begin_step(step + 1 < steps);
                    }
                    (model, _, _) =
                        train_step(model, &mut optim, &cfg, &noise, x.clone(), y.clone(), 1e-2)
                            .unwrap();
                }
                drop(scope);
                let next = Tensor::<1>::random([8], Distribution::Default, &ad);
                let bits = |v: Vec<Vec<f32>>| -> Vec<Vec<u32>> {
                    v.into_iter()
                        .map(|l| l.iter().map(|x| x.to_bits()).collect())
                        .collect()
                };
                (
                    bits(model.backbone.weights()),
                    next.into_data().try_to_vec::<f32>().unwrap(),
                )
            };
            let (plain, ahead) = (run(false), run(true));
            assert!(plain.0 == ahead.0, "{method:?}: the weights differ");
            assert_eq!(plain.1, ahead.1, "{method:?}: the generator ends elsewhere");
        }
    }
}

#[cfg(test)]
mod resume_tests {
    use super::*;
    use crate::model::Arch;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    #[test]
    fn checkpoint_round_trip_continues_identically() {
        let _rng = crate::burn_rng_guard();
        let ad = Device::flex().autodiff();
        ad.seed(3);
        let spec = ModelSpec {
            arch: Arch::Vgg8,
            width: 0.125,
            in_channels: 1,
            image_size: 32,
            num_classes: 10,
            graph: None,
        };
        let mut model = TrainModel {
            backbone: spec.init_backbone(&ad),
            exits: spec.init_exits(&ad),
        };
        let mut optim = AdamConfig::new().init();
        let x = Tensor::<4>::random([4, 1, 32, 32], Distribution::Normal(0.0, 1.0), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 3, 5, 7], [4]), &ad);
        let step = |m: TrainModel, o: &mut burn::optim::ModuleOptimizer| {
            let (out, fb) = m.forward(x.clone());
            let loss = method::loss(Method::Nft, out, &fb, y.clone(), 0.1, None);
            let g = GradientsParams::from_grads(loss.backward(), &m);
            o.step(1e-3, m, g)
        };
        for _ in 0..3 {
            model = step(model, &mut optim);
        }
        model.backbone.sync_running_stats();
        let dir = tempfile::tempdir().unwrap();
        model.clone().save_file(dir.path().join("m.bpk")).unwrap();
        optim.save(dir.path().join("o.bpk")).unwrap();
        let rec = burn::store::ModuleRecord::load(dir.path().join("m.bpk")).unwrap();
        let loaded = TrainModel {
            backbone: spec.init_backbone(&ad),
            exits: spec.init_exits(&ad),
        }
        .try_load_record(rec)
        .unwrap();
        assert_eq!(
            loaded.backbone.weights(),
            model.backbone.weights(),
            "weights survive saving"
        );
        let mut optim2 = AdamConfig::new()
            .init()
            .load(dir.path().join("o.bpk"))
            .unwrap();
        let a = step(model, &mut optim);
        let b = step(loaded, &mut optim2);
        let (mut a, mut b) = (a, b);
        a.backbone.sync_running_stats();
        b.backbone.sync_running_stats();
        let (la, lb) = (a.backbone.weight_layers(), b.backbone.weight_layers());
        for (p, q) in la.iter().zip(&lb) {
            assert_eq!(p.weights, q.weights, "{} weights", p.name);
            assert_eq!(p.bias, q.bias, "{} bias", p.name);
            assert_eq!(p.bn, q.bn, "{} bn", p.name);
        }
        let ea = to_flat(&a.exits);
        let eb = to_flat(&b.exits);
        assert_eq!(ea, eb, "exits");
    }

    fn to_flat(exits: &[crate::model::ExitHead]) -> Vec<f32> {
        exits
            .iter()
            .flat_map(|e| {
                let mut v = e.fc1.weight.val().into_data().try_to_vec::<f32>().unwrap();
                v.extend(
                    e.fc2
                        .bias
                        .as_ref()
                        .unwrap()
                        .val()
                        .into_data()
                        .try_to_vec::<f32>()
                        .unwrap(),
                );
                v
            })
            .collect()
    }
}
