//! A Burn-free description of a trained backbone: the hub between training, ONNX export, the
//! packer and the tests.
//!
//! A [`Network`] is an input shape `(C, H, W)`, a class count, the input normalization, the
//! provenance of the weights, and an SSA graph of [`Node`]s: each node reads values produced
//! earlier ([`Value::INPUT`] is the normalized image batch, [`Value::node`] the output of node
//! `i`), and the output of the last node is the logits. Activations are NCHW `f32`; after
//! `Flatten` (or a `Linear`) a value is `[N, features]`, stored here as `[N, features, 1, 1]`.
//!
//! **Weight layers** ([`Network::weight_layers`]) are the conv and linear nodes in graph order:
//! that order *is* the contract's layer index `l` (Monte Carlo run `r` under seed `s` perturbs
//! layer `l` from `rng::stream(s, r, l)`), so a converter must emit nodes in forward order — for a
//! residual block: `conv1, bn1, relu, conv2, bn2, shortcut conv, shortcut bn, add, relu`. Weights
//! are stored in PyTorch's canonical order: conv `[out][in / groups][kh][kw]`, linear `[out][in]` (Burn's
//! `Linear` stores `[in, out]`: transpose when converting).
//!
//! The graph holds the backbone only: training exits never enter it. BatchNorm stays a node of
//! its own; [`Network::fold_batchnorm`] folds it into the preceding conv for export only (the
//! conductance-coded weights are the unfolded conv weights).
//!
//! [`Network::forward`] (in `reference.rs`) is a plain, slow, obviously-correct `f32` forward
//! pass: the oracle the exporters and runtimes are tested against. `random.rs` builds
//! random-weight VGG-8 and ResNet-18 graphs for tests and benches ([`RandomArch`]), and
//! [`convert`] turns a Burn checkpoint into a [`Network`].

use std::collections::BTreeMap;

mod random;
mod reference;

pub mod convert;

pub use random::RandomArch;

use anyhow::{Context, Result, bail, ensure};
use nvcim_shared::{
    quant::layer_scale,
    rng::stream,
    variation::{SigmaUnit, VariationConfig},
};

/// A value of the graph: the network input or the output of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(usize);

impl Value {
    /// The (normalized) input batch.
    pub const INPUT: Value = Value(0);

    /// The output of node `index`.
    pub const fn node(index: usize) -> Value {
        Value(index + 1)
    }

    /// The node producing this value, `None` for the input.
    pub const fn producer(self) -> Option<usize> {
        self.0.checked_sub(1)
    }
}

/// A 2-D convolution, weight `[out][in / groups][kh][kw]`, zero padding, dilation 1.
///
/// `groups` splits the channels into independent convolutions: output channel `o` reads input
/// channels `g * in / groups .. (g + 1) * in / groups` with `g = o / (out / groups)`. A
/// depthwise convolution has `groups == in_channels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2d {
    /// Output channels.
    pub out_channels: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride along the height and the width.
    pub stride: [usize; 2],
    /// Zero padding: top, left, bottom, right (ONNX's `pads` order is top, left, bottom, right
    /// too).
    pub padding: [usize; 4],
    /// Channel groups (1: an ordinary convolution).
    pub groups: usize,
    /// Weights, `[out][in / groups][kh][kw]`.
    pub weight: Vec<f32>,
    /// One bias per output channel, if any.
    pub bias: Option<Vec<f32>>,
}

