//! The float engine of `nvcim eval`: an [`ir::Network`] with one Monte Carlo run's weights,
//! run a batch of images at a time, one node at a time, each conv and linear node as an `f32`
//! matrix product.
//!
//! The layout is the integer engine's ([`crate::engine::int::layers`]): activations in `[c][image][h][w]`
//! order. The register block is 8 output channels x 48 output pixels (AVX-512 FMA with the
//! weight broadcast from memory when the CPU has AVX-512 F, portable Rust otherwise), fed three
//! ways:
//! - a same-padding stride-1 conv (every VGG conv) reads its input straight from a copy with
//!   zero rows between the images and masked loads for the zero columns (`direct`; no im2col);
//! - other convs (strided, 1x1 shortcuts) im2col their zero-padded input in blocks of about
//!   256 KiB;
//! - a linear node puts the output features in the vector lanes and the batch's images in the
//!   broadcast rows (`linear`).
//!
//! A BatchNorm that only reads a conv or linear node is folded into that node's output step
//! (`y = acc * m + b`, `m` and `b` from [`ir::BatchNorm::affine`]), and so is a ReLU that only
//! reads it; everything else runs as its own node.
//!
//! The numbers are `f32` sums in another order than Burn's or [`ir::Network::forward`]'s
//! (which sums in `f64`): the tests bound the difference of the logits to `1e-4` of their
//! scale, the same bound the ONNX runtimes meet. On the demo's three models every one of the 96
//! Monte Carlo runs classified exactly as many images correctly as Burn's forward pass did.

use anyhow::{Result, ensure};

use crate::engine::int::layers::{pad_planes, pixel_runs};
use crate::ir::{self, Network, Op, Value};
pub use crate::kernels::Isa;
use crate::kernels::gemm::{LANES, MAX_KW, MR, NR, tile, tile_direct};

/// Images per batch (as the integer engine).
pub const BATCH: usize = 8;

/// Fan-in rows times padded pixels of one im2col block, at most (256 KiB of `f32`).
const BLOCK_ELEMS: usize = 1 << 16;

/// What a node does in this engine.
enum Step {
    /// A conv or linear node with the folded output step; the nodes it absorbed are skipped.
    Weighted {
        /// A conv's weights `[o / MR][k][o % MR]`; a linear node's `[k][o]` (rows padded to
        /// whole vectors, see `linear`).
        w: Vec<f32>,
        /// Per output channel: `y = acc * m + b`.
        affine: Vec<(f32, f32)>,
        relu: bool,
        /// The last node it stands for (its output is this node's value).
        last: usize,
    },
    /// Folded into an earlier step.
    Skip,
    /// Runs as it is.
    Plain,
}

/// The network of one run, ready to classify batches.
pub struct Prepared<'n> {
    net: &'n Network,
    shapes: Vec<ir::Shape>,
    steps: Vec<Step>,
    isa: Isa,
}

impl<'n> Prepared<'n> {
    /// Resolves `net` (the run's weights already in it) for `isa`.
    pub fn new(net: &'n Network, isa: Isa) -> Result<Self> {
        Self::build(net, isa, true)
    }

