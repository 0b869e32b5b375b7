//! The packed-model writer: BatchNorm folded into requantization, weights quantized, the
//! activation arena planned, the blob checksummed.

use alloc::{vec, vec::Vec};

use crate::crc::crc32;
use crate::error::{Error, Result};
use crate::format::{ActKind, HEADER_LEN, MAGIC, MAX_POOL_WINDOW, OP_LEN, OpKind, Shape, VERSION};
use crate::quant::{Quantized, ScaleMode, layer_scale, quantize_layer};
use crate::tile::{FRAC_BITS, MAX_TILE_ROWS};
use crate::variation::{Profile, SigmaUnit};

use super::forward::normalize;
use super::*;

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
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
    groups: usize,
    count_include_pad: bool,
    clip: [i32; 2],
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
        if let Layer::Add { other } | Layer::Concat { other } = n.layer {
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
    let act_scale = |node: usize, unsigned: bool, last: bool| -> Result<(ActKind, f64)> {
        let a = f64::from(nodes[node].act_max);
        if !(a.is_finite() && a > 0.0) {
            return Err(invalid("node.act_max", node));
        }
        Ok(if last {
            (ActKind::I32, a / f64::from(1u32 << 20))
        } else if unsigned {
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
    // The activation fused after node `j` (its end node and the activation), if any.
    let fused_act = |j: usize| -> Option<(usize, Act)> {
        if fusable(j, |l| matches!(l, Layer::Relu)) {
            Some((j + 1, Act::Relu))
        } else if fusable(j, |l| matches!(l, Layer::Clip { .. })) {
            match nodes[j + 1].layer {
                Layer::Clip { min, max } => Some((j + 1, Act::Clip(min, max))),
                _ => None,
            }
        } else {
            None
        }
    };
    // The nodes up to `body` compute; trailing `Flatten`s of the logits are views of them.
    let mut body = nodes.len();
    while body > 1
        && matches!(nodes[body - 1].layer, Layer::Flatten)
        && source(nodes, body - 1) == body - 2
    {
        body -= 1;
    }
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
                let (kernel, stride, pad, groups, kind) = match n.layer {
                    Layer::Conv2d {
                        kernel,
                        stride,
                        padding,
                        groups,
                        ..
                    } => (kernel, stride, padding, groups, OpKind::Conv),
                    _ => ([1, 1], [1, 1], [0; 4], 1, OpKind::Linear),
                };
                let out = shapes[i];
                let mut bn = None;
                if fusable(end, |l| matches!(l, Layer::BatchNorm { .. })) {
                    end += 1;
                    bn = Some(nodes[end].layer);
                }
                let act = fused_act(end);
                if let Some((e, _)) = act {
                    end = e;
                }
                let act = act.map(|a| a.1);
                let last = end + 1 == body;
                if last && act.is_some() {
                    return Err(invalid("node.last_relu", end));
                }
                if last && (out.c != desc.classes || out.h != 1 || out.w != 1) {
                    return Err(invalid("node.logits_shape", out.c));
                }
                let (out_kind, out_scale) = act_scale(end, act.is_some_and(Act::unsigned), last)?;
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
                    kernel,
                    stride,
                    pad,
                    groups,
                    count_include_pad: false,
                    clip: Act::bounds(act, out_kind, out_scale),
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
            Layer::Relu | Layer::Clip { .. } => {
                let (kind, act) = match n.layer {
                    Layer::Clip { min, max } => (OpKind::Clip, Act::Clip(min, max)),
                    _ => (OpKind::Relu, Act::Relu),
                };
                // Values of a `u8` input are never below 0: a negative lower bound is moot.
                let out_kind = if act.unsigned() || x.kind == ActKind::U8 {
                    ActKind::U8
                } else {
                    ActKind::I8
                };
                tensors.push(TensorInfo {
                    shape: x.shape,
                    kind: out_kind,
                    scale: x.scale,
                });
                let mut rec = simple(kind, out_kind, src_t, x.shape, records.len(), x.scale);
                rec.clip = Act::bounds(Some(act), out_kind, x.scale);
                rec
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
                let (kind, include) = match n.layer {
                    Layer::AvgPool {
                        count_include_pad, ..
                    } => (OpKind::AvgPool, count_include_pad),
                    _ => (OpKind::MaxPool, false),
                };
                let mut rec = simple(kind, x.kind, src_t, shapes[i], records.len(), x.scale);
                rec.kernel = kernel;
                rec.stride = stride;
                rec.pad = padding;
                rec.count_include_pad = include;
                if include {
                    let (m, shift) = multiplier(1.0 / (kernel[0] * kernel[1]) as f64, "node.pool")?;
                    records.push((m, shift, 0));
                }
                tensors.push(TensorInfo {
                    shape: shapes[i],
                    kind: x.kind,
                    scale: x.scale,
                });
                rec
            }
            Layer::GlobalAvgPool => {
                let window = x.shape.h * x.shape.w;
                if window > MAX_POOL_WINDOW {
                    return Err(invalid("node.pool_window", i));
                }
                // The last op writes the logits: the record rescales the window's sum to them.
                let last = i + 1 == body;
                if last && shapes[i].c != desc.classes {
                    return Err(invalid("node.logits_shape", shapes[i].c));
                }
                let (kind, scale) = if last {
                    act_scale(i, false, true)?
                } else {
                    (x.kind, x.scale)
                };
                let ratio = if last {
                    x.scale / window as f64 / scale
                } else {
                    1.0 / window as f64
                };
                let (m, shift) = multiplier(ratio, "node.pool")?;
                let rec = simple(
                    OpKind::GlobalAvgPool,
                    kind,
                    src_t,
                    shapes[i],
                    records.len(),
                    scale,
                );
                records.push((m, shift, 0));
                tensors.push(TensorInfo {
                    shape: shapes[i],
                    kind,
                    scale,
                });
                rec
            }
            Layer::Add { other } | Layer::Concat { other } => {
                let add = matches!(n.layer, Layer::Add { .. });
                let y_t = node_tensor[other];
                let y = tensors[y_t];
                let act = fused_act(end);
                if let Some((e, _)) = act {
                    end = e;
                }
                let act = act.map(|a| a.1);
                if end + 1 == body {
                    return Err(invalid("node.last", end));
                }
                let unsigned = act.is_some_and(Act::unsigned)
                    || (!add && x.kind == ActKind::U8 && y.kind == ActKind::U8);
                let (out_kind, out_scale) = act_scale(end, unsigned, false)?;
                let (ra, rb) = (x.scale / out_scale, y.scale / out_scale);
                let (_, shift) = multiplier(ra.max(rb), "node.add")?;
                let (ma, mb) = (
                    libm::round(ra * libm::exp2(f64::from(shift))),
                    libm::round(rb * libm::exp2(f64::from(shift))),
                );
                // A flattened operand is a view of its `CHW` tensor: concatenating the tensors
                // over channels is concatenating the flat vectors when height and width agree.
                if !add && (x.shape.h != y.shape.h || x.shape.w != y.shape.w) {
                    return Err(invalid("node.concat", i));
                }
                let (kind, out) = if add {
                    (OpKind::Add, x.shape)
                } else {
                    let c = x.shape.c + y.shape.c;
                    if c > 0xFFFF {
                        return Err(invalid("node.shape", i));
                    }
                    (OpKind::Concat, Shape { c, ..x.shape })
                };
                let mut rec = simple(kind, out_kind, src_t, out, records.len(), out_scale);
                rec.src2 = y_t;
                rec.clip = Act::bounds(act, out_kind, out_scale);
                records.push((ma as i32, shift, 0));
                records.push((mb as i32, shift, 0));
                tensors.push(TensorInfo {
                    shape: out,
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
    if ops.len() > crate::format::MAX_OPS || ops.last().map(|o| o.out_kind) != Some(ActKind::I32) {
        return Err(invalid("nodes.count", ops.len()));
    }

    // Arena: first fit against every earlier tensor still to be read by this op or a later one.
    let n_t = tensors.len();
    let mut last_use = (0..n_t).map(|t| t.saturating_sub(1)).collect::<Vec<_>>();
    for (k, op) in ops.iter().enumerate() {
        last_use[op.src] = last_use[op.src].max(k);
        if op.kind.is_binary() {
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
            OpKind::Conv => tensors[o.src].shape.c / o.groups * o.kernel[0] * o.kernel[1],
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
        let at = b.len();
        b.extend_from_slice(&[
            o.kind.code(),
            o.out_kind.code(),
            o.kernel[0] as u8,
            o.kernel[1] as u8,
            o.stride[0] as u8,
            o.stride[1] as u8,
            o.pad[0] as u8,
            o.pad[1] as u8,
            o.pad[2] as u8,
            o.pad[3] as u8,
            u8::from(o.count_include_pad),
            0,
        ]);
        let out_off = if o.out_kind == ActKind::I32 {
            0
        } else {
            off[k + 1]
        };
        for v in [
            o.groups,
            o.src,
            o.src2,
            o.out.c,
            o.out.h,
            o.out.w,
            o.layer.unwrap_or(0xFFFF),
        ] {
            b.extend_from_slice(&(v as u16).to_le_bytes());
        }
        let [lo, hi] = if o.out_kind == ActKind::I32 {
            [0, 0]
        } else {
            o.clip
        };
        for v in [lo as i16 as u16, hi as i16 as u16, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [out_off, o.weights_start, o.params_start] {
            b.extend_from_slice(&(v as u32).to_le_bytes());
        }
        b.extend_from_slice(&o.out_scale.to_le_bytes());
        b.extend_from_slice(&o.w_scale.to_le_bytes());
        debug_assert_eq!(b.len() - at, OP_LEN);
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

/// An activation fused into (or standing as) an op.
#[derive(Clone, Copy)]
enum Act {
    Relu,
    Clip(f32, f32),
}

impl Act {
    /// Whether the output is never negative (`u8`).
    fn unsigned(self) -> bool {
        match self {
            Act::Relu => true,
            Act::Clip(min, _) => min >= 0.0,
        }
    }

    /// The saturation bounds of an output of `kind` at `scale` under the activation (the
    /// type's range without one).
    fn bounds(act: Option<Act>, kind: ActKind, scale: f64) -> [i32; 2] {
        let [lo, hi] = kind.range();
        match act {
            Some(Act::Clip(min, max)) if kind != ActKind::I32 => {
                let q = |v: f32| {
                    libm::round(f64::from(v) / scale).clamp(f64::from(lo), f64::from(hi)) as i32
                };
                [q(min), q(max)]
            }
            _ => [lo, hi],
        }
    }
}

fn simple(
    kind: OpKind,
    out_kind: ActKind,
    src: usize,
    out: Shape,
    params_start: usize,
    scale: f64,
) -> OpRec {
    OpRec {
        kind,
        out_kind,
        kernel: [0; 2],
        stride: [0; 2],
        pad: [0; 4],
        groups: 1,
        count_include_pad: false,
        clip: out_kind.range(),
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
