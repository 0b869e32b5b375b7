//! The paper's networks in Burn: VGG-8 and ResNet-18 (CIFAR stem) with their training exits.
//!
//! Every convolution is a conv-BN-ReLU block (bias-free 3x3 convolutions followed by batch
//! normalization, as in the authors' code); linear layers carry a bias. A `--width` multiplier
//! scales every hidden width (channels, the 1024-wide VGG classifier layer and the 512-wide exit
//! layer), rounded, at least 1. Weights start from Kaiming-normal (fan-out, ReLU gain), biases
//! from zero, as in the authors' code.
//!
//! The [`Backbone`] is the network that is deployed: saved, loaded, evaluated and exported alone.
//! [`ExitHead`]s exist only for training ([`TrainModel`] holds both).
//!
//! **Weight layers** (the cross-component contract): the backbone's conv and linear layers in
//! forward order, each with its weights in PyTorch's canonical layout — conv
//! `[out][in][kh][kw]`, linear `[out][in]` (Burn stores linear weights as `[in, out]`; the
//! accessors transpose). ResNet-18 lists, per basic block, `conv1`, `conv2`, then the 1x1
//! shortcut convolution when the block has one. See [`Backbone::weight_layers`] and
//! [`Backbone::set_weights`].

pub mod graph;
pub mod import;
pub mod noise;

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{Initializer, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::store::ModuleRecord;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// The network architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// VGG-8: six conv-BN-ReLU blocks (64, 128, pool, 256, 256, pool, 512, 512, pool), FC 1024, FC K.
    Vgg8,
    /// ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), stages 64/128/256/512, FC K.
    Resnet18,
    /// Any CNN given as a graph (`nvcim train --onnx FILE`; recorded in `model.json`).
    #[value(skip)]
    Graph,
}

/// Everything needed to rebuild a backbone (saved beside every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture.
    pub arch: Arch,
    /// Width multiplier.
    pub width: f64,
    /// Input channels (1 or 3).
    pub in_channels: usize,
    /// Input height = width in pixels.
    pub image_size: usize,
    /// Output classes.
    pub num_classes: usize,
    /// The graph of an [`Arch::Graph`] model (its structure and exits; `None` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<Box<graph::GraphSpec>>,
}

/// How the backbone's linear layers start (`nvcim train --init`; convs are Kaiming-normal
/// fan-out either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// PyTorch's `nn.Linear` default: Kaiming-uniform fan-in, bias in `±1/sqrt(fan_in)`
    /// (`random` is another name for it).
    #[default]
    #[value(alias = "random")]
    Pytorch,
    /// The authors' `init_weights`: Kaiming-normal fan-out (ReLU gain), bias 0, on the
    /// backbone's linear layers (their exits keep PyTorch's default, as their code creates them
    /// after `init_weights` runs).
    Authors,
}

/// Kaiming-normal, fan-out, ReLU gain: `kaiming_normal_(mode='fan_out', nonlinearity='relu')`.
fn kaiming() -> Initializer {
    Initializer::KaimingNormal {
        gain: std::f64::consts::SQRT_2,
        fan_out_only: true,
    }
}

fn scaled(base: usize, width: f64) -> usize {
    ((base as f64 * width).round() as usize).max(1)
}

impl ModelSpec {
    /// A graph model of `graph` (its input and classes).
    pub fn of_graph(graph: graph::GraphSpec) -> Self {
        ModelSpec {
            arch: Arch::Graph,
            width: 1.0,
            in_channels: graph.input[0],
            image_size: graph.input[1],
            num_classes: graph.num_classes,
            graph: Some(Box::new(graph)),
        }
    }

    /// Input channels, height and width.
    pub fn input(&self) -> [usize; 3] {
        match &self.graph {
            Some(g) => g.input,
            None => [self.in_channels, self.image_size, self.image_size],
        }
    }

    /// The pooled sizes of Table I's exits (VGG-8 6, 4, 3; ResNet-18 6, 6, 4, 3).
    pub fn table_one_pools(&self) -> Vec<usize> {
        match self.arch {
            Arch::Vgg8 => vec![6, 4, 3],
            Arch::Resnet18 => vec![6, 6, 4, 3],
            Arch::Graph => Vec::new(),
        }
    }

    /// The graph of this model: the recorded one, or VGG-8's / ResNet-18's.
    pub fn graph(&self) -> graph::GraphSpec {
        let (m, s) = (vec![0.0; self.in_channels], vec![1.0; self.in_channels]);
        match (&self.graph, self.arch) {
            (Some(g), _) => (**g).clone(),
            (None, Arch::Resnet18) => graph::GraphSpec::resnet18(self, &m, &s),
            (None, _) => graph::GraphSpec::vgg8(self, &m, &s),
        }
    }

    /// Checks the numbers (width > 0, 1 or 3 channels, an image VGG-8 can pool three times).
    pub fn validate(&self) -> Result<()> {
        if let Some(g) = &self.graph {
            ensure!(
                self.arch == Arch::Graph,
                "a {:?} model with a recorded graph",
                self.arch
            );
            return g.check();
        }
        ensure!(
            self.arch != Arch::Graph,
            "a graph model without its graph (model.json has no `graph`)"
        );
        ensure!(
            self.width.is_finite() && self.width > 0.0 && self.width <= 8.0,
            "--width must be in (0, 8], got {}",
            self.width
        );
        ensure!(
            matches!(self.in_channels, 1 | 3),
            "input images must have 1 or 3 channels, found {}",
            self.in_channels
        );
        ensure!(
            self.num_classes >= 2,
            "need at least 2 classes, found {}",
            self.num_classes
        );
        ensure!(
            self.image_size >= 8,
            "images of {0}x{0} are too small for {1:?} (at least 8x8)",
            self.image_size,
            self.arch
        );
        Ok(())
    }