    /// [`Prepared::new`], with BatchNorm folded into the producing step or (for recalibration,
    /// which reads each BatchNorm's input) run as its own node.
    fn build(net: &'n Network, isa: Isa, fold_bn: bool) -> Result<Self> {
        let shapes = net.shapes()?;
        let n = net.nodes.len();
        let mut readers = vec![0usize; n];
        for node in &net.nodes {
            for v in &node.inputs {
                if let Some(p) = v.producer() {
                    readers[p] += 1;
                }
            }
        }
        // Reads only `p`, and is `p`'s only reader.
        let sole = |i: usize, p: usize| {
            i < n && net.nodes[i].inputs == [Value::node(p)] && readers[p] == 1
        };
        let mut steps: Vec<Step> = (0..n).map(|_| Step::Plain).collect();
        let mut i = 0;
        while i < n {
            let (w, bias, out) = match &net.nodes[i].op {
                Op::Conv2d(c) => (&c.weight, &c.bias, c.out_channels),
                Op::Linear(l) => (&l.weight, &l.bias, l.out_features),
                _ => {
                    i += 1;
                    continue;
                }
            };
            let mut affine: Vec<(f64, f64)> = (0..out)
                .map(|o| (1.0, bias.as_ref().map_or(0.0, |b| f64::from(b[o]))))
                .collect();
            let mut last = i;
            if fold_bn
                && sole(i + 1, i)
                && let Op::BatchNorm(bn) = &net.nodes[i + 1].op
            {
                for ((m, b), (bm, bb)) in affine.iter_mut().zip(bn.affine()) {
                    *b = *b * bm + bb;
                    *m *= bm;
                }
                last = i + 1;
            }
            let relu = sole(last + 1, last) && matches!(net.nodes[last + 1].op, Op::Relu);
            if relu {
                last += 1;
            }
            let k = w.len() / out.max(1);
            let packed = if matches!(net.nodes[i].op, Op::Linear(_)) {
                // Transposed, `[k][o]` with rows of whole vectors (see `linear`).
                let row = out.next_multiple_of(LANES);
                let mut t = vec![0f32; k * row];
                for o in 0..out {
                    for (j, &v) in w[o * k..(o + 1) * k].iter().enumerate() {
                        t[j * row + o] = v;
                    }
                }
                t
            } else {
                // Per group (one for an ungrouped conv): `[o / MR][k][o % MR]` of its channels.
                let groups = match &net.nodes[i].op {
                    Op::Conv2d(c) => c.groups.max(1),
                    _ => 1,
                };
                let per = out / groups;
                let len = per.div_ceil(MR) * k * MR;
                let mut packed = vec![0f32; groups * len];
                for o in 0..out {
                    let (g, r) = (o / per, o % per);
                    for (j, &v) in w[o * k..(o + 1) * k].iter().enumerate() {
                        packed[g * len + ((r / MR) * k + j) * MR + r % MR] = v;
                    }
                }
                packed
            };
            steps[i] = Step::Weighted {
                w: packed,
                affine: affine.iter().map(|&(m, b)| (m as f32, b as f32)).collect(),
                relu,
                last,
            };
            for s in &mut steps[i + 1..=last] {
                *s = Step::Skip;
            }
            i = last + 1;
        }
        Ok(Prepared {
            net,
            shapes,
            steps,
            isa,
        })
    }

    /// The logits (`[image][class]`) of `nb` normalized `[n][c][h][w]` images.
    pub fn logits(&self, images: &[f32], nb: usize) -> Result<Vec<f32>> {
        let mut ws = Workspace::default();
        let out = self.forward(images, nb, &mut ws)?;
        let classes = self.net.num_classes;
        let mut logits = vec![0f32; nb * classes];
        for n in 0..nb {
            for k in 0..classes {
                logits[n * classes + k] = out[k * nb + n];
            }
        }
        Ok(logits)
    }

    /// How many of `batches` (normalized `[n][c][h][w]` images and their labels) are
    /// classified correctly: the first index of the largest logit (a NaN never wins).
    pub fn count_correct(&self, batches: &[(Vec<f32>, Vec<i64>)]) -> Result<usize> {
        let mut ws = Workspace::default();
        let classes = self.net.num_classes;
        let mut correct = 0;
        for (images, labels) in batches {
            let nb = labels.len();
            let out = self.forward(images, nb, &mut ws)?;
            for (n, &label) in labels.iter().enumerate() {
                let mut best = 0;
                for k in 1..classes {
                    let (v, b) = (out[k * nb + n], out[best * nb + n]);
                    if v > b || b.is_nan() && !v.is_nan() {
                        best = k;
                    }
                }
                correct += usize::from(usize::try_from(label).ok() == Some(best));
            }
        }
        Ok(correct)
    }

