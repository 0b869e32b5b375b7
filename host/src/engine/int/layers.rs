//! The host's layer-at-a-time integer engine: [`exec`]'s numbers, computed as matrix products.
//!
//! [`exec::infer`] runs one image at a time and one output pixel at a time (an im2col row, then
//! one tile dot product per output channel): the firmware's shape, where memory is scarce. On
//! the host that leaves the vector units waiting on loads and horizontal sums. This engine runs
//! a batch of images through the model one op at a time instead: activations are `i16` values in
//! `[c][image][h][w]` order, each weighted op is one integer matrix product
//! `C[o][p] = sum_k W[o][k] X[k][p]` over every output pixel `p` of every image in the batch
//! (the input im2col'ed block by block), followed by the same requantization, saturation and
//! argmax as `exec`.
//!
//! **Bit-exact with `exec` on the collapsed (ideal-ADC) path.** `exec` sums each tile of
//! `tile_rows` products in `i32` and the tiles in `i64`. No tile can overflow `i32`: `rows *
//! max|w| * max|x| <= 256 * 32768 * 255 < 2^31` (asserted at compile time from
//! [`MAX_TILE_ROWS`]), so `exec` computes the exact integer sum, and so does this engine: it sums
//! chunks of the fan-in in `i32`, each chunk short enough that `chunk * max|w| * max|x| <=
//! i32::MAX` for the layer's programmed state, and the chunks in `i64`. The requantization is
//! `exec`'s formula (`(acc * m + bias) >> shift`, rounded half up) in `i64`. The
//! [`Path::Sliced`] path (a non-ideal ADC converts each tile's partial sums) is not computed
//! here ([`unsupported`]); callers run `exec` for it.
//!
//! The product runs on AVX-512 VNNI (`vpdpwssd`: 16 output pixels times a pair of fan-in rows
//! per instruction, 8 output channels x 3 vectors of pixels in registers) when the CPU has it,
//! and on portable Rust (which LLVM vectorizes for the baseline) otherwise; both compute exact
//! integers, so the path never changes a result. Tests compare both with `exec` image by image.
//!
//! [`exec`]: nvcim_shared::exec
//! [`exec::infer`]: nvcim_shared::exec::infer

use anyhow::{Context, Result, bail, ensure};
use nvcim_shared::exec::{requant, shift_round, value};
use nvcim_shared::format::{ActKind, Model, Op, OpKind, Requant, Shape};
use nvcim_shared::tile::{MAX_TILE_ROWS, Path};

use crate::kernels::Isa;

// No tile sum of `exec` can leave `i32` (module docs).
const _: () = assert!(MAX_TILE_ROWS as i64 * 32768 * 255 <= i32::MAX as i64);

/// Images per batch of [`count_correct`]: the largest VGG-8 w0.25 activations of a batch of 8
/// (`32 x 8 x 32 x 32` values) stay in a core's L2 cache.
pub const BATCH: usize = 8;

/// Output channels per register block (weights padded to a multiple of it).
const MR: usize = 8;
/// `i32` lanes per vector.
const LANES: usize = 16;
/// Vectors of output pixels per register block.
const NR: usize = 3;
/// Pairs of fan-in rows times padded pixels of one im2col block, at most (about 256 KiB).
const BLOCK_ELEMS: usize = 1 << 16;

/// A weighted op's per-run data: the programmed weights in register-block order and the
/// fan-in chunk that keeps `i32` sums exact.
struct Packed {
    /// `[o / MR][k / 2][o % MR]`, each `i32` the pair `(w[o][2j], w[o][2j+1])` (low, high half).
    w: Vec<i32>,
    /// Fan-in pairs per `i32` chunk.
    chunk: usize,
}

/// Where an op's results go.
enum Out<'a> {
    /// Saturated to `U8` (`0..=255`) or `I8` (`-127..=127`), stored as `i16` values.
    Act(&'a mut [i16], ActKind),
    /// The logits, `[class][image]`, saturated to `±i32::MAX`.
    Logits(&'a mut [i32]),
}

impl Out<'_> {
    /// Output `k`, saturated to the output's range.
    #[inline]
    fn put(&mut self, k: usize, v: i64) {
        let (lo, hi) = self.range();
        match self {
            Out::Act(o, _) => o[k] = v.clamp(lo, hi) as i16,
            Out::Logits(o) => o[k] = v.clamp(lo, hi) as i32,
        }
    }

    /// The saturation range of the outputs.
    fn range(&self) -> (i64, i64) {
        match self {
            Out::Act(_, ActKind::U8) => (0, 255),
            Out::Act(..) => (-127, 127),
            Out::Logits(_) => (-i64::from(i32::MAX), i64::from(i32::MAX)),
        }
    }
}

/// Largest `|value|` a tensor of `kind` holds (the input's table reaches -128).
fn max_abs(kind: ActKind) -> i64 {
    match kind {
        ActKind::U8 => 255,
        _ => 128,
    }
}