    /// A scaled width.
    pub fn ch(&self, base: usize) -> usize {
        scaled(base, self.width)
    }

    /// The exits of Table I as (channels at the tap, pooled size s).
    pub fn exit_taps(&self) -> Vec<(usize, usize)> {
        if let Some(g) = &self.graph {
            return g.exit_taps().unwrap_or_default();
        }
        match self.arch {
            Arch::Vgg8 => vec![(self.ch(64), 6), (self.ch(128), 4), (self.ch(256), 3)],
            Arch::Resnet18 => {
                vec![
                    (self.ch(64), 6),
                    (self.ch(64), 6),
                    (self.ch(128), 4),
                    (self.ch(256), 3),
                ]
            }
            Arch::Graph => Vec::new(),
        }
    }

    /// A freshly initialized backbone on `device`.
    pub fn init_backbone(&self, device: &Device) -> Backbone {
        match self.arch {
            Arch::Vgg8 => Backbone::Vgg8(Vgg8::new(self, device)),
            Arch::Resnet18 => Backbone::Resnet18(ResNet18::new(self, device)),
            Arch::Graph => Backbone::Graph(graph::GraphNet::init(self.graph(), device)),
        }
    }

    /// Freshly initialized exits (Table I) on `device`.
    pub fn init_exits(&self, device: &Device) -> Vec<ExitHead> {
        let hidden = match &self.graph {
            Some(g) => g.exit_hidden,
            None => self.ch(512),
        };
        self.exit_taps()
            .into_iter()
            .map(|(c, s)| ExitHead::new(c, s, hidden, self.num_classes, device))
            .collect()
    }
}

/// Loads a backbone saved by training's `Checkpoint::save_best` (or any backbone record) for
/// `spec`.
pub fn load_backbone(path: &Path, spec: &ModelSpec, device: &Device) -> Result<Backbone> {
    crate::fsx::verify_checksum(path)?;
    let record = ModuleRecord::load(path)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| format!("reading backbone {}", path.display()))?;
    spec.init_backbone(device)
        .try_load_record(record)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| {
            format!(
                "{} does not fit a {:?} of width {}",
                path.display(),
                spec.arch,
                spec.width
            )
        })
}

/// A bias-free convolution followed by batch normalization (ReLU is applied by the caller).
#[derive(Module, Debug)]
pub struct ConvBn {
    /// The convolution (no bias).
    pub conv: Conv2d,
    /// Its batch normalization.
    pub bn: BatchNorm,
}

impl ConvBn {
    fn new(cin: usize, cout: usize, kernel: usize, stride: usize, device: &Device) -> Self {
        let pad = kernel / 2;
        ConvBn {
            conv: Conv2dConfig::new([cin, cout], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                .with_initializer(kaiming())
                .init(device),
            bn: BatchNormConfig::new(cout).init(device),
        }
    }

    /// Conv then BN, no activation. `[n, cin, h, w] -> [n, cout, h/stride, w/stride]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        use crate::kernels::backend::{batch_norm, conv2d};
        batch_norm(&self.bn, conv2d(&self.conv, x))
    }
}

/// A linear layer with PyTorch's `nn.Linear` default initialization (Kaiming-uniform, fan-in,
/// weights and bias in `±1/sqrt(fan_in)`), which is Burn's default. The authors' fan-out Kaiming
/// init on linear layers gives the 10-way classifier a weight std of `sqrt(2/10)`: logits of std
/// ~16 at initialization, and with noise injection at sigma 0.4 training barely moved in the few
/// epochs a CPU run affords (loss 81 after 20 steps, measured), so nvcim keeps the default here.
fn linear(din: usize, dout: usize, device: &Device) -> Linear {
    LinearConfig::new(din, dout).init(device)
}

/// VGG-8 (DESIGN §1).
#[derive(Module, Debug)]
pub struct Vgg8 {
    /// The six conv-BN blocks.
    pub blocks: Vec<ConvBn>,
    /// FC `512w * (H/8)^2 -> 1024w`.
    pub fc1: Linear,
    /// FC `1024w -> K`.
    pub fc2: Linear,
    pool: MaxPool2d,
}

impl Vgg8 {
    const CHANNELS: [usize; 6] = [64, 128, 256, 256, 512, 512];