    /// The last node's output, `[class][image]`, computed in `ws` (reused batch to batch).
    fn forward<'w>(&self, images: &[f32], nb: usize, ws: &'w mut Workspace) -> Result<&'w [f32]> {
        let [c, h, w] = self.net.input;
        ensure!(
            images.len() == nb * c * h * w,
            "{} input values for {nb} images of {c}x{h}x{w}",
            images.len()
        );
        let plane = h * w;
        ws.input.resize(images.len(), 0.0);
        for n in 0..nb {
            for ch in 0..c {
                ws.input[(ch * nb + n) * plane..(ch * nb + n + 1) * plane]
                    .copy_from_slice(&images[(n * c + ch) * plane..(n * c + ch + 1) * plane]);
            }
        }
        ws.values.resize_with(self.steps.len(), Vec::new);
        match self.isa {
            // SAFETY: `Isa::Avx512Vnni` and `Isa::Avx512` are only detected (or listed) when the
            // CPU has AVX-512 F, BW, DQ, VL and FMA, the features `run_avx512` is compiled for.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Avx512 => unsafe { self.run_avx512(nb, ws) },
            _ => self.run(nb, ws),
        }
        Ok(ws.values.last().map_or(&[][..], |v| v.as_slice()))
    }

    /// # Safety
    /// The CPU must have AVX-512 F and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
    unsafe fn run_avx512(&self, nb: usize, ws: &mut Workspace) {
        self.run(nb, ws);
    }

    /// Every node over the batch in `ws.input` (`[c][n][h][w]`); `ws.values[i]` becomes node
    /// `i`'s output (stale for nodes folded into a later one's step).
    #[inline(always)]
    fn run(&self, nb: usize, ws: &mut Workspace) {
        let Workspace {
            input,
            values,
            scratch: s,
            recal,
        } = ws;
        let mut i = 0;
        while i < self.steps.len() {
            let node = &self.net.nodes[i];
            let last = match &self.steps[i] {
                Step::Weighted { last, .. } => *last,
                _ => i,
            };
            // The output buffer, out of `values` while the inputs are read.
            let mut out = std::mem::take(&mut values[last]);
            let val = |v: Value| -> (&[f32], ir::Shape) {
                match v.producer() {
                    None => (input.as_slice(), self.net.input),
                    Some(p) => (values[p].as_slice(), self.shapes[p]),
                }
            };
            let (x, shape) = val(node.inputs[0]);
            match &self.steps[i] {
                Step::Skip => {}
                Step::Weighted {
                    w, affine, relu, ..
                } => weighted(node, x, shape, nb, w, affine, *relu, s, self.isa, &mut out),
                Step::Plain => match &node.op {
                    Op::Add => {
                        let (y, _) = val(node.inputs[1]);
                        out.resize(x.len(), 0.0);
                        for ((d, &a), &b) in out.iter_mut().zip(x).zip(y) {
                            *d = a + b;
                        }
                    }
                    Op::Concat => {
                        // `[c][n][h][w]`: the second input's channels follow the first's.
                        let (y, _) = val(node.inputs[1]);
                        out.clear();
                        out.extend_from_slice(x);
                        out.extend_from_slice(y);
                    }
                    Op::BatchNorm(bn) if recal.is_some() => {
                        let (mean, var) =
                            super::super::channel_stats(x, shape[0], nb * shape[1] * shape[2]);
                        let bn = ir::BatchNorm {
                            mean,
                            var,
                            ..bn.clone()
                        };
                        let op = Op::BatchNorm(bn);
                        plain(&op, x, shape, self.shapes[i], nb, &mut out);
                        if let (Some(r), Op::BatchNorm(bn)) = (recal.as_mut(), op) {
                            r[i] = Some((bn.mean, bn.var));
                        }
                    }
                    op => plain(op, x, shape, self.shapes[i], nb, &mut out),
                },
            }
            values[last] = out;
            i = last + 1;
        }
    }
}

/// Buffers of [`Prepared::forward`], kept from batch to batch.
#[derive(Default)]
struct Workspace {
    input: Vec<f32>,
    values: Vec<Vec<f32>>,
    scratch: Scratch,
    /// When set (a recalibration pass over an unfolded [`Prepared`]), every BatchNorm node
    /// normalizes with the statistics of its input over the batch, stored here by node.
    recal: Option<Vec<Option<BnStats>>>,
}

/// A BatchNorm's per-channel mean and (biased) variance.
type BnStats = (Vec<f32>, Vec<f32>);

/// Re-estimates every BatchNorm's running mean and variance of `net` (weights as programmed)
/// on `nb` normalized `[n][c][h][w]` images, in one forward pass in node order: each BatchNorm
/// takes the mean and biased variance of its input over all `nb` images (every pixel of a
/// channel), and the nodes after it see its output normalized with them — the population
/// statistics of the network as it is, what BatchNorm recalibration after programming does.
/// No weight changes. Holds every node's output for the `nb` images at once.
///
/// Returns each node's largest `|value|` over the images in the recalibrated network (a conv or
/// linear followed directly by a ReLU shares the ReLU's).
pub fn recalibrate_batchnorm(
    net: &mut Network,
    images: &[f32],
    nb: usize,
    isa: Isa,
) -> Result<Vec<f32>> {
    let (stats, max) = {
        let p = Prepared::build(net, isa, false)?;
        let mut ws = Workspace {
            recal: Some(vec![None; net.nodes.len()]),
            ..Workspace::default()
        };
        p.forward(images, nb, &mut ws)?;
        // A step's output is in `values[last]`; the nodes it absorbed share its maximum.
        let mut max: Vec<f32> = ws
            .values
            .iter()
            .map(|v| v.iter().fold(0f32, |m, x| m.max(x.abs())))
            .collect();
        for (i, step) in p.steps.iter().enumerate() {
            if let Step::Weighted { last, .. } = *step {
                max[i] = max[last];
            }
        }
        (ws.recal.take().unwrap_or_default(), max)
    };
    for (node, s) in net.nodes.iter_mut().zip(stats) {
        if let (Op::BatchNorm(bn), Some((mean, var))) = (&mut node.op, s) {
            bn.mean = mean;
            bn.var = var;
        }
    }
    Ok(max)
}

