//! [`DenseNetwork`]: a Burn-free float engine over `nvcim_shared` for fully connected
//! networks, and the [`fixture`] the Monte Carlo tests run it on.

use anyhow::{Context, Result, bail, ensure};
use nvcim_shared::{
    quant::{ScaleMode, layer_scale},
    rng::stream,
    variation::VariationConfig,
};

use super::{NoisyClassifier, argmax};

/// One fully connected layer: `y = W x + b`, optionally followed by ReLU.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayer {
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub outputs: usize,
    /// Weights in canonical (PyTorch) order `[out][in]`, `outputs * inputs` values.
    pub weights: Vec<f32>,
    /// Bias, `outputs` values (not perturbed: biases are not conductance-coded).
    pub bias: Vec<f32>,
    /// Apply ReLU to the output.
    pub relu: bool,
}

/// A labelled test set of flat feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseData {
    /// Features per example.
    pub dim: usize,
    /// `labels.len() * dim` features, example-major.
    pub features: Vec<f32>,
    /// Class of each example.
    pub labels: Vec<usize>,
}

impl DenseData {
    /// Checks that the features match `dim` and the labels.
    pub fn new(dim: usize, features: Vec<f32>, labels: Vec<usize>) -> Result<Self> {
        ensure!(dim > 0, "test features need at least one dimension");
        ensure!(
            features.len() == dim * labels.len(),
            "test set: {} features for {} examples of dimension {dim}",
            features.len(),
            labels.len()
        );
        Ok(DenseData {
            dim,
            features,
            labels,
        })
    }

    /// The first `n` examples (all of them when `n` is larger).
    pub fn subset(&self, n: usize) -> DenseData {
        let n = n.min(self.labels.len());
        DenseData {
            dim: self.dim,
            features: self.features[..n * self.dim].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }
}

/// A float engine for fully connected networks, built on `nvcim_shared` only.
///
/// Each run perturbs every layer's weights with `VariationConfig::perturb_f32` (the float
/// engine's noisy weight: the trained weight plus its devices' read-back error), quantized
/// against the layer's own `max|W|` or, with [`ScaleMode::PerModel`], the model's.
#[derive(Debug, Clone)]
pub struct DenseNetwork {
    layers: Vec<DenseLayer>,
    scales: Vec<f32>,
    scale_mode: ScaleMode,
}

impl DenseNetwork {
    /// Checks the shapes (each layer's inputs are the previous layer's outputs) and the weights
    /// (finite, no all-zero layer), and computes the quantization scales.
    pub fn new(layers: Vec<DenseLayer>, scale_mode: ScaleMode) -> Result<Self> {
        ensure!(!layers.is_empty(), "a network needs at least one layer");
        let mut scales = Vec::with_capacity(layers.len());
        for (l, layer) in layers.iter().enumerate() {
            ensure!(
                layer.inputs > 0 && layer.outputs > 0,
                "layer {l}: empty shape {}x{}",
                layer.outputs,
                layer.inputs
            );
            ensure!(
                layer.weights.len() == layer.inputs * layer.outputs,
                "layer {l}: {} weights for shape [{}][{}]",
                layer.weights.len(),
                layer.outputs,
                layer.inputs
            );
            ensure!(
                layer.bias.len() == layer.outputs,
                "layer {l}: {} biases for {} outputs",
                layer.bias.len(),
                layer.outputs
            );
            if l > 0 && layers[l - 1].outputs != layer.inputs {
                bail!(
                    "layer {l} takes {} inputs but layer {} gives {}",
                    layer.inputs,
                    l - 1,
                    layers[l - 1].outputs
                );
            }
            scales.push(layer_scale(&layer.weights).with_context(|| format!("layer {l}"))?);
        }
        if scale_mode == ScaleMode::PerModel {
            let max = scales.iter().copied().fold(0.0f32, f32::max);
            scales.iter_mut().for_each(|s| *s = max);
        }
        Ok(DenseNetwork {
            layers,
            scales,
            scale_mode,
        })
    }

    /// The layers.
    pub fn layers(&self) -> &[DenseLayer] {
        &self.layers
    }

    /// The quantization scale of each layer.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Per layer or per model scales.
    pub fn scale_mode(&self) -> ScaleMode {
        self.scale_mode
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }

    /// The noisy weights of run `run` under `seed`, one vector per layer in canonical order.
    pub fn noisy_weights(
        &self,
        var: &VariationConfig,
        seed: u64,
        run: u32,
    ) -> Result<Vec<Vec<f32>>> {
        self.layers
            .iter()
            .zip(&self.scales)
            .enumerate()
            .map(|(l, (layer, &scale))| {
                let mut out = vec![0.0; layer.weights.len()];
                let mut rng = stream(seed, run, l as u32);
                var.perturb_f32(&layer.weights, scale, &mut rng, &mut out)
                    .with_context(|| format!("perturbing layer {l}"))?;
                Ok(out)
            })
            .collect()
    }