    fn new(spec: &ModelSpec, device: &Device) -> Self {
        let mut cin = spec.in_channels;
        let mut blocks = Vec::new();
        for base in Self::CHANNELS {
            let cout = spec.ch(base);
            blocks.push(ConvBn::new(cin, cout, 3, 1, device));
            cin = cout;
        }
        let side = spec.image_size / 8;
        Vgg8 {
            blocks,
            fc1: linear(cin * side * side, spec.ch(1024), device),
            fc2: linear(spec.ch(1024), spec.num_classes, device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
        }
    }

    /// Logits and the feature maps at the three exits.
    ///
    /// # Shapes
    /// `[n, c, h, w] -> [n, K]`; taps `[n, 64w, h, w]`, `[n, 128w, h/2, w/2]`, `[n, 256w, h/4, w/4]`.
    fn forward_taps(&self, x: Tensor<4>, want_taps: bool) -> (Tensor<2>, Vec<Tensor<4>>) {
        let mut taps = Vec::new();
        let mut x = x;
        for (i, b) in self.blocks.iter().enumerate() {
            x = relu(b.forward(x));
            if i % 2 == 1 {
                x = crate::kernels::backend::max_pool2d(&self.pool, x);
            }
            if want_taps && matches!(i, 0 | 1 | 3) {
                taps.push(x.clone());
            }
        }
        let x = x.flatten::<2>(1, 3); // [n, 512w * (h/8) * (w/8)]
        let x = relu(self.fc1.forward(x));
        (self.fc2.forward(x), taps)
    }
}

/// A ResNet basic block: conv-BN-ReLU, conv-BN, plus the identity or a 1x1 conv-BN shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// First 3x3 conv (carries the stride).
    pub conv1: ConvBn,
    /// Second 3x3 conv.
    pub conv2: ConvBn,
    /// 1x1 projection when the shape changes.
    pub shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        BasicBlock {
            conv1: ConvBn::new(cin, cout, 3, stride, device),
            conv2: ConvBn::new(cout, cout, 3, 1, device),
            shortcut: (stride != 1 || cin != cout)
                .then(|| ConvBn::new(cin, cout, 1, stride, device)),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let out = self.conv2.forward(relu(self.conv1.forward(x.clone())));
        let id = match &self.shortcut {
            Some(s) => s.forward(x),
            None => x,
        };
        relu(out + id)
    }
}

/// ResNet-18 with the CIFAR stem (DESIGN §1).
#[derive(Module, Debug)]
pub struct ResNet18 {
    /// 3x3 stem conv-BN.
    pub stem: ConvBn,
    /// Stages 1-4, two basic blocks each.
    pub stages: Vec<Vec<BasicBlock>>,
    /// FC `512w -> K` after global average pooling.
    pub fc: Linear,
    gap: AdaptiveAvgPool2d,
}

impl ResNet18 {
    fn new(spec: &ModelSpec, device: &Device) -> Self {
        let stem_c = spec.ch(64);
        let mut cin = stem_c;
        let mut stages = Vec::new();
        for (base, stride) in [(64, 1), (128, 2), (256, 2), (512, 2)] {
            let cout = spec.ch(base);
            stages.push(vec![
                BasicBlock::new(cin, cout, stride, device),
                BasicBlock::new(cout, cout, 1, device),
            ]);
            cin = cout;
        }
        ResNet18 {
            stem: ConvBn::new(spec.in_channels, stem_c, 3, 1, device),
            stages,
            fc: linear(cin, spec.num_classes, device),
            gap: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
        }
    }

    /// Logits and the feature maps after the stem and stages 1-3.
    fn forward_taps(&self, x: Tensor<4>, want_taps: bool) -> (Tensor<2>, Vec<Tensor<4>>) {
        let mut taps = Vec::new();
        let mut x = relu(self.stem.forward(x));
        for (i, stage) in self.stages.iter().enumerate() {
            if want_taps && i < 4 {
                taps.push(x.clone());
            }
            for b in stage {
                x = b.forward(x);
            }
        }
        let x = self.gap.forward(x).flatten::<2>(1, 3); // [n, 512w]
        (self.fc.forward(x), taps)
    }
}

/// A training exit: `AdaptiveAvgPool2d(s) -> Linear(C*s*s -> 512w) -> ReLU -> Linear(512w -> K)`.
#[derive(Module, Debug)]
pub struct ExitHead {
    /// Pooling to `s x s`.
    pub pool: AdaptiveAvgPool2d,
    /// First linear layer.
    pub fc1: Linear,
    /// Second linear layer.
    pub fc2: Linear,
}

impl ExitHead {
    fn new(c: usize, s: usize, hidden: usize, classes: usize, device: &Device) -> Self {
        ExitHead {
            pool: AdaptiveAvgPool2dConfig::new([s, s]).init(),
            fc1: linear(c * s * s, hidden, device),
            fc2: linear(hidden, classes, device),
        }
    }

    /// `[n, c, h, w] -> [n, K]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(x).flatten::<2>(1, 3); // [n, c*s*s]
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}

/// A deployable network.
// The variants are large module trees built once per model; boxing them would only add
// indirection to every forward call.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone {
    /// VGG-8.
    Vgg8(Vgg8),
    /// ResNet-18.
    Resnet18(ResNet18),
    /// Any CNN, as a graph.
    Graph(graph::GraphNet),
}

/// The kind and geometry of a weight layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LayerKind {
    /// A 2-D convolution (square kernel, symmetric zero padding, no bias).
    Conv {
        /// Stride in both directions.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// A fully connected layer (with bias).
    Linear,
}

/// Batch-normalization parameters of the BN after a convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct BnParams {
    /// Scale.
    pub gamma: Vec<f32>,
    /// Shift.
    pub beta: Vec<f32>,
    /// Running mean.
    pub mean: Vec<f32>,
    /// Running variance.
    pub var: Vec<f32>,
    /// The epsilon added to the variance.
    pub epsilon: f64,
}

