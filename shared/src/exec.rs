//! The integer executor: programs a parsed [`Model`]'s tiles for one Monte Carlo run, then runs
//! images through it with caller-provided scratch, allocating nothing.
//!
//! - [`program`] draws layer `l`'s deviations from `stream(seed, run, l)`, one
//!   [`VariationConfig::sample`] per weight in canonical order, into the state buffer
//!   ([`Model::state_len`] `i16`s).
//! - [`infer`] maps the raw `u8` pixels through the per-channel input table, runs the ops and
//!   writes `i32` logits; it returns the class (the first index of the largest logit).
//!
//! Only integer arithmetic runs in [`infer`]; [`program`] uses the crate's `f32` sampling, whose
//! operations are IEEE-exact and never fused, so x86-64 and the Cortex-M4F program the same bits.
//!
//! **Requantization** of an accumulator `acc` (see [`crate::tile`] for its bound, `|acc| < 2^39`
//! on the ideal paths; a non-ideal ADC's accumulator is saturated to `±2^39` first) with a record
//! `(m, shift, bias)`, `|m| < 2^23`, `|bias| < 2^61`: `acc * m` is below `2^62` and the sum with
//! the bias and the rounding term below `2^63`, so `i64` never overflows; the result is rounded
//! half up (arithmetic shift), then saturated to the output type (`u8` 0..=255, `i8`
//! -127..=127, `i32`) and to the op's saturation bounds ([`Op::clip`]: a fused ReLU or clip).
//! Pooling sums at most 65536 values of at most 255 (`< 2^24`; the exact division of an
//! avg-pool without padded positions works on `2 s + n < 2^26` in `i32`), the add's and
//! concat's products are below `2^31` each: `i64` throughout. A global pool that writes the
//! logits (the last op of a SqueezeNet-style head) requantizes its window sum (`< 2^24`, times
//! `|m| < 2^23`) with its record and saturates it to `±(2^31 - 1)` like every logit.
//!
//! A grouped convolution gathers, per output pixel and group, the patch of that group's input
//! channels (`in / groups * kh * kw` values) and runs that group's output channels over it.

use crate::error::{Error, Result};
use crate::format::{ActKind, Model, Op, OpKind, Records, Requant, Shape, Tensor};
use crate::rng::stream;
use crate::tile::{
    ACC_LIMIT, DotKernel, Path, Plain, Programmer, dot_collapsed_with, dot_sliced_with,
};
use crate::variation::VariationConfig;

/// Caller-provided working memory for [`infer`]; sizes from [`Model::scratch`].
#[derive(Debug)]
pub struct Scratch<'s> {
    /// The activation arena, at least `scratch().act_bytes` bytes.
    pub act: &'s mut [u8],
    /// The patch (one im2col row), at least `scratch().patch` elements.
    pub patch: &'s mut [i16],
}

fn need(what: &'static str, needed: usize, found: usize) -> Result<()> {
    if found < needed {
        Err(Error::BufferTooSmall {
            what,
            needed,
            found,
        })
    } else {
        Ok(())
    }
}

/// Programs the tiles of every weight layer for Monte Carlo run `run` under `seed`.
///
/// `var` is usually [`Model::variation`] (or it with another sigma); its M and N must be the
/// model's. `state` must hold exactly [`Model::state_len`]`(path)` elements.
pub fn program(
    model: &Model<'_>,
    var: &VariationConfig,
    seed: u64,
    run: u32,
    path: Path,
    state: &mut [i16],
) -> Result<()> {
    program_with::<Plain>(model, var, seed, run, path, state)
}

