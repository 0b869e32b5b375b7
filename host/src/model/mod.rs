//! The networks in Burn: one generic graph network ([`graph::GraphNet`], the [`Backbone`]) that
//! runs VGG-8, ResNet-18 (CIFAR stem) or any imported CNN, and the training exits.
//!
//! In VGG-8 and ResNet-18 every convolution is a conv-BN-ReLU block (bias-free 3x3 convolutions
//! followed by batch normalization, as in the authors' code); linear layers carry a bias. A `--width` multiplier
//! scales every hidden width (channels, the 1024-wide VGG classifier layer and the 512-wide exit
//! layer), rounded, at least 1. Weights start from Kaiming-normal (fan-out, ReLU gain), biases
//! from zero, as in the authors' code.
//!
//! The [`Backbone`] is the network that is deployed: saved, loaded, evaluated and exported alone.
//! [`ExitHead`]s exist only for training ([`TrainModel`] holds both).
//!
//! **Weight layers** (the cross-component contract): the backbone's conv and linear layers in
//! graph order, each with its weights in PyTorch's canonical layout — conv
//! `[out][in / groups][kh][kw]`, linear `[out][in]` (Burn stores linear weights as `[in, out]`;
//! the accessors transpose). ResNet-18 lists, per basic block, `conv1`, `conv2`, then the 1x1
//! shortcut convolution when the block has one. See [`Backbone::weight_layers`] and
//! [`Backbone::set_weights`].

pub mod graph;
pub mod import;
pub mod legacy;
pub mod noise;

use std::path::Path;

use anyhow::{Context, Result, ensure};
use burn::module::{Initializer, Module};
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, Linear, LinearConfig};
use burn::store::ModuleRecord;
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
        graph::GraphNet::init(self.graph(), device)
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
/// `spec`. A VGG-8 or ResNet-18 saved before the generic network (its parameters named after the
/// old modules, `Vgg8.blocks.0.conv.weight`) loads too: its names are mapped onto the graph's.
pub fn load_backbone(path: &Path, spec: &ModelSpec, device: &Device) -> Result<Backbone> {
    crate::fsx::verify_checksum(path)?;
    let record = ModuleRecord::load(path)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| format!("reading backbone {}", path.display()))?;
    let what = || {
        format!(
            "{} does not fit a {:?} of width {}",
            path.display(),
            spec.arch,
            spec.width
        )
    };
    match spec.init_backbone(device).try_load_record(record) {
        Ok(b) => Ok(b),
        Err(_) if spec.arch != Arch::Graph && legacy::is_legacy(path) => {
            legacy::load(path, spec, device).with_context(what)
        }
        Err(e) => Err(anyhow::anyhow!("{e:?}").context(what())),
    }
}

/// A training exit: `AdaptiveAvgPool2d(s) -> Linear(C*s*s -> 512w) -> ReLU -> Linear(512w -> K)`,
/// linear layers with PyTorch's `nn.Linear` default initialization (Burn's default).
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
            fc1: LinearConfig::new(c * s * s, hidden).init(device),
            fc2: LinearConfig::new(hidden, classes).init(device),
        }
    }

    /// `[n, c, h, w] -> [n, K]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(x).flatten::<2>(1, 3); // [n, c*s*s]
        self.fc2
            .forward(crate::kernels::backend::relu(self.fc1.forward(x)))
    }
}

/// The deployable network: saved, loaded, evaluated and exported alone.
pub type Backbone = graph::GraphNet;

/// A weight layer of the graph: a conv with the BatchNorm that reads its output (if any), or a
/// linear layer, with its node's name.
enum LayerRef<'a> {
    Conv(&'a Conv2d, Option<&'a BatchNorm>),
    Linear(&'a Linear),
}

