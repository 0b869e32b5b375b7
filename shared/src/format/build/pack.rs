//! The packed-model writer: BatchNorm folded into requantization, weights quantized, the
//! activation arena planned, the blob checksummed.

use alloc::{vec, vec::Vec};

use crate::crc::crc32;
use crate::error::{Error, Result};
use crate::format::{ActKind, HEADER_LEN, MAGIC, OpKind, Shape, VERSION};
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
    if ops.len() > crate::format::MAX_OPS || ops.last().map(|o| o.out_kind) != Some(ActKind::I32) {
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