impl Conv2d {
    /// An ungrouped convolution with a square kernel, one stride and the same padding on every
    /// side (VGG-8's and ResNet-18's).
    pub fn square(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Self {
        Conv2d {
            out_channels,
            in_channels,
            kernel: [kernel, kernel],
            stride: [stride, stride],
            padding: [padding; 4],
            groups: 1,
            weight,
            bias,
        }
    }

    /// Weights per output channel: `in / groups * kh * kw`.
    pub fn fan_in(&self) -> usize {
        self.in_channels / self.groups.max(1) * self.kernel[0] * self.kernel[1]
    }

    /// `(stride, padding)` when the convolution is ungrouped with one stride and the same
    /// padding on every side (the engines' fast paths), `None` otherwise.
    pub fn uniform(&self) -> Option<(usize, usize)> {
        let p = self.padding;
        (self.groups == 1 && self.stride[0] == self.stride[1] && p.iter().all(|&v| v == p[0]))
            .then_some((self.stride[0], p[0]))
    }
}

/// A pooling window: kernel, stride, zero padding (top, left, bottom, right), floor mode.
/// Max pooling never picks a padded position (PyTorch's and ONNX's semantics); average pooling
/// divides by the whole window (`count_include_pad`) or by its positions inside the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Step along the height and the width.
    pub stride: [usize; 2],
    /// Padding: top, left, bottom, right.
    pub padding: [usize; 4],
    /// Average pooling: divide by `kh * kw` even where the window covers padding.
    pub count_include_pad: bool,
}

impl Pool {
    /// A square window without padding.
    pub const fn square(kernel: usize, stride: usize) -> Self {
        Pool {
            kernel: [kernel, kernel],
            stride: [stride, stride],
            padding: [0; 4],
            count_include_pad: true,
        }
    }

    /// `(kernel, stride)` of a square window without padding (the engines' fast paths).
    pub fn uniform(&self) -> Option<(usize, usize)> {
        (self.kernel[0] == self.kernel[1]
            && self.stride[0] == self.stride[1]
            && self.padding == [0; 4])
            .then_some((self.kernel[0], self.stride[0]))
    }

    /// The output height and width over an `h x w` input, `None` when the window does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        window_out(h, w, self.kernel, self.stride, self.padding)
    }
}

/// Output height and width of a window sliding over `h x w` with `pad` (top, left, bottom,
/// right), floor mode; `None` when it does not fit or a stride is zero.
pub fn window_out(
    h: usize,
    w: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
) -> Option<(usize, usize)> {
    let (ph, pw) = (h + pad[0] + pad[2], w + pad[1] + pad[3]);
    (kernel[0] > 0
        && kernel[1] > 0
        && stride[0] > 0
        && stride[1] > 0
        && ph >= kernel[0]
        && pw >= kernel[1])
        .then(|| {
            (
                (ph - kernel[0]) / stride[0] + 1,
                (pw - kernel[1]) / stride[1] + 1,
            )
        })
}

/// A fully connected layer, weight `[out][in]` (canonical, *not* Burn's `[in, out]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Output features.
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
    /// Weights, `[out][in]`.
    pub weight: Vec<f32>,
    /// One bias per output feature, if any.
    pub bias: Option<Vec<f32>>,
}

/// Inference-mode batch normalization over channels:
/// `y = gamma * (x - mean) / sqrt(var + eps) + beta`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm {
    /// Scale per channel.
    pub gamma: Vec<f32>,
    /// Shift per channel.
    pub beta: Vec<f32>,
    /// Running mean per channel.
    pub mean: Vec<f32>,
    /// Running variance per channel.
    pub var: Vec<f32>,
    /// Added to the variance.
    pub eps: f32,
}

impl BatchNorm {
    /// Per-channel `(multiplier, offset)` with `y = multiplier * x + offset`, computed in `f64`.
    pub fn affine(&self) -> Vec<(f64, f64)> {
        (0..self.gamma.len())
            .map(|c| {
                let m = f64::from(self.gamma[c])
                    / (f64::from(self.var[c]) + f64::from(self.eps)).sqrt();
                (m, f64::from(self.beta[c]) - m * f64::from(self.mean[c]))
            })
            .collect()
    }
}