/// [`program`] with the tile programmer `P` (a firmware's own loop, see [`Programmer`]).
pub fn program_with<P: Programmer>(
    model: &Model<'_>,
    var: &VariationConfig,
    seed: u64,
    run: u32,
    path: Path,
    state: &mut [i16],
) -> Result<()> {
    if var.quant() != model.quant() {
        return Err(Error::InvalidField {
            field: "variation.quant",
            value: i64::from(var.quant().m_bits()),
        });
    }
    if let Path::Sliced(adc) = path {
        adc.validate()?;
    }
    let expected = model.state_len(path);
    if state.len() != expected {
        return Err(Error::LengthMismatch {
            expected,
            found: state.len(),
        });
    }
    let per = path.state_per_weight(model.quant());
    for i in 0..model.op_count() {
        let op = model.op(i)?;
        let Some(layer) = op.layer else { continue };
        let fan_in = model.fan_in(&op);
        let start = op.weights_start * per;
        let len = op.out.c * fan_in * per;
        let out = state
            .get_mut(start..start + len)
            .ok_or(Error::LengthMismatch {
                expected: start + len,
                found: expected,
            })?;
        let mut rng = stream(seed, run, layer as u32);
        P::program_records(
            var,
            model.layer_weight_bytes(&op),
            fan_in,
            path,
            &mut rng,
            out,
        )?;
    }
    Ok(())
}

/// Runs one image (`C*H*W` raw pixels) through the programmed model, writes the logits
/// ([`Model::classes`] of them) and returns the class.
///
/// `state` is what [`program`] wrote for the same `path`.
pub fn infer(
    model: &Model<'_>,
    path: Path,
    state: &[i16],
    image: &[u8],
    scratch: &mut Scratch<'_>,
    logits: &mut [i32],
) -> Result<usize> {
    infer_with::<Plain>(model, path, state, image, scratch, logits)
}