/// A node that is not a product: elementwise ops, pools, flatten.
#[inline(always)]
fn plain(op: &Op, x: &[f32], s: ir::Shape, o: ir::Shape, nb: usize, out: &mut Vec<f32>) {
    let [c, h, w] = s;
    if let Op::MaxPool(p) = op
        && p.uniform() == Some((2, 2))
    {
        // VGG's pool: two input rows per output row, pairs along them (vectorizes).
        let (oh, ow) = (o[1], o[2]);
        out.resize(c * nb * oh * ow, 0.0);
        for (plane, dst) in x.chunks(h * w).zip(out.chunks_mut(oh * ow)) {
            for (oy, d) in dst.chunks_exact_mut(ow).enumerate() {
                let r0 = &plane[2 * oy * w..2 * oy * w + 2 * ow];
                let r1 = &plane[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
                for ((d, a), b) in d.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                    *d = a[0].max(a[1]).max(b[0].max(b[1]));
                }
            }
        }
        return;
    }
    *out = match op {
        Op::BatchNorm(bn) => {
            let aff = bn.affine();
            let plane = h * w * nb;
            let mut y = x.to_vec();
            for (ch, p) in y.chunks_mut(plane).enumerate() {
                let (m, b) = (aff[ch].0 as f32, aff[ch].1 as f32);
                p.iter_mut().for_each(|v| *v = *v * m + b);
            }
            y
        }
        Op::Relu => x.iter().map(|&v| v.max(0.0)).collect(),
        Op::Clip { min, max } => x.iter().map(|&v| v.max(*min).min(*max)).collect(),
        Op::MaxPool(p) | Op::AvgPool(p) => {
            let max = matches!(op, Op::MaxPool(_));
            let (oh, ow) = (o[1], o[2]);
            let [kh, kw] = p.kernel;
            let (top, left) = (p.padding[0] as isize, p.padding[1] as isize);
            let mut y = Vec::with_capacity(c * nb * oh * ow);
            for plane in x.chunks(h * w).take(c * nb) {
                for oy in 0..oh {
                    let y0 = (oy * p.stride[0]) as isize - top;
                    let rows = (y0.max(0) as usize)..((y0 + kh as isize).min(h as isize) as usize);
                    for ox in 0..ow {
                        let x0 = (ox * p.stride[1]) as isize - left;
                        let cols =
                            (x0.max(0) as usize)..((x0 + kw as isize).min(w as isize) as usize);
                        let v = if max {
                            let mut m = f32::NEG_INFINITY;
                            for iy in rows.clone() {
                                for &v in &plane[iy * w + cols.start..iy * w + cols.end] {
                                    m = m.max(v);
                                }
                            }
                            m
                        } else {
                            let mut sum = 0f32;
                            for iy in rows.clone() {
                                for &v in &plane[iy * w + cols.start..iy * w + cols.end] {
                                    sum += v;
                                }
                            }
                            let count = if p.count_include_pad {
                                kh * kw
                            } else {
                                rows.len() * cols.len()
                            };
                            sum / count as f32
                        };
                        y.push(v);
                    }
                }
            }
            y
        }
        Op::GlobalAvgPool => x
            .chunks(h * w)
            .map(|p| p.iter().sum::<f32>() / p.len() as f32)
            .collect(),
        Op::Flatten => {
            // `[c][n][h][w]` -> `[c * h * w][n]`.
            let plane = h * w;
            let mut y = vec![0f32; x.len()];
            for ch in 0..c {
                for n in 0..nb {
                    for q in 0..plane {
                        y[(ch * plane + q) * nb + n] = x[(ch * nb + n) * plane + q];
                    }
                }
            }
            y
        }
        // Run by `Prepared::run` (two inputs) and `weighted`.
        Op::Add | Op::Concat | Op::Conv2d(_) | Op::Linear(_) => Vec::new(),
    }
}

/// Working memory, grown on demand.
#[derive(Default)]
struct Scratch {
    col: Vec<f32>,
    padded: Vec<f32>,
    runs: Vec<(usize, usize, usize)>,
    /// Each fan-in row's offset in the padded input (the direct path).
    taps: Vec<usize>,
    /// Each fan-in row's kernel column (the direct path's mask row).
    tap_x: Vec<u8>,
}