/// Why [`count_correct`] cannot run a model: `None` when it can.
pub fn unsupported(model: &Model<'_>, path: Path) -> Option<String> {
    if path != Path::Collapsed {
        return Some("a non-ideal ADC converts each tile's partial sums".into());
    }
    let n = model.op_count();
    if n == 0 {
        return Some("the model has no ops".into());
    }
    for i in 0..n {
        let Ok(op) = model.op(i) else {
            return Some(format!("op {i} does not decode"));
        };
        if (op.out_kind == ActKind::I32) != (i + 1 == n) {
            return Some("only the last op may (and must) write the logits".into());
        }
        if op.src > i || (op.kind.is_binary() && op.src2 > i) {
            return Some(format!("op {i} reads a tensor not yet computed"));
        }
        if matches!(op.kind, OpKind::Conv | OpKind::MaxPool | OpKind::AvgPool)
            && (op.kh == 0 || op.kw == 0 || op.stride[0] == 0)
        {
            return Some(format!("op {i} has an empty window or a zero stride"));
        }
        // The format's version-2 features run through `exec` (the same bits, image by image).
        if matches!(op.kind, OpKind::Clip | OpKind::Concat)
            || op.groups != 1
            || op.stride[0] != op.stride[1]
            || op.pad.iter().any(|&p| p != op.pad[0])
            || (op.kind == OpKind::AvgPool && !op.count_include_pad)
            || (op.out_kind != ActKind::I32 && op.clip != op.out_kind.range())
        {
            return Some(format!(
                "op {i} ({:?}) uses groups, uneven strides or padding, a clip or a concat",
                op.kind
            ));
        }
    }
    None
}

/// Counts how many of the model's packed test images the programmed `state` (collapsed path)
/// classifies correctly — `exec::count_correct`'s number — in batches of `batch` images on
/// `isa`'s inner loops.
pub fn count_correct(model: &Model<'_>, state: &[i16], batch: usize, isa: Isa) -> Result<usize> {
    let mut correct = 0;
    drive(model, state, batch, isa, usize::MAX, |label, logits| {
        correct += usize::from(argmax(logits) == label);
    })?;
    Ok(correct)
}

/// Every packed test image's logits (`[image][class]`), as [`count_correct`] computes them,
/// with the fan-in chunks at most `max_chunk` pairs long (`usize::MAX`: as long as exactness
/// allows; small values exercise the chunked sums in tests).
pub fn logits(
    model: &Model<'_>,
    state: &[i16],
    batch: usize,
    isa: Isa,
    max_chunk: usize,
) -> Result<Vec<i32>> {
    let mut all = Vec::new();
    drive(model, state, batch, isa, max_chunk, |_, logits| {
        all.extend_from_slice(logits)
    })?;
    Ok(all)
}

/// The first index of the largest logit, as `exec`.
fn argmax(logits: &[i32]) -> usize {
    let mut best = 0;
    for (k, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = k;
        }
    }
    best
}

/// Runs the test images in batches and hands each image's label and logits to `sink`.
fn drive(
    model: &Model<'_>,
    state: &[i16],
    batch: usize,
    isa: Isa,
    max_chunk: usize,
    mut sink: impl FnMut(usize, &[i32]),
) -> Result<()> {
    if let Some(why) = unsupported(model, Path::Collapsed) {
        bail!("the layer-wise engine cannot run this model: {why}");
    }
    ensure!(
        state.len() == model.state_len(Path::Collapsed),
        "programmed state of {} values, the model needs {}",
        state.len(),
        model.state_len(Path::Collapsed)
    );
    ensure!(batch > 0, "a batch of at least one image");
    let ops: Vec<Op> = (0..model.op_count())
        .map(|i| model.op(i))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("packed model: {e}"))?;
    let shapes: Vec<(Shape, ActKind)> = (0..=ops.len())
        .map(|t| model.tensor(t).map(|x| (x.shape, x.kind)))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("packed model: {e}"))?;
    let mut packed = Vec::with_capacity(ops.len());
    for op in &ops {
        packed.push(if op.kind.is_weighted() {
            Some(pack(model, op, shapes[op.src].1, state, max_chunk)?)
        } else {
            None
        });
    }
    let records = ops
        .iter()
        .map(|op| {
            let n = match op.kind {
                OpKind::Conv | OpKind::Linear => op.out.c,
                OpKind::Add => 2,
                OpKind::AvgPool | OpKind::GlobalAvgPool => 1,
                _ => 0,
            };
            (0..n).map(|o| model.record(op.params_start + o)).collect()
        })
        .collect();
    let net = Net {
        ops,
        shapes,
        packed,
        records,
        classes: model.classes(),
        isa,
    };
    let mut acts: Vec<Vec<i16>> = net
        .shapes
        .iter()
        .map(|(s, _)| vec![0; s.len() * batch])
        .collect();
    let mut logits = vec![0i32; net.classes * batch];
    let mut scratch = Scratch::default();
    let input = model.input_shape();
    let plane = input.h * input.w;
    let luts: Vec<[i16; 256]> = (0..input.c)
        .map(|c| {
            let t = model.input_table(c);
            std::array::from_fn(|b| value(net.shapes[0].1, t.get(b).copied().unwrap_or(0)))
        })
        .collect();
    let mut first = 0;
    let mut one = vec![0i32; net.classes];
    while first < model.test_len() {
        let nb = batch.min(model.test_len() - first);
        let mut labels = Vec::with_capacity(nb);
        for n in 0..nb {
            let (image, label) = model
                .test_image(first + n)
                .with_context(|| format!("packed test image {}", first + n))?;
            labels.push(usize::from(label));
            for (c, lut) in luts.iter().enumerate() {
                let dst = &mut acts[0][(c * nb + n) * plane..(c * nb + n + 1) * plane];
                for (d, &p) in dst.iter_mut().zip(&image[c * plane..(c + 1) * plane]) {
                    *d = lut[usize::from(p)];
                }
            }
        }
        net.run(&mut acts, &mut logits, nb, &mut scratch);
        for (n, &label) in labels.iter().enumerate() {
            for (k, v) in one.iter_mut().enumerate() {
                *v = logits[k * nb + n];
            }
            sink(label, &one);
        }
        first += nb;
    }
    Ok(())
}