/// [`infer`] with the tile-column kernel `K` (a firmware's DSP kernel); the result is the same
/// bit for bit as long as `K` agrees with [`Plain`], which [`DotKernel`] requires.
pub fn infer_with<K: DotKernel>(
    model: &Model<'_>,
    path: Path,
    state: &[i16],
    image: &[u8],
    scratch: &mut Scratch<'_>,
    logits: &mut [i32],
) -> Result<usize> {
    let sizes = model.scratch();
    need("act", sizes.act_bytes, scratch.act.len())?;
    need("patch", sizes.patch, scratch.patch.len())?;
    need("logits", sizes.logits, logits.len())?;
    if state.len() != model.state_len(path) {
        return Err(Error::LengthMismatch {
            expected: model.state_len(path),
            found: state.len(),
        });
    }
    if let Path::Sliced(adc) = path {
        adc.validate()?;
    }
    let input = model.input_shape();
    if image.len() != input.len() {
        return Err(Error::LengthMismatch {
            expected: input.len(),
            found: image.len(),
        });
    }
    let x0 = model.tensor(0)?;
    let plane = input.h * input.w;
    let dst = scratch
        .act
        .get_mut(x0.off..x0.off + input.len())
        .ok_or(Error::BufferTooSmall {
            what: "act",
            needed: x0.off + input.len(),
            found: sizes.act_bytes,
        })?;
    for (c, (d, px)) in dst.chunks_mut(plane).zip(image.chunks(plane)).enumerate() {
        let lut = model.input_table(c);
        for (o, &p) in d.iter_mut().zip(px) {
            *o = lut.get(usize::from(p)).copied().unwrap_or(0);
        }
    }
    let per = path.state_per_weight(model.quant());
    for i in 0..model.op_count() {
        let op = model.op(i)?;
        let x = model.tensor(op.src)?;
        let y = if op.kind.is_binary() {
            Some(model.tensor(op.src2)?)
        } else {
            None
        };
        let (out_off, out_len) = if op.out_kind == ActKind::I32 {
            (0, 0)
        } else {
            (op.out_off, op.out.len())
        };
        let (xs, ys, out) = split(scratch.act, &x, y.as_ref(), out_off, out_len)?;
        let mut sink = match op.out_kind {
            ActKind::I32 => Sink::Logits(&mut logits[..op.out.c.min(sizes.logits)]),
            kind => Sink::Bytes(out, kind, i64::from(op.clip[0]), i64::from(op.clip[1])),
        };
        match op.kind {
            OpKind::Conv | OpKind::Linear => {
                let fan_in = model.fan_in(&op);
                let start = op.weights_start * per;
                let w = state
                    .get(start..start + op.out.c * fan_in * per)
                    .unwrap_or(&[]);
                let layer = Layer {
                    model,
                    path,
                    weights: w,
                    fan_in,
                    records: model.records(op.params_start, op.out.c),
                };
                if op.kind == OpKind::Conv {
                    conv::<K>(&layer, &op, xs, &x, scratch.patch, &mut sink);
                } else {
                    linear::<K>(&layer, &op, xs, &x, scratch.patch, &mut sink);
                }
            }
            OpKind::Relu => {
                for (k, &v) in xs.iter().enumerate() {
                    sink.put(k, i64::from(value(x.kind, v)).max(0));
                }
            }
            OpKind::Clip => {
                for (k, &v) in xs.iter().enumerate() {
                    sink.put(k, i64::from(value(x.kind, v)));
                }
            }
            OpKind::MaxPool => pool(&op, xs, &x, None, &mut sink),
            OpKind::AvgPool => {
                let r = op.count_include_pad.then(|| model.record(op.params_start));
                pool(&op, xs, &x, Some(r), &mut sink);
            }
            OpKind::GlobalAvgPool => {
                let r = model.record(op.params_start);
                let hw = x.shape.h * x.shape.w;
                for (c, ch) in xs.chunks(hw.max(1)).enumerate().take(x.shape.c) {
                    let sum: i64 = ch.iter().map(|&v| i64::from(value(x.kind, v))).sum();
                    sink.put(c, requant(sum, r));
                }
            }
            OpKind::Add => {
                let (ra, rb) = (
                    model.record(op.params_start),
                    model.record(op.params_start + 1),
                );
                let yk = y.map_or(ActKind::U8, |t| t.kind);
                for (k, (&a, &b)) in xs.iter().zip(ys).enumerate() {
                    let acc = i64::from(value(x.kind, a)) * i64::from(ra.m)
                        + i64::from(value(yk, b)) * i64::from(rb.m);
                    sink.put(k, shift_round(acc + ra.bias, ra.shift));
                }
            }
            OpKind::Concat => {
                let yk = y.map_or(ActKind::U8, |t| t.kind);
                let parts = [
                    (xs, x.kind, model.record(op.params_start)),
                    (ys, yk, model.record(op.params_start + 1)),
                ];
                let mut k = 0;
                for (vals, kind, r) in parts {
                    for &v in vals {
                        let acc = i64::from(value(kind, v)) * i64::from(r.m);
                        sink.put(k, shift_round(acc + r.bias, r.shift));
                        k += 1;
                    }
                }
            }
        }
    }
    let classes = &logits[..sizes.logits];
    let mut best = 0;
    for (k, &v) in classes.iter().enumerate() {
        if v > classes[best] {
            best = k;
        }
    }
    Ok(best)
}

/// Classifies every test image packed with the model on the programmed `state` and returns how
/// many match their labels (one Monte Carlo run's accuracy is `correct / model.test_len()`).
pub fn count_correct(
    model: &Model<'_>,
    path: Path,
    state: &[i16],
    scratch: &mut Scratch<'_>,
    logits: &mut [i32],
) -> Result<usize> {
    count_correct_with::<Plain>(model, path, state, scratch, logits)
}

/// [`count_correct`] with the tile-column kernel `K` (see [`infer_with`]).
pub fn count_correct_with<K: DotKernel>(
    model: &Model<'_>,
    path: Path,
    state: &[i16],
    scratch: &mut Scratch<'_>,
    logits: &mut [i32],
) -> Result<usize> {
    let mut correct = 0;
    for i in 0..model.test_len() {
        let (image, label) = model.test_image(i).ok_or(Error::InvalidField {
            field: "test.index",
            value: i as i64,
        })?;
        correct += usize::from(
            infer_with::<K>(model, path, state, image, scratch, logits)? == usize::from(label),
        );
    }
    Ok(correct)
}

