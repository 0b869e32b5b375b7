//! The float64 forward pass of a [`ModelDesc`], activation calibration and the noisy
//! reference weights.

use alloc::{vec, vec::Vec};

use crate::error::{Error, Result};
use crate::format::{Model, Shape};
use crate::rng::stream;
use crate::tile::FRAC_BITS;
use crate::variation::VariationConfig;

use super::*;

/// Per-channel input normalization, `(p / 255 - mean) / std`, in `f64`.
pub(super) fn normalize(inp: &InputSpec<'_>, c: usize, p: u8) -> f64 {
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
                out_channels,
                kernel: [kh, kw],
                stride: [sh, sw],
                padding: [pt, pl, _, _],
                groups,
            } => {
                own = w_of(weight);
                if own.len() != weight.len() {
                    return Err(Error::LengthMismatch {
                        expected: weight.len(),
                        found: own.len(),
                    });
                }
                // One patch per output position and group in `[c][ky][kx]` order (padding as
                // 0.0), then one sequential dot per output channel of the group: the same
                // additions in the same order as the direct loop (a padded term adds 0.0),
                // several times faster.
                let (icg, ocg) = (xs.c / groups, out_channels / groups);
                let fan_in = icg * kh * kw;
                let mut patch = vec![0.0f64; fan_in];
                let mut y = vec![0.0; ys.len()];
                for oy in 0..ys.h {
                    for ox in 0..ys.w {
                        for g in 0..groups {
                            let mut p = patch.iter_mut();
                            for c in g * icg..(g + 1) * icg {
                                for ky in 0..kh {
                                    let iy = (oy * sh + ky) as isize - pt as isize;
                                    for kx in 0..kw {
                                        let ix = (ox * sw + kx) as isize - pl as isize;
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
                            let rows = own
                                .chunks_exact(fan_in.max(1))
                                .enumerate()
                                .skip(g * ocg)
                                .take(ocg);
                            for (o, row) in rows {
                                y[(o * ys.h + oy) * ys.w + ox] =
                                    row.iter().zip(&patch).fold(
                                        bias.map_or(0.0, |b| f64::from(b[o])),
                                        |a, (w, v)| a + w * v,
                                    );
                            }
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
            Layer::Clip { min, max } => x
                .iter()
                .map(|&v| v.max(f64::from(min)).min(f64::from(max)))
                .collect(),
            Layer::MaxPool {
                kernel: [kh, kw],
                stride: [sh, sw],
                padding: [pt, pl, _, _],
            }
            | Layer::AvgPool {
                kernel: [kh, kw],
                stride: [sh, sw],
                padding: [pt, pl, _, _],
                ..
            } => {
                let include = match n.layer {
                    Layer::AvgPool {
                        count_include_pad, ..
                    } => Some(count_include_pad),
                    _ => None,
                };
                let mut y = vec![0.0; ys.len()];
                for c in 0..ys.c {
                    for oy in 0..ys.h {
                        for ox in 0..ys.w {
                            let (mut max, mut sum, mut n_in) = (f64::NEG_INFINITY, 0.0, 0usize);
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * sh + ky) as isize - pt as isize;
                                    let ix = (ox * sw + kx) as isize - pl as isize;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < xs.h
                                        && (ix as usize) < xs.w
                                    {
                                        let v = x[(c * xs.h + iy as usize) * xs.w + ix as usize];
                                        max = max.max(v);
                                        sum += v;
                                        n_in += 1;
                                    }
                                }
                            }
                            y[(c * ys.h + oy) * ys.w + ox] = match include {
                                None => max,
                                Some(true) => sum / (kh * kw) as f64,
                                Some(false) => sum / n_in.max(1) as f64,
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
            Layer::Concat { other } => x.iter().chain(&outs[other]).copied().collect(),
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