/// One weight layer, copied out in canonical layout.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightLayer {
    /// A readable name (`blocks.3.conv`, `stages.1.0.shortcut`, `fc1`).
    pub name: String,
    /// Kind and geometry.
    pub kind: LayerKind,
    /// Canonical shape: `[out, in, kh, kw]` or `[out, in]`.
    pub shape: Vec<usize>,
    /// Weights in canonical order.
    pub weights: Vec<f32>,
    /// The bias (linear layers).
    pub bias: Option<Vec<f32>>,
    /// The batch normalization that follows (conv layers).
    pub bn: Option<BnParams>,
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float tensors convert to f32")
}

/// A borrowed weight layer (a conv with the BatchNorm after it, or linear), in forward order.
enum LayerRef<'a> {
    Conv(&'a Conv2d, Option<&'a BatchNorm>),
    Linear(&'a Linear),
}

enum LayerMut<'a> {
    Conv(&'a mut Conv2d),
    Linear(&'a mut Linear),
}

impl Backbone {
    /// Logits. `[n, c, h, w] -> [n, K]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_taps(x, false).0
    }

    /// Logits and, when `want_taps`, the feature maps the exits read.
    pub fn forward_taps(&self, x: Tensor<4>, want_taps: bool) -> (Tensor<2>, Vec<Tensor<4>>) {
        match self {
            Backbone::Vgg8(m) => m.forward_taps(x, want_taps),
            Backbone::Resnet18(m) => m.forward_taps(x, want_taps),
            Backbone::Graph(m) => m.forward_taps(x, want_taps),
        }
    }

    /// The graph of a [`Backbone::Graph`].
    pub fn graph(&self) -> Option<&graph::GraphNet> {
        match self {
            Backbone::Graph(g) => Some(g),
            _ => None,
        }
    }

    /// Every BatchNorm, in forward order.
    fn bns(&self) -> Vec<&BatchNorm> {
        match self {
            Backbone::Graph(g) => g
                .layers
                .iter()
                .filter_map(|l| match l {
                    graph::GraphLayer::Bn(b) => Some(b),
                    _ => None,
                })
                .collect(),
            _ => self
                .layers()
                .into_iter()
                .filter_map(|(_, l)| match l {
                    LayerRef::Conv(_, bn) => bn,
                    LayerRef::Linear(_) => None,
                })
                .collect(),
        }
    }

    fn bns_mut(&mut self) -> Vec<&mut BatchNorm> {
        match self {
            Backbone::Vgg8(m) => m.blocks.iter_mut().map(|b| &mut b.bn).collect(),
            Backbone::Resnet18(m) => {
                let mut out = vec![&mut m.stem.bn];
                for block in m.stages.iter_mut().flatten() {
                    out.push(&mut block.conv1.bn);
                    out.push(&mut block.conv2.bn);
                    if let Some(sc) = &mut block.shortcut {
                        out.push(&mut sc.bn);
                    }
                }
                out
            }
            Backbone::Graph(g) => g
                .layers
                .iter_mut()
                .filter_map(|l| match l {
                    graph::GraphLayer::Bn(b) => Some(b),
                    _ => None,
                })
                .collect(),
        }
    }

    fn layers<'a>(&'a self) -> Vec<(String, LayerRef<'a>)> {
        let mut out = Vec::new();
        match self {
            Backbone::Vgg8(m) => {
                for (i, b) in m.blocks.iter().enumerate() {
                    out.push((format!("blocks.{i}"), LayerRef::Conv(&b.conv, Some(&b.bn))));
                }
                out.push(("fc1".into(), LayerRef::Linear(&m.fc1)));
                out.push(("fc2".into(), LayerRef::Linear(&m.fc2)));
            }
            Backbone::Resnet18(m) => {
                let conv = |c: &'a ConvBn| LayerRef::Conv(&c.conv, Some(&c.bn));
                out.push(("stem".into(), conv(&m.stem)));
                for (s, stage) in m.stages.iter().enumerate() {
                    for (b, block) in stage.iter().enumerate() {
                        let p = format!("stages.{s}.{b}");
                        out.push((format!("{p}.conv1"), conv(&block.conv1)));
                        out.push((format!("{p}.conv2"), conv(&block.conv2)));
                        if let Some(sc) = &block.shortcut {
                            out.push((format!("{p}.shortcut"), conv(sc)));
                        }
                    }
                }
                out.push(("fc".into(), LayerRef::Linear(&m.fc)));
            }
            Backbone::Graph(g) => {
                let nodes = g.spec().nodes.iter().filter(|n| {
                    matches!(
                        n.op,
                        graph::GraphOp::Conv { .. }
                            | graph::GraphOp::BatchNorm { .. }
                            | graph::GraphOp::Linear { .. }
                    )
                });
                for (node, l) in nodes.zip(&g.layers) {
                    match l {
                        graph::GraphLayer::Conv(c) => {
                            out.push((node.name.clone(), LayerRef::Conv(c, None)));
                        }
                        graph::GraphLayer::Linear(l) => {
                            out.push((node.name.clone(), LayerRef::Linear(l)));
                        }
                        graph::GraphLayer::Bn(_) => {}
                    }
                }
            }
        }
        out
    }

    fn layers_mut(&mut self) -> Vec<LayerMut<'_>> {
        let mut out = Vec::new();
        match self {
            Backbone::Vgg8(m) => {
                out.extend(m.blocks.iter_mut().map(|b| LayerMut::Conv(&mut b.conv)));
                out.push(LayerMut::Linear(&mut m.fc1));
                out.push(LayerMut::Linear(&mut m.fc2));
            }
            Backbone::Resnet18(m) => {
                out.push(LayerMut::Conv(&mut m.stem.conv));
                for block in m.stages.iter_mut().flatten() {
                    out.push(LayerMut::Conv(&mut block.conv1.conv));
                    out.push(LayerMut::Conv(&mut block.conv2.conv));
                    if let Some(sc) = &mut block.shortcut {
                        out.push(LayerMut::Conv(&mut sc.conv));
                    }
                }
                out.push(LayerMut::Linear(&mut m.fc));
            }
            Backbone::Graph(g) => {
                for l in &mut g.layers {
                    match l {
                        graph::GraphLayer::Conv(c) => out.push(LayerMut::Conv(c)),
                        graph::GraphLayer::Linear(l) => out.push(LayerMut::Linear(l)),
                        graph::GraphLayer::Bn(_) => {}
                    }
                }
            }
        }
        out
    }

    /// Folds every BN's pending running-statistics update into its stored value (Burn's
    /// `RunningState` lags one update behind until synced), so that saving, evaluating and
    /// resuming all see the latest statistics.
    pub fn sync_running_stats(&mut self) {
        for bn in self.bns() {
            // `value_sync` folds this thread's pending update into the stored value.
            let _ = bn.running_mean.value_sync();
            let _ = bn.running_var.value_sync();
        }
    }

    /// Re-initializes the backbone's linear layers as the authors do ([`Init::Authors`]):
    /// weights Kaiming-normal fan-out with ReLU gain, biases 0.
    pub fn authors_linear_init(&mut self, device: &Device) {
        for l in self.layers_mut() {
            if let LayerMut::Linear(lin) = l {
                let [din, dout] = lin.weight.shape().dims();
                lin.weight = kaiming().init_with([din, dout], Some(din), Some(dout), device);
                lin.bias = Some(Initializer::Zeros.init([dout], device));
            }
        }
    }

    /// Every BatchNorm's running (mean, variance), in forward order, with pending updates
    /// folded in.
    pub fn running_stats(&self) -> Vec<(Tensor<1>, Tensor<1>)> {
        self.bns()
            .into_iter()
            .map(|bn| (bn.running_mean.value_sync(), bn.running_var.value_sync()))
            .collect()
    }

    /// Sets every BatchNorm's running statistics to `stats` (as [`Backbone::running_stats`]
    /// returns them).
    pub fn set_running_stats(&mut self, stats: &[(Tensor<1>, Tensor<1>)]) -> Result<()> {
        let mut it = stats.iter();
        let mut n = 0;
        for bn in self.bns_mut() {
            let Some((m, v)) = it.next() else {
                bail!(
                    "{} BatchNorm statistics for a network with more",
                    stats.len()
                );
            };
            bn.running_mean.update(m.clone());
            bn.running_var.update(v.clone());
            let _ = bn.running_mean.value_sync();
            let _ = bn.running_var.value_sync();
            n += 1;
        }
        ensure!(
            n == stats.len(),
            "{} BatchNorm statistics for a network with {n}",
            stats.len()
        );
        Ok(())
    }

    /// Number of weight layers.
    pub fn num_weight_layers(&self) -> usize {
        self.layers().len()
    }

    /// The weight layers in forward order, canonical layout, with biases and BN parameters.
    pub fn weight_layers(&self) -> Vec<WeightLayer> {
        self.layers()
            .into_iter()
            .map(|(name, l)| match l {
                LayerRef::Conv(c, bn) => {
                    let w = c.weight.val();
                    WeightLayer {
                        name,
                        kind: LayerKind::Conv {
                            stride: c.stride[0],
                            padding: c.kernel_size[0] / 2,
                        },
                        shape: w.dims().to_vec(),
                        weights: to_vec(w),
                        bias: c.bias.as_ref().map(|b| to_vec(b.val())),
                        bn: bn.map(|bn| BnParams {
                            gamma: to_vec(bn.gamma.val()),
                            beta: to_vec(bn.beta.val()),
                            mean: to_vec(bn.running_mean.value()),
                            var: to_vec(bn.running_var.value()),
                            epsilon: bn.epsilon,
                        }),
                    }
                }
                LayerRef::Linear(l) => {
                    let w = l.weight.val().transpose(); // [in, out] -> [out, in]
                    WeightLayer {
                        name,
                        kind: LayerKind::Linear,
                        shape: w.dims().to_vec(),
                        weights: to_vec(w),
                        bias: l.bias.as_ref().map(|b| to_vec(b.val())),
                        bn: None,
                    }
                }
            })
            .collect()
    }

    /// The weights alone, canonical layout, forward order (cheaper than [`Self::weight_layers`]).
    pub fn weights(&self) -> Vec<Vec<f32>> {
        self.layers()
            .into_iter()
            .map(|(_, l)| match l {
                LayerRef::Conv(c, _) => to_vec(c.weight.val()),
                LayerRef::Linear(l) => to_vec(l.weight.val().transpose()),
            })
            .collect()
    }

    /// Replaces every weight layer's weights (canonical layout, forward order), keeping
    /// parameter ids; biases and BN are untouched.
    pub fn set_weights(&mut self, weights: &[Vec<f32>]) -> Result<()> {
        let layers = self.layers_mut();
        ensure!(
            layers.len() == weights.len(),
            "the backbone has {} weight layers, got {}",
            layers.len(),
            weights.len()
        );
        for (i, (l, w)) in layers.into_iter().zip(weights).enumerate() {
            match l {
                LayerMut::Conv(c) => {
                    let t = c.weight.val();
                    let shape = t.dims();
                    ensure!(
                        shape.iter().product::<usize>() == w.len(),
                        "weight layer {i}: expected {shape:?} = {} weights, got {}",
                        shape.iter().product::<usize>(),
                        w.len()
                    );
                    let new =
                        Tensor::<4>::from_data(TensorData::new(w.clone(), shape), &t.device());
                    let new = if t.is_require_grad() {
                        new.require_grad()
                    } else {
                        new
                    };
                    c.weight = c.weight.clone().map(|_| new);
                }
                LayerMut::Linear(l) => {
                    let t = l.weight.val();
                    let [din, dout] = t.dims();
                    ensure!(
                        din * dout == w.len(),
                        "weight layer {i}: expected [{dout}, {din}] = {} weights, got {}",
                        din * dout,
                        w.len()
                    );
                    let new = Tensor::<2>::from_data(
                        TensorData::new(w.clone(), [dout, din]),
                        &t.device(),
                    )
                    .transpose();
                    let new = if t.is_require_grad() {
                        new.detach().require_grad()
                    } else {
                        new
                    };
                    l.weight = l.weight.clone().map(|_| new);
                }
            }
        }
        Ok(())
    }
}