/// Splits the arena into the op's inputs and its output (disjoint: checked at parse time).
fn split<'s>(
    act: &'s mut [u8],
    x: &Tensor,
    y: Option<&Tensor>,
    out_off: usize,
    out_len: usize,
) -> Result<(&'s [u8], &'s [u8], &'s mut [u8])> {
    let corrupt = Error::InvalidField {
        field: "op.out_off",
        value: out_off as i64,
    };
    let (lo, hi) = act.split_at_mut_checked(out_off).ok_or(corrupt)?;
    let (out, rest) = hi.split_at_mut_checked(out_len).ok_or(corrupt)?;
    let (lo, rest) = (&*lo, &*rest);
    let out_end = out_off + out_len;
    let view = |t: &Tensor| -> Result<&'s [u8]> {
        let (a, b) = (t.off, t.off + t.shape.len());
        if b <= out_off {
            lo.get(a..b).ok_or(corrupt)
        } else if a >= out_end {
            rest.get(a - out_end..b - out_end).ok_or(corrupt)
        } else {
            Err(corrupt)
        }
    };
    let xs = view(x)?;
    let ys = match y {
        Some(t) => view(t)?,
        None => &[],
    };
    Ok((xs, ys, out))
}

/// The number an activation byte of `kind` codes: `0..=255` for `U8`, the byte as `i8`
/// otherwise.
#[inline]
pub fn value(kind: ActKind, b: u8) -> i16 {
    match kind {
        ActKind::U8 => i16::from(b),
        _ => i16::from(b as i8),
    }
}

/// `(v + 2^(shift-1)) >> shift` (round half up), computed as `((v >> (shift-1)) + 1) >> 1`:
/// with `v = q 2^(s-1) + r`, `0 <= r < 2^(s-1)`, both are `floor((q + 1) / 2)`, and the second
/// needs no 64-bit constant (one variable shift instead of two on the Cortex-M).
#[inline]
pub fn shift_round(v: i64, shift: u32) -> i64 {
    if shift == 0 {
        v
    } else {
        ((v >> (shift - 1)) + 1) >> 1
    }
}

/// `(clamp(acc, ±2^39) * m + bias + 2^(shift-1)) >> shift` (see the module docs for the bound).
#[inline]
pub fn requant(acc: i64, r: Requant) -> i64 {
    shift_round(
        acc.clamp(-ACC_LIMIT, ACC_LIMIT) * i64::from(r.m) + r.bias,
        r.shift,
    )
}

/// [`requant`] of an accumulator already within `±ACC_LIMIT`, where its clamp is the identity:
/// the collapsed path's, `|acc| <= 65536 * 255 * 32768 < 2^39` for any `i16` state and `u8` or
/// `i8` inputs over the format's largest fan-in.
#[inline]
fn requant_in_bound(acc: i64, r: Requant) -> i64 {
    shift_round(acc * i64::from(r.m) + r.bias, r.shift)
}

/// Where an op's outputs go: the arena (saturated to the op's bounds `[lo, hi]`, which lie in
/// the `u8` or `i8` range) or the logits.
enum Sink<'s> {
    Bytes(&'s mut [u8], ActKind, i64, i64),
    Logits(&'s mut [i32]),
}

impl Sink<'_> {
    #[inline]
    fn put(&mut self, k: usize, v: i64) {
        match self {
            Sink::Bytes(out, kind, lo, hi) => {
                // `max` then `min` (not `clamp`): never panics, even on bounds not from `parse`.
                let v = v.max(*lo).min(*hi);
                let b = match kind {
                    ActKind::U8 => v as u8,
                    _ => v as i8 as u8,
                };
                if let Some(o) = out.get_mut(k) {
                    *o = b;
                }
            }
            Sink::Logits(out) => {
                if let Some(o) = out.get_mut(k) {
                    *o = v.clamp(-i64::from(i32::MAX), i64::from(i32::MAX)) as i32;
                }
            }
        }
    }
}

/// A weighted op's programmed state and its records, resolved once per layer.
struct Layer<'m, 's> {
    model: &'m Model<'m>,
    path: Path,
    weights: &'s [i16],
    fan_in: usize,
    records: Records<'m>,
}