    /// Logits of a block of examples (`x`: example-major, `n` examples) with the given weights
    /// (one vector per layer); the result is left in `a`, example-major.
    fn forward(
        &self,
        weights: &[Vec<f32>],
        x: &[f32],
        n: usize,
        a: &mut Vec<f32>,
        b: &mut Vec<f32>,
    ) {
        a.clear();
        a.extend_from_slice(x);
        for (layer, w) in self.layers.iter().zip(weights) {
            b.clear();
            b.resize(n * layer.outputs, 0.0);
            // Row-outer: one weight row stays in cache across the block.
            for (o, row) in w.chunks_exact(layer.inputs).enumerate() {
                for (e, xe) in a.chunks_exact(layer.inputs).enumerate() {
                    let acc = layer.bias[o] + dot(row, xe);
                    b[e * layer.outputs + o] = if layer.relu { acc.max(0.0) } else { acc };
                }
            }
            std::mem::swap(a, b);
        }
    }

    /// Correct classifications of `data` with `weights`; the predicted class is the first
    /// index of the largest logit.
    pub fn count_correct(&self, weights: &[Vec<f32>], data: &DenseData) -> Result<usize> {
        /// Examples per forward block.
        const BLOCK: usize = 32;
        ensure!(
            data.dim == self.inputs(),
            "the test set has {} features but the network takes {}",
            data.dim,
            self.inputs()
        );
        let classes = self.layers.last().expect("at least one layer").outputs;
        if let Some(&label) = data.labels.iter().find(|&&l| l >= classes) {
            bail!("label {label} out of range for {classes} classes");
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut correct = 0;
        for (x, labels) in data
            .features
            .chunks(BLOCK * data.dim)
            .zip(data.labels.chunks(BLOCK))
        {
            self.forward(weights, x, labels.len(), &mut a, &mut b);
            for (logits, &label) in a.chunks_exact(classes).zip(labels) {
                correct += usize::from(argmax(logits) == label);
            }
        }
        Ok(correct)
    }
}

/// Dot product with eight independent partial sums (so the compiler can vectorise it), added
/// in a fixed order: deterministic for given inputs.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl NoisyClassifier for DenseNetwork {
    type Data = DenseData;

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn num_examples(&self, data: &DenseData) -> usize {
        data.labels.len()
    }

    fn clean(&self, data: &DenseData) -> Result<usize> {
        let weights: Vec<Vec<f32>> = self.layers.iter().map(|l| l.weights.clone()).collect();
        self.count_correct(&weights, data)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, data: &DenseData) -> Result<usize> {
        let weights = self.noisy_weights(var, seed, run)?;
        self.count_correct(&weights, data)
    }
}

/// Test fixtures: a small two-layer network and a separable data set, made from a seed.
pub mod fixture {
    use nvcim_shared::{
        quant::ScaleMode,
        rng::{Purpose, standard_normal, stream_for},
    };

    use super::{DenseData, DenseLayer, DenseNetwork};

    /// A `dim -> hidden -> classes` ReLU network and `n` examples it classifies mostly right
    /// when clean (about 99% with the tests' sizes), from `seed`.
    ///
    /// The first layer's rows are random directions; output `k` reads hidden unit `k` (weight 1)
    /// minus a little of the others. Example `i` has class `k = i % classes`: a Gaussian point
    /// (std 0.6 per feature) pushed 3 units along row `k`.
    pub fn separable(
        seed: u64,
        dim: usize,
        hidden: usize,
        classes: usize,
        n: usize,
    ) -> (DenseNetwork, DenseData) {
        assert!(hidden >= classes && classes >= 2 && dim >= 1);
        let mut rng = stream_for(Purpose::Host, seed, 0, 0);
        let mut gauss = |scale: f32| scale * standard_normal(&mut rng);
        let w1: Vec<f32> = (0..hidden * dim)
            .map(|_| gauss(1.0 / (dim as f32).sqrt()))
            .collect();
        // Output k reads hidden unit k, minus a little of the others.
        let mut w2 = vec![0.0f32; classes * hidden];
        for k in 0..classes {
            for h in 0..hidden {
                w2[k * hidden + h] = if h == k { 1.0 } else { -0.1 };
            }
        }
        let mut features = Vec::with_capacity(n * dim);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let k = i % classes;
            let dir = &w1[k * dim..(k + 1) * dim];
            let norm: f32 = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
            for d in dir {
                features.push(3.0 * d / norm + gauss(0.6));
            }
            labels.push(k);
        }
        let net = DenseNetwork::new(
            vec![
                DenseLayer {
                    inputs: dim,
                    outputs: hidden,
                    weights: w1,
                    bias: vec![0.0; hidden],
                    relu: true,
                },
                DenseLayer {
                    inputs: hidden,
                    outputs: classes,
                    weights: w2,
                    bias: vec![0.0; classes],
                    relu: false,
                },
            ],
            ScaleMode::PerLayer,
        )
        .expect("the fixture is well formed");
        let data = DenseData::new(dim, features, labels).expect("the fixture is well formed");
        (net, data)
    }
}