/// What a node computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Convolution (a weight layer).
    Conv2d(Conv2d),
    /// Batch normalization (inference mode).
    BatchNorm(BatchNorm),
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)` (ReLU6 is `Clip { min: 0, max: 6 }`).
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// Max pooling.
    MaxPool(Pool),
    /// Average pooling.
    AvgPool(Pool),
    /// Mean over the spatial axes: `[N, C, H, W] -> [N, C, 1, 1]`.
    GlobalAvgPool,
    /// `[N, C, H, W] -> [N, C*H*W]` in NCHW order.
    Flatten,
    /// Fully connected (a weight layer) on `[N, features]`.
    Linear(Linear),
    /// Elementwise sum of two values of the same shape (residual connections).
    Add,
    /// The channels of the first input, then those of the second (same height and width).
    Concat,
}

impl Op {
    /// The ONNX-ish name of the operation, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv2d(_) => "Conv2d",
            Op::BatchNorm(_) => "BatchNorm",
            Op::Relu => "Relu",
            Op::Clip { .. } => "Clip",
            Op::MaxPool(_) => "MaxPool",
            Op::AvgPool(_) => "AvgPool",
            Op::GlobalAvgPool => "GlobalAvgPool",
            Op::Flatten => "Flatten",
            Op::Linear(_) => "Linear",
            Op::Add => "Add",
            Op::Concat => "Concat",
        }
    }

    fn arity(&self) -> usize {
        if matches!(self, Op::Add | Op::Concat) {
            2
        } else {
            1
        }
    }
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// A unique, descriptive name (`features.0.conv`, `layer2.1.shortcut.bn`, `classifier.2`).
    pub name: String,
    /// What it computes.
    pub op: Op,
    /// The values it reads, each produced before this node.
    pub inputs: Vec<Value>,
}

/// Per-channel input normalization: the graph input is `(pixel - mean[c]) / std[c]` with pixels
/// in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    /// Mean per input channel.
    pub mean: Vec<f32>,
    /// Standard deviation per input channel.
    pub std: Vec<f32>,
}

impl Normalization {
    /// No normalization for `channels` channels (mean 0, std 1).
    pub fn identity(channels: usize) -> Self {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Normalizes an NCHW batch of pixels in `[0, 1]` in place.
    pub fn apply(&self, batch: &mut [f32], plane: usize) {
        let channels = self.mean.len();
        for (i, chunk) in batch.chunks_mut(plane).enumerate() {
            let c = i % channels;
            for x in chunk {
                *x = (*x - self.mean[c]) / self.std[c];
            }
        }
    }
}

/// Where the weights come from; exported as ONNX `metadata_props` (keys `nvcim.*`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Provenance {
    /// The architecture (`vgg8`, `resnet18`, ...).
    pub architecture: Option<String>,
    /// The training data set.
    pub dataset: Option<String>,
    /// The training method (`vanilla`, `noise-injection`, `nft-irs`, `nft-ovf`, ...).
    pub method: Option<String>,
    /// The negative-feedback strength alpha.
    pub alpha: Option<f32>,
    /// The sigma used during training, with its convention.
    pub train_sigma: Option<(f32, SigmaUnit)>,
    /// Anything else worth keeping (seed, epochs, checkpoint path, ...).
    pub extra: BTreeMap<String, String>,
}

impl Provenance {
    /// Key/value pairs, the nvcim version first; every key starts with `nvcim.`.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut out = vec![(
            "nvcim.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )];
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push((format!("nvcim.{k}"), v));
            }
        };
        put("architecture", self.architecture.clone());
        put("dataset", self.dataset.clone());
        put("method", self.method.clone());
        put("alpha", self.alpha.map(|a| a.to_string()));
        put("train_sigma", self.train_sigma.map(|(s, _)| s.to_string()));
        put(
            "sigma_unit",
            self.train_sigma.map(|(_, u)| u.name().to_string()),
        );
        for (k, v) in &self.extra {
            out.push((format!("nvcim.{k}"), v.clone()));
        }
        out
    }
}

/// The kind of a weight layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A convolution, weight `[out][in][kh][kw]`.
    Conv,
    /// A fully connected layer, weight `[out][in]`.
    Linear,
}

/// A weight layer (conv or linear) as seen by the variation model.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightLayer {
    /// The contract's layer index `l`.
    pub index: usize,
    /// The node holding it.
    pub node: usize,
    /// The node's name.
    pub name: String,
    /// Conv or linear.
    pub kind: LayerKind,
    /// The canonical weight shape.
    pub shape: Vec<usize>,
}

/// The shape of a value, NCHW without the batch: `[C, H, W]` (`[features, 1, 1]` when flat).
pub type Shape = [usize; 3];

/// A trained (or random) backbone. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// Input channels, height, width.
    pub input: Shape,
    /// Number of classes (the width of the logits).
    pub num_classes: usize,
    /// How raw pixels become the graph input.
    pub normalization: Normalization,
    /// Where the weights come from.
    pub provenance: Provenance,
    /// The graph, in forward order; the last node's output is the logits.
    pub nodes: Vec<Node>,
}

impl Network {
    /// Checks the graph (inputs defined before use, arities, weight and parameter lengths,
    /// channel counts, a logits output of `num_classes`) and returns every node's output shape.
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        ensure!(!self.nodes.is_empty(), "the network has no nodes");
        ensure!(
            self.input.iter().all(|&d| d > 0),
            "input shape {:?} has a zero dimension",
            self.input
        );
        ensure!(
            self.normalization.mean.len() == self.input[0]
                && self.normalization.std.len() == self.input[0],
            "normalization has {} means and {} stds for {} input channels",
            self.normalization.mean.len(),
            self.normalization.std.len(),
            self.input[0]
        );
        ensure!(
            self.normalization
                .std
                .iter()
                .all(|s| s.is_finite() && *s > 0.0),
            "normalization std must be finite and positive"
        );
        let mut shapes: Vec<Shape> = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let ctx = || format!("node {i} `{}` ({})", node.name, node.op.kind());
            ensure!(
                node.inputs.len() == node.op.arity(),
                "{}: expects {} input(s), has {}",
                ctx(),
                node.op.arity(),
                node.inputs.len()
            );
            let mut ins = Vec::new();
            for v in &node.inputs {
                ins.push(match v.producer() {
                    None => self.input,
                    Some(p) if p < i => shapes[p],
                    Some(p) => bail!("{}: reads node {p}, which is not before it", ctx()),
                });
            }
            let [c, h, w] = ins[0];
            let out = match &node.op {
                Op::Conv2d(conv) => {
                    let [kh, kw] = conv.kernel;
                    let g = conv.groups;
                    ensure!(
                        conv.in_channels == c,
                        "{}: {} input channels, gets {c}",
                        ctx(),
                        conv.in_channels
                    );
                    ensure!(
                        conv.stride.iter().all(|&s| s > 0)
                            && kh > 0
                            && kw > 0
                            && conv.out_channels > 0,
                        "{}: zero stride, kernel or channel count",
                        ctx()
                    );
                    ensure!(
                        g > 0 && c % g == 0 && conv.out_channels % g == 0,
                        "{}: {g} groups do not divide {c} input and {} output channels",
                        ctx(),
                        conv.out_channels
                    );
                    ensure!(
                        conv.weight.len() == conv.out_channels * conv.fan_in(),
                        "{}: weight has {} values, expected {}",
                        ctx(),
                        conv.weight.len(),
                        conv.out_channels * conv.fan_in()
                    );
                    if let Some(b) = &conv.bias {
                        ensure!(b.len() == conv.out_channels, "{}: bias length", ctx());
                    }
                    ensure!(
                        conv.padding[0] < kh
                            && conv.padding[2] < kh
                            && conv.padding[1] < kw
                            && conv.padding[3] < kw,
                        "{}: padding {:?} is not smaller than the kernel {kh}x{kw}",
                        ctx(),
                        conv.padding
                    );
                    let (oh, ow) = window_out(h, w, conv.kernel, conv.stride, conv.padding)
                        .with_context(|| {
                            format!("{}: kernel larger than its padded input {h}x{w}", ctx())
                        })?;
                    [conv.out_channels, oh, ow]
                }
                Op::BatchNorm(bn) => {
                    for (what, v) in [
                        ("gamma", &bn.gamma),
                        ("beta", &bn.beta),
                        ("mean", &bn.mean),
                        ("var", &bn.var),
                    ] {
                        ensure!(
                            v.len() == c,
                            "{}: {what} has {} values for {c} channels",
                            ctx(),
                            v.len()
                        );
                    }
                    ensure!(
                        bn.eps >= 0.0 && bn.var.iter().all(|&v| v + bn.eps > 0.0),
                        "{}: variance + eps must be positive",
                        ctx()
                    );
                    [c, h, w]
                }
                Op::Relu => [c, h, w],
                Op::Clip { min, max } => {
                    ensure!(
                        !min.is_nan() && !max.is_nan() && min <= max,
                        "{}: bounds [{min}, {max}] are not an interval",
                        ctx()
                    );
                    [c, h, w]
                }
                Op::MaxPool(p) | Op::AvgPool(p) => {
                    ensure!(
                        p.padding[0] < p.kernel[0]
                            && p.padding[2] < p.kernel[0]
                            && p.padding[1] < p.kernel[1]
                            && p.padding[3] < p.kernel[1],
                        "{}: padding {:?} is not smaller than the window {:?}",
                        ctx(),
                        p.padding,
                        p.kernel
                    );
                    let (oh, ow) = p.out_hw(h, w).with_context(|| {
                        format!(
                            "{}: window {:?} / stride {:?} do not fit {h}x{w}",
                            ctx(),
                            p.kernel,
                            p.stride
                        )
                    })?;
                    [c, oh, ow]
                }
                Op::GlobalAvgPool => [c, 1, 1],
                Op::Flatten => [c * h * w, 1, 1],
                Op::Linear(lin) => {
                    ensure!(
                        h == 1 && w == 1,
                        "{}: input is {c}x{h}x{w}; flatten it first",
                        ctx()
                    );
                    ensure!(
                        lin.in_features == c,
                        "{}: {} input features, gets {c}",
                        ctx(),
                        lin.in_features
                    );
                    ensure!(
                        lin.weight.len() == lin.out_features * c && lin.out_features > 0,
                        "{}: weight has {} values, expected {}",
                        ctx(),
                        lin.weight.len(),
                        lin.out_features * c
                    );
                    if let Some(b) = &lin.bias {
                        ensure!(b.len() == lin.out_features, "{}: bias length", ctx());
                    }
                    [lin.out_features, 1, 1]
                }
                Op::Add => {
                    ensure!(
                        ins[0] == ins[1],
                        "{}: adds {:?} and {:?}",
                        ctx(),
                        ins[0],
                        ins[1]
                    );
                    ins[0]
                }
                Op::Concat => {
                    let [c2, h2, w2] = ins[1];
                    ensure!(
                        (h, w) == (h2, w2),
                        "{}: concatenates {:?} and {:?} (heights and widths differ)",
                        ctx(),
                        ins[0],
                        ins[1]
                    );
                    [c + c2, h, w]
                }
            };
            shapes.push(out);
        }
        let last = *shapes.last().expect("non-empty graph");
        ensure!(
            last == [self.num_classes, 1, 1],
            "the last node outputs {last:?}, expected [{}, 1, 1] logits",
            self.num_classes
        );
        Ok(shapes)
    }

    /// The conv and linear layers in forward order; position `l` is the contract's layer index.
    pub fn weight_layers(&self) -> Vec<WeightLayer> {
        let mut out = Vec::new();
        for (node, n) in self.nodes.iter().enumerate() {
            let (kind, shape) = match &n.op {
                Op::Conv2d(c) => (
                    LayerKind::Conv,
                    vec![
                        c.out_channels,
                        c.in_channels / c.groups.max(1),
                        c.kernel[0],
                        c.kernel[1],
                    ],
                ),
                Op::Linear(l) => (LayerKind::Linear, vec![l.out_features, l.in_features]),
                _ => continue,
            };
            out.push(WeightLayer {
                index: out.len(),
                node,
                name: n.name.clone(),
                kind,
                shape,
            });
        }
        out
    }

    /// The weights of every weight layer, canonical order, indexed by layer.
    pub fn weights(&self) -> Vec<&[f32]> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Conv2d(c) => Some(c.weight.as_slice()),
                Op::Linear(l) => Some(l.weight.as_slice()),
                _ => None,
            })
            .collect()
    }

    fn weights_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.nodes
            .iter_mut()
            .filter_map(|n| match &mut n.op {
                Op::Conv2d(c) => Some(&mut c.weight),
                Op::Linear(l) => Some(&mut l.weight),
                _ => None,
            })
            .collect()
    }

    /// Replaces the weights of every weight layer (canonical order, one vector per layer).
    pub fn set_weights(&mut self, weights: Vec<Vec<f32>>) -> Result<()> {
        let mut slots = self.weights_mut();
        ensure!(
            slots.len() == weights.len(),
            "{} weight tensors for {} weight layers",
            weights.len(),
            slots.len()
        );
        for (l, (slot, w)) in slots.iter_mut().zip(weights).enumerate() {
            ensure!(
                slot.len() == w.len(),
                "layer {l}: {} weights for a layer of {}",
                w.len(),
                slot.len()
            );
            **slot = w;
        }
        Ok(())
    }

    /// The noisy instance of Monte Carlo run `run` under `seed`: every weight layer `l` perturbed
    /// with [`VariationConfig::perturb_f32`] from `stream(seed, run, l)`, quantized against the
    /// layer's own `max|W|` — exactly the float engine's weights for that run.
    pub fn noisy_instance(&self, cfg: &VariationConfig, seed: u64, run: u32) -> Result<Network> {
        let mut noisy = self.clone();
        for (l, w) in noisy.weights_mut().into_iter().enumerate() {
            let scale = layer_scale(w).with_context(|| format!("scale of weight layer {l}"))?;
            let mut rng = stream(seed, run, l as u32);
            let mut out = vec![0.0; w.len()];
            cfg.perturb_f32(w, scale, &mut rng, &mut out)
                .with_context(|| format!("perturbing weight layer {l}"))?;
            *w = out;
        }
        Ok(noisy)
    }

    /// Folds every BatchNorm that directly follows a conv (whose output nothing else reads) into
    /// that conv's weights and bias. For export only: the variation model perturbs unfolded
    /// weights, so noise is applied before folding.
    pub fn fold_batchnorm(&self) -> Result<Network> {
        Ok(self.fold_batchnorm_with_factors()?.0)
    }

    /// [`Self::fold_batchnorm`], also returning, per weight layer, the per-output-channel
    /// multipliers folded into it (`None` where no BatchNorm was folded).
    pub fn fold_batchnorm_with_factors(&self) -> Result<(Network, Vec<Option<Vec<f64>>>)> {
        self.shapes()?;
        let layer_of: Vec<Option<usize>> = {
            let mut l = 0;
            self.nodes
                .iter()
                .map(|n| {
                    matches!(n.op, Op::Conv2d(_) | Op::Linear(_)).then(|| {
                        l += 1;
                        l - 1
                    })
                })
                .collect()
        };
        let mut factors = vec![None; self.weight_layers().len()];
        let readers = |v: Value| self.nodes.iter().filter(|n| n.inputs.contains(&v)).count();
        // For each node: where its output now lives (folded BNs alias their conv).
        let mut remap: Vec<Value> = Vec::with_capacity(self.nodes.len());
        let mut nodes: Vec<Node> = Vec::new();
        for node in &self.nodes {
            let inputs: Vec<Value> = node.inputs.iter().map(|v| map(&remap, *v)).collect();
            if let (Op::BatchNorm(bn), Some(src)) = (&node.op, node.inputs[0].producer())
                && matches!(self.nodes[src].op, Op::Conv2d(_))
                && readers(Value::node(src)) == 1
            {
                let target = inputs[0].producer().expect("a conv node");
                let Op::Conv2d(conv) = &mut nodes[target].op else {
                    unreachable!("remapped conv is a conv")
                };
                let per_out = conv.weight.len() / conv.out_channels;
                let affine = bn.affine();
                factors[layer_of[src].expect("a conv is a weight layer")] =
                    Some(affine.iter().map(|a| a.0).collect());
                for (o, (m, b)) in affine.into_iter().enumerate() {
                    for w in &mut conv.weight[o * per_out..(o + 1) * per_out] {
                        *w = (f64::from(*w) * m) as f32;
                    }
                    let bias = conv
                        .bias
                        .get_or_insert_with(|| vec![0.0; conv.out_channels]);
                    bias[o] = (f64::from(bias[o]) * m + b) as f32;
                }
                remap.push(inputs[0]);
                continue;
            }
            nodes.push(Node {
                name: node.name.clone(),
                op: node.op.clone(),
                inputs,
            });
            remap.push(Value::node(nodes.len() - 1));
        }
        let folded = Network {
            nodes,
            ..self.clone()
        };
        folded.shapes()?;
        Ok((folded, factors))
    }
}

fn map(remap: &[Value], v: Value) -> Value {
    match v.producer() {
        None => v,
        Some(p) => remap[p],
    }
}

#[cfg(test)]
mod tests {
    use nvcim_shared::rng::{Purpose, standard_normal, stream_for};

    use super::*;

    fn input(net: &Network, batch: usize, seed: u32) -> Vec<f32> {
        let mut rng = stream_for(Purpose::Host, 7, 1, seed);
        let n = batch * net.input.iter().product::<usize>();
        (0..n).map(|_| standard_normal(&mut rng)).collect()
    }

    #[test]
    fn vgg8_shapes_and_layers() {
        let net = Network::vgg8(&RandomArch::new(3, 0.125)).unwrap();
        let layers = net.weight_layers();
        assert_eq!(layers.len(), 8); // 6 conv + 2 linear
        assert_eq!(layers[0].shape, vec![8, 3, 3, 3]);
        assert_eq!(layers[6].shape, vec![128, 64 * 16]);
        assert_eq!(layers[7].shape, vec![10, 128]);
        assert!(layers.iter().all(|l| !l.name.contains("exit")));
        let half = Network::vgg8(&RandomArch::new(1, 0.5)).unwrap();
        assert_eq!(half.weight_layers()[6].shape, vec![512, 4096]); // 8192 -> 1024 at width 1
    }

    #[test]
    fn resnet18_layers_in_forward_order() {
        let net = Network::resnet18(&RandomArch::new(3, 0.125)).unwrap();
        let layers = net.weight_layers();
        // stem + 8 blocks x 2 convs + 3 shortcuts + fc
        assert_eq!(layers.len(), 1 + 16 + 3 + 1);
        let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            &names[5..8],
            &[
                "layer2.0.conv1.conv",
                "layer2.0.conv2.conv",
                "layer2.0.shortcut.conv"
            ]
        );
        assert_eq!(*names.last().unwrap(), "fc");
    }

    #[test]
    fn forward_of_tiny_graph_by_hand() {
        // 1x2x2 input, conv 1x1 (weight 2, bias 1), relu, global pool, flatten, linear 1->2.
        let net = Network {
            input: [1, 2, 2],
            num_classes: 2,
            normalization: Normalization::identity(1),
            provenance: Provenance::default(),
            nodes: vec![
                Node {
                    name: "c".into(),
                    op: Op::Conv2d(Conv2d::square(1, 1, 1, 1, 0, vec![2.0], Some(vec![1.0]))),
                    inputs: vec![Value::INPUT],
                },
                Node {
                    name: "r".into(),
                    op: Op::Relu,
                    inputs: vec![Value::node(0)],
                },
                Node {
                    name: "g".into(),
                    op: Op::GlobalAvgPool,
                    inputs: vec![Value::node(1)],
                },
                Node {
                    name: "f".into(),
                    op: Op::Flatten,
                    inputs: vec![Value::node(2)],
                },
                Node {
                    name: "l".into(),
                    op: Op::Linear(Linear {
                        out_features: 2,
                        in_features: 1,
                        weight: vec![1.0, -3.0],
                        bias: Some(vec![0.5, 0.0]),
                    }),
                    inputs: vec![Value::node(3)],
                },
            ],
        };
        // conv: [3, -1, 5, 1] -> relu [3, 0, 5, 1] -> mean 2.25
        let y = net.forward(&[1.0, -1.0, 2.0, 0.0], 1).unwrap();
        assert_eq!(y, vec![2.75, -6.75]);
        assert!(net.forward(&[1.0; 3], 1).is_err());
    }

    #[test]
    fn folding_keeps_logits() {
        for net in [
            Network::vgg8(&RandomArch::new(1, 0.125)).unwrap(),
            Network::resnet18(&RandomArch::new(3, 0.0625)).unwrap(),
        ] {
            let folded = net.fold_batchnorm().unwrap();
            assert!(
                !folded
                    .nodes
                    .iter()
                    .any(|n| matches!(n.op, Op::BatchNorm(_)))
            );
            assert_eq!(folded.weight_layers().len(), net.weight_layers().len());
            let x = input(&net, 2, 0);
            let a = net.forward(&x, 2).unwrap();
            let b = folded.forward(&x, 2).unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-4, "fold changed logits by {diff}");
        }
    }

    #[test]
    fn noisy_instance_uses_the_contract_streams() {
        let net = Network::vgg8(&RandomArch::new(1, 0.125)).unwrap();
        let cfg = VariationConfig::paper(0.3).unwrap();
        let noisy = net.noisy_instance(&cfg, 5, 2).unwrap();
        for (l, (w, nw)) in net.weights().iter().zip(noisy.weights()).enumerate() {
            let mut expect = vec![0.0; w.len()];
            let scale = layer_scale(w).unwrap();
            cfg.perturb_f32(w, scale, &mut stream(5, 2, l as u32), &mut expect)
                .unwrap();
            assert_eq!(nw, expect.as_slice(), "layer {l}");
            assert_ne!(nw, *w);
        }
        assert_ne!(net.noisy_instance(&cfg, 5, 3).unwrap(), noisy);
        let clean = net
            .noisy_instance(&VariationConfig::paper(0.0).unwrap(), 5, 2)
            .unwrap();
        assert_eq!(clean, net);
    }

    #[test]
    fn normalization_applies_per_channel() {
        let n = Normalization {
            mean: vec![0.5, 0.0],
            std: vec![0.25, 2.0],
        };
        // Two images of two 1-pixel channels.
        let mut x = vec![1.0, 1.0, 0.5, -2.0];
        n.apply(&mut x, 1);
        assert_eq!(x, vec![2.0, 0.5, 0.0, -1.0]);
    }

    #[test]
    fn bad_graphs_are_rejected() {
        let mut net = Network::vgg8(&RandomArch::new(1, 0.125)).unwrap();
        net.nodes[0].inputs = vec![Value::node(3)];
        assert!(net.shapes().unwrap_err().to_string().contains("not before"));
        let mut net = Network::vgg8(&RandomArch::new(1, 0.125)).unwrap();
        net.num_classes = 11;
        assert!(net.shapes().is_err());
        let mut net = Network::vgg8(&RandomArch::new(1, 0.125)).unwrap();
        let n = net.weights()[1].len();
        assert!(net.set_weights(vec![vec![0.0; n]]).is_err());
    }
}