/// A model resolved for one run: its ops, tensor shapes, packed weights and records.
struct Net {
    ops: Vec<Op>,
    /// Tensor `t`'s shape and element type (0 the input, `i + 1` op `i`'s output).
    shapes: Vec<(Shape, ActKind)>,
    packed: Vec<Option<Packed>>,
    /// Each op's requantization records (per output channel, or the op's one or two).
    records: Vec<Vec<Requant>>,
    classes: usize,
    isa: Isa,
}

impl Net {
    /// Every op over a batch of `nb` images (`acts[0]` holds the input).
    fn run(&self, acts: &mut [Vec<i16>], logits: &mut [i32], nb: usize, s: &mut Scratch) {
        match self.isa {
            // SAFETY: `Isa::Avx512Vnni` is only detected (or listed) when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { self.run_avx512(acts, logits, nb, s) },
            _ => self.run_ops(acts, logits, nb, s),
        }
    }

    /// [`Self::run_ops`] compiled for AVX-512, where LLVM vectorizes the gathers, the
    /// requantization and the pools 16 or 32 lanes wide.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, DQ, VL and VNNI.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx512vl")]
    unsafe fn run_avx512(
        &self,
        acts: &mut [Vec<i16>],
        logits: &mut [i32],
        nb: usize,
        s: &mut Scratch,
    ) {
        self.run_ops(acts, logits, nb, s);
    }

    #[inline(always)]
    fn run_ops(&self, acts: &mut [Vec<i16>], logits: &mut [i32], nb: usize, s: &mut Scratch) {
        for (i, op) in self.ops.iter().enumerate() {
            let (done, rest) = acts.split_at_mut(i + 1);
            let (xs, x_kind) = (&done[op.src], self.shapes[op.src]);
            let x = Tensor {
                v: &xs[..x_kind.0.len() * nb],
                shape: x_kind.0,
            };
            let mut out = if op.out_kind == ActKind::I32 {
                Out::Logits(&mut logits[..op.out.c.min(self.classes) * nb])
            } else {
                Out::Act(&mut rest[0][..op.out.len() * nb], op.out_kind)
            };
            let records = &self.records[i];
            match op.kind {
                OpKind::Conv | OpKind::Linear => {
                    if let Some(p) = &self.packed[i] {
                        weighted(op, &x, nb, p, records, &mut out, s, self.isa);
                    }
                }
                OpKind::Relu => match &mut out {
                    Out::Act(o, kind) => {
                        let hi = if *kind == ActKind::U8 { 255 } else { 127 };
                        // `put(k, max(v, 0))` without the per-element dispatch.
                        for (d, &v) in o.iter_mut().zip(x.v) {
                            *d = v.clamp(0, hi);
                        }
                    }
                    Out::Logits(_) => {
                        for (k, &v) in x.v.iter().enumerate() {
                            out.put(k, i64::from(v).max(0));
                        }
                    }
                },
                OpKind::MaxPool => pool(op, &x, nb, &mut out, None),
                OpKind::AvgPool => pool(op, &x, nb, &mut out, records.first().copied()),
                OpKind::GlobalAvgPool => {
                    let r = records[0];
                    let hw = x.shape.h * x.shape.w;
                    for (k, ch) in x.v.chunks(hw.max(1)).enumerate() {
                        let sum: i64 = ch.iter().map(|&v| i64::from(v)).sum();
                        out.put(k, requant(sum, r));
                    }
                }
                OpKind::Clip | OpKind::Concat => {
                    unreachable!("`unsupported` sends models with these ops to exec")
                }
                OpKind::Add => {
                    let ys = &done[op.src2][..self.shapes[op.src2].0.len() * nb];
                    let (ra, rb) = (records[0], records[1]);
                    for (k, (&a, &b)) in x.v.iter().zip(ys).enumerate() {
                        let acc = i64::from(a) * i64::from(ra.m) + i64::from(b) * i64::from(rb.m);
                        out.put(k, shift_round(acc + ra.bias, ra.shift));
                    }
                }
            }
        }
    }
}