/// A conv or linear node over the batch with its folded output step; output `[o][n][oh][ow]`
/// (a linear node's input is `[features][n]`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weighted(
    node: &ir::Node,
    x: &[f32],
    s_in: ir::Shape,
    nb: usize,
    w: &[f32],
    affine: &[(f32, f32)],
    relu: bool,
    s: &mut Scratch,
    isa: Isa,
    out: &mut Vec<f32>,
) {
    let [ic, ih, iw] = s_in;
    let (k, per_image, conv) = match &node.op {
        Op::Conv2d(c) => {
            let (oh, ow) = ir::window_out(ih, iw, c.kernel, c.stride, c.padding)
                .expect("checked by Network::shapes");
            (c.fan_in(), oh * ow, Some((c, oh, ow)))
        }
        _ => (ic * ih * iw, 1, None),
    };
    let channels = affine.len();
    let total = nb * per_image;
    // Every element is written below: no need to clear what a previous batch left.
    out.resize(channels * total, 0.0);
    let Some((conv, oh, ow)) = conv else {
        linear(k, ih * iw, nb, x, w, affine, relu, s, isa, out);
        return;
    };
    let block = ((BLOCK_ELEMS / k.max(1)) / (NR * LANES) * (NR * LANES)).max(NR * LANES);
    let block = block.min(total.next_multiple_of(LANES));
    let Some((st, pad)) = conv.uniform() else {
        grouped(
            conv,
            s_in,
            (oh, ow),
            nb,
            block,
            x,
            w,
            affine,
            relu,
            s,
            isa,
            out,
        );
        return;
    };
    let [kh, kw] = conv.kernel;
    let (ph, pw) = (ih + 2 * pad, iw + 2 * pad);
    if st == 1
        && (oh, ow) == (ih, iw)
        && kw <= MAX_KW
        && per_image % LANES == 0
        && (LANES.is_multiple_of(ow) || ow.is_multiple_of(LANES))
    {
        direct(
            k,
            kh,
            kw,
            pad,
            nb,
            (ih, iw),
            x,
            w,
            affine,
            relu,
            s,
            isa,
            out,
        );
        return;
    }
    pad_planes(x, ic * nb, ih, iw, pad, &mut s.padded);
    let mut first = 0;
    while first < total {
        let np = block.min(total - first);
        let stride = np.next_multiple_of(LANES);
        s.col.resize(k * stride, 0.0);
        pixel_runs(first, np, oh, ow, st, ph, pw, &mut s.runs);
        let taps = kh * kw;
        for kk in 0..k {
            let (c, t) = (kk / taps, kk % taps);
            let tap = c * nb * ph * pw + (t / kw) * pw + t % kw;
            let dst = &mut s.col[kk * stride..(kk + 1) * stride];
            for &(base, at, len) in &s.runs {
                let src = &s.padded[base + tap..];
                let d = &mut dst[at..at + len];
                if st == 1 {
                    copy(d, &src[..len]);
                } else {
                    for (i, d) in d.iter_mut().enumerate() {
                        *d = src[i * st];
                    }
                }
            }
            dst[np..].fill(0.0);
        }
        product(
            isa, w, &s.col, stride, k, np, first, total, affine, relu, out,
        );
        first += np;
    }
}

/// The register-blocked product of one im2col block (`np` pixels from pixel `first`, rows of
/// `stride` values) with packed weights `w` (`[o / MR][k][o % MR]`), through the output step,
/// into `out` (`[o][total]`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn product(
    isa: Isa,
    w: &[f32],
    col: &[f32],
    stride: usize,
    k: usize,
    np: usize,
    first: usize,
    total: usize,
    affine: &[(f32, f32)],
    relu: bool,
    out: &mut [f32],
) {
    let channels = affine.len();
    let mut acc = [[0f32; NR * LANES]; MR];
    for b in 0..channels.div_ceil(MR) {
        let wb = &w[b * k * MR..(b + 1) * k * MR];
        let mut v = 0;
        while v * LANES < np {
            let nr = (np.div_ceil(LANES) - v).min(NR);
            tile(isa, wb, col, stride, v * LANES, k, nr, &mut acc);
            let valid = (np - v * LANES).min(nr * LANES);
            for (r, a) in acc.iter().enumerate().take(MR.min(channels - b * MR)) {
                let o = b * MR + r;
                let (m, c) = affine[o];
                let at = o * total + first + v * LANES;
                output(&a[..valid], (m, c), relu, &mut out[at..at + valid]);
            }
            v += nr;
        }
    }
}