/// The network being trained: the backbone and (for `nft`) its exits.
#[derive(Module, Debug)]
pub struct TrainModel {
    /// The deployable network.
    pub backbone: Backbone,
    /// Training-only exits, shallowest first (empty unless the method uses them).
    pub exits: Vec<ExitHead>,
}

impl TrainModel {
    /// Backbone logits and exit logits (shallowest first).
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<2>, Vec<Tensor<2>>) {
        let (logits, taps) = self.backbone.forward_taps(x, !self.exits.is_empty());
        let outs = self
            .exits
            .iter()
            .zip(taps)
            .map(|(e, t)| e.forward(t))
            .collect();
        (logits, outs)
    }
}

/// Fraction of `labels` the arg-max of `logits` gets right, as a count.
pub fn correct(logits: Tensor<2>, labels: &[i64]) -> usize {
    let pred = logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("int argmax");
    pred.iter().zip(labels).filter(|(p, l)| p == l).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arch: Arch, channels: usize) -> ModelSpec {
        ModelSpec {
            arch,
            width: 0.125,
            in_channels: channels,
            image_size: 32,
            num_classes: 10,
            graph: None,
        }
    }

    #[test]
    fn shapes_and_layer_counts() {
        let _rng = crate::burn_rng_guard();
        let device = Device::flex();
        for (arch, layers, exits) in [(Arch::Vgg8, 8, 3), (Arch::Resnet18, 21, 4)] {
            for ch in [1, 3] {
                let s = spec(arch, ch);
                let m = TrainModel {
                    backbone: s.init_backbone(&device),
                    exits: s.init_exits(&device),
                };
                let (y, outs) = m.forward(Tensor::zeros([2, ch, 32, 32], &device));
                assert_eq!(y.dims(), [2, 10]);
                assert_eq!(outs.len(), exits);
                assert!(outs.iter().all(|o| o.dims() == [2, 10]));
                assert_eq!(m.backbone.num_weight_layers(), layers);
            }
        }
    }

    /// `--init authors`: the backbone's linear weights have std sqrt(2 / fan_out) and zero
    /// biases; PyTorch's default has uniform weights in ±1/sqrt(fan_in) and non-zero biases.
    #[test]
    fn authors_linear_init() {
        let _rng = crate::burn_rng_guard();
        let device = Device::flex();
        device.seed(3);
        let s = spec(Arch::Vgg8, 1);
        let mut b = s.init_backbone(&device);
        let before = b.weight_layers();
        let fc1 = &before[6];
        let bound = 1.0 / (fc1.weights.len() as f64 / s.ch(1024) as f64).sqrt();
        assert!(
            fc1.weights
                .iter()
                .all(|w| f64::from(w.abs()) <= bound + 1e-6)
        );
        assert!(fc1.bias.as_ref().unwrap().iter().any(|&x| x != 0.0));
        b.authors_linear_init(&device);
        let after = b.weight_layers();
        assert_eq!(after[0].weights, before[0].weights, "convs untouched");
        for l in &after[6..] {
            let bias = l.bias.as_ref().unwrap();
            let fan_out = bias.len() as f64;
            let n = l.weights.len() as f64;
            let var = l
                .weights
                .iter()
                .map(|&w| f64::from(w) * f64::from(w))
                .sum::<f64>()
                / n;
            let expect = 2.0 / fan_out;
            assert!(
                (var / expect - 1.0).abs() < 0.1,
                "{}: var {var} vs {expect}",
                l.name
            );
            assert!(bias.iter().all(|&x| x == 0.0), "{}", l.name);
        }
    }

    #[test]
    fn exits_match_table_one_at_full_width() {
        let _rng = crate::burn_rng_guard();
        let s = ModelSpec {
            width: 1.0,
            ..spec(Arch::Vgg8, 3)
        };
        let ins: Vec<usize> = s.exit_taps().iter().map(|(c, k)| c * k * k).collect();
        assert_eq!(ins, vec![2304, 2048, 2304]);
        let s = ModelSpec {
            arch: Arch::Resnet18,
            ..s
        };
        let ins: Vec<usize> = s.exit_taps().iter().map(|(c, k)| c * k * k).collect();
        assert_eq!(ins, vec![2304, 2304, 2048, 2304]);
    }

    #[test]
    fn weights_round_trip_in_canonical_layout() {
        let _rng = crate::burn_rng_guard();
        let device = Device::flex();
        let mut b = spec(Arch::Vgg8, 1).init_backbone(&device);
        let layers = b.weight_layers();
        assert_eq!(layers[0].shape, vec![8, 1, 3, 3]);
        assert_eq!(layers[6].shape, vec![128, 64 * 16]); // fc1 [out, in]
        assert!(layers[6].bias.is_some() && layers[0].bn.is_some());
        // Canonical linear order: element [o][i] is Burn's weight[i][o].
        let burn_w = match &b {
            Backbone::Vgg8(m) => to_vec(m.fc2.weight.val()),
            _ => unreachable!(),
        };
        let (din, dout) = (128, 10);
        assert_eq!(layers[7].weights[3 * din + 5], burn_w[5 * dout + 3]);
        let new: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| (0..l.weights.len()).map(|i| i as f32 * 1e-3).collect())
            .collect();
        b.set_weights(&new).unwrap();
        assert_eq!(b.weights(), new);
        assert!(b.set_weights(&new[..3]).is_err());
    }
}