/// An activation tensor of a batch: `[c][image][h][w]` values.
struct Tensor<'a> {
    v: &'a [i16],
    shape: Shape,
}

/// Max or average pooling (no padding, floor mode) over each image's channel planes.
#[inline(always)]
fn pool(op: &Op, x: &Tensor<'_>, nb: usize, out: &mut Out<'_>, avg: Option<Requant>) {
    let (ih, iw) = (x.shape.h, x.shape.w);
    let (oh, ow) = (op.out.h, op.out.w);
    if let (None, Out::Act(o, kind), 2, 2, 2) = (avg, &mut *out, op.kh, op.kw, op.stride[0]) {
        let (lo, hi) = if *kind == ActKind::U8 {
            (0, 255)
        } else {
            (-127, 127)
        };
        // 2x2 max pooling, stride 2 (VGG's): two rows at a time, same type in and out.
        if 2 * oh <= ih && 2 * ow <= iw {
            for plane in 0..x.shape.c * nb {
                let src = &x.v[plane * ih * iw..(plane + 1) * ih * iw];
                let dst = &mut o[plane * oh * ow..(plane + 1) * oh * ow];
                for (oy, d) in dst.chunks_exact_mut(ow).enumerate() {
                    let r0 = &src[2 * oy * iw..2 * oy * iw + 2 * ow];
                    let r1 = &src[(2 * oy + 1) * iw..(2 * oy + 1) * iw + 2 * ow];
                    for ((d, a), b) in d.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2))
                    {
                        *d = a[0].max(a[1]).max(b[0].max(b[1])).clamp(lo, hi);
                    }
                }
            }
            return;
        }
    }
    for plane in 0..x.shape.c * nb {
        let src = &x.v[plane * ih * iw..(plane + 1) * ih * iw];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = i16::MIN;
                let mut sum = 0i64;
                for ky in 0..op.kh {
                    let at = (oy * op.stride[0] + ky) * iw + ox * op.stride[0];
                    for kx in 0..op.kw {
                        let v = src.get(at + kx).copied();
                        m = m.max(v.unwrap_or(i16::MIN));
                        sum += i64::from(v.unwrap_or(0));
                    }
                }
                let k = (plane * oh + oy) * ow + ox;
                match avg {
                    Some(r) => out.put(k, requant(sum, r)),
                    None => out.put(k, i64::from(m)),
                }
            }
        }
    }
}

/// Packs a weighted op's programmed weights into register-block order with the longest exact
/// `i32` chunk (module docs).
fn pack(
    model: &Model<'_>,
    op: &Op,
    x_kind: ActKind,
    state: &[i16],
    max_chunk: usize,
) -> Result<Packed> {
    let k = model.fan_in(op);
    let o = op.out.c;
    let start = op.weights_start;
    let w = state
        .get(start..start + o * k)
        .context("the programmed state is shorter than the model's layers")?;
    let max_w = w.iter().map(|&v| i64::from(v).abs()).max().unwrap_or(0);
    let per_row = max_w * max_abs(x_kind);
    let limit = i64::from(i32::MAX);
    let kp = k.div_ceil(2);
    // Rows per exact i32 chunk, in pairs: `limit / per_row >= 2^31 / (32768 * 255) > 256`, so
    // at least 128 pairs.
    let chunk = if per_row == 0 {
        kp.max(1)
    } else {
        ((limit / per_row) as usize / 2).clamp(1, kp.max(1))
    }
    .min(max_chunk.max(1));
    let blocks = o.div_ceil(MR);
    let mut packed = vec![0i32; blocks * kp * MR];
    for oc in 0..o {
        let row = &w[oc * k..(oc + 1) * k];
        let (b, r) = (oc / MR, oc % MR);
        for (j, two) in row.chunks(2).enumerate() {
            packed[(b * kp + j) * MR + r] = pair(two[0], two.get(1).copied().unwrap_or(0));
        }
    }
    Ok(Packed { w: packed, chunk })
}

/// Working memory of the weighted ops, grown on demand.
#[derive(Default)]
struct Scratch {
    /// The im2col block, `[k / 2][pixel]` pairs.
    col: Vec<i32>,
    /// A conv's input with its zero padding.
    padded: Vec<i16>,
    /// An im2col block's runs of output pixels along a row.
    runs: Vec<(usize, usize, usize)>,
}