/// A conv the paths above do not take (groups, a stride or padding that differs between the
/// axes or sides): per group, its input channels im2col'ed in blocks (zeros where a tap falls
/// in the padding), then [`product`] with the group's packed weights. A depthwise conv has one
/// output channel per group: correct, not fast.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grouped(
    conv: &ir::Conv2d,
    [ic, ih, iw]: ir::Shape,
    (oh, ow): (usize, usize),
    nb: usize,
    block: usize,
    x: &[f32],
    w: &[f32],
    affine: &[(f32, f32)],
    relu: bool,
    s: &mut Scratch,
    isa: Isa,
    out: &mut [f32],
) {
    let groups = conv.groups.max(1);
    let (cig, cog) = (ic / groups, conv.out_channels / groups);
    let [kh, kw] = conv.kernel;
    let [sh, sw] = conv.stride;
    let (top, left) = (conv.padding[0], conv.padding[1]);
    let k = cig * kh * kw;
    let per_image = oh * ow;
    let total = nb * per_image;
    let len = cog.div_ceil(MR) * k * MR;
    let plane = ih * iw;
    for g in 0..groups {
        let xg = &x[g * cig * nb * plane..(g + 1) * cig * nb * plane];
        let wg = &w[g * len..(g + 1) * len];
        let out_g = &mut out[g * cog * total..(g + 1) * cog * total];
        let mut first = 0;
        while first < total {
            let np = block.min(total - first);
            let stride = np.next_multiple_of(LANES);
            s.col.resize(k * stride, 0.0);
            for kk in 0..k {
                let (c, t) = (kk / (kh * kw), kk % (kh * kw));
                let (ky, kx) = (t / kw, t % kw);
                let dst = &mut s.col[kk * stride..(kk + 1) * stride];
                for (j, d) in dst[..np].iter_mut().enumerate() {
                    let p = first + j;
                    let (n, r) = (p / per_image, p % per_image);
                    let (iy, ix) = ((r / ow) * sh + ky, (r % ow) * sw + kx);
                    *d = if iy >= top && ix >= left && iy - top < ih && ix - left < iw {
                        xg[(c * nb + n) * plane + (iy - top) * iw + ix - left]
                    } else {
                        0.0
                    };
                }
                dst[np..].fill(0.0);
            }
            let aff = &affine[g * cog..(g + 1) * cog];
            product(
                isa, wg, &s.col, stride, k, np, first, total, aff, relu, out_g,
            );
            first += np;
        }
    }
}

/// A linear node, `out[o][n] = sum_k W[o][k] x[k][n]`, with the roles of the product swapped:
/// the output features are the vector lanes (the weights `w` are `[k][o]`, rows padded to whole
/// vectors) and the batch's images (8 at a time) the broadcast rows, so every lane does work
/// even for a batch of a few images. `x` is `[c][n][plane]` (`plane = 1` after a flatten).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn linear(
    k: usize,
    plane: usize,
    nb: usize,
    x: &[f32],
    w: &[f32],
    affine: &[(f32, f32)],
    relu: bool,
    s: &mut Scratch,
    isa: Isa,
    out: &mut [f32],
) {
    let channels = affine.len();
    let row = channels.next_multiple_of(LANES);
    let plane = plane.max(1);
    let mut acc = [[0f32; NR * LANES]; MR];
    for n0 in (0..nb).step_by(MR) {
        let images = (nb - n0).min(MR);
        // `[k][MR]`: feature `kk` of images `n0 ..`, zeros past the batch.
        s.col.clear();
        s.col.resize(k * MR, 0.0);
        for kk in 0..k {
            for n in 0..images {
                s.col[kk * MR + n] = x[((kk / plane) * nb + n0 + n) * plane + kk % plane];
            }
        }
        let mut v = 0;
        while v * LANES < channels {
            let nr = (row / LANES - v).min(NR);
            tile(isa, &s.col, w, row, v * LANES, k, nr, &mut acc);
            for (n, a) in acc.iter().enumerate().take(images) {
                for (j, &a) in a[..nr * LANES].iter().enumerate() {
                    let o = v * LANES + j;
                    if o < channels {
                        let (m, c) = affine[o];
                        let y = a * m + c;
                        out[o * nb + n0 + n] = if relu { y.max(0.0) } else { y };
                    }
                }
            }
            v += nr;
        }
    }
}