impl Layer<'_, '_> {
    /// Output channels `first .. first + channels` over the patch, requantized, into
    /// `put(o, value)`: on the collapsed path pairs of rows through one
    /// [`DotKernel::dot_rows2`], then one at a time.
    #[inline]
    fn outputs<K: DotKernel>(
        &self,
        first: usize,
        channels: usize,
        patch: &[i16],
        mut put: impl FnMut(usize, i64),
    ) {
        let mut o = first;
        let k = self.fan_in;
        if self.path == Path::Collapsed && k > 0 {
            let rows = self.model.tile_rows();
            let weights = self.weights.get(first * k..).unwrap_or(&[]);
            for pair in weights.chunks_exact(2 * k).take(channels / 2) {
                let (w0, w1) = pair.split_at(k);
                let acc = K::dot_rows2([w0, w1], patch, rows);
                put(o, requant_in_bound(acc[0], self.records.get(o)));
                put(o + 1, requant_in_bound(acc[1], self.records.get(o + 1)));
                o += 2;
            }
        }
        for o in o..first + channels {
            put(o, self.output::<K>(o, patch));
        }
    }

    /// Output channel `o`'s accumulator over the patch, requantized.
    #[inline]
    fn output<K: DotKernel>(&self, o: usize, patch: &[i16]) -> i64 {
        let rows = self.model.tile_rows();
        let k = self.fan_in;
        let acc = match self.path {
            Path::Collapsed => dot_collapsed_with::<K>(
                self.weights.get(o * k..(o + 1) * k).unwrap_or(&[]),
                patch,
                rows,
            ),
            Path::Sliced(adc) => {
                let q = self.model.quant();
                let s = q.slices();
                let w = self.weights.get(o * s * k..(o + 1) * s * k).unwrap_or(&[]);
                dot_sliced_with::<K>(w, patch, s, q.n_bits(), rows, adc)
            }
        };
        requant(acc, self.records.get(o))
    }
}

/// Convolution: for each output pixel and group, gathers the group's `in / groups * kh * kw`
/// patch (zero padding) in canonical order, then one tile dot product per output channel of
/// the group.
fn conv<K: DotKernel>(
    l: &Layer<'_, '_>,
    op: &Op,
    xs: &[u8],
    x: &Tensor,
    patch: &mut [i16],
    sink: &mut Sink<'_>,
) {
    let Shape {
        c: ic,
        h: ih,
        w: iw,
    } = x.shape;
    let Shape {
        c: oc,
        h: oh,
        w: ow,
    } = op.out;
    let patch = match patch.get_mut(..l.fan_in) {
        Some(p) => p,
        None => return,
    };
    let (kh, kw) = (op.kh, op.kw);
    let [sh, sw] = op.stride;
    let [pt, pl, _, _] = op.pad;
    let groups = op.groups.max(1);
    let (icg, ocg, plane) = (ic / groups, oc / groups, ih * iw);
    let signed = x.kind != ActKind::U8;
    for oy in 0..oh {
        for ox in 0..ow {
            // The window's first row and column; out of range (wrapped) in the padding.
            let x0 = (ox * sw).wrapping_sub(pl);
            let y0 = (oy * sh).wrapping_sub(pt);
            let inside = x0 < iw && x0 + kw <= iw && y0 < ih && y0 + kh <= ih;
            for g in 0..groups {
                let xg = xs.get(g * icg * plane..).unwrap_or(&[]);
                if inside {
                    // The window lies wholly inside the image: a straight widening copy per row.
                    let window = Window {
                        channels: icg,
                        plane,
                        iw,
                        at: y0 * iw + x0,
                    };
                    let done = match (kh, kw, signed) {
                        (3, 3, false) => window.gather(xg, patch, 3, 3, false),
                        (3, 3, true) => window.gather(xg, patch, 3, 3, true),
                        (kh, _, false) => window.gather(xg, patch, kh, kw, false),
                        (kh, _, true) => window.gather(xg, patch, kh, kw, true),
                    };
                    if done {
                        pixel_outputs::<K>(l, g * ocg, ocg, patch, sink, oy * ow + ox, oh * ow);
                        continue;
                    }
                }
                // Not wholly inside (or, for a corrupt model, past the arena): the general
                // gather.
                let border = Border {
                    channels: icg,
                    ih,
                    iw,
                    y0,
                    x0,
                };
                let done = match (kh, kw, signed) {
                    (3, 3, false) => border.gather(xg, patch, 3, 3, false),
                    (3, 3, true) => border.gather(xg, patch, 3, 3, true),
                    (kh, _, false) => border.gather(xg, patch, kh, kw, false),
                    (kh, _, true) => border.gather(xg, patch, kh, kw, true),
                };
                if !done {
                    // Not reached: `split` hands over the whole input tensor and `patch` is the
                    // fan-in long.
                    return;
                }
                pixel_outputs::<K>(l, g * ocg, ocg, patch, sink, oy * ow + ox, oh * ow);
            }
        }
    }
}