/// One conv or linear op over a batch: im2col block by block, the product, requantization.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weighted(
    op: &Op,
    x: &Tensor<'_>,
    nb: usize,
    p: &Packed,
    records: &[Requant],
    out: &mut Out<'_>,
    s: &mut Scratch,
    isa: Isa,
) {
    let conv = op.kind == OpKind::Conv;
    let (k, pixels_per_image) = if conv {
        (x.shape.c * op.kh * op.kw, op.out.h * op.out.w)
    } else {
        (x.shape.len(), 1)
    };
    let kp = k.div_ceil(2);
    let total = nb * pixels_per_image;
    let block = ((BLOCK_ELEMS / kp.max(1)) / (NR * LANES) * (NR * LANES)).max(NR * LANES);
    let block = block.min(total.next_multiple_of(LANES));
    // The input with its zero padding, `[c][image][ih + 2 pad][iw + 2 pad]`: every tap of every
    // output pixel is then in range.
    let Shape {
        c: ic,
        h: ih,
        w: iw,
    } = x.shape;
    let (ph, pw) = (ih + 2 * op.pad[0], iw + 2 * op.pad[0]);
    if conv {
        pad_planes(x.v, ic * nb, ih, iw, op.pad[0], &mut s.padded);
    }
    let mut first = 0;
    while first < total {
        let np = block.min(total - first);
        let stride = np.next_multiple_of(LANES);
        s.col.resize(kp * stride, 0);
        if conv {
            // The block's runs of output pixels along a row: (input offset of the run's first
            // window, im2col column, length).
            let st = op.stride[0];
            pixel_runs(first, np, op.out.h, op.out.w, st, ph, pw, &mut s.runs);
            let taps = op.kh * op.kw;
            let tap_at = |kk: usize| -> Option<usize> {
                // Channel `c`'s planes start `c * nb` planes in.
                (kk < k).then(|| {
                    let (c, t) = (kk / taps, kk % taps);
                    c * nb * ph * pw + (t / op.kw) * pw + t % op.kw
                })
            };
            for j in 0..kp {
                let dst = &mut s.col[j * stride..(j + 1) * stride];
                let (a, b) = (tap_at(2 * j), tap_at(2 * j + 1));
                for &(base, at, len) in &s.runs {
                    let d = &mut dst[at..at + len];
                    let src_a = &s.padded[base + a.unwrap_or(0)..];
                    match (b, st) {
                        (Some(b), 1) => {
                            let src_b = &s.padded[base + b..];
                            for ((d, &va), &vb) in d.iter_mut().zip(src_a).zip(src_b) {
                                *d = pair(va, vb);
                            }
                        }
                        (Some(b), _) => {
                            let src_b = &s.padded[base + b..];
                            for (i, d) in d.iter_mut().enumerate() {
                                *d = pair(src_a[i * st], src_b[i * st]);
                            }
                        }
                        (None, _) => {
                            for (i, d) in d.iter_mut().enumerate() {
                                *d = pair(src_a[i * st], 0);
                            }
                        }
                    }
                }
                dst[np..].fill(0);
            }
        } else {
            // Linear over the flattened `[c][h][w]` input: feature `kk` of image `n`.
            let plane = (ih * iw).max(1);
            let feature = |kk: usize, n: usize| -> i16 {
                if kk < k {
                    x.v[((kk / plane) * nb + n) * plane + kk % plane]
                } else {
                    0
                }
            };
            for j in 0..kp {
                let dst = &mut s.col[j * stride..(j + 1) * stride];
                for (i, d) in dst[..np].iter_mut().enumerate() {
                    *d = pair(feature(2 * j, first + i), feature(2 * j + 1, first + i));
                }
                dst[np..].fill(0);
            }
        }
        product(p, kp, &s.col, stride, np, first, total, records, out, isa);
        first += np;
    }
}

/// Copies `planes` planes of `ih x iw` values into `out` with `pad` zeros on every side.
#[inline(always)]
pub(crate) fn pad_planes<T: Copy + Default>(
    x: &[T],
    planes: usize,
    ih: usize,
    iw: usize,
    pad: usize,
    out: &mut Vec<T>,
) {
    let (ph, pw) = (ih + 2 * pad, iw + 2 * pad);
    out.clear();
    out.resize(planes * ph * pw, T::default());
    for (plane, src) in x.chunks_exact(ih * iw).take(planes).enumerate() {
        for (y, row) in src.chunks_exact(iw).enumerate() {
            let at = (plane * ph + y + pad) * pw + pad;
            out[at..at + iw].copy_from_slice(row);
        }
    }
}

/// The runs of output pixels `first .. first + np` (pixel `p` = image `p / (oh * ow)`, then
/// row-major) along output rows: (offset of the run's first window in the padded input planes
/// of image 0 / channel 0, with `ph x pw` planes; im2col column; length).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn pixel_runs(
    first: usize,
    np: usize,
    oh: usize,
    ow: usize,
    st: usize,
    ph: usize,
    pw: usize,
    runs: &mut Vec<(usize, usize, usize)>,
) {
    runs.clear();
    let per_image = oh * ow;
    let mut i = 0;
    while i < np {
        let q = first + i;
        let (n, r) = (q / per_image, q % per_image);
        let (oy, ox) = (r / ow, r % ow);
        let len = (ow - ox).min(np - i);
        runs.push(((n * ph + oy * st) * pw + ox * st, i, len));
        i += len;
    }
}

