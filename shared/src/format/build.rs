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
//! Fusion: a conv or linear node followed by a `BatchNorm` and/or `Relu` that read only it (and
//! that no other node reads) becomes one op; so does an add followed by a ReLU. Any other ReLU is
//! its own op; a `BatchNorm` that does not follow a conv or linear is an error. `Flatten` is a
//! view (`CHW` order, as PyTorch's `flatten(1)`). The last node must be a conv or linear
//! (optionally with BatchNorm) producing `(classes, 1, 1)`.

use alloc::{vec, vec::Vec};

use super::{ActKind, HEADER_LEN, MAGIC, Model, OpKind, Shape, VERSION};
use crate::crc::crc32;
use crate::error::{Error, Result};
use crate::quant::{Quantized, ScaleMode, layer_scale, quantize_layer};
use crate::rng::stream;
use crate::tile::{FRAC_BITS, MAX_TILE_ROWS};
use crate::variation::{Profile, SigmaUnit, VariationConfig};

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
    /// Square-kernel convolution; `weight` in `[out][in][k][k]` order.
    Conv2d {
        /// Weights, `out_channels * in * kernel * kernel`.
        weight: &'a [f32],
        /// Optional bias, `out_channels`.
        bias: Option<&'a [f32]>,
        /// Output channels.
        out_channels: usize,
        /// Kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on each side.
        padding: usize,
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
    /// Max pooling without padding.
    MaxPool {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling without padding.
    AvgPool {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
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
        let window = |k: usize, st: usize, p: usize| -> Result<(usize, usize)> {
            match (super::out_dim(x.h, k, st, p), super::out_dim(x.w, k, st, p)) {
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
            } => {
                let (h, w) = window(kernel, stride, padding)?;
                if weight.len() != out_channels * x.c * kernel * kernel || out_channels == 0 {
                    return Err(Error::LengthMismatch {
                        expected: out_channels * x.c * kernel * kernel,
                        found: weight.len(),
                    });
                }
                if bias.is_some_and(|b| b.len() != out_channels)
                    || kernel > 255
                    || stride > 255
                    || padding >= kernel
                {
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
            Layer::MaxPool { kernel, stride } | Layer::AvgPool { kernel, stride } => {
                if kernel > 255 || stride > 255 {
                    return Err(invalid("node.pool", i));
                }
                let (h, w) = window(kernel, stride, 0)?;
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
        };
        if y.c > 0xFFFF || y.h > 0xFFFF || y.w > 0xFFFF {
            return Err(invalid("node.shape", i));
        }
        out.push(y);
    }
    Ok(out)
}

/// Per-channel input normalization, `(p / 255 - mean) / std`, in `f64`.
fn normalize(inp: &InputSpec<'_>, c: usize, p: u8) -> f64 {
    (f64::from(p) / 255.0 - f64::from(inp.mean[c])) / f64::from(inp.std[c])
}

/// The float64 forward pass: every node's output (`CHW`), with the description's weights or,
/// when `weights` is given, with those (one `Vec` per weight layer, canonical order).
pub fn forward(
    desc: &ModelDesc<'_>,
    weights: Option<&[Vec<f64>]>,
    image: &[u8],
) -> Result<Vec<Vec<f64>>> {
    let shapes = shapes(desc)?;
    let inp = desc.input;
    let input_shape = Shape {
        c: inp.channels,
        h: inp.height,
        w: inp.width,
    };
    if image.len() != input_shape.len() {
        return Err(Error::LengthMismatch {
            expected: input_shape.len(),
            found: image.len(),
        });
    }
    let plane = inp.height * inp.width;
    let x0: Vec<f64> = image
        .iter()
        .enumerate()
        .map(|(k, &p)| normalize(&inp, k / plane, p))
        .collect();
    let mut outs: Vec<Vec<f64>> = Vec::with_capacity(desc.nodes.len());
    let mut layer = 0;
    for (i, n) in desc.nodes.iter().enumerate() {
        let s = source(desc.nodes, i);
        let (x, xs) = if s == usize::MAX {
            (&x0, input_shape)
        } else {
            (&outs[s], shapes[s])
        };
        let ys = shapes[i];
        let mut own = Vec::new();
        let mut w_of = |w: &[f32]| -> Vec<f64> {
            let v = match weights {
                Some(ws) => ws.get(layer).cloned().unwrap_or_default(),
                None => w.iter().map(|&v| f64::from(v)).collect(),
            };
            layer += 1;
            v
        };
        let y: Vec<f64> = match n.layer {
            Layer::Conv2d {
                weight,
                bias,
                out_channels: _,
                kernel: k,
                stride,
                padding,
            } => {
                own = w_of(weight);
                if own.len() != weight.len() {
                    return Err(Error::LengthMismatch {
                        expected: weight.len(),
                        found: own.len(),
                    });
                }
                // One patch per output position in `[c][ky][kx]` order (padding as 0.0), then
                // one sequential dot per output channel: the same additions in the same order
                // as the direct loop (a padded term adds 0.0), several times faster.
                let fan_in = xs.c * k * k;
                let mut patch = vec![0.0f64; fan_in];
                let mut y = vec![0.0; ys.len()];
                for oy in 0..ys.h {
                    for ox in 0..ys.w {
                        let mut p = patch.iter_mut();
                        for c in 0..xs.c {
                            for ky in 0..k {
                                let iy = (oy * stride + ky) as isize - padding as isize;
                                for kx in 0..k {
                                    let ix = (ox * stride + kx) as isize - padding as isize;
                                    let inside = iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < xs.h
                                        && (ix as usize) < xs.w;
                                    if let Some(slot) = p.next() {
                                        *slot = if inside {
                                            x[(c * xs.h + iy as usize) * xs.w + ix as usize]
                                        } else {
                                            0.0
                                        };
                                    }
                                }
                            }
                        }
                        for (o, row) in own.chunks_exact(fan_in.max(1)).enumerate() {
                            y[(o * ys.h + oy) * ys.w + ox] = row
                                .iter()
                                .zip(&patch)
                                .fold(bias.map_or(0.0, |b| f64::from(b[o])), |a, (w, v)| a + w * v);
                        }
                    }
                }
                y
            }
            Layer::Linear {
                weight,
                bias,
                out_features,
            } => {
                own = w_of(weight);
                if own.len() != weight.len() {
                    return Err(Error::LengthMismatch {
                        expected: weight.len(),
                        found: own.len(),
                    });
                }
                let k = xs.len();
                (0..out_features)
                    .map(|o| {
                        bias.map_or(0.0, |b| f64::from(b[o]))
                            + (0..k).map(|j| own[o * k + j] * x[j]).sum::<f64>()
                    })
                    .collect()
            }
            Layer::BatchNorm {
                gamma,
                beta,
                mean,
                var,
                eps,
            } => {
                let hw = xs.h * xs.w;
                x.iter()
                    .enumerate()
                    .map(|(k, &v)| {
                        let c = k / hw;
                        let g =
                            f64::from(gamma[c]) / libm::sqrt(f64::from(var[c]) + f64::from(eps));
                        (v - f64::from(mean[c])) * g + f64::from(beta[c])
                    })
                    .collect()
            }
            Layer::Relu => x.iter().map(|&v| v.max(0.0)).collect(),
            Layer::MaxPool { kernel, stride } | Layer::AvgPool { kernel, stride } => {
                let max = matches!(n.layer, Layer::MaxPool { .. });
                let mut y = vec![0.0; ys.len()];
                for c in 0..ys.c {
                    for oy in 0..ys.h {
                        for ox in 0..ys.w {
                            let it = (0..kernel).flat_map(|ky| (0..kernel).map(move |kx| (ky, kx)));
                            let vals = it.map(|(ky, kx)| {
                                x[(c * xs.h + oy * stride + ky) * xs.w + ox * stride + kx]
                            });
                            y[(c * ys.h + oy) * ys.w + ox] = if max {
                                vals.fold(f64::NEG_INFINITY, f64::max)
                            } else {
                                vals.sum::<f64>() / (kernel * kernel) as f64
                            };
                        }
                    }
                }
                y
            }
            Layer::GlobalAvgPool => {
                let hw = xs.h * xs.w;
                x.chunks(hw)
                    .map(|ch| ch.iter().sum::<f64>() / hw as f64)
                    .collect()
            }
            Layer::Flatten => x.clone(),
            Layer::Add { other } => x.iter().zip(&outs[other]).map(|(a, b)| a + b).collect(),
        };
        drop(own);
        outs.push(y);
    }
    Ok(outs)
}

/// Largest `|output|` of every node over `images` (back-to-back raw `CHW` images): the
/// `act_max` values to put in the description.
pub fn calibrate(desc: &ModelDesc<'_>, images: &[u8]) -> Result<Vec<f32>> {
    calibrate_with(desc, &[None], images)
}

/// [`calibrate`] over several weight sets (`None`: the description's own), e.g. the clean
/// weights and a few Monte Carlo runs' [`noisy_weights`], so that the scales leave room for the
/// activations that device variation produces.
pub fn calibrate_with(
    desc: &ModelDesc<'_>,
    weights: &[Option<&[Vec<f64>]>],
    images: &[u8],
) -> Result<Vec<f32>> {
    Ok(act_scales(&activation_max(desc, weights, images)?))
}

/// The raw largest `|output|` of every node over `images` under each weight set (0 for a node
/// that never fires). Maxima of parts of the images combine by an elementwise maximum, so
/// callers may split the images between threads; [`act_scales`] turns the result into scales.
pub fn activation_max(
    desc: &ModelDesc<'_>,
    weights: &[Option<&[Vec<f64>]>],
    images: &[u8],
) -> Result<Vec<f64>> {
    let len = desc.input.channels * desc.input.height * desc.input.width;
    let mut max = vec![0.0f64; desc.nodes.len()];
    for w in weights {
        for img in images.chunks(len.max(1)) {
            for (m, out) in max.iter_mut().zip(forward(desc, *w, img)?) {
                *m = out.iter().fold(*m, |a, &v| a.max(v.abs()));
            }
        }
    }
    Ok(max)
}

/// Activation scales from [`activation_max`]: the maximum, or 1 for a node that never fires.
pub fn act_scales(max: &[f64]) -> Vec<f32> {
    max.iter()
        .map(|&m| if m > 0.0 { m as f32 } else { 1.0 })
        .collect()
}

/// How [`noisy_weights`] reads a device back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readback {
    /// `g_j + dg_j` exactly as sampled (the float engine's weights).
    Exact,
    /// `g_j + dg_j` rounded to the tile's fixed point ([`FRAC_BITS`] bits, saturated like the
    /// tile state): the integer engine's weights, exactly.
    Fixed,
}

/// Every weight layer's weights as programmed for run `run` under `seed`, in `f64`, from the same
/// [`VariationConfig::sample`] draws the integer engine programs: the float reference's weights.
pub fn noisy_weights(
    model: &Model<'_>,
    var: &VariationConfig,
    seed: u64,
    run: u32,
    readback: Readback,
) -> Result<Vec<Vec<f64>>> {
    let q = var.quant();
    let n = u32::from(q.n_bits());
    let lim = crate::tile::device_limit(q);
    let one = f64::from(1u32 << FRAC_BITS);
    let mut out = Vec::new();
    for i in 0..model.op_count() {
        let op = model.op(i)?;
        let Some(layer) = op.layer else { continue };
        let mut rng = stream(seed, run, layer as u32);
        let unit = f64::from(op.w_scale) / f64::from(q.max_magnitude());
        out.push(
            model
                .layer_weights(&op)
                .map(|w| {
                    let r = var.sample(w, &mut rng);
                    let m = match readback {
                        Readback::Exact => {
                            let d: f64 = r
                                .deltas()
                                .iter()
                                .enumerate()
                                .map(|(j, &d)| f64::from(d) * f64::from(1u32 << (j as u32 * n)))
                                .sum();
                            f64::from(w.magnitude) + d
                        }
                        Readback::Fixed => r
                            .devices_fixed(q, FRAC_BITS)
                            .iter()
                            .take(q.slices())
                            .enumerate()
                            .map(|(j, &v)| {
                                f64::from(v.clamp(-lim, lim)) / one
                                    * f64::from(1u32 << (j as u32 * n))
                            })
                            .sum(),
                    };
                    if w.negative { -m * unit } else { m * unit }
                })
                .collect(),
        );
    }
    Ok(out)
}

/// A real multiplier as `m * 2^-shift` with `2^22 <= |m| < 2^23` (or `shift = 62` for tiny
/// ones, `m = 0, shift = 30` for zero). Fails when `|r| >= 2^23`.
fn multiplier(r: f64, field: &'static str) -> Result<(i32, u32)> {
    if !r.is_finite() {
        return Err(Error::InvalidField {
            field,
            value: i64::MAX,
        });
    }
    if r == 0.0 {
        return Ok((0, 30));
    }
    let e = libm::floor(libm::log2(libm::fabs(r))) as i64;
    let mut shift = (22 - e).min(62);
    if shift < 0 {
        return Err(Error::InvalidField { field, value: e });
    }
    loop {
        let m = libm::round(r * libm::exp2(shift as f64));
        if libm::fabs(m) < f64::from(1u32 << 23) {
            return Ok((m as i32, shift as u32));
        }
        if shift == 0 {
            return Err(Error::InvalidField { field, value: e });
        }
        shift -= 1;
    }
}

fn bias_fixed(b: f64, shift: u32) -> Result<i64> {
    let v = libm::round(b * libm::exp2(f64::from(shift)));
    if v.is_finite() && libm::fabs(v) < libm::exp2(61.0) {
        Ok(v as i64)
    } else {
        Err(Error::InvalidField {
            field: "node.bias",
            value: i64::MAX,
        })
    }
}

struct OpRec {
    kind: OpKind,
    out_kind: ActKind,
    k: usize,
    stride: usize,
    pad: usize,
    src: usize,
    src2: usize,
    out: Shape,
    layer: Option<usize>,
    weights_start: usize,
    params_start: usize,
    out_scale: f32,
    w_scale: f32,
}

#[derive(Clone, Copy)]
struct TensorInfo {
    shape: Shape,
    kind: ActKind,
    scale: f64,
}

/// Packs a description into a blob (see [`super`] for the layout).
pub fn pack(
    desc: &ModelDesc<'_>,
    cfg: &PackConfig,
    test: Option<TestBatch<'_>>,
) -> Result<Vec<u8>> {
    let shapes = shapes(desc)?;
    let nodes = desc.nodes;
    let var = cfg.variation;
    let quant = var.quant();
    if !(1..=MAX_TILE_ROWS).contains(&cfg.tile_rows) || !(1..=0xFFFF).contains(&cfg.tile_cols) {
        return Err(invalid("pack.tile_rows", cfg.tile_rows));
    }
    let inp = desc.input;
    if inp.channels > 0xFFFF
        || inp.height > 0xFFFF
        || inp.width > 0xFFFF
        || desc.classes == 0
        || desc.classes > 0xFFFF
    {
        return Err(invalid("input.shape", inp.channels));
    }
    if nodes.is_empty() {
        return Err(invalid("nodes", 0));
    }
    // Readers of each node (inputs and add operands).
    let mut readers = vec![0usize; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let s = source(nodes, i);
        if s != usize::MAX {
            readers[s] += 1;
        }
        if let Layer::Add { other } = n.layer {
            readers[other] += 1;
        }
    }
    // Input table and scale.
    let mut in_max = 0.0f64;
    for c in 0..inp.channels {
        if !(inp.std[c].is_finite() && inp.std[c] > 0.0 && inp.mean[c].is_finite()) {
            return Err(invalid("input.std", c));
        }
        in_max = in_max
            .max(normalize(&inp, c, 0).abs())
            .max(normalize(&inp, c, 255).abs());
    }
    let in_scale = if in_max > 0.0 { in_max / 127.0 } else { 1.0 };
    let mut lut = Vec::with_capacity(inp.channels * 256);
    for c in 0..inp.channels {
        for p in 0..=255u8 {
            lut.push(
                libm::round(normalize(&inp, c, p) / in_scale).clamp(-127.0, 127.0) as i8 as u8,
            );
        }
    }
    // Weight scales.
    let mut model_max = 0.0f32;
    for n in nodes {
        if let Layer::Conv2d { weight, .. } | Layer::Linear { weight, .. } = n.layer {
            model_max = model_max.max(layer_scale(weight)?);
        }
    }

    let mut tensors = vec![TensorInfo {
        shape: Shape {
            c: inp.channels,
            h: inp.height,
            w: inp.width,
        },
        kind: ActKind::I8,
        scale: in_scale,
    }];
    let mut node_tensor = vec![usize::MAX; nodes.len()];
    let mut ops: Vec<OpRec> = Vec::new();
    let mut records: Vec<(i32, u32, i64)> = Vec::new();
    let mut weights: Vec<u16> = Vec::new();
    let mut layer = 0usize;
    let tensor_of =
        |node_tensor: &[usize], s: usize| if s == usize::MAX { 0 } else { node_tensor[s] };
    let act_scale = |node: usize, relu: bool, last: bool| -> Result<(ActKind, f64)> {
        let a = f64::from(nodes[node].act_max);
        if !(a.is_finite() && a > 0.0) {
            return Err(invalid("node.act_max", node));
        }
        Ok(if last {
            (ActKind::I32, a / f64::from(1u32 << 20))
        } else if relu {
            (ActKind::U8, a / 255.0)
        } else {
            (ActKind::I8, a / 127.0)
        })
    };
    // Whether node `j + 1` exists, is `want`, reads only node `j`, and node `j` has no other reader.
    let fusable = |j: usize, want: fn(&Layer<'_>) -> bool| {
        j + 1 < nodes.len()
            && nodes[j + 1].input.is_none()
            && readers[j] == 1
            && want(&nodes[j + 1].layer)
    };
    let mut i = 0;
    while i < nodes.len() {
        let n = nodes[i];
        let src_t = tensor_of(&node_tensor, source(nodes, i));
        if src_t == usize::MAX {
            return Err(invalid("node.input", i));
        }
        let x = tensors[src_t];
        let mut end = i;
        let rec = match n.layer {
            Layer::Conv2d { weight, bias, .. } | Layer::Linear { weight, bias, .. } => {
                let (k, stride, pad, kind) = match n.layer {
                    Layer::Conv2d {
                        kernel,
                        stride,
                        padding,
                        ..
                    } => (kernel, stride, padding, OpKind::Conv),
                    _ => (1, 1, 0, OpKind::Linear),
                };
                let out = shapes[i];
                let mut bn = None;
                if fusable(end, |l| matches!(l, Layer::BatchNorm { .. })) {
                    end += 1;
                    bn = Some(nodes[end].layer);
                }
                let relu = fusable(end, |l| matches!(l, Layer::Relu));
                if relu {
                    end += 1;
                }
                let last = end + 1 == nodes.len();
                if last && relu {
                    return Err(invalid("node.last_relu", end));
                }
                if last && (out.c != desc.classes || out.h != 1 || out.w != 1) {
                    return Err(invalid("node.logits_shape", out.c));
                }
                let (out_kind, out_scale) = act_scale(end, relu, last)?;
                let scale = match cfg.scale_mode {
                    ScaleMode::PerLayer => layer_scale(weight)?,
                    ScaleMode::PerModel => model_max,
                };
                let mut q = vec![Quantized::default(); weight.len()];
                quantize_layer(weight, Some(scale), quant, &mut q)?;
                let weights_start = weights.len();
                weights.extend(q.iter().map(|q| u16::from(q.negative) << 15 | q.magnitude));
                let params_start = records.len();
                let unit = x.scale * f64::from(scale)
                    / f64::from(quant.max_magnitude())
                    / f64::from(1u32 << FRAC_BITS);
                for o in 0..out.c {
                    let b = bias.map_or(0.0, |b| f64::from(b[o]));
                    let (g, shift_b) = match bn {
                        Some(Layer::BatchNorm {
                            gamma,
                            beta,
                            mean,
                            var,
                            eps,
                        }) => {
                            let g = f64::from(gamma[o])
                                / libm::sqrt(f64::from(var[o]) + f64::from(eps));
                            (g, (b - f64::from(mean[o])) * g + f64::from(beta[o]))
                        }
                        _ => (1.0, b),
                    };
                    let (m, shift) = multiplier(unit * g / out_scale, "node.multiplier")?;
                    records.push((m, shift, bias_fixed(shift_b / out_scale, shift)?));
                }
                let rec = OpRec {
                    kind,
                    out_kind,
                    k,
                    stride,
                    pad,
                    src: src_t,
                    src2: 0,
                    out,
                    layer: Some(layer),
                    weights_start,
                    params_start,
                    out_scale: out_scale as f32,
                    w_scale: scale,
                };
                layer += 1;
                tensors.push(TensorInfo {
                    shape: out,
                    kind: out_kind,
                    scale: out_scale,
                });
                rec
            }
            Layer::BatchNorm { .. } => return Err(invalid("node.batchnorm_position", i)),
            Layer::Flatten => {
                node_tensor[i] = src_t;
                i += 1;
                continue;
            }
            Layer::Relu => {
                tensors.push(TensorInfo {
                    shape: x.shape,
                    kind: ActKind::U8,
                    scale: x.scale,
                });
                simple(
                    OpKind::Relu,
                    ActKind::U8,
                    src_t,
                    x.shape,
                    0,
                    0,
                    records.len(),
                    x.scale,
                )
            }
            Layer::MaxPool { kernel, stride } => {
                tensors.push(TensorInfo {
                    shape: shapes[i],
                    kind: x.kind,
                    scale: x.scale,
                });
                simple(
                    OpKind::MaxPool,
                    x.kind,
                    src_t,
                    shapes[i],
                    kernel,
                    stride,
                    records.len(),
                    x.scale,
                )
            }
            Layer::AvgPool { .. } | Layer::GlobalAvgPool => {
                let (kind, k, stride, window) = match n.layer {
                    Layer::AvgPool { kernel, stride } => {
                        (OpKind::AvgPool, kernel, stride, kernel * kernel)
                    }
                    _ => (OpKind::GlobalAvgPool, 0, 0, x.shape.h * x.shape.w),
                };
                let (m, shift) = multiplier(1.0 / window as f64, "node.pool")?;
                let rec = simple(
                    kind,
                    x.kind,
                    src_t,
                    shapes[i],
                    k,
                    stride,
                    records.len(),
                    x.scale,
                );
                records.push((m, shift, 0));
                tensors.push(TensorInfo {
                    shape: shapes[i],
                    kind: x.kind,
                    scale: x.scale,
                });
                rec
            }
            Layer::Add { other } => {
                let y_t = node_tensor[other];
                let y = tensors[y_t];
                let relu = fusable(end, |l| matches!(l, Layer::Relu));
                if relu {
                    end += 1;
                }
                if end + 1 == nodes.len() {
                    return Err(invalid("node.last", end));
                }
                let (out_kind, out_scale) = act_scale(end, relu, false)?;
                let (ra, rb) = (x.scale / out_scale, y.scale / out_scale);
                let (_, shift) = multiplier(ra.max(rb), "node.add")?;
                let (ma, mb) = (
                    libm::round(ra * libm::exp2(f64::from(shift))),
                    libm::round(rb * libm::exp2(f64::from(shift))),
                );
                let mut rec = simple(
                    OpKind::Add,
                    out_kind,
                    src_t,
                    x.shape,
                    0,
                    0,
                    records.len(),
                    out_scale,
                );
                rec.src2 = y_t;
                records.push((ma as i32, shift, 0));
                records.push((mb as i32, shift, 0));
                tensors.push(TensorInfo {
                    shape: x.shape,
                    kind: out_kind,
                    scale: out_scale,
                });
                rec
            }
        };
        ops.push(rec);
        for t in node_tensor.iter_mut().take(end + 1).skip(i) {
            *t = tensors.len() - 1;
        }
        i = end + 1;
    }
    if ops.len() > super::MAX_OPS || ops.last().map(|o| o.out_kind) != Some(ActKind::I32) {
        return Err(invalid("nodes.count", ops.len()));
    }

    // Arena: first fit against every earlier tensor still to be read by this op or a later one.
    let n_t = tensors.len();
    let mut last_use = (0..n_t).map(|t| t.saturating_sub(1)).collect::<Vec<_>>();
    for (k, op) in ops.iter().enumerate() {
        last_use[op.src] = last_use[op.src].max(k);
        if op.kind == OpKind::Add {
            last_use[op.src2] = last_use[op.src2].max(k);
        }
    }
    let mut off = vec![0usize; n_t];
    let mut act_bytes = 0usize;
    for t in 0..n_t {
        if tensors[t].kind == ActKind::I32 {
            continue;
        }
        let len = tensors[t].shape.len();
        let producer = t.saturating_sub(1);
        let live: Vec<(usize, usize)> = (0..t)
            .filter(|&u| tensors[u].kind != ActKind::I32 && last_use[u] >= producer)
            .map(|u| (off[u], off[u] + tensors[u].shape.len()))
            .collect();
        let candidates = core::iter::once(0).chain(live.iter().map(|r| r.1));
        let fits = |a: usize| live.iter().all(|&(s, e)| a + len <= s || a >= e);
        let a = candidates.filter(|&a| fits(a)).min().unwrap_or(0);
        off[t] = a;
        act_bytes = act_bytes.max(a + len);
    }
    let patch_len = ops
        .iter()
        .map(|o| match o.kind {
            OpKind::Conv => tensors[o.src].shape.c * o.k * o.k,
            OpKind::Linear => tensors[o.src].shape.len(),
            _ => 0,
        })
        .max()
        .unwrap_or(0);

    let (images, labels) = match test {
        Some(t) => {
            let len = inp.channels * inp.height * inp.width;
            if t.images.len() != t.labels.len() * len {
                return Err(Error::LengthMismatch {
                    expected: t.labels.len() * len,
                    found: t.images.len(),
                });
            }
            if let Some(&l) = t.labels.iter().find(|&&l| usize::from(l) >= desc.classes) {
                return Err(invalid("test.label", usize::from(l)));
            }
            (t.images, t.labels)
        }
        None => (&[][..], &[][..]),
    };

    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.push(quant.m_bits());
    b.push(quant.n_bits());
    b.extend_from_slice(&var.sigma().to_le_bytes());
    b.push(match var.unit() {
        SigmaUnit::Range => 0,
        SigmaUnit::Level => 1,
    });
    b.push(match var.profile() {
        Profile::Uniform => 0,
        Profile::Rram1 => 1,
        Profile::Fefet2 => 2,
        Profile::Rram4 => 3,
        Profile::Fefet6 => 4,
    });
    b.push(match cfg.scale_mode {
        ScaleMode::PerLayer => 0,
        ScaleMode::PerModel => 1,
    });
    b.push(0);
    b.extend_from_slice(&var.faults().stuck_low().to_le_bytes());
    b.extend_from_slice(&var.faults().stuck_high().to_le_bytes());
    for v in [
        cfg.tile_rows,
        cfg.tile_cols,
        inp.channels,
        inp.height,
        inp.width,
        desc.classes,
        ops.len(),
        layer,
    ] {
        b.extend_from_slice(&(v as u16).to_le_bytes());
    }
    for v in [
        act_bytes,
        patch_len,
        weights.len(),
        records.len(),
        labels.len(),
        off[0],
    ] {
        let v = u32::try_from(v).map_err(|_| invalid("pack.size", v))?;
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&(in_scale as f32).to_le_bytes());
    let total_at = b.len();
    b.extend_from_slice(&[0; 8]);
    debug_assert_eq!(b.len(), HEADER_LEN);
    b.extend_from_slice(&lut);
    for (k, o) in ops.iter().enumerate() {
        b.extend_from_slice(&[
            o.kind.code(),
            o.out_kind.code(),
            o.k as u8,
            o.k as u8,
            o.stride as u8,
            o.pad as u8,
            0,
            0,
        ]);
        let out_off = if o.out_kind == ActKind::I32 {
            0
        } else {
            off[k + 1]
        };
        for v in [
            o.src,
            o.src2,
            o.out.c,
            o.out.h,
            o.out.w,
            o.layer.unwrap_or(0xFFFF),
        ] {
            b.extend_from_slice(&(v as u16).to_le_bytes());
        }
        for v in [out_off, o.weights_start, o.params_start] {
            b.extend_from_slice(&(v as u32).to_le_bytes());
        }
        b.extend_from_slice(&o.out_scale.to_le_bytes());
        b.extend_from_slice(&o.w_scale.to_le_bytes());
    }
    for &(m, shift, bias) in &records {
        b.extend_from_slice(&m.to_le_bytes());
        b.extend_from_slice(&shift.to_le_bytes());
        b.extend_from_slice(&bias.to_le_bytes());
    }
    for w in &weights {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.extend_from_slice(images);
    for l in labels {
        b.extend_from_slice(&l.to_le_bytes());
    }
    let total = u32::try_from(b.len() + 4).map_err(|_| invalid("pack.size", b.len()))?;
    b[total_at..total_at + 4].copy_from_slice(&total.to_le_bytes());
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    Ok(b)
}

#[allow(clippy::too_many_arguments)]
fn simple(
    kind: OpKind,
    out_kind: ActKind,
    src: usize,
    out: Shape,
    k: usize,
    stride: usize,
    params_start: usize,
    scale: f64,
) -> OpRec {
    OpRec {
        kind,
        out_kind,
        k,
        stride,
        pad: 0,
        src,
        src2: 0,
        out,
        layer: None,
        weights_start: 0,
        params_start,
        out_scale: scale as f32,
        w_scale: 0.0,
    }
}
