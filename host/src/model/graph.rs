//! One trainable network for any CNN: a Burn module that runs a graph of the importer's ops
//! (grouped and depthwise conv, BatchNorm, ReLU, Clip, max/average pooling, global average
//! pooling, Add, Concat, Flatten, Linear).
//!
//! A [`GraphSpec`] is the structure alone (saved in `model.json`, so a checkpoint loads without
//! the file it came from); a [`GraphNet`] holds its parameters, one Burn layer per weight or
//! BatchNorm node **in node order**: parameter creation, the noise mapper's draws and the
//! contract's weight-layer order all follow the graph. VGG-8 and ResNet-18 are two graph
//! builders ([`GraphSpec::vgg8`], [`GraphSpec::resnet18`]); an ONNX file imported by
//! [`crate::onnx::import`] is another ([`GraphSpec::from_network`]).
//!
//! Convolutions run on the project's kernels where they cover the shape (ungrouped, one stride,
//! the same padding on every side; a bias is added after the bias-free kernel); grouped and
//! depthwise convolutions and asymmetric padding go to Burn's Flex convolution, which is
//! slower (see `docs/guide.md`).
//!
//! **Exits** ([`ExitPoint`]) tap node outputs. [`GraphSpec::auto_exits`] places them by the
//! paper's semantics principle: the backbone is cut into *units* (a convolution that reads the
//! single live value, up to the next such convolution; a depthwise convolution joins the unit of
//! the convolution before it); units with the same kind (plain, residual, depthwise-separable,
//! branching), resolution and width form a *block*; an exit sits at the end of every block but
//! the last, after any pooling there, and its head pools to the `s` that brings `C*s*s` nearest
//! Table I's 2048-2304.

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{Initializer, Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2dConfig, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::ir::{self, Network, Node, Normalization, Op, Pool, Provenance, Value};

/// What a node computes, without its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum GraphOp {
    /// A convolution (a weight layer), zero padding top, left, bottom, right.
    Conv {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Strides.
        stride: [usize; 2],
        /// Padding: top, left, bottom, right.
        padding: [usize; 4],
        /// Channel groups.
        groups: usize,
        /// Whether it adds a bias.
        bias: bool,
    },
    /// Batch normalization over channels.
    BatchNorm {
        /// Channels.
        channels: usize,
        /// Added to the variance.
        eps: f64,
    },
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)`.
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// Max pooling.
    MaxPool {
        /// Window.
        kernel: [usize; 2],
        /// Strides.
        stride: [usize; 2],
        /// Padding: top, left, bottom, right.
        padding: [usize; 4],
    },
    /// Average pooling.
    AvgPool {
        /// Window.
        kernel: [usize; 2],
        /// Strides.
        stride: [usize; 2],
        /// Padding: top, left, bottom, right.
        padding: [usize; 4],
        /// Divide by the whole window where it covers padding.
        count_include_pad: bool,
    },
    /// Mean over height and width.
    GlobalAvgPool,
    /// `[N, C, H, W] -> [N, C*H*W]`.
    Flatten,
    /// Fully connected (a weight layer).
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
        /// Whether it adds a bias.
        bias: bool,
    },
    /// Elementwise sum of two values.
    Add,
    /// Channel concatenation of two values.
    Concat,
}

impl GraphOp {
    /// Whether the node has a layer in [`GraphNet`] (conv, BatchNorm, linear).
    pub fn has_layer(&self) -> bool {
        matches!(
            self,
            GraphOp::Conv { .. } | GraphOp::BatchNorm { .. } | GraphOp::Linear { .. }
        )
    }

    /// Whether the node is a weight layer of the contract (conv, linear).
    pub fn is_weight(&self) -> bool {
        matches!(self, GraphOp::Conv { .. } | GraphOp::Linear { .. })
    }
}

/// One node: a name, an op and its inputs (0 is the image, `i + 1` the output of node `i`, as
/// [`ir::Value`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphNode {
    /// The node's name (the file's, or nvcim's for the built-in architectures).
    pub name: String,
    /// What it computes.
    #[serde(flatten)]
    pub op: GraphOp,
    /// The values it reads.
    pub inputs: Vec<usize>,
}

/// A training exit: the node whose output it reads and the size its head pools to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPoint {
    /// The index of the node whose output the exit reads.
    pub node: usize,
    /// `AdaptiveAvgPool2d(s)`.
    pub pool: usize,
}

/// A network's structure: input, classes, normalization, nodes and training exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphSpec {
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Classes.
    pub num_classes: usize,
    /// The input normalization the weights expect (pixels in `[0, 1]`).
    pub mean: Vec<f32>,
    /// Its standard deviations.
    pub std: Vec<f32>,
    /// The nodes in forward order; the last one's output is the logits.
    pub nodes: Vec<GraphNode>,
    /// The training exits, shallowest first.
    #[serde(default)]
    pub exits: Vec<ExitPoint>,
    /// The exits' hidden width (Table I: 512).
    #[serde(default = "default_hidden")]
    pub exit_hidden: usize,
}

fn default_hidden() -> usize {
    512
}

/// The weights of an [`ir::Network`] as [`GraphSpec::from_network`] leaves them behind, for
/// [`GraphNet::load_network`].
fn pool_of(kernel: [usize; 2], stride: [usize; 2], padding: [usize; 4], cip: bool) -> Pool {
    Pool {
        kernel,
        stride,
        padding,
        count_include_pad: cip,
    }
}

impl GraphSpec {
    /// The structure of `net` (no exits).
    pub fn from_network(net: &Network) -> Result<Self> {
        net.shapes()
            .context("the imported network is inconsistent")?;
        let nodes = net
            .nodes
            .iter()
            .map(|n| GraphNode {
                name: n.name.clone(),
                op: match &n.op {
                    Op::Conv2d(c) => GraphOp::Conv {
                        in_channels: c.in_channels,
                        out_channels: c.out_channels,
                        kernel: c.kernel,
                        stride: c.stride,
                        padding: c.padding,
                        groups: c.groups,
                        bias: c.bias.is_some(),
                    },
                    Op::BatchNorm(b) => GraphOp::BatchNorm {
                        channels: b.gamma.len(),
                        eps: f64::from(b.eps),
                    },
                    Op::Relu => GraphOp::Relu,
                    Op::Clip { min, max } => GraphOp::Clip {
                        min: *min,
                        max: *max,
                    },
                    Op::MaxPool(p) => GraphOp::MaxPool {
                        kernel: p.kernel,
                        stride: p.stride,
                        padding: p.padding,
                    },
                    Op::AvgPool(p) => GraphOp::AvgPool {
                        kernel: p.kernel,
                        stride: p.stride,
                        padding: p.padding,
                        count_include_pad: p.count_include_pad,
                    },
                    Op::GlobalAvgPool => GraphOp::GlobalAvgPool,
                    Op::Flatten => GraphOp::Flatten,
                    Op::Linear(l) => GraphOp::Linear {
                        in_features: l.in_features,
                        out_features: l.out_features,
                        bias: l.bias.is_some(),
                    },
                    Op::Add => GraphOp::Add,
                    Op::Concat => GraphOp::Concat,
                },
                inputs: n.inputs.iter().map(|v| value_index(*v)).collect(),
            })
            .collect();
        let spec = GraphSpec {
            input: net.input,
            num_classes: net.num_classes,
            mean: net.normalization.mean.clone(),
            std: net.normalization.std.clone(),
            nodes,
            exits: Vec::new(),
            exit_hidden: default_hidden(),
        };
        spec.check()?;
        Ok(spec)
    }

    /// The network with every weight zero (for shapes and checks).
    pub fn skeleton(&self) -> Network {
        let nodes = self
            .nodes
            .iter()
            .map(|n| Node {
                name: n.name.clone(),
                op: match &n.op {
                    &GraphOp::Conv {
                        in_channels,
                        out_channels,
                        kernel,
                        stride,
                        padding,
                        groups,
                        bias,
                    } => {
                        let conv = ir::Conv2d {
                            out_channels,
                            in_channels,
                            kernel,
                            stride,
                            padding,
                            groups,
                            weight: Vec::new(),
                            bias: bias.then(|| vec![0.0; out_channels]),
                        };
                        let n = out_channels * conv.fan_in();
                        Op::Conv2d(ir::Conv2d {
                            weight: vec![0.0; n],
                            ..conv
                        })
                    }
                    &GraphOp::BatchNorm { channels, eps } => Op::BatchNorm(ir::BatchNorm {
                        gamma: vec![1.0; channels],
                        beta: vec![0.0; channels],
                        mean: vec![0.0; channels],
                        var: vec![1.0; channels],
                        eps: eps as f32,
                    }),
                    GraphOp::Relu => Op::Relu,
                    &GraphOp::Clip { min, max } => Op::Clip { min, max },
                    &GraphOp::MaxPool {
                        kernel,
                        stride,
                        padding,
                    } => Op::MaxPool(pool_of(kernel, stride, padding, true)),
                    &GraphOp::AvgPool {
                        kernel,
                        stride,
                        padding,
                        count_include_pad,
                    } => Op::AvgPool(pool_of(kernel, stride, padding, count_include_pad)),
                    GraphOp::GlobalAvgPool => Op::GlobalAvgPool,
                    GraphOp::Flatten => Op::Flatten,
                    &GraphOp::Linear {
                        in_features,
                        out_features,
                        bias,
                    } => Op::Linear(ir::Linear {
                        out_features,
                        in_features,
                        weight: vec![0.0; in_features * out_features],
                        bias: bias.then(|| vec![0.0; out_features]),
                    }),
                    GraphOp::Add => Op::Add,
                    GraphOp::Concat => Op::Concat,
                },
                inputs: n.inputs.iter().map(|&i| value_of(i)).collect(),
            })
            .collect();
        Network {
            input: self.input,
            num_classes: self.num_classes,
            normalization: Normalization {
                mean: self.mean.clone(),
                std: self.std.clone(),
            },
            provenance: Provenance::default(),
            nodes,
        }
    }

    /// Every node's output shape `[C, H, W]` (`[features, 1, 1]` when flat).
    pub fn shapes(&self) -> Result<Vec<ir::Shape>> {
        self.skeleton().shapes()
    }

    /// Checks the graph (the IR's checks, plus what the trainer needs: a convolution, pooling
    /// padding it can run, exits on 4-D values before the last convolution).
    pub fn check(&self) -> Result<()> {
        let shapes = self.shapes()?;
        let last_conv = self
            .nodes
            .iter()
            .rposition(|n| matches!(n.op, GraphOp::Conv { .. }))
            .context(
                "the model has no convolution: negative feedback training places its exits \
                 after convolution blocks, so nvcim trains CNNs only",
            )?;
        let flat = self.flat_from();
        for e in &self.exits {
            let node = self.nodes.get(e.node).with_context(|| {
                format!("exit at node {} of a graph of {}", e.node, self.nodes.len())
            })?;
            ensure!(
                e.node < last_conv,
                "exit after `{}`: it is not before the last convolution (`{}`), so it would \
                 read what the backbone's classifier reads; place exits inside the \
                 convolutional part",
                node.name,
                self.nodes[last_conv].name
            );
            ensure!(
                e.node < flat,
                "exit after `{}`: its output is already flat",
                node.name
            );
            let [c, h, w] = shapes[e.node];
            ensure!(
                e.pool >= 1 && c >= 1 && h >= 1 && w >= 1,
                "exit after `{}`: pool size {}",
                node.name,
                e.pool
            );
        }
        Ok(())
    }

    /// The first node whose output is flat (`Flatten`, `Linear`), or the node count.
    fn flat_from(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| matches!(n.op, GraphOp::Flatten | GraphOp::Linear { .. }))
            .unwrap_or(self.nodes.len())
    }

    /// Whether any node is a BatchNorm.
    pub fn has_batchnorm(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| matches!(n.op, GraphOp::BatchNorm { .. }))
    }

    /// The index of the node called `name`.
    pub fn find(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| {
                let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
                format!(
                    "--exits: no node is called `{name}`; the model's nodes are: {}",
                    names.join(", ")
                )
            })
    }

    /// Exits after the nodes called `names`, each pooled to the size nearest Table I's inputs.
    pub fn exits_at(&self, names: &[String]) -> Result<Vec<ExitPoint>> {
        let shapes = self.shapes()?;
        let mut out: Vec<ExitPoint> = Vec::new();
        for name in names {
            let node = self.find(name)?;
            let [c, h, w] = shapes[node];
            out.push(ExitPoint {
                node,
                pool: head_pool(c, h, w),
            });
        }
        out.sort_by_key(|e| e.node);
        out.dedup();
        let spec = GraphSpec {
            exits: out.clone(),
            ..self.clone()
        };
        spec.check()?;
        Ok(out)
    }

    /// The exits of the paper's semantics principle (module docs).
    pub fn auto_exits(&self) -> Result<Vec<ExitPoint>> {
        let shapes = self.shapes()?;
        let units = self.units(&shapes);
        let mut out = Vec::new();
        for pair in units.windows(2) {
            if pair[0].signature != pair[1].signature {
                let node = pair[0].end;
                let [c, h, w] = shapes[node];
                out.push(ExitPoint {
                    node,
                    pool: head_pool(c, h, w),
                });
            }
        }
        Ok(out)
    }

    /// The units of the backbone (module docs), in order.
    fn units(&self, shapes: &[ir::Shape]) -> Vec<Unit> {
        let n = self.nodes.len();
        // The last reader of every value, to find the cut points: values that are the only
        // live one after their node.
        let mut last_use = vec![0usize; n + 1];
        for (i, node) in self.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_use[v] = last_use[v].max(i);
            }
        }
        // Value v (node v-1's output) is a cut when no value produced before it is read after it.
        let mut cut = vec![false; n];
        let mut reach = last_use[0];
        for i in 0..n {
            // values 0..=i (image and nodes before i) are all dead after node i
            cut[i] = reach <= i;
            reach = reach.max(last_use[i + 1]);
        }
        let flat = self.flat_from();
        // Unit starts: a conv reading a cut value (or the image), not depthwise-after-a-unit.
        let mut starts = Vec::new();
        for (i, node) in self.nodes.iter().enumerate().take(flat) {
            let GraphOp::Conv {
                in_channels,
                groups,
                ..
            } = node.op
            else {
                continue;
            };
            let v = node.inputs[0];
            let reads_cut = v == 0 || cut[v - 1];
            let already = starts
                .last()
                .is_some_and(|&s: &usize| self.nodes[s].inputs[0] == v);
            let depthwise = groups > 1 && groups == in_channels;
            if reads_cut && !already && (!depthwise || starts.is_empty()) {
                starts.push(i);
            }
        }
        let mut units = Vec::new();
        for (k, &s) in starts.iter().enumerate() {
            let next = starts.get(k + 1).copied().unwrap_or(flat);
            // The last cut value before the next unit (after any pooling there).
            let end = (s..next).rev().find(|&i| cut[i]).unwrap_or(next - 1);
            let body = &self.nodes[s..next.max(s + 1)];
            let kind = if body.iter().any(|n| matches!(n.op, GraphOp::Add)) {
                UnitKind::Residual
            } else if body.iter().any(|n| matches!(n.op, GraphOp::Concat)) {
                UnitKind::Branching
            } else if body.iter().any(|n| {
                matches!(n.op, GraphOp::Conv { in_channels, groups, .. }
                    if groups > 1 && groups == in_channels)
            }) {
                UnitKind::DepthwiseSeparable
            } else if body
                .iter()
                .any(|n| matches!(n.op, GraphOp::Conv { groups, .. } if groups > 1))
            {
                UnitKind::Grouped
            } else {
                UnitKind::Plain
            };
            let [_, h, w] = shapes[s];
            let [c, _, _] = shapes[end];
            units.push(Unit {
                end,
                signature: (kind, h, w, c),
            });
        }
        units
    }

    /// Input exits as `(channels, pool)` for [`super::ExitHead`]s.
    pub fn exit_taps(&self) -> Result<Vec<(usize, usize)>> {
        let shapes = self.shapes()?;
        Ok(self
            .exits
            .iter()
            .map(|e| (shapes[e.node][0], e.pool))
            .collect())
    }

    /// A readable listing: every node with its output shape, the exits marked with their heads.
    pub fn describe(&self) -> Result<String> {
        use std::fmt::Write;
        let shapes = self.shapes()?;
        let mut s = String::new();
        let mut layer = 0;
        for (i, (n, [c, h, w])) in self.nodes.iter().zip(&shapes).enumerate() {
            let kind = op_name(&n.op);
            let weight = if n.op.is_weight() {
                layer += 1;
                format!("  weight layer {}", layer - 1)
            } else {
                String::new()
            };
            let shape = if i >= self.flat_from() {
                format!("[{c}]")
            } else {
                format!("[{c}, {h}, {w}]")
            };
            writeln!(s, "{i:>4}  {:<36} {kind:<14} -> {shape}{weight}", n.name)?;
            for (k, e) in self.exits.iter().enumerate().filter(|(_, e)| e.node == i) {
                let hidden = self.exit_hidden;
                writeln!(
                    s,
                    "      ^ exit {}: AdaptiveAvgPool({p}) -> Linear({c}*{p}*{p} = {} -> {hidden}) \
                     -> ReLU -> Linear({hidden} -> {})",
                    k + 1,
                    c * e.pool * e.pool,
                    self.num_classes,
                    p = e.pool
                )?;
            }
        }
        Ok(s)
    }

    /// VGG-8 of `spec` (the node names of [`crate::ir::convert::to_network`]) with Table I's
    /// exits: after conv1, pool1 and pool2, pooled to 6, 4 and 3.
    pub fn vgg8(spec: &super::ModelSpec, mean: &[f32], std: &[f32]) -> Self {
        let mut b = Builder::new(spec, mean, std);
        let mut x = 0;
        let mut taps = Vec::new();
        for (i, base) in [64, 128, 256, 256, 512, 512].into_iter().enumerate() {
            x = b.conv_bn(&format!("features.{i}"), x, spec.ch(base), 3, 1);
            x = b.push(format!("features.{i}.relu"), GraphOp::Relu, vec![x]);
            if i % 2 == 1 {
                let op = GraphOp::MaxPool {
                    kernel: [2, 2],
                    stride: [2, 2],
                    padding: [0; 4],
                };
                x = b.push(format!("features.{i}.pool"), op, vec![x]);
            }
            if matches!(i, 0 | 1 | 3) {
                taps.push(x - 1);
            }
        }
        x = b.push("flatten".into(), GraphOp::Flatten, vec![x]);
        let side = spec.image_size / 8;
        x = b.linear("fc1", x, spec.ch(512) * side * side, spec.ch(1024));
        x = b.push("fc1.relu".into(), GraphOp::Relu, vec![x]);
        b.linear("fc2", x, spec.ch(1024), spec.num_classes);
        b.finish(taps, spec)
    }

    /// ResNet-18 (CIFAR stem) of `spec` with Table I's exits: after the stem and stages 1-3,
    /// pooled to 6, 6, 4 and 3.
    pub fn resnet18(spec: &super::ModelSpec, mean: &[f32], std: &[f32]) -> Self {
        let mut b = Builder::new(spec, mean, std);
        let mut x = b.conv_bn("stem", 0, spec.ch(64), 3, 1);
        x = b.push("stem.relu".into(), GraphOp::Relu, vec![x]);
        let mut taps = vec![x - 1];
        let mut cin = spec.ch(64);
        for (s, (base, stride)) in [(64, 1), (128, 2), (256, 2), (512, 2)]
            .into_iter()
            .enumerate()
        {
            let cout = spec.ch(base);
            for k in 0..2 {
                let stride = if k == 0 { stride } else { 1 };
                let p = format!("layer{}.{k}", s + 1);
                let y = b.conv_bn(&format!("{p}.conv1"), x, cout, 3, stride);
                let y = b.push(format!("{p}.relu1"), GraphOp::Relu, vec![y]);
                let y = b.conv_bn(&format!("{p}.conv2"), y, cout, 3, 1);
                let short = if stride != 1 || cin != cout {
                    b.conv_bn(&format!("{p}.shortcut"), x, cout, 1, stride)
                } else {
                    x
                };
                let sum = b.push(format!("{p}.add"), GraphOp::Add, vec![y, short]);
                x = b.push(format!("{p}.relu"), GraphOp::Relu, vec![sum]);
                cin = cout;
            }
            if s < 3 {
                taps.push(x - 1);
            }
        }
        x = b.push("pool".into(), GraphOp::GlobalAvgPool, vec![x]);
        x = b.push("flatten".into(), GraphOp::Flatten, vec![x]);
        b.linear("fc", x, cin, spec.num_classes);
        b.finish(taps, spec)
    }
}

/// The op's name in listings.
fn op_name(op: &GraphOp) -> String {
    match op {
        GraphOp::Conv {
            kernel,
            stride,
            groups,
            in_channels,
            ..
        } => {
            let g = if *groups > 1 && groups == in_channels {
                " dw".to_string()
            } else if *groups > 1 {
                format!(" g{groups}")
            } else {
                String::new()
            };
            format!("Conv {}x{}/{}{g}", kernel[0], kernel[1], stride[0])
        }
        GraphOp::BatchNorm { .. } => "BatchNorm".into(),
        GraphOp::Relu => "Relu".into(),
        GraphOp::Clip { min, max } => format!("Clip {min}..{max}"),
        GraphOp::MaxPool { kernel, stride, .. } => {
            format!("MaxPool {}x{}/{}", kernel[0], kernel[1], stride[0])
        }
        GraphOp::AvgPool { kernel, stride, .. } => {
            format!("AvgPool {}x{}/{}", kernel[0], kernel[1], stride[0])
        }
        GraphOp::GlobalAvgPool => "GlobalAvgPool".into(),
        GraphOp::Flatten => "Flatten".into(),
        GraphOp::Linear { .. } => "Linear".into(),
        GraphOp::Add => "Add".into(),
        GraphOp::Concat => "Concat".into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitKind {
    Plain,
    Residual,
    DepthwiseSeparable,
    Grouped,
    Branching,
}

struct Unit {
    /// The node whose output ends the unit.
    end: usize,
    /// Kind, height and width at its first convolution, channels at its end.
    signature: (UnitKind, usize, usize, usize),
}

/// The pooled size `s` (at most the map's) that brings `c*s*s` nearest `[2048, 2304]`; the
/// smaller `s` on a tie.
pub fn head_pool(c: usize, h: usize, w: usize) -> usize {
    let dist = |s: usize| {
        let n = c * s * s;
        if n < 2048 {
            2048 - n
        } else {
            n.saturating_sub(2304)
        }
    };
    (1..=h.min(w).max(1)).min_by_key(|&s| dist(s)).unwrap_or(1)
}

fn value_index(v: Value) -> usize {
    v.producer().map_or(0, |p| p + 1)
}

fn value_of(i: usize) -> Value {
    if i == 0 {
        Value::INPUT
    } else {
        Value::node(i - 1)
    }
}

struct Builder {
    spec: GraphSpec,
}

impl Builder {
    fn new(spec: &super::ModelSpec, mean: &[f32], std: &[f32]) -> Self {
        Builder {
            spec: GraphSpec {
                input: [spec.in_channels, spec.image_size, spec.image_size],
                num_classes: spec.num_classes,
                mean: mean.to_vec(),
                std: std.to_vec(),
                nodes: Vec::new(),
                exits: Vec::new(),
                exit_hidden: spec.ch(512),
            },
        }
    }

    /// Pushes a node; returns its value index.
    fn push(&mut self, name: String, op: GraphOp, inputs: Vec<usize>) -> usize {
        self.spec.nodes.push(GraphNode { name, op, inputs });
        self.spec.nodes.len()
    }

    /// The channels of value `x` (0: the image): those of the conv or BatchNorm that made it.
    fn in_channels(&self, x: usize) -> usize {
        let mut v = x;
        while v > 0 {
            match &self.spec.nodes[v - 1].op {
                GraphOp::Conv { out_channels, .. } => return *out_channels,
                GraphOp::BatchNorm { channels, .. } => return *channels,
                _ => v = self.spec.nodes[v - 1].inputs[0],
            }
        }
        self.spec.input[0]
    }

    /// A bias-free 3x3 (or 1x1) conv with padding k/2, then BatchNorm.
    fn conv_bn(&mut self, name: &str, x: usize, cout: usize, k: usize, stride: usize) -> usize {
        let cin = self.in_channels(x);
        let op = GraphOp::Conv {
            in_channels: cin,
            out_channels: cout,
            kernel: [k, k],
            stride: [stride, stride],
            padding: [k / 2; 4],
            groups: 1,
            bias: false,
        };
        let y = self.push(format!("{name}.conv"), op, vec![x]);
        let bn = GraphOp::BatchNorm {
            channels: cout,
            eps: 1e-5,
        };
        self.push(format!("{name}.bn"), bn, vec![y])
    }

    fn linear(&mut self, name: &str, x: usize, din: usize, dout: usize) -> usize {
        let op = GraphOp::Linear {
            in_features: din,
            out_features: dout,
            bias: true,
        };
        self.push(name.into(), op, vec![x])
    }

    fn finish(mut self, taps: Vec<usize>, spec: &super::ModelSpec) -> GraphSpec {
        self.spec.exits = taps
            .into_iter()
            .zip(spec.table_one_pools())
            .map(|(node, pool)| ExitPoint { node, pool })
            .collect();
        self.spec
    }
}

/// One parameterized layer of a [`GraphNet`].
#[derive(Module, Debug)]
pub enum GraphLayer {
    /// A convolution.
    Conv(Conv2d),
    /// A batch normalization.
    Bn(BatchNorm),
    /// A fully connected layer.
    Linear(Linear),
}

/// The trainable network of a [`GraphSpec`] (module docs).
#[derive(Module, Debug)]
pub struct GraphNet {
    /// One layer per conv, BatchNorm and linear node, in node order.
    pub layers: Vec<GraphLayer>,
    /// The structure.
    #[module(skip)]
    pub spec: Arc<GraphSpec>,
}

/// Kaiming-normal, fan-out, ReLU gain (the authors' conv init).
fn kaiming() -> Initializer {
    Initializer::KaimingNormal {
        gain: std::f64::consts::SQRT_2,
        fan_out_only: true,
    }
}

enum Val {
    Map(Tensor<4>),
    Flat(Tensor<2>),
}

impl Val {
    /// The value as `[N, C, H, W]`; a flat `[N, F]` is the IR's `[N, F, 1, 1]`.
    fn map(self) -> Tensor<4> {
        match self {
            Val::Map(t) => t,
            Val::Flat(t) => {
                let [n, f] = t.dims();
                t.reshape([n, f, 1, 1])
            }
        }
    }

    fn flat(self) -> Tensor<2> {
        match self {
            Val::Map(t) => t.flatten::<2>(1, 3),
            Val::Flat(t) => t,
        }
    }
}

impl GraphNet {
    /// Fresh parameters for `spec` on `device`: convs Kaiming-normal (fan-out, ReLU gain),
    /// BatchNorm 1/0, linears PyTorch's default, created in node order.
    pub fn init(spec: GraphSpec, device: &Device) -> Self {
        // Burn draws a parameter's random values on its first use, in the module's visiting
        // order: node order here, as in the hand-written VGG-8 and ResNet-18, so a seed gives the
        // weights it gave them.
        let layers = spec
            .nodes
            .iter()
            .filter_map(|n| Self::init_layer(&n.op, device))
            .collect();
        GraphNet {
            layers,
            spec: Arc::new(spec),
        }
    }

    /// A fresh layer for a conv, BatchNorm or linear node (`None` for any other).
    fn init_layer(op: &GraphOp, device: &Device) -> Option<GraphLayer> {
        Some(match *op {
            GraphOp::Conv {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding: [t, l, b, r],
                groups,
                bias,
            } => GraphLayer::Conv(
                Conv2dConfig::new([in_channels, out_channels], kernel)
                    .with_stride(stride)
                    .with_padding(PaddingConfig2d::Explicit(t, l, b, r))
                    .with_groups(groups)
                    .with_bias(bias)
                    .with_initializer(kaiming())
                    .init(device),
            ),
            GraphOp::BatchNorm { channels, eps } => GraphLayer::Bn(
                BatchNormConfig::new(channels)
                    .with_epsilon(eps)
                    .init(device),
            ),
            GraphOp::Linear {
                in_features,
                out_features,
                bias,
            } => GraphLayer::Linear(
                LinearConfig::new(in_features, out_features)
                    .with_bias(bias)
                    .init(device),
            ),
            _ => return None,
        })
    }

    /// The network of `net` with its weights, BatchNorm parameters and statistics, and `spec`'s
    /// exits.
    pub fn from_network(net: &Network, exits: Vec<ExitPoint>, device: &Device) -> Result<Self> {
        let spec = GraphSpec {
            exits,
            ..GraphSpec::from_network(net)?
        };
        spec.check()?;
        let mut g = GraphNet::init(spec, device);
        g.load_network(net)?;
        Ok(g)
    }

    /// Copies `net`'s parameters (same structure) into this network, keeping parameter ids.
    pub fn load_network(&mut self, net: &Network) -> Result<()> {
        let params: Vec<&Op> = net
            .nodes
            .iter()
            .map(|n| &n.op)
            .filter(|op| matches!(op, Op::Conv2d(_) | Op::BatchNorm(_) | Op::Linear(_)))
            .collect();
        ensure!(
            params.len() == self.layers.len(),
            "the network has {} parameterized nodes, this model {}",
            params.len(),
            self.layers.len()
        );
        for (k, (layer, op)) in self.layers.iter_mut().zip(params).enumerate() {
            match (layer, op) {
                (GraphLayer::Conv(c), Op::Conv2d(w)) => {
                    c.weight = set(&c.weight, &w.weight)?;
                    if let (Some(b), Some(v)) = (&mut c.bias, &w.bias) {
                        *b = set(b, v)?;
                    }
                }
                (GraphLayer::Bn(b), Op::BatchNorm(p)) => {
                    b.gamma = set(&b.gamma, &p.gamma)?;
                    b.beta = set(&b.beta, &p.beta)?;
                    let dev = b.gamma.val().device();
                    let t = |v: &Vec<f32>| {
                        Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &dev)
                    };
                    b.running_mean.update(t(&p.mean));
                    b.running_var.update(t(&p.var));
                    let _ = b.running_mean.value_sync();
                    let _ = b.running_var.value_sync();
                }
                (GraphLayer::Linear(l), Op::Linear(p)) => {
                    // Canonical [out, in] -> Burn's [in, out].
                    let [din, dout] = l.weight.val().dims();
                    ensure!(
                        p.weight.len() == din * dout,
                        "linear layer {k}: {} weights for [{dout}, {din}]",
                        p.weight.len()
                    );
                    let mut t = vec![0f32; din * dout];
                    for o in 0..dout {
                        for i in 0..din {
                            t[i * dout + o] = p.weight[o * din + i];
                        }
                    }
                    l.weight = set(&l.weight, &t)?;
                    if let (Some(b), Some(v)) = (&mut l.bias, &p.bias) {
                        *b = set(b, v)?;
                    }
                }
                (_, op) => bail!("parameterized node {k}: the model has no {}", op.kind()),
            }
        }
        Ok(())
    }

    /// The structure.
    pub fn spec(&self) -> &GraphSpec {
        &self.spec
    }

    /// Logits and the outputs of the exit nodes (when `want_taps`), shallowest first.
    pub fn forward_taps(&self, x: Tensor<4>, want_taps: bool) -> (Tensor<2>, Vec<Tensor<4>>) {
        let spec = &*self.spec;
        let n = spec.nodes.len();
        let mut last_use = vec![0usize; n + 1];
        for (i, node) in spec.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_use[v] = last_use[v].max(i);
            }
        }
        let mut vals: Vec<Option<Val>> = Vec::with_capacity(n + 1);
        vals.push(Some(Val::Map(x)));
        let mut taps = Vec::new();
        let mut layer = 0;
        for (i, node) in spec.nodes.iter().enumerate() {
            let mut take = |v: usize| -> Val {
                let slot = &mut vals[v];
                if last_use[v] == i && node.inputs.iter().filter(|&&u| u == v).count() == 1 {
                    slot.take().expect("a value is read before it is dropped")
                } else {
                    match slot.as_ref().expect("a value is read before it is dropped") {
                        Val::Map(t) => Val::Map(t.clone()),
                        Val::Flat(t) => Val::Flat(t.clone()),
                    }
                }
            };
            let a = take(node.inputs[0]);
            let out = match &node.op {
                GraphOp::Conv { .. } => {
                    let GraphLayer::Conv(c) = &self.layers[layer] else {
                        unreachable!("layers follow the nodes")
                    };
                    layer += 1;
                    Val::Map(conv(c, a.map()))
                }
                GraphOp::BatchNorm { .. } => {
                    let GraphLayer::Bn(b) = &self.layers[layer] else {
                        unreachable!("layers follow the nodes")
                    };
                    layer += 1;
                    Val::Map(crate::kernels::backend::batch_norm(b, a.map()))
                }
                GraphOp::Linear { .. } => {
                    let GraphLayer::Linear(l) = &self.layers[layer] else {
                        unreachable!("layers follow the nodes")
                    };
                    layer += 1;
                    Val::Flat(l.forward(a.flat()))
                }
                GraphOp::Relu => match a {
                    Val::Map(t) => Val::Map(crate::kernels::backend::relu(t)),
                    Val::Flat(t) => Val::Flat(crate::kernels::backend::relu(t)),
                },
                &GraphOp::Clip { min, max } => match a {
                    Val::Map(t) => Val::Map(t.clamp(min, max)),
                    Val::Flat(t) => Val::Flat(t.clamp(min, max)),
                },
                &GraphOp::MaxPool {
                    kernel,
                    stride,
                    padding: [t, l, b, r],
                } => {
                    let pool: MaxPool2d = MaxPool2dConfig::new(kernel)
                        .with_strides(stride)
                        .with_padding(if [t, l, b, r] == [0; 4] {
                            PaddingConfig2d::Valid
                        } else {
                            PaddingConfig2d::Explicit(t, l, b, r)
                        })
                        .init();
                    Val::Map(crate::kernels::backend::max_pool2d(&pool, a.map()))
                }
                &GraphOp::AvgPool {
                    kernel,
                    stride,
                    padding: [t, l, b, r],
                    count_include_pad,
                } => {
                    let pool = AvgPool2dConfig::new(kernel)
                        .with_strides(stride)
                        .with_padding(PaddingConfig2d::Explicit(t, l, b, r))
                        .with_count_include_pad(count_include_pad)
                        .init();
                    Val::Map(pool.forward(a.map()))
                }
                GraphOp::GlobalAvgPool => {
                    Val::Map(AdaptiveAvgPool2dConfig::new([1, 1]).init().forward(a.map()))
                }
                GraphOp::Flatten => Val::Flat(a.flat()),
                GraphOp::Add => {
                    let b = take(node.inputs[1]);
                    match (a, b) {
                        (Val::Flat(a), b) => Val::Flat(a + b.flat()),
                        (a, b) => Val::Map(a.map() + b.map()),
                    }
                }
                GraphOp::Concat => {
                    let b = take(node.inputs[1]);
                    Val::Map(Tensor::cat(vec![a.map(), b.map()], 1))
                }
            };
            if want_taps
                && spec.exits.iter().any(|e| e.node == i)
                && let Val::Map(t) = &out
            {
                taps.push(t.clone());
            }
            vals.push(Some(out));
        }
        let logits = vals
            .pop()
            .flatten()
            .expect("the last node's output is the logits")
            .flat();
        (logits, taps)
    }

    /// The parameters as an [`ir::Network`] with `normalization` and `provenance`.
    pub fn to_network(&self, provenance: Provenance) -> Result<Network> {
        let mut net = self.spec.skeleton();
        net.provenance = provenance;
        let mut layers = self.layers.iter();
        for node in &mut net.nodes {
            if !matches!(node.op, Op::Conv2d(_) | Op::BatchNorm(_) | Op::Linear(_)) {
                continue;
            }
            let layer = layers.next().context("fewer layers than nodes")?;
            match (&mut node.op, layer) {
                (Op::Conv2d(c), GraphLayer::Conv(l)) => {
                    c.weight = to_vec(l.weight.val());
                    c.bias = l.bias.as_ref().map(|b| to_vec(b.val()));
                }
                (Op::BatchNorm(p), GraphLayer::Bn(b)) => {
                    p.gamma = to_vec(b.gamma.val());
                    p.beta = to_vec(b.beta.val());
                    p.mean = to_vec(b.running_mean.value_sync());
                    p.var = to_vec(b.running_var.value_sync());
                    p.eps = b.epsilon as f32;
                }
                (Op::Linear(p), GraphLayer::Linear(l)) => {
                    p.weight = to_vec(l.weight.val().transpose());
                    p.bias = l.bias.as_ref().map(|b| to_vec(b.val()));
                }
                _ => bail!("node `{}` does not match its layer", node.name),
            }
        }
        net.shapes()
            .context("the trained network is inconsistent")?;
        Ok(net)
    }
}

/// `conv.forward(x)` on the project's kernels where they cover it; a bias is added after the
/// bias-free kernel so that biased convolutions (BatchNorm folded in) stay on them.
fn conv(c: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match &c.bias {
        Some(b) if c.groups == 1 => {
            let plain = Conv2d {
                weight: c.weight.clone(),
                bias: None,
                stride: c.stride,
                kernel_size: c.kernel_size,
                dilation: c.dilation,
                groups: c.groups,
                padding: c.padding.clone(),
            };
            let [o] = b.val().dims();
            crate::kernels::backend::conv2d(&plain, x) + b.val().reshape([1, o, 1, 1])
        }
        _ => crate::kernels::backend::conv2d(c, x),
    }
}

fn set<const D: usize>(p: &Param<Tensor<D>>, v: &[f32]) -> Result<Param<Tensor<D>>> {
    let t = p.val();
    let shape = t.dims();
    ensure!(
        shape.iter().product::<usize>() == v.len(),
        "expected {shape:?} = {} values, got {}",
        shape.iter().product::<usize>(),
        v.len()
    );
    let new = Tensor::<D>::from_data(TensorData::new(v.to_vec(), shape), &t.device());
    let new = if t.is_require_grad() {
        new.require_grad()
    } else {
        new
    };
    Ok(p.clone().map(|_| new))
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float tensors convert to f32")
}