/// Two `i16` as one `i32`, `lo` in the low half (`vpdpwssd`'s pair order).
#[inline(always)]
fn pair(lo: i16, hi: i16) -> i32 {
    (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32
}

/// `C = W X` over one im2col block (`np` pixels, rows `stride` apart), requantized into `out`
/// at pixels `first ..` of `total` per output channel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn product(
    p: &Packed,
    kp: usize,
    col: &[i32],
    stride: usize,
    np: usize,
    first: usize,
    total: usize,
    records: &[Requant],
    out: &mut Out<'_>,
    isa: Isa,
) {
    let channels = records.len();
    let (lo, hi) = out.range();
    let mut acc = [[0i64; NR * LANES]; MR];
    for b in 0..channels.div_ceil(MR) {
        let w = &p.w[b * kp * MR..(b + 1) * kp * MR];
        let mut v = 0;
        while v * LANES < np {
            let nr = (np.div_ceil(LANES) - v).min(NR);
            tile(isa, w, col, stride, v * LANES, kp, p.chunk, nr, &mut acc);
            let valid = (np - v * LANES).min(nr * LANES);
            for (r, a) in acc.iter().enumerate().take(MR.min(channels - b * MR)) {
                let o = b * MR + r;
                let rq = records[o];
                let at = o * total + first + v * LANES;
                let src = &a[..valid];
                match out {
                    Out::Act(dst, _) => requant_row(src, rq, lo, hi, &mut dst[at..at + valid]),
                    Out::Logits(dst) => requant_row(src, rq, lo, hi, &mut dst[at..at + valid]),
                }
            }
            v += nr;
        }
    }
}

/// `dst[j] = clamp(shift_round(acc[j] * m + bias, shift), lo, hi)`: `exec`'s requantization of
/// an in-bound accumulator and its saturation, in a loop LLVM vectorizes.
#[inline(always)]
fn requant_row<T: TryFrom<i64> + Default>(
    acc: &[i64],
    r: Requant,
    lo: i64,
    hi: i64,
    dst: &mut [T],
) {
    let (m, bias) = (i64::from(r.m), r.bias);
    if r.shift == 0 {
        for (d, &a) in dst.iter_mut().zip(acc) {
            *d = T::try_from((a * m + bias).clamp(lo, hi)).unwrap_or_default();
        }
    } else {
        let s = r.shift - 1;
        for (d, &a) in dst.iter_mut().zip(acc) {
            *d = T::try_from(((((a * m + bias) >> s) + 1) >> 1).clamp(lo, hi)).unwrap_or_default();
        }
    }
}