impl graph::GraphNet {
    /// Logits. `[n, c, h, w] -> [n, K]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_taps(x, false).0
    }

    /// The parameterized nodes' names, in layer order.
    fn layer_names(&self) -> Vec<&str> {
        self.spec()
            .nodes
            .iter()
            .filter(|n| n.op.has_layer())
            .map(|n| n.name.as_str())
            .collect()
    }

    /// The weight layers in graph order, each conv with the BatchNorm right after it.
    fn layers_ref(&self) -> Vec<(String, LayerRef<'_>)> {
        let names = self.layer_names();
        let mut out = Vec::new();
        for (k, l) in self.layers.iter().enumerate() {
            match l {
                graph::GraphLayer::Conv(c) => {
                    let bn = match self.layers.get(k + 1) {
                        Some(graph::GraphLayer::Bn(b)) => Some(b),
                        _ => None,
                    };
                    out.push((names[k].to_string(), LayerRef::Conv(c, bn)));
                }
                graph::GraphLayer::Linear(l) => {
                    out.push((names[k].to_string(), LayerRef::Linear(l)));
                }
                graph::GraphLayer::Bn(_) => {}
            }
        }
        out
    }

    fn bns(&self) -> impl Iterator<Item = &BatchNorm> {
        self.layers.iter().filter_map(|l| match l {
            graph::GraphLayer::Bn(b) => Some(b),
            _ => None,
        })
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
        for l in &mut self.layers {
            if let graph::GraphLayer::Linear(lin) = l {
                let [din, dout] = lin.weight.shape().dims();
                lin.weight = kaiming().init_with([din, dout], Some(din), Some(dout), device);
                lin.bias = Some(Initializer::Zeros.init([dout], device));
            }
        }
    }

    /// Every BatchNorm's running (mean, variance), in graph order, with pending updates folded
    /// in.
    pub fn running_stats(&self) -> Vec<(Tensor<1>, Tensor<1>)> {
        self.bns()
            .map(|bn| (bn.running_mean.value_sync(), bn.running_var.value_sync()))
            .collect()
    }

    /// Sets every BatchNorm's running statistics to `stats` (as [`Self::running_stats`]
    /// returns them).
    pub fn set_running_stats(&mut self, stats: &[(Tensor<1>, Tensor<1>)]) -> Result<()> {
        let n = self.bns().count();
        ensure!(
            n == stats.len(),
            "{} BatchNorm statistics for a network with {n}",
            stats.len()
        );
        let bns = self.layers.iter_mut().filter_map(|l| match l {
            graph::GraphLayer::Bn(b) => Some(b),
            _ => None,
        });
        for (bn, (m, v)) in bns.zip(stats) {
            bn.running_mean.update(m.clone());
            bn.running_var.update(v.clone());
            let _ = bn.running_mean.value_sync();
            let _ = bn.running_var.value_sync();
        }
        Ok(())
    }

    /// Number of weight layers.
    pub fn num_weight_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| !matches!(l, graph::GraphLayer::Bn(_)))
            .count()
    }

    /// The weight layers in graph order, canonical layout, with biases and BN parameters.
    pub fn weight_layers(&self) -> Vec<WeightLayer> {
        self.layers_ref()
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

    /// The weights alone, canonical layout, graph order (cheaper than [`Self::weight_layers`]).
    pub fn weights(&self) -> Vec<Vec<f32>> {
        self.layers_ref()
            .into_iter()
            .map(|(_, l)| match l {
                LayerRef::Conv(c, _) => to_vec(c.weight.val()),
                LayerRef::Linear(l) => to_vec(l.weight.val().transpose()),
            })
            .collect()
    }

    /// Replaces every weight layer's weights (canonical layout, graph order), keeping
    /// parameter ids; biases and BN are untouched.
    pub fn set_weights(&mut self, weights: &[Vec<f32>]) -> Result<()> {
        let n = self.num_weight_layers();
        ensure!(
            n == weights.len(),
            "the backbone has {n} weight layers, got {}",
            weights.len()
        );
        let layers = self
            .layers
            .iter_mut()
            .filter(|l| !matches!(l, graph::GraphLayer::Bn(_)));
        for (i, (l, w)) in layers.zip(weights).enumerate() {
            match l {
                graph::GraphLayer::Conv(c) => {
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
                graph::GraphLayer::Linear(l) => {
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
                graph::GraphLayer::Bn(_) => unreachable!("filtered out"),
            }
        }
        Ok(())
    }
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
        let Some(graph::GraphLayer::Linear(fc2)) = b.layers.last() else {
            panic!("VGG-8 ends with a linear layer");
        };
        let burn_w = to_vec(fc2.weight.val());
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

/// The generic graph network's VGG-8 and ResNet-18 against the hand-written modules they
/// replaced: on the same deterministic parameters and input, the logits, exit taps and
/// gradients of `tests/golden/graph_modules.txt` — written by the hand-written modules, which the
/// generic network matched within 1e-5 (in fact exactly) before they were removed.
#[cfg(test)]
mod graph_tests {
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
        for (name, l) in b.layers_ref() {
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
            // Gradient sums are looser: the golden file was recorded before the AVX-512 `gemm`
            // blocks changed their order of additions (2026-12-07), and ResNet-18's batch norms
            // over a batch of 2 amplify that rounding through the backward pass (measured: up
            // to 7.4e-5 of the scale in its deepest layers, VGG-8's under 1e-5). Outputs, taps
            // and the initialization keep 1e-5 (measured: at most 8.5e-6).
            let tol = if gk.contains("| grad ") { 2e-4 } else { 1e-5 };
            for (a, b) in gv.iter().zip(wv) {
                assert!(
                    (a - b).abs() <= tol * scale,
                    "{what}: {gk}: {a} vs {b} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn graph_modules_equal_the_hand_written_ones() {
        let _rng = crate::burn_rng_guard();
        let device = Device::flex().autodiff();
        let mut got = Vec::new();
        for arch in [Arch::Vgg8, Arch::Resnet18] {
            let s = spec(arch);
            let net = filled(&s);
            let g = graph::GraphNet::from_network(&net, s.graph().exits, &device).unwrap();
            // Layer names are the graph's; the golden file numbers the gradient lines.
            for (i, (k, x)) in measure(&g).into_iter().enumerate() {
                let k = if k.starts_with("grad ") {
                    format!("grad {i}")
                } else {
                    k
                };
                got.push((format!("{arch:?} | {k}"), x));
            }
        }
        // The seeded initialization (backbone and exits, every parameter in visiting order):
        // the hand-written modules' draws, so that a seed trains what it trained before.
        let device = Device::flex().autodiff();
        for arch in [Arch::Vgg8, Arch::Resnet18] {
            let s = spec(arch);
            device.seed(7);
            let m = TrainModel {
                backbone: s.init_backbone(&device),
                exits: s.init_exits(&device),
            };
            let sums: Vec<f64> = noise::tests::all_params(&m)
                .iter()
                .map(|v| v.iter().map(|&x| f64::from(x.abs())).sum())
                .collect();
            got.push((
                format!("{arch:?} | init seed 7 (sum of |x| per parameter)"),
                sums,
            ));
        }
        if std::env::var_os("NVCIM_PRINT_GOLDEN").is_some() {
            for (k, v) in &got {
                let v: Vec<String> = v.iter().map(|x| format!("{x:.9e}")).collect();
                eprintln!("{k} | {}", v.join(" "));
            }
        }
        let golden = parse(&std::fs::read_to_string(golden_path()).unwrap());
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