/// A "same" stride-1 conv (`oh x ow = ih x iw`) without im2col, when vectors of 16 output
/// pixels never straddle two images and start at the same column phase (`16 % ow == 0` or
/// `ow % 16 == 0`): VGG's every conv, ResNet's 3x3 stride-1 ones.
///
/// The input is copied once with `pad` zero rows above and below each image plane (no zero
/// columns) and a guard of 16 zeros at both ends. A vector of 16 consecutive output pixels
/// (crossing rows when `ow < 16`) then reads tap `(c, ky, kx)` as 16 consecutive inputs at a
/// fixed offset; the lanes whose column `ox + kx - pad` falls outside the row — the left and
/// right padding — are zeroed by the load's mask. The product reads the fan-in straight from the
/// copy (an indirect matrix product), 8 output channels x 3 vectors per register block.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn direct(
    k: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    nb: usize,
    (ih, iw): (usize, usize),
    x: &[f32],
    w: &[f32],
    affine: &[(f32, f32)],
    relu: bool,
    s: &mut Scratch,
    isa: Isa,
    out: &mut [f32],
) {
    let ph = ih + 2 * pad;
    let plane = ph * iw;
    let planes = x.len() / (ih * iw).max(1);
    // The copy: `LANES` guard zeros, `planes` padded planes, `LANES` guard zeros.
    s.padded.clear();
    s.padded.resize(LANES + planes * plane + LANES, 0.0);
    for (p, src) in x.chunks_exact(ih * iw).enumerate() {
        let at = LANES + p * plane + pad * iw;
        s.padded[at..at + ih * iw].copy_from_slice(src);
    }
    let taps = kh * kw;
    s.taps.clear();
    s.tap_x.clear();
    for kk in 0..k {
        let (c, t) = (kk / taps, kk % taps);
        s.taps.push(c * nb * plane + (t / kw) * iw + t % kw);
        s.tap_x.push((t % kw) as u8);
    }
    let max_tap = s.taps.iter().max().copied().unwrap_or(0);
    // Every `tap_x = t % kw < MAX_KW`, which `tile_direct`'s mask lookups rely on.
    assert!(kw <= MAX_KW);
    // `kk % taps % kw = kk % 3` when `kw = 3`: the taps come in rows of three.
    let rows3 = kw == 3;
    let per_image = ih * iw;
    let total = nb * per_image;
    let vectors = total / LANES;
    // Vector `q`'s first window's offset in the copy (tap (0, 0, 0)), and its masks per `kx`.
    let base = |q: usize| {
        let (n, r) = ((q * LANES) / per_image, (q * LANES) % per_image);
        LANES + n * plane + r - pad
    };
    // The masks per `kx` of each column phase (`ox0 / 16`; one phase when `ow <= 16`).
    let phases: Vec<[u16; MAX_KW]> = (0..iw.div_ceil(LANES))
        .map(|ph| {
            let ox0 = ph * LANES;
            std::array::from_fn(|kx| {
                (0..LANES)
                    .filter(|&j| {
                        let c = (ox0 + j) % iw + kx;
                        c >= pad && c - pad < iw
                    })
                    .fold(0u16, |m, j| m | 1 << j)
            })
        })
        .collect();
    let masks = |q: usize| phases[(q * LANES) % per_image % iw / LANES];
    let channels = affine.len();
    let mut acc = [[0f32; NR * LANES]; MR];
    let mut q = 0;
    while q < vectors {
        let nr = (vectors - q).min(NR);
        let bases: [usize; NR] = std::array::from_fn(|v| base(q + v.min(nr - 1)));
        let m: [[u16; MAX_KW]; NR] = std::array::from_fn(|v| masks(q + v.min(nr - 1)));
        for b in 0..channels.div_ceil(MR) {
            let wb = &w[b * k * MR..(b + 1) * k * MR];
            tile_direct(
                isa, wb, &s.padded, &s.taps, &s.tap_x, rows3, max_tap, bases, &m, nr, &mut acc,
            );
            for (r, a) in acc.iter().enumerate().take(MR.min(channels - b * MR)) {
                let o = b * MR + r;
                let at = o * total + q * LANES;
                output(
                    &a[..nr * LANES],
                    affine[o],
                    relu,
                    &mut out[at..at + nr * LANES],
                );
            }
        }
        q += nr;
    }
}

/// `dst = relu?(acc * m + c)`.
#[inline(always)]
fn output(acc: &[f32], (m, c): (f32, f32), relu: bool, dst: &mut [f32]) {
    if relu {
        for (d, &a) in dst.iter_mut().zip(acc) {
            *d = (a * m + c).max(0.0);
        }
    } else {
        for (d, &a) in dst.iter_mut().zip(acc) {
            *d = a * m + c;
        }
    }
}

