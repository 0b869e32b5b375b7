//! The inference engines that Monte Carlo evaluation (Algorithm 2) runs, and the one trait they
//! implement, [`NoisyClassifier`].
//!
//! | engine | what it computes | used by |
//! |---|---|---|
//! | [`float`] | the checkpoint's network ([`crate::ir`]) with each run's perturbed weights in `f32`, layer by layer (equal to Burn's forward pass within `1e-4`) | `nvcim eval --engine float` |
//! | [`int`] | the packed integer CiM model the firmware runs, bit-exact with `shared`'s `exec` and the firmware | `nvcim eval --engine int`, `nvcim firmware run` |
//! | [`onnx`] | an external ONNX CNN through tract, its Conv/Gemm/MatMul weights perturbed | `nvcim eval --onnx` |
//! | [`dense`] | a small fully connected network over `shared` (tests and fixtures) | tests |
//!
//! The host's runtime-dispatched kernels (the integer dot products, the `f32` gemm) are in
//! [`crate::kernels`]; the float and integer engines' own register-blocked layer kernels are in
//! `float::layers` and `int::layers`.
//!
//! **The contract.** For each sigma and each run `r`, an engine programs its noisy weights —
//! layer `l` drawn from `nvcim_shared::rng::stream(seed, r, l)`, weights in canonical order
//! (conv `[out][in][kh][kw]`, linear `[out][in]`), one `VariationConfig::sample` per weight —
//! then classifies its test set and reports how many examples it got right.
//! [`crate::eval::mc::monte_carlo`] runs the runs in parallel; [`crate::eval::evaluate`] turns
//! the counts into result files.
//!
//! **Adding an engine.** Implement [`NoisyClassifier`]: `Data` is the engine's test set (e.g.
//! prepared batches, computed once — input pipelines and anything else that does not depend on
//! the weights belong there, not in `run`); `run` must, for each backbone weight layer `l`, take
//! the layer's clean weights in canonical order (transpose Burn's `[in, out]` first), quantize
//! against the layer's scale and draw one `VariationConfig::sample` per weight from
//! `stream(seed, run, l)` ([`noisy_weights`] does all of that for a float engine; an integer
//! engine uses the same `Readout`s for its tile state), then classify `data`. Then call
//! [`crate::eval::evaluate`] with the `nvcim eval` flags.

use anyhow::{Context, Result, ensure};
use nvcim_shared::{
    quant::{ScaleMode, layer_scale},
    rng::{Purpose, stream, stream_for},
    variation::VariationConfig,
};

use crate::{
    data::{Dataset, make_batch, permutation, tags},
    ir::{Network, Op},
};

pub mod dense;
pub mod float;
pub mod int;
pub mod onnx;
pub mod perturb;

/// An inference engine whose weights can be reprogrammed with device variation.
///
/// `run` must be a pure function of its arguments (and the engine's clean weights): calling it
/// twice, or from two threads at once, gives the same count.
pub trait NoisyClassifier: Sync {
    /// The test set in the engine's own representation (images and labels).
    type Data: Sync + ?Sized;

    /// Number of weight layers (backbone conv and linear layers; exits excluded).
    fn num_layers(&self) -> usize;

    /// Number of examples in `data`.
    fn num_examples(&self, data: &Self::Data) -> usize;

    /// Correct classifications with the clean (unperturbed) weights.
    fn clean(&self, data: &Self::Data) -> Result<usize>;

    /// Programs the noisy weights of Monte Carlo run `run` under `seed` (layer `l` from
    /// `stream(seed, run, l)`) and returns the number of correct classifications of `data`.
    fn run(&self, var: &VariationConfig, seed: u64, run: u32, data: &Self::Data) -> Result<usize>;
}

/// Index of the first largest value (NaN never wins).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
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

/// BatchNorm recalibration after programming (`nvcim eval --bn-recalibrate N`): before a Monte
/// Carlo run classifies its test set, every BatchNorm's running mean and variance are
/// re-estimated on the same `N` training images through that run's perturbed weights
/// ([`float::layers::recalibrate_batchnorm`]) — what a chip's digital periphery can do once
/// after its arrays are programmed. The images are a seeded choice (`--seed`) from the
/// training set, the same for every run; no weight changes.
#[derive(Debug, Clone)]
pub struct BnRecalibration {
    images: Vec<f32>,
    n: usize,
}

impl BnRecalibration {
    /// `n` images of `train` chosen by `seed` ([`recalibration_images`]).
    pub fn new(train: &Dataset, n: usize, seed: u64) -> Result<Self> {
        let idx = recalibration_images(train.len(), n, seed, "")?;
        Ok(BnRecalibration {
            images: make_batch(train, &idx, None).images,
            n,
        })
    }

    /// Recalibration on `n` images already normalized for the network (flat NCHW), e.g. an
    /// imported model's ([`crate::onnx::data::recalibration_batch`]).
    pub fn from_images(images: Vec<f32>, n: usize) -> Self {
        BnRecalibration { images, n }
    }

    /// Re-estimates the BatchNorm statistics of `net` (its weights as programmed); returns
    /// each node's largest `|value|` over the images, after recalibration.
    pub fn apply(&self, net: &mut Network) -> Result<Vec<f32>> {
        float::layers::recalibrate_batchnorm(
            net,
            &self.images,
            self.n,
            float::layers::Isa::detect(),
        )
        .context("recalibrating BatchNorm")
    }
}

/// The training images `--bn-recalibrate n` uses out of `len` (`where_` names where they are
/// in the error): the first `n` of a seeded permutation (host stream, tag
/// [`tags::RECALIBRATE`]), in file order. Checkpoints and ONNX models choose the same ones.
pub fn recalibration_images(len: usize, n: usize, seed: u64, where_: &str) -> Result<Vec<usize>> {
    ensure!(n > 0, "--bn-recalibrate must be at least 1 image");
    ensure!(
        n <= len,
        "--bn-recalibrate {n} is more than the {len} training images there are{where_}; give at \
         most {len}"
    );
    let mut idx = permutation(
        len,
        &mut stream_for(Purpose::Host, seed, 0, tags::RECALIBRATE),
    );
    idx.truncate(n);
    idx.sort_unstable();
    Ok(idx)
}

/// Per channel, the mean and biased variance (summed in `f64`, two passes) of `x` cut into
/// runs of `run` values, run `k` belonging to channel `k % channels`: `[c][n][plane]` with
/// `run = n * plane`, or `[n][c][plane]` with `run = plane`.
pub fn channel_stats(x: &[f32], channels: usize, run: usize) -> (Vec<f32>, Vec<f32>) {
    let runs = || {
        x.chunks(run.max(1))
            .enumerate()
            .map(|(k, r)| (k % channels.max(1), r))
    };
    let count = (x.len() / channels.max(1)).max(1) as f64;
    let mut mean = vec![0f64; channels];
    for (c, r) in runs() {
        mean[c] += r.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    mean.iter_mut().for_each(|m| *m /= count);
    let mut var = vec![0f64; channels];
    for (c, r) in runs() {
        var[c] += r
            .iter()
            .map(|&v| (f64::from(v) - mean[c]).powi(2))
            .sum::<f64>();
    }
    (
        mean.iter().map(|&m| m as f32).collect(),
        var.iter().map(|&v| (v / count) as f32).collect(),
    )
}

/// Whether `net` has a BatchNorm node (what `--bn-recalibrate` re-estimates).
pub fn has_batchnorm(net: &Network) -> bool {
    net.nodes.iter().any(|n| matches!(n.op, Op::BatchNorm(_)))
}
