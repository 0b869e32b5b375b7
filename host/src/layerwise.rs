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
use nvcim_shared::format::{ActKind, Model, Op, OpKind, Requant, Shape};
use nvcim_shared::tile::{MAX_TILE_ROWS, Path};

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

/// Which inner loops this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F, BW, DQ and VNNI.
    Avx512Vnni,
    /// Portable Rust.
    Portable,
}

impl Isa {
    /// The best this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
        }
        Isa::Portable
    }

    /// Every path this CPU can run (for tests).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        if Isa::detect() == Isa::Avx512Vnni {
            v.push(Isa::Avx512Vnni);
        }
        v
    }
}

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
    #[inline]
    fn put(&mut self, k: usize, v: i64) {
        match self {
            Out::Act(o, kind) => o[k] = saturate(v, *kind) as i16,
            Out::Logits(o) => o[k] = v.clamp(-i64::from(i32::MAX), i64::from(i32::MAX)) as i32,
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

#[inline]
fn saturate(v: i64, kind: ActKind) -> i64 {
    match kind {
        ActKind::U8 => v.clamp(0, 255),
        _ => v.clamp(-127, 127),
    }
}

/// `exec`'s `value`: a stored byte as the number it codes.
#[inline]
fn value(kind: ActKind, b: u8) -> i16 {
    match kind {
        ActKind::U8 => i16::from(b),
        _ => i16::from(b as i8),
    }
}

/// `exec`'s rounding shift: `(v + 2^(shift-1)) >> shift`.
#[inline]
fn shift_round(v: i64, shift: u32) -> i64 {
    if shift == 0 {
        v
    } else {
        ((v >> (shift - 1)) + 1) >> 1
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
        if op.src > i || (op.kind == OpKind::Add && op.src2 > i) {
            return Some(format!("op {i} reads a tensor not yet computed"));
        }
        if matches!(op.kind, OpKind::Conv | OpKind::MaxPool | OpKind::AvgPool)
            && (op.kh == 0 || op.kw == 0 || op.stride == 0)
        {
            return Some(format!("op {i} has an empty window or a zero stride"));
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
    let classes = model.classes();
    let mut acts: Vec<Vec<i16>> = shapes
        .iter()
        .map(|(s, _)| vec![0; s.len() * batch])
        .collect();
    let mut logits = vec![0i32; classes * batch];
    let mut scratch = Scratch::default();
    let input = model.input_shape();
    let plane = input.h * input.w;
    let luts: Vec<[i16; 256]> = (0..input.c)
        .map(|c| {
            let t = model.input_table(c);
            std::array::from_fn(|b| value(shapes[0].1, t.get(b).copied().unwrap_or(0)))
        })
        .collect();
    let mut first = 0;
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
        for (i, op) in ops.iter().enumerate() {
            let (done, rest) = acts.split_at_mut(i + 1);
            let (xs, x_kind) = (&done[op.src], shapes[op.src]);
            let x = Tensor {
                v: &xs[..x_kind.0.len() * nb],
                shape: x_kind.0,
            };
            let mut out = if op.out_kind == ActKind::I32 {
                Out::Logits(&mut logits[..op.out.c.min(classes) * nb])
            } else {
                Out::Act(&mut rest[0][..op.out.len() * nb], op.out_kind)
            };
            match op.kind {
                OpKind::Conv | OpKind::Linear => {
                    let p = packed[i].as_ref().context("a weighted op without weights")?;
                    let records: Vec<Requant> = (0..op.out.c)
                        .map(|o| model.record(op.params_start + o))
                        .collect();
                    weighted(op, &x, nb, p, &records, &mut out, &mut scratch, isa);
                }
                OpKind::Relu => {
                    for (k, &v) in x.v.iter().enumerate() {
                        out.put(k, i64::from(v).max(0));
                    }
                }
                OpKind::MaxPool => pool(op, &x, nb, &mut out, None),
                OpKind::AvgPool => pool(op, &x, nb, &mut out, Some(model.record(op.params_start))),
                OpKind::GlobalAvgPool => {
                    let r = model.record(op.params_start);
                    let hw = x.shape.h * x.shape.w;
                    for (k, ch) in x.v.chunks(hw.max(1)).enumerate() {
                        let sum: i64 = ch.iter().map(|&v| i64::from(v)).sum();
                        out.put(k, requant(sum, r));
                    }
                }
                OpKind::Add => {
                    let ys = &done[op.src2][..shapes[op.src2].0.len() * nb];
                    let (ra, rb) = (
                        model.record(op.params_start),
                        model.record(op.params_start + 1),
                    );
                    for (k, (&a, &b)) in x.v.iter().zip(ys).enumerate() {
                        let acc = i64::from(a) * i64::from(ra.m) + i64::from(b) * i64::from(rb.m);
                        out.put(k, shift_round(acc + ra.bias, ra.shift));
                    }
                }
            }
        }
        let mut one = vec![0i32; classes];
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

/// `exec`'s requantization (clamped accumulator).
#[inline]
fn requant(acc: i64, r: Requant) -> i64 {
    nvcim_shared::exec::requant(acc, r)
}

/// An activation tensor of a batch: `[c][image][h][w]` values.
struct Tensor<'a> {
    v: &'a [i16],
    shape: Shape,
}

/// Max or average pooling (no padding, floor mode) over each image's channel planes.
fn pool(op: &Op, x: &Tensor<'_>, nb: usize, out: &mut Out<'_>, avg: Option<Requant>) {
    let (ih, iw) = (x.shape.h, x.shape.w);
    let (oh, ow) = (op.out.h, op.out.w);
    for plane in 0..x.shape.c * nb {
        let src = &x.v[plane * ih * iw..(plane + 1) * ih * iw];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = i16::MIN;
                let mut sum = 0i64;
                for ky in 0..op.kh {
                    let at = (oy * op.stride + ky) * iw + ox * op.stride;
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
        for (j, pair) in row.chunks(2).enumerate() {
            let lo = pair[0] as u16 as u32;
            let hi = pair.get(1).map_or(0, |&v| v as u16 as u32);
            packed[(b * kp + j) * MR + r] = (lo | hi << 16) as i32;
        }
    }
    Ok(Packed { w: packed, chunk })
}

/// Working memory of the weighted ops, grown on demand.
#[derive(Default)]
struct Scratch {
    /// The im2col block, `[k / 2][pixel]` pairs.
    col: Vec<i32>,
    /// Two gathered fan-in rows before interleaving.
    rows: [Vec<i16>; 2],
}

/// One conv or linear op over a batch: im2col block by block, the product, requantization.
#[allow(clippy::too_many_arguments)]
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
    let (k, pixels_per_image) = match op.kind {
        OpKind::Conv => (x.shape.c * op.kh * op.kw, op.out.h * op.out.w),
        _ => (x.shape.len(), 1),
    };
    let kp = k.div_ceil(2);
    let total = nb * pixels_per_image;
    let block = ((BLOCK_ELEMS / kp.max(1)) / (NR * LANES) * (NR * LANES)).max(NR * LANES);
    let block = block.min(total.next_multiple_of(LANES));
    let mut first = 0;
    while first < total {
        let np = block.min(total - first);
        let stride = np.next_multiple_of(LANES);
        s.col.clear();
        s.col.resize(kp * stride, 0);
        for r in &mut s.rows {
            r.clear();
            r.resize(np, 0);
        }
        for j in 0..kp {
            for (h, row) in s.rows.iter_mut().enumerate() {
                let kk = 2 * j + h;
                if kk < k {
                    gather(op, x, nb, kk, first, row);
                } else {
                    row.fill(0);
                }
            }
            let dst = &mut s.col[j * stride..j * stride + np];
            for ((d, &a), &b) in dst.iter_mut().zip(&s.rows[0]).zip(&s.rows[1]) {
                *d = (a as u16 as u32 | (b as u16 as u32) << 16) as i32;
            }
        }
        product(p, kp, &s.col, stride, np, first, total, records, out, isa);
        first += np;
    }
}

/// Fan-in row `kk` of the im2col matrix over output pixels `first .. first + row.len()` of the
/// batch (pixel `p` = image `p / (oh * ow)`, then row-major), zeros in the padding.
fn gather(op: &Op, x: &Tensor<'_>, nb: usize, kk: usize, first: usize, row: &mut [i16]) {
    let Shape {
        c: _,
        h: ih,
        w: iw,
    } = x.shape;
    let plane = ih * iw;
    if op.kind != OpKind::Conv {
        // Linear over the flattened `[c][h][w]` input: feature `kk` of image `n`.
        let (c, at) = (kk / plane.max(1), kk % plane.max(1));
        for (i, d) in row.iter_mut().enumerate() {
            let n = first + i;
            *d = x.v[(c * nb + n) * plane + at];
        }
        return;
    }
    let (c, tap) = (kk / (op.kh * op.kw), kk % (op.kh * op.kw));
    let (ky, kx) = (tap / op.kw, tap % op.kw);
    let (oh, ow) = (op.out.h, op.out.w);
    let per_image = oh * ow;
    let mut i = 0;
    while i < row.len() {
        let p = first + i;
        let (n, r) = (p / per_image, p % per_image);
        let (oy, ox0) = (r / ow, r % ow);
        let len = (ow - ox0).min(row.len() - i);
        let seg = &mut row[i..i + len];
        let iy = (oy * op.stride + ky).wrapping_sub(op.pad);
        if iy >= ih {
            seg.fill(0);
        } else {
            let src = &x.v[(c * nb + n) * plane + iy * iw..][..iw];
            for (j, d) in seg.iter_mut().enumerate() {
                let ix = ((ox0 + j) * op.stride + kx).wrapping_sub(op.pad);
                *d = if ix < iw { src[ix] } else { 0 };
            }
        }
        i += len;
    }
}

/// `C = W X` over one im2col block (`np` pixels, rows `stride` apart), requantized into `out`
/// at pixels `first ..` of `total` per output channel.
#[allow(clippy::too_many_arguments)]
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
            for r in 0..MR.min(channels - b * MR) {
                let o = b * MR + r;
                let rq = records[o];
                let base = o * total + first + v * LANES;
                for (j, &a) in acc[r][..valid].iter().enumerate() {
                    let y = shift_round(a * i64::from(rq.m) + rq.bias, rq.shift).clamp(lo, hi);
                    out.put(base + j, y);
                }
            }
            v += nr;
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
            // has AVX-512 F, BW, DQ and VNNI; the bounds the kernel relies on are checked here.
            Isa::Avx512Vnni => {
                assert!(w.len() >= kp * MR && col0 + nr * LANES <= stride && col.len() >= kp * stride);
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
        _mm512_add_epi64, _mm512_cvtepi32_epi64, _mm512_dpwssd_epi32,
        _mm512_extracti64x4_epi64, _mm512_castsi512_si256, _mm512_loadu_si512,
        _mm512_set1_epi32, _mm512_setzero_si512, _mm512_storeu_si512, _mm512_loadu_epi64,
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
    use crate::convert::{desc_nodes, model_desc};
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
        let images: Vec<u8> = (0..n * len).map(|i| mix64(i as u64 ^ 0x5eed) as u8).collect();
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
                    assert_eq!(got, want, "{isa:?} batch {batch} chunk {chunk} sigma {sigma}");
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

    #[test]
    fn vgg8_logits_equal_exec() {
        let arch = RandomArch {
            channels: 1,
            size: 16,
            classes: 10,
            width: 0.125,
            seed: 3,
        };
        check(&Network::vgg8(&arch).unwrap(), 11, 128);
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
        let arch = RandomArch {
            channels: 1,
            size: 16,
            classes: 10,
            width: 0.125,
            seed: 3,
        };
        let blob = packed(&Network::vgg8(&arch).unwrap(), 2, 128);
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
        let v = (-3i16 as u16 as u32 | (7u32) << 16) as i32;
        assert_eq!(v as i16, -3);
        assert_eq!((v >> 16) as i16, 7);
    }
}