/// The generic graph module against the hand-written VGG-8 and ResNet-18: same parameters, same
/// input, the same logits, exit taps and gradients (within 1e-5 of their scale), kept as a
/// golden file (`tests/golden/graph_modules.txt`, written by the hand-written modules with
/// `NVCIM_BLESS=1`) so that the graph builders stay checked against them.
#[cfg(test)]
mod graph_tests {
    use std::fmt::Write;

    use super::*;
    use crate::ir;

    fn spec(arch: Arch) -> ModelSpec {
        ModelSpec {
            arch,
            width: 0.125,
            in_channels: 3,
            image_size: 32,
            num_classes: 10,
            graph: None,
        }
    }

    fn wave(n: usize, k: f32, scale: f32, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|i| offset + scale * ((i as f32 * 0.618 + k) * 1.7).sin())
            .collect()
    }

    /// The network of `spec`'s graph with deterministic parameters (no Burn RNG involved).
    fn filled(spec: &ModelSpec) -> ir::Network {
        let mut net = spec.graph().skeleton();
        for (k, node) in net.nodes.iter_mut().enumerate() {
            let k = k as f32;
            match &mut node.op {
                ir::Op::Conv2d(c) => {
                    let s = (2.0 / c.fan_in() as f32).sqrt();
                    c.weight = wave(c.weight.len(), k, s, 0.0);
                }
                ir::Op::Linear(l) => {
                    let s = (1.0 / l.in_features as f32).sqrt();
                    l.weight = wave(l.weight.len(), k, s, 0.0);
                    l.bias = Some(wave(l.out_features, k + 0.5, 0.05, 0.0));
                }
                ir::Op::BatchNorm(b) => {
                    let c = b.gamma.len();
                    b.gamma = wave(c, k, 0.2, 1.0);
                    b.beta = wave(c, k + 1.0, 0.1, 0.0);
                    b.mean = wave(c, k + 2.0, 0.05, 0.0);
                    b.var = wave(c, k + 3.0, 0.2, 1.0);
                }
                _ => {}
            }
        }
        net
    }

    /// The hand-written module of `spec` holding `net`'s parameters.
    fn hand_written(spec: &ModelSpec, net: &ir::Network, device: &Device) -> Backbone {
        let mut b = spec.init_backbone(device);
        assert!(b.graph().is_none());
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        let mut bns = Vec::new();
        for node in &net.nodes {
            match &node.op {
                ir::Op::Conv2d(c) => weights.push(c.weight.clone()),
                ir::Op::Linear(l) => {
                    weights.push(l.weight.clone());
                    biases.push(l.bias.clone().unwrap());
                }
                ir::Op::BatchNorm(bn) => bns.push(bn.clone()),
                _ => {}
            }
        }
        b.set_weights(&weights).unwrap();
        let t =
            |v: &Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
        let mut biases = biases.iter();
        for l in b.layers_mut() {
            if let LayerMut::Linear(l) = l {
                let v = biases.next().unwrap();
                l.bias = Some(l.bias.clone().unwrap().map(|_| t(v).require_grad()));
            }
        }
        let mut stats = Vec::new();
        for (bn, p) in b.bns_mut().into_iter().zip(&bns) {
            bn.gamma = bn.gamma.clone().map(|_| t(&p.gamma).require_grad());
            bn.beta = bn.beta.clone().map(|_| t(&p.beta).require_grad());
            stats.push((t(&p.mean), t(&p.var)));
        }
        b.set_running_stats(&stats).unwrap();
        b
    }

    /// Logits and taps (training mode), their gradients' per-layer sums, and eval-mode logits,
    /// as lines of numbers.
    fn measure(b: &Backbone) -> Vec<(String, Vec<f64>)> {
        let device = Device::flex().autodiff();
        let n = 2 * 3 * 32 * 32;
        let x = Tensor::<4>::from_data(
            TensorData::new(wave(n, 0.3, 1.0, 0.0), [2, 3, 32, 32]),
            &device,
        );
        let (logits, taps) = b.forward_taps(x.clone(), true);
        let c = Tensor::<2>::from_data(TensorData::new(wave(20, 9.0, 1.0, 0.0), [2, 10]), &device);
        let mut loss = (logits.clone() * c).sum();
        for t in &taps {
            loss = loss + t.clone().sum().mul_scalar(0.01);
        }
        let grads = loss.backward();
        let sums = |v: Vec<f32>| {
            let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
            let a: f64 = v.iter().map(|&x| f64::from(x.abs())).sum();
            vec![s, a]
        };
        let mut out = vec![(
            "logits".to_string(),
            to_vec(logits.detach())
                .iter()
                .map(|&v| f64::from(v))
                .collect(),
        )];
        for (i, t) in taps.into_iter().enumerate() {
            out.push((format!("tap{i}"), sums(to_vec(t.detach()))));
        }
        for (name, l) in b.layers() {
            let g = match l {
                LayerRef::Conv(c, _) => to_vec(c.weight.val().grad(&grads).unwrap()),
                LayerRef::Linear(l) => to_vec(l.weight.val().grad(&grads).unwrap()),
            };
            out.push((format!("grad {name}"), sums(g)));
        }
        let eval = b.valid().forward(x.inner());
        out.push((
            "eval logits".to_string(),
            to_vec(eval).iter().map(|&v| f64::from(v)).collect(),
        ));
        out
    }

    fn golden_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/graph_modules.txt")
    }

    /// Named rows of numbers.
    type Lines = Vec<(String, Vec<f64>)>;

    fn render(all: &[(Arch, Lines)]) -> String {
        let mut s = String::from(
            "# nvcim: the hand-written VGG-8 / ResNet-18 (width 0.125, 3x32x32, 10 classes) on\n\
             # deterministic parameters and input (model::graph_tests): logits, exit taps (sum,\n\
             # sum of |x|), weight gradients per layer (sum, sum of |g|), eval-mode logits.\n",
        );
        for (arch, lines) in all {
            for (k, v) in lines {
                let v: Vec<String> = v.iter().map(|x| format!("{x:.9e}")).collect();
                writeln!(s, "{arch:?} | {k} | {}", v.join(" ")).unwrap();
            }
        }
        s
    }

    fn parse(text: &str) -> Vec<(String, Vec<f64>)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut p = l.splitn(3, " | ");
                let key = format!("{} | {}", p.next().unwrap(), p.next().unwrap());
                let v = p
                    .next()
                    .unwrap()
                    .split(' ')
                    .map(|x| x.parse().unwrap())
                    .collect();
                (key, v)
            })
            .collect()
    }

    fn assert_close(what: &str, got: &[(String, Vec<f64>)], want: &[(String, Vec<f64>)]) {
        assert_eq!(got.len(), want.len(), "{what}: line count");
        for ((gk, gv), (wk, wv)) in got.iter().zip(want) {
            assert_eq!(gk, wk, "{what}");
            let scale = wv.iter().fold(1f64, |m, v| m.max(v.abs()));
            for (a, b) in gv.iter().zip(wv) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{what}: {gk}: {a} vs {b} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn graph_modules_equal_the_hand_written_ones() {
        let _rng = crate::burn_rng_guard();
        let device = Device::flex().autodiff();
        let mut hand_all = Vec::new();
        let mut graph_all = Vec::new();
        for arch in [Arch::Vgg8, Arch::Resnet18] {
            let s = spec(arch);
            let net = filled(&s);
            let hand = hand_written(&s, &net, &device);
            let g = graph::GraphNet::from_network(&net, s.graph().exits, &device).unwrap();
            let g = Backbone::Graph(g);
            let (h, m) = (measure(&hand), measure(&g));
            let tag = |v: &[(String, Vec<f64>)]| -> Vec<(String, Vec<f64>)> {
                v.iter()
                    .map(|(k, x)| (format!("{arch:?} | {k}"), x.clone()))
                    .collect()
            };
            // Layer names differ between the modules; compare by position.
            let strip = |v: Vec<(String, Vec<f64>)>| -> Vec<(String, Vec<f64>)> {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (k, x))| {
                        (
                            if k.starts_with("grad ") {
                                format!("grad {i}")
                            } else {
                                k
                            },
                            x,
                        )
                    })
                    .collect()
            };
            assert_close(&format!("{arch:?}"), &strip(m.clone()), &strip(h.clone()));
            hand_all.push((arch, strip(h)));
            graph_all.push((arch, tag(&strip(m))));
        }
        let path = golden_path();
        if std::env::var_os("NVCIM_BLESS").is_some() {
            std::fs::write(&path, render(&hand_all)).unwrap();
        }
        let golden = parse(&std::fs::read_to_string(&path).unwrap());
        let got: Vec<(String, Vec<f64>)> = graph_all.into_iter().flat_map(|(_, v)| v).collect();
        assert_close("golden", &got, &golden);
    }

    /// `--exits auto` on the full-width graphs gives Table I's positions and sizes.
    #[test]
    fn auto_exits_are_table_one() {
        for (arch, ins) in [
            (Arch::Vgg8, vec![2304, 2048, 2304]),
            (Arch::Resnet18, vec![2304, 2304, 2048, 2304]),
        ] {
            let s = ModelSpec {
                width: 1.0,
                ..spec(arch)
            };
            let g = s.graph();
            let auto = g.auto_exits().unwrap();
            assert_eq!(auto, g.exits, "{arch:?}\n{}", g.describe().unwrap());
            let shapes = g.shapes().unwrap();
            let got: Vec<usize> = auto
                .iter()
                .map(|e| shapes[e.node][0] * e.pool * e.pool)
                .collect();
            assert_eq!(got, ins, "{arch:?}");
        }
    }
}