/// The register block: `acc[r][j] = sum_k W[r][k] X[k][col0 + j]` for `j < nr * LANES`, in
/// `i32` chunks of `chunk` pairs summed in `i64`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn tile(
    isa: Isa,
    w: &[i32],
    col: &[i32],
    stride: usize,
    col0: usize,
    kp: usize,
    chunk: usize,
    nr: usize,
    acc: &mut [[i64; NR * LANES]; MR],
) {
    for a in acc.iter_mut() {
        a.fill(0);
    }
    let mut k0 = 0;
    while k0 < kp {
        let k1 = (k0 + chunk).min(kp);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512Vnni` is only detected (or listed as available) when the CPU
            // has AVX-512 F, BW, DQ, VL and VNNI; the bounds the kernel relies on are checked here.
            Isa::Avx512Vnni => {
                assert!(
                    w.len() >= kp * MR && col0 + nr * LANES <= stride && col.len() >= kp * stride
                );
                unsafe { vnni::tile(w, col, stride, col0, k0, k1, nr, acc) }
            }
            _ => portable_tile(w, col, stride, col0, k0, k1, nr, acc),
        }
        k0 = k1;
    }
}

/// [`tile`]'s chunk `k0 .. k1` in portable Rust (`i32` wrapping sums, exact within the bound).
#[allow(clippy::too_many_arguments)]
fn portable_tile(
    w: &[i32],
    col: &[i32],
    stride: usize,
    col0: usize,
    k0: usize,
    k1: usize,
    nr: usize,
    acc: &mut [[i64; NR * LANES]; MR],
) {
    let n = nr * LANES;
    let mut part = [[0i32; NR * LANES]; MR];
    for j in k0..k1 {
        let xs = &col[j * stride + col0..j * stride + col0 + n];
        for (r, pr) in part.iter_mut().enumerate() {
            let wv = w[j * MR + r];
            let (wl, wh) = (i32::from(wv as i16), i32::from((wv >> 16) as i16));
            for (a, &xv) in pr[..n].iter_mut().zip(xs) {
                let (xl, xh) = (i32::from(xv as i16), i32::from((xv >> 16) as i16));
                *a = a.wrapping_add(wl * xl).wrapping_add(wh * xh);
            }
        }
    }
    for (a, pr) in acc.iter_mut().zip(&part) {
        for (a, &v) in a[..n].iter_mut().zip(&pr[..n]) {
            *a += i64::from(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::{
        _mm512_add_epi64, _mm512_castsi512_si256, _mm512_cvtepi32_epi64, _mm512_dpwssd_epi32,
        _mm512_extracti64x4_epi64, _mm512_loadu_epi64, _mm512_loadu_si512, _mm512_set1_epi32,
        _mm512_setzero_si512, _mm512_storeu_si512,
    };

    use super::{LANES, MR, NR};

    /// [`super::tile`]'s chunk `k0 .. k1`: `MR x nr` accumulators of 16 `i32` lanes, one
    /// `vpdpwssd` per (channel, vector, pair), then widened and added to `acc`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, DQ and VNNI; `w` holds `k1 * MR` values, `col` holds
    /// `k1` rows of `stride` values and `col0 + nr * LANES <= stride`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        w: &[i32],
        col: &[i32],
        stride: usize,
        col0: usize,
        k0: usize,
        k1: usize,
        nr: usize,
        acc: &mut [[i64; NR * LANES]; MR],
    ) {
        match nr {
            3 => unsafe { tile_n::<3>(w, col, stride, col0, k0, k1, acc) },
            2 => unsafe { tile_n::<2>(w, col, stride, col0, k0, k1, acc) },
            _ => unsafe { tile_n::<1>(w, col, stride, col0, k0, k1, acc) },
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn tile_n<const N: usize>(
        w: &[i32],
        col: &[i32],
        stride: usize,
        col0: usize,
        k0: usize,
        k1: usize,
        acc: &mut [[i64; NR * LANES]; MR],
    ) {
        let mut a = [[_mm512_setzero_si512(); N]; MR];
        let wp = w.as_ptr();
        let xp = col.as_ptr();
        for j in k0..k1 {
            let mut x = [_mm512_setzero_si512(); N];
            for (v, xv) in x.iter_mut().enumerate() {
                // SAFETY: row `j < k1` of `col` has `stride >= col0 + N * LANES` values.
                *xv = unsafe { _mm512_loadu_si512(xp.add(j * stride + col0 + v * LANES).cast()) };
            }
            for (r, ar) in a.iter_mut().enumerate() {
                // SAFETY: `j * MR + r < k1 * MR <= w.len()`.
                let wv = _mm512_set1_epi32(unsafe { *wp.add(j * MR + r) });
                for (av, &xv) in ar.iter_mut().zip(&x) {
                    *av = _mm512_dpwssd_epi32(*av, xv, wv);
                }
            }
        }
        for (ar, accr) in a.iter().zip(acc.iter_mut()) {
            for (v, &av) in ar.iter().enumerate() {
                let lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(av));
                let hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(av));
                let at = accr[v * LANES..].as_mut_ptr();
                // SAFETY: `v * LANES + 16 <= N * LANES <= NR * LANES`, the row's length.
                unsafe {
                    let s0 = _mm512_add_epi64(_mm512_loadu_epi64(at), lo);
                    let s1 = _mm512_add_epi64(_mm512_loadu_epi64(at.add(8)), hi);
                    _mm512_storeu_si512(at.cast(), s0);
                    _mm512_storeu_si512(at.add(8).cast(), s1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::convert::{desc_nodes, model_desc};
    use crate::ir::{Network, RandomArch};
    use nvcim_shared::exec::{Scratch, infer, program};
    use nvcim_shared::format::build::{PackConfig, TestBatch, calibrate, pack as pack_blob};
    use nvcim_shared::quant::{QuantConfig, ScaleMode};
    use nvcim_shared::rng::mix64;
    use nvcim_shared::variation::{Faults, Profile, SigmaUnit, VariationConfig};

    fn variation(sigma: f32) -> VariationConfig {
        VariationConfig::new(
            QuantConfig::new(8, 2).unwrap(),
            sigma,
            SigmaUnit::Range,
            Profile::Uniform,
            Faults::NONE,
        )
        .unwrap()
    }

    /// A packed random network with `n` random test images, calibrated on them.
    fn packed(net: &Network, n: usize, tile_rows: usize) -> Vec<u8> {
        let len = net.input.iter().product::<usize>();
        let images: Vec<u8> = (0..n * len)
            .map(|i| mix64(i as u64 ^ 0x5eed) as u8)
            .collect();
        let labels: Vec<u16> = (0..n).map(|i| (mix64(i as u64) % 10) as u16).collect();
        let mut nodes = desc_nodes(net).unwrap();
        let act = calibrate(&model_desc(net, &nodes), &images).unwrap();
        for (node, a) in nodes.iter_mut().zip(act) {
            node.act_max = a;
        }
        let cfg = PackConfig {
            variation: variation(0.0),
            tile_rows,
            tile_cols: 128,
            scale_mode: ScaleMode::PerLayer,
        };
        let test = TestBatch {
            images: &images,
            labels: &labels,
        };
        pack_blob(&model_desc(net, &nodes), &cfg, Some(test)).unwrap()
    }

    /// `exec`'s logits for every test image.
    fn exec_logits(m: &Model<'_>, state: &[i16]) -> Vec<i32> {
        let s = m.scratch();
        let (mut act, mut patch) = (vec![0u8; s.act_bytes], vec![0i16; s.patch]);
        let mut out = Vec::new();
        for i in 0..m.test_len() {
            let (image, _) = m.test_image(i).unwrap();
            let mut logits = vec![0i32; s.logits];
            let mut scratch = Scratch {
                act: &mut act,
                patch: &mut patch,
            };
            infer(m, Path::Collapsed, state, image, &mut scratch, &mut logits).unwrap();
            out.extend_from_slice(&logits);
        }
        out
    }

    /// Every image's logits equal `exec`'s on every path this CPU has, for batch sizes that
    /// do and do not divide the test set, whole and chunked fan-in sums, clean and noisy runs.
    fn check(net: &Network, images: usize, tile_rows: usize) {
        let blob = packed(net, images, tile_rows);
        let m = Model::parse(&blob).unwrap();
        for (run, sigma) in [(0, 0.0), (1, 0.4), (2, 3.0)] {
            let mut state = vec![0i16; m.state_len(Path::Collapsed)];
            program(&m, &variation(sigma), 11, run, Path::Collapsed, &mut state).unwrap();
            let want = exec_logits(&m, &state);
            assert!(want.iter().any(|&v| v != 0), "degenerate logits");
            for isa in Isa::available() {
                for (batch, chunk) in [(1, usize::MAX), (3, 5), (8, usize::MAX), (64, 1)] {
                    let got = logits(&m, &state, batch, isa, chunk).unwrap();
                    assert_eq!(
                        got, want,
                        "{isa:?} batch {batch} chunk {chunk} sigma {sigma}"
                    );
                }
            }
            let correct = count_correct(&m, &state, BATCH, Isa::detect()).unwrap();
            let s = m.scratch();
            let (mut act, mut patch) = (vec![0u8; s.act_bytes], vec![0i16; s.patch]);
            let mut lg = vec![0i32; s.logits];
            let mut scratch = Scratch {
                act: &mut act,
                patch: &mut patch,
            };
            let exec_correct = nvcim_shared::exec::count_correct(
                &m,
                Path::Collapsed,
                &state,
                &mut scratch,
                &mut lg,
            )
            .unwrap();
            assert_eq!(correct, exec_correct);
        }
    }

    /// VGG-8 at width 1/8 on 16x16 single-channel images.
    fn small_vgg() -> Network {
        let arch = RandomArch {
            channels: 1,
            size: 16,
            classes: 10,
            width: 0.125,
            seed: 3,
        };
        Network::vgg8(&arch).unwrap()
    }

    #[test]
    fn vgg8_logits_equal_exec() {
        check(&small_vgg(), 11, 128);
    }

    #[test]
    fn resnet18_logits_equal_exec() {
        // Strided convs, 1x1 shortcuts, residual adds, global average pooling; 3 channels;
        // small tiles.
        let arch = RandomArch {
            channels: 3,
            size: 16,
            classes: 10,
            width: 0.0625,
            seed: 5,
        };
        check(&Network::resnet18(&arch).unwrap(), 5, 32);
    }

    #[test]
    fn bad_state_and_batch_are_errors() {
        let blob = packed(&small_vgg(), 2, 128);
        let m = Model::parse(&blob).unwrap();
        let state = vec![0i16; m.state_len(Path::Collapsed)];
        assert!(count_correct(&m, &state, 4, Isa::Portable).is_ok());
        let e = count_correct(&m, &state[1..], 4, Isa::Portable).unwrap_err();
        assert!(e.to_string().contains("programmed state"), "{e}");
        assert!(count_correct(&m, &state, 0, Isa::Portable).is_err());
        assert!(unsupported(&m, Path::Collapsed).is_none());
        let adc = nvcim_shared::tile::Adc::with_full_scale(6, 1 << 14).unwrap();
        assert!(unsupported(&m, Path::Sliced(adc)).is_some());
    }

    #[test]
    fn pair_packing_keeps_signs() {
        // `vpdpwssd` and `portable_tile` read the low half as the first row of the pair.
        for (lo, hi) in [(-3, 7), (i16::MIN, i16::MAX), (5, -1), (0, -32767)] {
            let v = pair(lo, hi);
            assert_eq!((v as i16, (v >> 16) as i16), (lo, hi));
        }
    }
}
