//! The packed-model writer (feature `alloc`): turns a float-level model description into a
//! [`super`] blob, folding BatchNorm into the requantization records and ReLU into the
//! producing op, quantizing the weights and planning the activation arena. Also a float64
//! forward pass of the same description ([`forward`]) for activation calibration ([`calibrate`])
//! and as the reference the integer engine is tested against ([`noisy_weights`]).
//!
//! # Model description
//!
//! A [`ModelDesc`] is a list of [`Node`]s in forward order. A node reads the previous node's
//! output (or the image, for node 0) unless [`Node::input`] names another node; [`Layer::Add`]
//! adds a second node's output. Every node carries `act_max`, the calibrated largest `|value|`
//! of its float output on training data; it sets the scale of the integer tensor where that
//! output is materialized (`act_max / 255` after a ReLU, `act_max / 127` otherwise,
//! `act_max / 2^20` for the `i32` logits). Weight layers (conv and linear) are numbered in node
//! order, which must be the backbone's forward order.
//!
//! Fusion: a conv or linear node followed by a `BatchNorm` and/or a `Relu` or `Clip` that read
//! only it (and that no other node reads) becomes one op; so does an add or a concat followed by
//! a `Relu` or `Clip`. The activation becomes the requantization's saturation bounds: `[0, 255]`
//! for a ReLU, `[round(min / s), round(max / s)]` within the output type's range for a clip at
//! output scale `s`; the output is `u8` when the activation's lower bound is `>= 0` (a concat's
//! also when both of its inputs are `u8`), `i8` otherwise. Any other `Relu` or `Clip` is its own
//! op (input scale kept); a `BatchNorm` that does not follow a conv or linear is an error.
//! `Flatten` is a view (`CHW` order, as PyTorch's `flatten(1)`).
//!
//! Logits: the last node, not counting trailing `Flatten`s that read it (views of the logits),
//! writes the `i32` logits at scale `act_max / 2^20` of that node and must produce
//! `(classes, 1, 1)`. It is either a conv or linear (optionally with BatchNorm, without an
//! activation), or a `GlobalAvgPool`: SqueezeNet's head `Conv 1x1 (classes) -> Relu ->
//! GlobalAveragePool -> Flatten`, where the conv fuses its ReLU as anywhere else (writing `u8`)
//! and the pool's one record rescales each channel's window sum from the conv's scale to the
//! logits' (`x.scale / (H W) / out_scale`), saturated to `±(2^31 - 1)`. This is a combination
//! the version-2 format allows, not a layout change: the blob stays version 2, and every model
//! that packed before packs to the same bytes. A global pool's window `H W` must not exceed
//! [`crate::format::MAX_POOL_WINDOW`] (`node.pool_window`, naming the node).
//!
//! A `Concat` rescales both inputs to its own calibrated scale with one record each (as `Add`
//! does), so its inputs keep their own scales; both stay live in the arena until it has run.

use alloc::vec::Vec;

use super::Shape;
use crate::error::{Error, Result};
use crate::quant::ScaleMode;
use crate::variation::VariationConfig;

mod forward;
mod pack;

pub use forward::{
    Readback, act_scales, activation_max, calibrate, calibrate_with, forward, noisy_weights,
};
pub use pack::pack;

/// The input: shape and per-channel normalization `(pixel / 255 - mean) / std`.
#[derive(Debug, Clone, Copy)]
pub struct InputSpec<'a> {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Per-channel mean (of pixels scaled to `[0, 1]`).
    pub mean: &'a [f32],
    /// Per-channel standard deviation.
    pub std: &'a [f32],
}