/// A convolution window anywhere on the image, typically reaching into the zero padding: its
/// first row `y0` and column `x0` wrap below zero (as `usize`) where they start in the padding.
struct Border {
    channels: usize,
    ih: usize,
    iw: usize,
    y0: usize,
    x0: usize,
}

impl Border {
    /// Widens the window into `patch` in canonical order, zeros outside the image (the
    /// padding); `false` when the input is shorter than `channels` images or `patch` than the
    /// window (then `patch` is partly written). Inlined with constant `kh`, `kw` and `signed`,
    /// each tap is a compare and a conditional load.
    #[inline(always)]
    fn gather(&self, xs: &[u8], patch: &mut [i16], kh: usize, kw: usize, signed: bool) -> bool {
        let plane = self.ih * self.iw;
        if kh * kw == 0 || patch.len() < self.channels * kh * kw {
            return false;
        }
        for (c, dst) in patch
            .chunks_exact_mut(kh * kw)
            .take(self.channels)
            .enumerate()
        {
            let Some(image) = xs.get(c * plane..(c + 1) * plane) else {
                return false;
            };
            for (ky, d) in dst.chunks_exact_mut(kw).enumerate() {
                let iy = self.y0.wrapping_add(ky);
                let Some(row) = image
                    .get(iy.wrapping_mul(self.iw)..)
                    .filter(|_| iy < self.ih)
                else {
                    d.fill(0);
                    continue;
                };
                for (kx, d) in d.iter_mut().enumerate() {
                    let ix = self.x0.wrapping_add(kx);
                    *d = match row.get(ix).filter(|_| ix < self.iw) {
                        Some(&b) if signed => i16::from(b as i8),
                        Some(&b) => i16::from(b),
                        None => 0,
                    };
                }
            }
        }
        true
    }
}

/// A convolution's output channels `first .. first + channels` at one pixel, channel `o` to
/// `o * step + base`.
#[inline(never)]
fn pixel_outputs<K: DotKernel>(
    l: &Layer<'_, '_>,
    first: usize,
    channels: usize,
    patch: &[i16],
    sink: &mut Sink<'_>,
    base: usize,
    step: usize,
) {
    match sink {
        // The usual case (ReLU or a clip folded into the requantization): no dispatch per
        // output.
        Sink::Bytes(out, ActKind::U8, lo, hi) => {
            let (lo, hi) = (*lo, *hi);
            l.outputs::<K>(first, channels, patch, |o, v| {
                if let Some(b) = out.get_mut(o * step + base) {
                    *b = v.max(lo).min(hi) as u8;
                }
            })
        }
        _ => l.outputs::<K>(first, channels, patch, |o, v| sink.put(o * step + base, v)),
    }
}

/// A convolution window wholly inside the image (no padding): `channels * kh` rows of `kw`
/// inputs, row `(c, ky)` starting at `c * plane + at + ky * iw`.
struct Window {
    channels: usize,
    plane: usize,
    iw: usize,
    at: usize,
}