/// `dst = src` in 16-value pieces that the compiler keeps inline (im2col runs are short).
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32]) {
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (d, s) in (&mut d).zip(&mut s) {
        let s: &[f32; LANES] = s.try_into().expect("chunks of LANES");
        let d: &mut [f32; LANES] = d.try_into().expect("chunks of LANES");
        *d = *s;
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::RandomArch;
    use nvcim_shared::rng::mix64;
    use nvcim_shared::variation::VariationConfig;

    fn images(net: &Network, n: usize) -> Vec<f32> {
        let len = net.input.iter().product::<usize>();
        (0..n * len)
            .map(|i| (mix64(i as u64) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn check(net: &Network, n: usize) {
        let x = images(net, n);
        let want = net.forward(&x, n).unwrap();
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for isa in Isa::available() {
            let p = Prepared::new(net, isa).unwrap();
            for nb in [1, 3, n] {
                let mut got = Vec::new();
                for chunk in x.chunks(nb * net.input.iter().product::<usize>()) {
                    let m = chunk.len() / net.input.iter().product::<usize>();
                    got.extend(p.logits(chunk, m).unwrap());
                }
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert_eq!(got.len(), want.len());
                assert!(
                    diff <= 1e-4 * scale,
                    "{isa:?} batch {nb}: max diff {diff}, scale {scale}"
                );
            }
        }
    }

    #[test]
    fn vgg8_logits_match_the_reference_forward() {
        let arch = RandomArch {
            channels: 1,
            size: 16,
            classes: 10,
            width: 0.125,
            seed: 2,
        };
        let net = Network::vgg8(&arch).unwrap();
        check(&net, 7);
        // A noisy instance too (the engine's use).
        let var = VariationConfig::paper(0.3).unwrap();
        check(&net.noisy_instance(&var, 4, 1).unwrap(), 5);
        // 32x32: rows of two vectors (two column phases in the direct path).
        let arch = RandomArch {
            channels: 3,
            size: 32,
            classes: 10,
            width: 0.0625,
            seed: 6,
        };
        check(&Network::vgg8(&arch).unwrap(), 3);
    }

    #[test]
    fn resnet18_logits_match_the_reference_forward() {
        let arch = RandomArch {
            channels: 3,
            size: 16,
            classes: 10,
            width: 0.0625,
            seed: 9,
        };
        check(&Network::resnet18(&arch).unwrap(), 5);
    }

    #[test]
    fn batchnorm_recalibration_measures_the_network_as_it_is_and_changes_no_weight() {
        for net in [
            Network::vgg8(&RandomArch {
                channels: 1,
                size: 16,
                classes: 10,
                width: 0.125,
                seed: 3,
            })
            .unwrap(),
            Network::resnet18(&RandomArch {
                channels: 3,
                size: 16,
                classes: 10,
                width: 0.0625,
                seed: 5,
            })
            .unwrap(),
        ] {
            // A noisy instance: its statistics differ from the checkpoint's.
            let noisy = net
                .noisy_instance(&VariationConfig::paper(0.5).unwrap(), 2, 0)
                .unwrap();
            let n = 9;
            let x = images(&noisy, n);
            // The oracle: the reference f64 pass, BatchNorm by BatchNorm in node order.
            let mut want = noisy.clone();
            want.calibrate_batchnorm(&x, n).unwrap();
            for isa in Isa::available() {
                let mut got = noisy.clone();
                recalibrate_batchnorm(&mut got, &x, n, isa).unwrap();
                let mut changed = 0;
                for ((g, w), before) in got.nodes.iter().zip(&want.nodes).zip(&noisy.nodes) {
                    match (&g.op, &w.op, &before.op) {
                        (Op::BatchNorm(g), Op::BatchNorm(w), Op::BatchNorm(b)) => {
                            // gamma, beta and eps are the checkpoint's; mean and var measured.
                            assert_eq!((&g.gamma, &g.beta, g.eps), (&b.gamma, &b.beta, b.eps));
                            for c in 0..g.mean.len() {
                                let tol = 1e-3 * (1.0 + w.var[c].sqrt());
                                assert!((g.mean[c] - w.mean[c]).abs() <= tol, "{isa:?} mean");
                                // The oracle floors the variance at 1e-3.
                                assert!(
                                    (g.var[c].max(1e-3) - w.var[c]).abs() <= 2e-3 * w.var[c],
                                    "{isa:?} var {} vs {}",
                                    g.var[c],
                                    w.var[c]
                                );
                            }
                            changed += usize::from(g.mean != b.mean);
                        }
                        // Every other node, weights included, is untouched.
                        (g, _, b) => assert_eq!(g, b),
                    }
                }
                assert!(changed > 0, "{isa:?}: no BatchNorm changed");
                assert_eq!(got.weights(), noisy.weights());
            }
        }
    }

    #[test]
    fn wrong_input_length_is_an_error() {
        let arch = RandomArch {
            channels: 1,
            size: 16,
            classes: 10,
            width: 0.125,
            seed: 2,
        };
        let net = Network::vgg8(&arch).unwrap();
        let p = Prepared::new(&net, Isa::Portable).unwrap();
        assert!(p.logits(&[0.0; 10], 1).is_err());
    }
}