/// One float layer.
#[derive(Debug, Clone, Copy)]
pub enum Layer<'a> {
    /// Convolution, possibly grouped (depthwise when `groups` equals the input and output
    /// channels); `weight` in PyTorch's `[out][in / groups][kh][kw]` order.
    Conv2d {
        /// Weights, `out_channels * in / groups * kh * kw`.
        weight: &'a [f32],
        /// Optional bias, `out_channels`.
        bias: Option<&'a [f32]>,
        /// Output channels.
        out_channels: usize,
        /// Kernel `[kh, kw]` (each 1..=255).
        kernel: [usize; 2],
        /// Stride `[sh, sw]` (each 1..=255).
        stride: [usize; 2],
        /// Zero padding `[top, left, bottom, right]`, each below its kernel side.
        padding: [usize; 4],
        /// Groups, dividing the input and output channels.
        groups: usize,
    },
    /// Fully connected over the flattened input; `weight` in `[out][in]` order (transpose Burn's
    /// `[in, out]` first).
    Linear {
        /// Weights, `out_features * in`.
        weight: &'a [f32],
        /// Optional bias.
        bias: Option<&'a [f32]>,
        /// Outputs.
        out_features: usize,
    },
    /// Inference-mode BatchNorm: `(x - mean) / sqrt(var + eps) * gamma + beta` per channel.
    BatchNorm {
        /// Scale.
        gamma: &'a [f32],
        /// Shift.
        beta: &'a [f32],
        /// Running mean.
        mean: &'a [f32],
        /// Running variance.
        var: &'a [f32],
        /// Epsilon.
        eps: f32,
    },
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)` (ReLU6 is `Clip { min: 0.0, max: 6.0 }`).
    Clip {
        /// Lower bound (finite, `<= max`).
        min: f32,
        /// Upper bound (finite).
        max: f32,
    },
    /// Max pooling in floor mode; padded positions are ignored (PyTorch's `-inf` padding).
    MaxPool {
        /// Window `[kh, kw]` (each 1..=255).
        kernel: [usize; 2],
        /// Stride `[sh, sw]` (each 1..=255).
        stride: [usize; 2],
        /// Padding `[top, left, bottom, right]`, each below its kernel side.
        padding: [usize; 4],
    },
    /// Average pooling in floor mode.
    AvgPool {
        /// Window `[kh, kw]` (each 1..=255).
        kernel: [usize; 2],
        /// Stride `[sh, sw]` (each 1..=255).
        stride: [usize; 2],
        /// Padding `[top, left, bottom, right]`, each below its kernel side.
        padding: [usize; 4],
        /// Divide by `kh * kw` (`true`) or by the in-bounds positions of each window.
        count_include_pad: bool,
    },
    /// Mean over height and width (to `(C, 1, 1)`).
    GlobalAvgPool,
    /// Flatten to a vector (a view).
    Flatten,
    /// Residual add: this node's input plus node `other`'s output.
    Add {
        /// The other summand.
        other: usize,
    },
    /// Channel concatenation: this node's input's channels, then node `other`'s output's (same
    /// height and width).
    Concat {
        /// The second part.
        other: usize,
    },
}

/// A node of the description.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    /// What it computes.
    pub layer: Layer<'a>,
    /// The node it reads; `None` is the previous node (the image for node 0).
    pub input: Option<usize>,
    /// Calibrated largest `|output|` (see the module docs).
    pub act_max: f32,
}

impl<'a> Node<'a> {
    /// A node reading the previous one, with `act_max` 1 (set it with [`calibrate`]).
    pub const fn new(layer: Layer<'a>) -> Self {
        Node {
            layer,
            input: None,
            act_max: 1.0,
        }
    }
}

/// A float model.
#[derive(Debug, Clone, Copy)]
pub struct ModelDesc<'a> {
    /// The input.
    pub input: InputSpec<'a>,
    /// Number of classes.
    pub classes: usize,
    /// The nodes in forward order.
    pub nodes: &'a [Node<'a>],
}

/// How to pack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackConfig {
    /// Quantization and device variation the model is packed for.
    pub variation: VariationConfig,
    /// Crossbar rows (1..=256).
    pub tile_rows: usize,
    /// Crossbar columns.
    pub tile_cols: usize,
    /// Per-layer or per-model `max|W|`.
    pub scale_mode: ScaleMode,
}

impl PackConfig {
    /// 128 x 128 tiles, per-layer scales.
    pub fn new(variation: VariationConfig) -> Self {
        PackConfig {
            variation,
            tile_rows: 128,
            tile_cols: 128,
            scale_mode: ScaleMode::PerLayer,
        }
    }
}

/// Test images (raw `CHW` pixels, back to back) and labels to pack with the model.
#[derive(Debug, Clone, Copy)]
pub struct TestBatch<'a> {
    /// `n * C * H * W` pixels.
    pub images: &'a [u8],
    /// `n` labels.
    pub labels: &'a [u16],
}

fn invalid(field: &'static str, value: usize) -> Error {
    Error::InvalidField {
        field,
        value: value as i64,
    }
}

/// The node a node reads (`usize::MAX` is the image).
fn source(nodes: &[Node<'_>], i: usize) -> usize {
    match nodes[i].input {
        Some(j) => j,
        None if i == 0 => usize::MAX,
        None => i - 1,
    }
}

/// Node output shapes, checking every reference and size.
fn shapes(desc: &ModelDesc<'_>) -> Result<Vec<Shape>> {
    let inp = desc.input;
    if inp.channels == 0 || inp.height == 0 || inp.width == 0 {
        return Err(invalid("input.shape", 0));
    }
    if inp.mean.len() != inp.channels || inp.std.len() != inp.channels {
        return Err(invalid("input.mean_std", inp.mean.len()));
    }
    let input = Shape {
        c: inp.channels,
        h: inp.height,
        w: inp.width,
    };
    let mut out: Vec<Shape> = Vec::with_capacity(desc.nodes.len());
    for (i, n) in desc.nodes.iter().enumerate() {
        let s = source(desc.nodes, i);
        if s != usize::MAX && s >= i {
            return Err(invalid("node.input", i));
        }
        let x = if s == usize::MAX { input } else { out[s] };
        let window = |k: [usize; 2], st: [usize; 2], p: [usize; 4]| -> Result<(usize, usize)> {
            if k.iter().chain(&st).any(|&v| v > 255) || p.iter().any(|&v| v > 255) {
                return Err(invalid("node.window", i));
            }
            match (
                super::out_dim(x.h, k[0], st[0], p[0], p[2]),
                super::out_dim(x.w, k[1], st[1], p[1], p[3]),
            ) {
                (Some(h), Some(w)) => Ok((h, w)),
                _ => Err(invalid("node.window", i)),
            }
        };
        let y = match n.layer {
            Layer::Conv2d {
                weight,
                bias,
                out_channels,
                kernel,
                stride,
                padding,
                groups,
            } => {
                let (h, w) = window(kernel, stride, padding)?;
                if groups == 0
                    || groups > 0xFFFF
                    || x.c % groups != 0
                    || out_channels % groups != 0
                    || out_channels == 0
                {
                    return Err(invalid("node.groups", i));
                }
                let expected = out_channels * (x.c / groups) * kernel[0] * kernel[1];
                if weight.len() != expected {
                    return Err(Error::LengthMismatch {
                        expected,
                        found: weight.len(),
                    });
                }
                if bias.is_some_and(|b| b.len() != out_channels) {
                    return Err(invalid("node.conv", i));
                }
                Shape {
                    c: out_channels,
                    h,
                    w,
                }
            }
            Layer::Linear {
                weight,
                bias,
                out_features,
            } => {
                if weight.len() != out_features * x.len() || out_features == 0 {
                    return Err(Error::LengthMismatch {
                        expected: out_features * x.len(),
                        found: weight.len(),
                    });
                }
                if bias.is_some_and(|b| b.len() != out_features) {
                    return Err(invalid("node.bias", i));
                }
                Shape {
                    c: out_features,
                    h: 1,
                    w: 1,
                }
            }
            Layer::BatchNorm {
                gamma,
                beta,
                mean,
                var,
                ..
            } => {
                if [gamma.len(), beta.len(), mean.len(), var.len()] != [x.c; 4] {
                    return Err(invalid("node.batchnorm", i));
                }
                x
            }
            Layer::Relu => x,
            Layer::Clip { min, max } => {
                if !(min.is_finite() && max.is_finite() && min <= max) {
                    return Err(invalid("node.clip", i));
                }
                x
            }
            Layer::MaxPool {
                kernel,
                stride,
                padding,
            }
            | Layer::AvgPool {
                kernel,
                stride,
                padding,
                ..
            } => {
                let (h, w) = window(kernel, stride, padding)?;
                Shape { c: x.c, h, w }
            }
            Layer::GlobalAvgPool => Shape { c: x.c, h: 1, w: 1 },
            Layer::Flatten => Shape {
                c: x.len(),
                h: 1,
                w: 1,
            },
            Layer::Add { other } => {
                if other >= i || out[other].len() != x.len() {
                    return Err(invalid("node.add", i));
                }
                x
            }
            Layer::Concat { other } => {
                if other >= i || out[other].h != x.h || out[other].w != x.w {
                    return Err(invalid("node.concat", i));
                }
                Shape {
                    c: x.c + out[other].c,
                    h: x.h,
                    w: x.w,
                }
            }
        };
        if y.c > 0xFFFF || y.h > 0xFFFF || y.w > 0xFFFF {
            return Err(invalid("node.shape", i));
        }
        out.push(y);
    }
    Ok(out)
}