impl Window {
    /// Widens the window into `patch` in canonical order (`[c][ky][kx]`), the values of the
    /// general gather; `false` (with `patch` partly written) when a row is out of the arena.
    /// Inlined with constant `kh`, `kw` (3 x 3) and `signed`, a channel's window is one range
    /// check, nine loads and nine stores.
    #[inline(always)]
    fn gather(&self, xs: &[u8], patch: &mut [i16], kh: usize, kw: usize, signed: bool) -> bool {
        if kh * kw == 0 || patch.len() < self.channels * kh * kw {
            return false;
        }
        let span = (kh - 1) * self.iw + kw;
        for (c, dst) in patch
            .chunks_exact_mut(kh * kw)
            .take(self.channels)
            .enumerate()
        {
            let at = c * self.plane + self.at;
            let Some(src) = xs.get(at..at + span) else {
                return false;
            };
            for (ky, d) in dst.chunks_exact_mut(kw).enumerate() {
                let row = &src[ky * self.iw..];
                for (d, &b) in d.iter_mut().zip(row) {
                    *d = if signed {
                        i16::from(b as i8)
                    } else {
                        i16::from(b)
                    };
                }
            }
        }
        true
    }
}

/// Fully connected layer over the flattened input.
fn linear<K: DotKernel>(
    l: &Layer<'_, '_>,
    op: &Op,
    xs: &[u8],
    x: &Tensor,
    patch: &mut [i16],
    sink: &mut Sink<'_>,
) {
    let patch = match patch.get_mut(..l.fan_in) {
        Some(p) => p,
        None => return,
    };
    for (p, &b) in patch.iter_mut().zip(xs) {
        *p = value(x.kind, b);
    }
    l.outputs::<K>(0, op.out.c, patch, |o, v| sink.put(o, v));
}

/// The in-bounds part of a pooling window along one axis: output position `o` with stride `s`,
/// kernel `k`, padding `lo` before an input of `n`: the first input index and the count.
#[inline]
fn span(o: usize, s: usize, k: usize, lo: usize, n: usize) -> (usize, usize) {
    let start = o * s; // in padded coordinates
    let first = start.max(lo);
    let end = (start + k).min(lo + n);
    (first.saturating_sub(lo), end.saturating_sub(first))
}

/// Max pooling (`avg: None`: padded positions ignored, the output in the input's type) or
/// average pooling (`avg: Some(record)`: the sum of the in-bounds values times the record's
/// `1 / (kh kw)` with `count_include_pad`; `Some(None)`: the sum divided exactly by the number
/// `n` of in-bounds positions, `floor((2 s + n) / (2 n))`, without).
fn pool(op: &Op, xs: &[u8], x: &Tensor, avg: Option<Option<Requant>>, sink: &mut Sink<'_>) {
    let Shape {
        c: ic,
        h: ih,
        w: iw,
    } = x.shape;
    let Shape { h: oh, w: ow, .. } = op.out;
    let [sh, sw] = op.stride;
    let [pt, pl, _, _] = op.pad;
    for c in 0..ic {
        for oy in 0..oh {
            let (y0, ny) = span(oy, sh, op.kh, pt, ih);
            for ox in 0..ow {
                let (x0, nx) = span(ox, sw, op.kw, pl, iw);
                let (mut m, mut sum) = (i16::MIN, 0i32);
                for iy in y0..y0 + ny {
                    let at = (c * ih + iy) * iw + x0;
                    for b in xs.get(at..at + nx).unwrap_or(&[]) {
                        let v = value(x.kind, *b);
                        m = m.max(v);
                        sum += i32::from(v);
                    }
                }
                let out = (c * oh + oy) * ow + ox;
                match avg {
                    // The format guarantees a non-empty window (pads below the kernel).
                    None => sink.put(out, if ny * nx == 0 { 0 } else { i64::from(m) }),
                    Some(Some(r)) => sink.put(out, requant(i64::from(sum), r)),
                    Some(None) => {
                        let n = (ny * nx).max(1) as i32;
                        sink.put(out, i64::from((2 * sum + n).div_euclid(2 * n)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
