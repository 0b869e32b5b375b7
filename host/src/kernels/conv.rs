//! Training's 2-D convolution on the CPU: the forward pass, the input gradient and the weight
//! gradient of a bias-free, ungrouped, undilated convolution over `f32` NCHW tensors (every
//! convolution of VGG-8 and ResNet-18), as matrix products on the kernels of
//! [`crate::kernels::gemm`] (AVX-512, AVX2 or portable, detected at run time).
//!
//! A worker takes a contiguous run of the batch (one per rayon thread) and goes through it a few
//! images at a time, enough for rows of at least `COLS` output pixels:
//! - forward: `Y = W col` — `col` the im2col matrix (`[c kh kw][image, oy, ox]`) of the images,
//!   `W` packed once per call;
//! - input gradient: `dcol = W^T dY`, then col2im adds `dcol` back onto the input pixels;
//! - weight gradient: `dW^T += col dY^T`, `col`'s rows read in place (`gemm::Lhs::Rows`) and
//!   `dY` transposed to pixel rows (16 x 16 register blocks with AVX-512), on the same
//!   micro-kernel as the other two; each worker owns a range of fan-in rows and sums over the
//!   whole batch in order (the same bits with any number of threads).
//!
//! A 3x3, stride-1, padding-1 convolution with at least 16 input and output channels and 16
//! tiles per image (images of 7x7 and up: every VGG-8 convolution but the first) takes Winograd
//! F(2x2, 3x3) instead, forward and input gradient alike (`winograd`): each 4x4 input tile
//! transformed (`B^T d B`), 16 products of the transformed kernels (`G k G^T`, `o x c`) by the
//! transformed tiles on the same micro-kernel, each 2x2 output tile transformed back (`A^T m A`):
//! 2.25x fewer multiplies, results within `f32` rounding of the direct sum (the transforms'
//! coefficients are 0, +-1 and +-1/2). With at least 32 input channels its weight gradient does
//! too (`backward_weight_winograd`, the adjoint: `dk = G^T (sum over tiles (A dY A^T) . (B^T d
//! B)) G`).
//!
//! Scratch matrices are kept per thread from call to call: in steady state a step allocates only
//! its output tensors, the per-call packed (and, for Winograd, transformed) weights and a few
//! row buffers.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Isa;
use super::gemm::{self, LANES};
use super::lanes::{Lanes, per_isa};

/// Output pixels per product, at least (images are grouped until their columns reach it).
const COLS: usize = 512;

/// A convolution's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geom {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both sides, both axes).
    pub pad: usize,
}

impl Geom {
    /// The output height and width, `None` when the kernel does not fit the padded input or
    /// the stride is 0.
    pub fn out(&self) -> Option<(usize, usize)> {
        let (ph, pw) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        (self.stride > 0 && self.kh > 0 && self.kw > 0 && ph >= self.kh && pw >= self.kw).then(
            || {
                (
                    (ph - self.kh) / self.stride + 1,
                    (pw - self.kw) / self.stride + 1,
                )
            },
        )
    }

    fn fan_in(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn image_in(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The columns of output pixel `ox` that tap `kx` reads inside the row: `lo..hi`, reading
    /// input column `ox * stride + kx - pad`.
    fn span(&self, kx: usize, ow: usize, w: usize) -> (usize, usize) {
        let s = self.stride;
        // ox * s + kx >= pad  and  ox * s + kx < w + pad.
        let lo = self.pad.saturating_sub(kx).div_ceil(s).min(ow);
        let hi = (w + self.pad).saturating_sub(kx).div_ceil(s).clamp(lo, ow);
        (lo, hi)
    }
}

/// A growable `f32` scratch matrix whose slice starts on a 64-byte boundary: with rows of a
/// multiple of [`LANES`] values, no 16-lane load of the kernels straddles two cache lines.
#[derive(Default)]
struct Aligned {
    v: Vec<f32>,
}

impl Aligned {
    /// `len` values (their contents are left to the caller to overwrite).
    fn take(&mut self, len: usize) -> &mut [f32] {
        if self.v.len() < len + LANES {
            self.v = vec![0.0; len + LANES];
        }
        let off = self.v.as_ptr().align_offset(64).min(LANES - 1);
        &mut self.v[off..off + len]
    }
}

/// Per-thread matrices, kept from call to call.
#[derive(Default)]
struct Scratch {
    col: Aligned,
    b: Aligned,
    c: Aligned,
    /// The Winograd transforms' planes.
    t: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Images per worker: the batch split evenly over rayon's threads.
fn per_worker(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// The row length of a matrix of `cols` columns: whole vectors, and never a multiple of 1 KiB,
/// so that the rows a kernel streams through at once do not all fall into the same L1 sets.
fn row_len(cols: usize) -> usize {
    let ld = cols.next_multiple_of(LANES);
    if ld.is_multiple_of(256) {
        ld + LANES
    } else {
        ld
    }
}

/// Images per product: enough for `min_cols` columns at `plane` per image.
fn group(plane: usize, images: usize, min_cols: usize) -> usize {
    (min_cols / plane.max(1)).clamp(1, images.max(1))
}

/// Splits a batch of `n` images over rayon's threads (`out` and `inp` hold `out_per` and
/// `in_per` values per image) and, in each thread with its scratch, calls `f(s, out, inp, gn)`
/// on consecutive groups of `gn` images: as many as make products of at least `min_cols`
/// columns, `cols_per_image` per image.
///
/// `out` may be uninitialized: each group's part is zeroed just before `f` gets it, while it
/// is about to be written and so in cache (zeroing the whole output first was a separate pass
/// over memory). `out` is then initialized when this returns, if `out.len()` is `n * out_per`.
fn by_image_groups(
    n: usize,
    (out, out_per): (&mut [MaybeUninit<f32>], usize),
    (inp, in_per): (&[f32], usize),
    (cols_per_image, min_cols): (usize, usize),
    f: impl Fn(&mut Scratch, &mut [f32], &[f32], usize) + Sync,
) {
    let per = per_worker(n);
    out.par_chunks_mut(per * out_per)
        .zip(inp.par_chunks(per * in_per))
        .for_each(|(oc, ic)| {
            SCRATCH.with_borrow_mut(|s| {
                let images = oc.len() / out_per;
                let gi = group(cols_per_image, images, min_cols);
                let mut i0 = 0;
                while i0 < images {
                    let gn = gi.min(images - i0);
                    let og = zeroed(&mut oc[i0 * out_per..(i0 + gn) * out_per]);
                    f(s, og, &ic[i0 * in_per..(i0 + gn) * in_per], gn);
                    i0 += gn;
                }
            })
        });
}

/// `s` with every value `+0.0`, as initialized values.
fn zeroed(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `s` is `s.len()` writable values, and all-zero bytes are `0.0f32`; after that
    // every value is initialized, and `MaybeUninit<f32>` has `f32`'s layout.
    unsafe {
        std::ptr::write_bytes(s.as_mut_ptr(), 0, s.len());
        &mut *(std::ptr::from_mut(s) as *mut [f32])
    }
}

/// `s` as possibly uninitialized values, to write through ([`forward`] and [`backward_input`]
/// take initialized outputs; the training backend hands them fresh memory).
fn as_uninit(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the callees write only initialized
    // values through it.
    unsafe { &mut *(std::ptr::from_mut(s) as *mut [MaybeUninit<f32>]) }
}

/// The im2col matrix of `gn` images (`x`: `gn` images of `c x h x w`): row `(ci, ky, kx)`,
/// column `i * oh * ow + oy * ow + ox`, `ld` values per row (columns past the images zero).
fn im2col(isa: Isa, g: &Geom, x: &[f32], gn: usize, col: &mut [f32], ld: usize) {
    im2col_rows(isa, g, x, gn, col, ld, 0..g.fan_in());
}

/// Rows `rows` of [`im2col`]'s matrix (row `rows.start` first). With AVX-512, a stride-2 tap's
/// rows of up to 32 input values are picked by one permute each ([`stride2_row_avx512`]).
fn im2col_rows(
    isa: Isa,
    g: &Geom,
    x: &[f32],
    gn: usize,
    col: &mut [f32],
    ld: usize,
    rows: std::ops::Range<usize>,
) {
    let (oh, ow) = g.out().expect("checked by the caller");
    let (h, w, s, pad) = (g.h, g.w, g.stride, g.pad);
    let plane = oh * ow;
    assert_eq!(col.len(), rows.len() * ld);
    for row in rows.clone() {
        let (ci, ky, kx) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
        {
            {
                let dst = &mut col[(row - rows.start) * ld..(row - rows.start + 1) * ld];
                let (lo, hi) = g.span(kx, ow, w);
                for i in 0..gn {
                    let src = &x[(i * g.c + ci) * h * w..][..h * w];
                    let d = &mut dst[i * plane..(i + 1) * plane];
                    if s == 1 && ow == w && oh == h {
                        // A "same" convolution: the tap's plane is the input plane shifted by
                        // (ky - pad, kx - pad), one copy, then the columns and rows it moved in
                        // from past the edges zeroed.
                        shifted_plane(src, h, w, ky as isize - pad as isize, kx, pad, d, lo, hi);
                        continue;
                    }
                    for oy in 0..oh {
                        let d = &mut dst[i * plane + oy * ow..][..ow];
                        let iy = oy * s + ky;
                        if iy < pad || iy - pad >= h {
                            d.fill(0.0);
                            continue;
                        }
                        let r = &src[(iy - pad) * w..][..w];
                        #[cfg(target_arch = "x86_64")]
                        if s == 2 && w <= 32 && ow <= 16 && isa.has_avx512() {
                            // SAFETY: AVX-512 F was detected; `w <= 32`, `ow <= 16`, and
                            // `Geom::span` keeps `2 ox + kx - pad` in `0..w` for `ox` in
                            // `lo..hi`.
                            unsafe { stride2_row_avx512(r, d, kx as isize - pad as isize, lo, hi) };
                            continue;
                        }
                        let _ = isa;
                        d[..lo].fill(0.0);
                        d[hi..].fill(0.0);
                        if s == 1 {
                            d[lo..hi].copy_from_slice(&r[lo + kx - pad..hi + kx - pad]);
                        } else {
                            for (ox, v) in d[lo..hi].iter_mut().enumerate() {
                                *v = r[(lo + ox) * s + kx - pad];
                            }
                        }
                    }
                }
                dst[gn * plane..].fill(0.0);
            }
        }
    }
}

/// One output row of a stride-2 tap in [`im2col_rows`]: `d[ox] = r[2 ox + off]` for `ox` in
/// `lo..hi`, zero elsewhere: the row in two masked loads, one two-register permute, one masked
/// store (the scalar loop took about half of im2col's time in ResNet-18's step).
///
/// # Safety
/// AVX-512 F; `r.len() <= 32`, `d.len() <= 16`, `lo <= hi <= d.len()`, and `2 ox + off` in
/// `0..r.len()` for every `ox` in `lo..hi`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stride2_row_avx512(r: &[f32], d: &mut [f32], off: isize, lo: usize, hi: usize) {
    use std::arch::x86_64::{
        _mm512_add_epi32, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
        _mm512_maskz_permutex2var_ps, _mm512_set1_epi32, _mm512_setr_epi32,
    };
    debug_assert!(r.len() <= 32 && d.len() <= 16 && lo <= hi && hi <= d.len());
    let w = r.len();
    let lanes = |n: usize| -> u16 { if n >= 16 { u16::MAX } else { (1u16 << n) - 1 } };
    // SAFETY: the masked loads read `min(w, 16)` values from 0 and `w - 16` from 16.
    let (a, b) = unsafe {
        (
            _mm512_maskz_loadu_ps(lanes(w), r.as_ptr()),
            _mm512_maskz_loadu_ps(lanes(w.saturating_sub(16)), r.as_ptr().add(16.min(w))),
        )
    };
    // Lane `ox` takes value `2 ox + off` of the row (bits 0-3 pick the lane, bit 4 the register);
    // lanes outside `lo..hi` are zeroed by the mask, whatever their index.
    let iota2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let idx = _mm512_add_epi32(iota2, _mm512_set1_epi32(off as i32));
    let v = _mm512_maskz_permutex2var_ps(lanes(hi) & !lanes(lo), a, idx, b);
    // SAFETY: the store writes `d.len() <= 16` values.
    unsafe { _mm512_mask_storeu_ps(d.as_mut_ptr(), lanes(d.len()), v) };
}

/// `d[oy * w + ox] = src[(oy + dy) * w + ox + kx - pad]` (`h x w` planes, stride 1), zero where
/// that pixel is outside the image: columns outside `lo..hi` (from [`Geom::span`]) and rows
/// outside `0..h`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn shifted_plane(
    src: &[f32],
    h: usize,
    w: usize,
    dy: isize,
    kx: usize,
    pad: usize,
    d: &mut [f32],
    lo: usize,
    hi: usize,
) {
    let shift = dy * w as isize + kx as isize - pad as isize;
    let n = (h * w) as isize;
    // Output pixels `a..b` read inside `src`.
    let (a, b) = (
        (-shift).clamp(0, n) as usize,
        (n - shift).clamp(0, n) as usize,
    );
    d[..a].fill(0.0);
    d[b..].fill(0.0);
    if a < b {
        let from = (a as isize + shift) as usize;
        d[a..b].copy_from_slice(&src[from..from + (b - a)]);
    }
    // The copy wrapped the neighbouring rows' pixels into the columns outside `lo..hi`.
    if lo > 0 || hi < w {
        for row in d.chunks_exact_mut(w) {
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
        }
    }
}

/// Adds the im2col-shaped `col` (`ld` values per row) back onto the pixels it was read from:
/// `dx` (`gn` images) `+=` col2im(`col`).
fn col2im(g: &Geom, col: &[f32], ld: usize, gn: usize, dx: &mut [f32]) {
    let (oh, ow) = g.out().expect("checked by the caller");
    let (h, w, s, pad) = (g.h, g.w, g.stride, g.pad);
    let plane = oh * ow;
    for ci in 0..g.c {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let src = &col[row * ld..];
                let (lo, hi) = g.span(kx, ow, w);
                for i in 0..gn {
                    let dst = &mut dx[(i * g.c + ci) * h * w..][..h * w];
                    for oy in 0..oh {
                        let iy = oy * s + ky;
                        if iy < pad || iy - pad >= h {
                            continue;
                        }
                        let r = &mut dst[(iy - pad) * w..][..w];
                        let d = &src[i * plane + oy * ow..][..ow];
                        if s == 1 {
                            let r = &mut r[lo + kx - pad..hi + kx - pad];
                            for (a, &b) in r.iter_mut().zip(&d[lo..hi]) {
                                *a += b;
                            }
                        } else {
                            for (ox, &b) in d[lo..hi].iter().enumerate() {
                                r[(lo + ox) * s + kx - pad] += b;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Copies `gn` images' `[o][plane]` blocks of `src` (NCHW) side by side into `o` rows of `ld`
/// values (columns past the images zero).
fn gather_rows(src: &[f32], o: usize, plane: usize, gn: usize, dst: &mut [f32], ld: usize) {
    assert_eq!(dst.len(), o * ld);
    for oo in 0..o {
        let row = &mut dst[oo * ld..(oo + 1) * ld];
        for i in 0..gn {
            row[i * plane..(i + 1) * plane].copy_from_slice(&src[(i * o + oo) * plane..][..plane]);
        }
        row[gn * plane..].fill(0.0);
    }
}

fn check(g: &Geom, x: usize, w: usize, y: usize) -> (usize, usize) {
    let (oh, ow) = g
        .out()
        .unwrap_or_else(|| panic!("conv2d: kernel does not fit the padded input: {g:?}"));
    assert_eq!(x, g.n * g.image_in(), "conv2d input length for {g:?}");
    assert_eq!(w, g.o * g.fan_in(), "conv2d weight length for {g:?}");
    assert_eq!(y, g.n * g.o * oh * ow, "conv2d output length for {g:?}");
    (oh, ow)
}

/// Tiles per Winograd product, at least (images are grouped until they reach it): fewer than
/// [`COLS`], since each tile has 16 rows of transforms and 16 of products.
const WINO_COLS: usize = 64;

/// Input and output channels from which a 3x3, stride-1, padding-1 convolution takes the
/// Winograd path (below it the products are too thin to gain).
const WINO_MIN: usize = 16;

/// Whether [`forward`] and [`backward_input`] compute `g` as Winograd F(2x2, 3x3): 16 products
/// of `o x c` by `c x tiles` instead of 9 of `o x c` by `c x 4 tiles`, 2.25x fewer multiplies.
/// Images need at least 16 tiles (7 x 7 and up): the transforms run over an image's tiles in
/// whole vectors, and ResNet-18's 4 x 4 images (4 tiles, all in the scalar tail) were faster as
/// im2col products (forward 12.9-14.5 -> 9.8-10.7 ms, input gradient 13.9-14.5 -> 10.0-10.2 ms
/// per step for its three 128-channel layers).
pub(crate) fn winograd(g: &Geom) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.pad == 1
        && g.c >= WINO_MIN
        && g.o >= WINO_MIN
        && g.h.div_ceil(2) * g.w.div_ceil(2) >= 16
}

/// Input channels from which a [`winograd`] convolution's weight gradient takes the Winograd
/// path too. Each worker there transforms the whole output gradient for its own range of input
/// channels, so with fewer channels that repeated transform outweighs the products it saves
/// (measured at width 0.25: 16 channels 7.2 -> 8.9 ms, 32 even, 64 and 128 faster).
const WINO_WEIGHT_MIN: usize = 32;

/// Whether [`backward_weight`] takes the Winograd path ([`backward_weight_winograd`]): a
/// [`winograd`] convolution with at least [`WINO_WEIGHT_MIN`] input channels.
pub(crate) fn winograd_weight(g: &Geom) -> bool {
    winograd(g) && g.c >= WINO_WEIGHT_MIN
}

/// `G k G^T` of a 3x3 kernel `k` (row-major), `xi = 4 row + column`.
fn kernel_transform(k: &[f32]) -> [f32; 16] {
    let mut t = [[0f32; 3]; 4];
    for q in 0..3 {
        let (a, b, c) = (k[q], k[3 + q], k[6 + q]);
        t[0][q] = a;
        t[1][q] = 0.5 * (a + b + c);
        t[2][q] = 0.5 * (a - b + c);
        t[3][q] = c;
    }
    let mut u = [0f32; 16];
    for (j, r) in t.iter().enumerate() {
        u[4 * j] = r[0];
        u[4 * j + 1] = 0.5 * (r[0] + r[1] + r[2]);
        u[4 * j + 2] = 0.5 * (r[0] - r[1] + r[2]);
        u[4 * j + 3] = r[2];
    }
    u
}

per_isa! {
    /// `B^T d B` of every 4x4 input tile of channels `chans` of `gn` images (`x`, `c x h x w`
    /// each, zero outside): `v[xi * v.len() / 16 + (ci - chans.start) * ld + i * tiles + ty * tw
    /// + tx]`, `ld` values per row (16 equal blocks of rows, one per `xi`); `buf` scratch.
    ///
    /// Per channel of an image, its padded pixels are first spread over 8 planes of `tiles + tw`
    /// values, `G[pr][q][r * tw + tx]` = padded pixel (row `2 r + pr`, column `2 tx + q`), so that
    /// the 16 values of tile `t = ty * tw + tx` are `G[j % 2][q][t + (j / 2) tw]`: the transform
    /// then runs over all of an image's tiles at unit stride.
    fn input_transform<V>(
        g: &Geom,
        x: &[f32],
        gn: usize,
        chans: std::ops::Range<usize>,
        v: &mut [f32],
        ld: usize,
        buf: &mut Vec<f32>,
    ) {
        let (c, h, w) = (g.c, g.h, g.w);
        let block = v.len() / 16;
        assert!(chans.end <= c && chans.len() * ld <= block && x.len() >= gn * c * h * w);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        let span = tiles + tw;
        // Every value of the planes is written below before it is read.
        if buf.len() < 8 * span {
            buf.resize(8 * span, 0.0);
        }
        let planes = &mut buf[..8 * span];
        for ci in chans.clone() {
            for i in 0..gn {
                let plane = &x[(i * c + ci) * h * w..][..h * w];
                // Padded row pr' = image row + 1 goes to row pr' / 2 of the planes of parity
                // pr' % 2; padded rows 0 and past the image stay zero.
                for pr in 0..2 {
                    for r in 0..=th {
                        let iy = (2 * r + pr).wrapping_sub(1);
                        let row = |q: usize| (pr * 4 + q) * span + r * tw;
                        if iy >= h {
                            for q in 0..4 {
                                planes[row(q)..row(q) + tw].fill(0.0);
                            }
                            continue;
                        }
                        let src = &plane[iy * w..(iy + 1) * w];
                        // `V::N == 16`: this body is the AVX-512 one.
                        #[cfg(target_arch = "x86_64")]
                        if V::N == 16 && w % 2 == 0 && w <= 32 {
                            let at = [row(0), row(1), row(2), row(3)];
                            // SAFETY: AVX-512 F (this body's features); `src` is `w <= 32`
                            // values and each `at[q] + tw <= planes.len()` (`row(3) + tw <= 8
                            // span`), `tw = w / 2`.
                            unsafe { spread_row_avx512(src, planes, at) };
                            continue;
                        }
                        // Padded column 2 tx + q is image column 2 tx + q - 1: image columns
                        // 2k and 2k + 1 go to tx = k of planes 1 and 2, tx = k + 1 of plane 0 and
                        // tx = k - 1 of plane 3; the padding columns and past the image are zero.
                        let (q01, q23) = planes.split_at_mut(row(2));
                        let (q0, q1) = q01.split_at_mut(row(1));
                        let (q2, q3) = q23.split_at_mut(row(3) - row(2));
                        let (q0, q1) = (&mut q0[row(0)..row(0) + tw], &mut q1[..tw]);
                        let (q2, q3) = (&mut q2[..tw], &mut q3[..tw]);
                        q0[0] = 0.0;
                        q3[tw - 1] = 0.0;
                        q2[tw - 1] = 0.0;
                        for (k, pair) in src.chunks(2).enumerate() {
                            let (e, o) = (pair[0], pair.get(1).copied().unwrap_or(0.0));
                            q1[k] = e;
                            q2[k] = o;
                            if k + 1 < tw {
                                q0[k + 1] = o;
                            }
                            if k > 0 {
                                q3[k - 1] = e;
                            }
                        }
                    }
                }
                let p = |j: usize, q: usize| {
                    let at = ((j % 2) * 4 + q) * span + (j / 2) * tw;
                    &planes[at..at + tiles]
                };
                let d: [[&[f32]; 4]; 4] = std::array::from_fn(|j| std::array::from_fn(|q| p(j, q)));
                let mut rows = v.chunks_exact_mut(block);
                let mut out: [&mut [f32]; 16] = std::array::from_fn(|_| {
                    let r = rows.next().expect("16 rows of transforms");
                    &mut r[(ci - chans.start) * ld + i * tiles..][..tiles]
                });
                // Whole vectors, then the tail one tile at a time (plain loops: a closure would
                // not inherit the copy's target features, and its intrinsics would not inline).
                let mut t = 0;
                while t + V::N <= tiles {
                    input_tiles::<V>(&d, &mut out, t);
                    t += V::N;
                }
                while t < tiles {
                    input_tiles::<f32>(&d, &mut out, t);
                    t += 1;
                }
            }
        }
    }
}

/// One image row of [`input_transform`]'s spread, `w = src.len()` even and at most 32, `tw = w /
/// 2`: `planes[at[q] + tx]` = padded column `2 tx + q` (image column `2 tx + q - 1`, zero outside
/// the row), as the scalar loop writes them: the row in two (masked) loads, each plane's `tw`
/// values picked from them by one two-register permute, zeroed lanes by its mask, one masked
/// store.
///
/// # Safety
/// AVX-512 F; `src.len()` even and at most 32; `at[q] + src.len() / 2 <= planes.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn spread_row_avx512(src: &[f32], planes: &mut [f32], at: [usize; 4]) {
    use std::arch::x86_64::{
        _mm512_loadu_si512, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
        _mm512_maskz_permutex2var_ps,
    };
    /// Per plane `q`, lane `tx` takes row value `2 tx + q - 1` (lane 0 of plane 0 and the last
    /// lane of plane 3 are masked to zero: the padding columns).
    const IDX: [[i32; 16]; 4] = {
        let mut t = [[0i32; 16]; 4];
        let mut q = 0;
        while q < 4 {
            let mut tx = 0;
            while tx < 16 {
                let v = 2 * tx as i32 + q as i32 - 1;
                t[q][tx] = if v < 0 {
                    0
                } else if v > 31 {
                    31
                } else {
                    v
                };
                tx += 1;
            }
            q += 1;
        }
        t
    };
    let w = src.len();
    let tw = w / 2;
    let lanes = |n: usize| -> u16 { if n >= 16 { u16::MAX } else { (1u16 << n) - 1 } };
    // SAFETY: the masked loads read `min(w, 16)` values from 0 and `w - 16` from 16.
    let (lo, hi) = unsafe {
        (
            _mm512_maskz_loadu_ps(lanes(w), src.as_ptr()),
            _mm512_maskz_loadu_ps(lanes(w.saturating_sub(16)), src.as_ptr().add(16.min(w))),
        )
    };
    let all = lanes(tw);
    // Plane 0's lane 0 is the left padding, plane 3's lane `tw - 1` the right padding.
    let keep = [all & !1, all, all, all >> 1];
    for q in 0..4 {
        debug_assert!(at[q] + tw <= planes.len());
        // SAFETY: `IDX[q]` is 16 `i32`s; the store writes `tw` values at `at[q]` (caller).
        unsafe {
            let idx = _mm512_loadu_si512(IDX[q].as_ptr().cast());
            let v = _mm512_maskz_permutex2var_ps(keep[q], lo, idx, hi);
            _mm512_mask_storeu_ps(planes.as_mut_ptr().add(at[q]), all, v);
        }
    }
}

/// [`input_transform`] of the `V::N` tiles from `t`: `out[xi][t..] = (B^T d B)[xi]`, `d[j][q]`
/// the tiles' values at row `j`, column `q`.
#[inline(always)]
fn input_tiles<V: Lanes>(d: &[[&[f32]; 4]; 4], out: &mut [&mut [f32]; 16], t: usize) {
    let mut p = [[V::ZERO; 4]; 4];
    for (pj, dj) in p.iter_mut().zip(d) {
        for (v, dq) in pj.iter_mut().zip(dj) {
            *v = V::load(dq, t);
        }
    }
    // B^T over the rows, then B over the columns.
    for j in 0..4 {
        let mut r = [V::ZERO; 4];
        for (q, r) in r.iter_mut().enumerate() {
            *r = match j {
                0 => p[0][q].sub(p[2][q]),
                1 => p[1][q].add(p[2][q]),
                2 => p[2][q].sub(p[1][q]),
                _ => p[1][q].sub(p[3][q]),
            };
        }
        r[0].sub(r[2]).store(out[4 * j], t);
        r[1].add(r[2]).store(out[4 * j + 1], t);
        r[2].sub(r[1]).store(out[4 * j + 2], t);
        r[1].sub(r[3]).store(out[4 * j + 3], t);
    }
}

per_isa! {
    /// `A^T m A` of every tile: `m[(xi * o + oo) * cols + i * tiles + tile]` to `y` (`gn` images
    /// of `o x h x w`), the outputs past the image dropped; `buf` scratch.
    ///
    /// Per output channel the four outputs of every tile are computed at unit stride over the
    /// tiles, then interleaved into the image rows.
    fn output_transform<V>(g: &Geom, m: &[f32], cols: usize, gn: usize, y: &mut [f32], buf: &mut Vec<f32>) {
        let (o, h, w) = (g.o, g.h, g.w);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        assert_eq!(cols, gn * tiles);
        // Every output of the tiles is written before it is read.
        if buf.len() < 4 * cols {
            buf.resize(4 * cols, 0.0);
        }
        let (t0, t1) = buf[..4 * cols].split_at_mut(2 * cols);
        let (y00, y01) = t0.split_at_mut(cols);
        let (y10, y11) = t1.split_at_mut(cols);
        for oo in 0..o {
            let mr: [&[f32]; 16] = std::array::from_fn(|xi| &m[(xi * o + oo) * cols..][..cols]);
            let mut out = [&mut y00[..], &mut y01[..], &mut y10[..], &mut y11[..]];
            let mut t = 0;
            while t + V::N <= cols {
                output_tiles::<V>(&mr, &mut out, t);
                t += V::N;
            }
            while t < cols {
                output_tiles::<f32>(&mr, &mut out, t);
                t += 1;
            }
            for i in 0..gn {
                let out = &mut y[(i * o + oo) * h * w..][..h * w];
                for ty in 0..th {
                    let at = i * tiles + ty * tw;
                    let pairs = [(&y00[at..at + tw], &y01[at..at + tw]), (&y10[at..at + tw], &y11[at..at + tw])];
                    for (dy, (a, b)) in pairs.into_iter().enumerate() {
                        if 2 * ty + dy >= h {
                            break;
                        }
                        let row = &mut out[(2 * ty + dy) * w..][..w];
                        for (px, (&a, &b)) in row.chunks_exact_mut(2).zip(a.iter().zip(b)) {
                            px[0] = a;
                            px[1] = b;
                        }
                        if w % 2 == 1 {
                            row[w - 1] = a[tw - 1];
                        }
                    }
                }
            }
        }
    }
}

/// [`output_transform`] of the `V::N` tiles from `t`: `out[2 a + b][t..] = (A^T m A)[a][b]`,
/// `m[xi]` the tiles' products.
#[inline(always)]
fn output_tiles<V: Lanes>(m: &[&[f32]; 16], out: &mut [&mut [f32]; 4], t: usize) {
    let mut mv = [V::ZERO; 16];
    for (v, m) in mv.iter_mut().zip(m) {
        *v = V::load(m, t);
    }
    // A^T over the rows (per column q of the 4x4), then A over the columns.
    let (mut s0, mut s1) = ([V::ZERO; 4], [V::ZERO; 4]);
    for q in 0..4 {
        s0[q] = mv[q].add(mv[4 + q]).add(mv[8 + q]);
        s1[q] = mv[4 + q].sub(mv[8 + q]).sub(mv[12 + q]);
    }
    s0[0].add(s0[1]).add(s0[2]).store(out[0], t);
    s0[1].sub(s0[2]).sub(s0[3]).store(out[1], t);
    s1[0].add(s1[1]).add(s1[2]).store(out[2], t);
    s1[1].sub(s1[2]).sub(s1[3]).store(out[3], t);
}

/// [`forward`] as Winograd F(2x2, 3x3) ([`winograd`] holds for `g`).
fn forward_winograd(isa: Isa, g: &Geom, x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
    let (c, o, plane_in) = (g.c, g.o, g.h * g.w);
    let tiles = g.h.div_ceil(2) * g.w.div_ceil(2);
    // The kernels' transforms, `[o][c][16]`, then packed per `xi`: both in parallel (they were
    // a serial prologue of every call).
    let mut u = super::zeros(16 * o * c);
    u.par_chunks_mut(16 * c).enumerate().for_each(|(oo, row)| {
        for (ci, t) in row.chunks_exact_mut(16).enumerate() {
            t.copy_from_slice(&kernel_transform(&w[(oo * c + ci) * 9..][..9]));
        }
    });
    let panel = o.div_ceil(gemm::MR) * c * gemm::MR;
    let mut packed = super::zeros(16 * panel);
    packed
        .par_chunks_mut(panel)
        .enumerate()
        .for_each(|(xi, p)| gemm::pack_panels_into(&u[xi..], o, c, 16 * c, 16, p));
    let (out, inp) = ((y, o * plane_in), (x, c * plane_in));
    // Groups of about WINO_COLS tiles: a group's transformed tiles and products (`16 (c + o)`
    // rows) then stay in L2 between the transforms and the products.
    by_image_groups(g.n, out, inp, (tiles, WINO_COLS), |s, yg, xg, gn| {
        let cols = gn * tiles;
        let ld = row_len(cols);
        let v = s.col.take(16 * c * ld);
        input_transform(isa, g, xg, gn, 0..c, v, ld, &mut s.t);
        for r in v.chunks_exact_mut(ld) {
            r[cols..].fill(0.0);
        }
        let m = s.c.take(16 * o * cols);
        for xi in 0..16 {
            gemm::gemm_nn(
                isa,
                &packed[xi * panel..(xi + 1) * panel],
                o,
                c,
                &v[xi * c * ld..(xi + 1) * c * ld],
                ld,
                cols,
                &mut m[xi * o * cols..(xi + 1) * o * cols],
                cols,
                false,
            );
        }
        output_transform(isa, g, m, cols, gn, yg, &mut s.t);
    });
}

/// `y = conv(x, w)`: `x` `[n][c][h][w]`, `w` `[o][c][kh][kw]`, `y` `[n][o][oh][ow]`.
pub fn forward(isa: Isa, g: &Geom, x: &[f32], w: &[f32], y: &mut [f32]) {
    forward_uninit(isa, g, x, w, as_uninit(y));
}

/// [`forward`] into uninitialized memory: every value of `y` is written (so initialized).
pub fn forward_uninit(isa: Isa, g: &Geom, x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
    let (oh, ow) = check(g, x.len(), w.len(), y.len());
    let (k, p, o) = (g.fan_in(), oh * ow, g.o);
    if y.is_empty() {
        return;
    }
    if winograd(g) {
        return forward_winograd(isa, g, x, w, y);
    }
    let mut a = Vec::new();
    gemm::pack_panels(w, o, k, k, 1, &mut a);
    by_image_groups(
        g.n,
        (y, o * p),
        (x, g.image_in()),
        (p, COLS),
        |s, out, xg, gn| {
            let cols = gn * p;
            let ld = row_len(cols);
            let col = s.col.take(k * ld);
            im2col(isa, g, xg, gn, col, ld);
            if gn == 1 {
                gemm::gemm_nn(isa, &a, o, k, col, ld, cols, out, p, false);
            } else {
                let c = s.c.take(o * cols);
                gemm::gemm_nn(isa, &a, o, k, col, ld, cols, c, cols, false);
                for oo in 0..o {
                    for i in 0..gn {
                        out[(i * o + oo) * p..][..p].copy_from_slice(&c[oo * cols + i * p..][..p]);
                    }
                }
            }
        },
    );
}

/// The input gradient: `dx = conv(x, w)`'s gradient with respect to `x` for the output
/// gradient `dy` (`dx` is overwritten).
pub fn backward_input(isa: Isa, g: &Geom, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    backward_input_uninit(isa, g, w, dy, as_uninit(dx));
}

/// [`backward_input`] into uninitialized memory: every value of `dx` is written (so
/// initialized).
pub fn backward_input_uninit(
    isa: Isa,
    g: &Geom,
    w: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
) {
    let (oh, ow) = check(g, dx.len(), w.len(), dy.len());
    let (k, p, o) = (g.fan_in(), oh * ow, g.o);
    if dx.is_empty() {
        return;
    }
    if dy.is_empty() {
        zeroed(dx);
        return;
    }
    if winograd(g) {
        // Stride 1, padding 1, 3x3: `dx = conv(dy, w')`, `w'` the kernels flipped with input and
        // output channels swapped, at the same padding.
        let mut wt = super::zeros(w.len());
        wt.par_chunks_mut(o * 9).enumerate().for_each(|(ci, row)| {
            for oo in 0..o {
                for t in 0..9 {
                    row[oo * 9 + 8 - t] = w[(oo * g.c + ci) * 9 + t];
                }
            }
        });
        let gt = Geom {
            c: o,
            h: oh,
            w: ow,
            o: g.c,
            ..*g
        };
        return forward_winograd(isa, &gt, dy, &wt, dx);
    }
    // `W^T`: `k` rows (fan-in), `o` columns.
    let mut a = Vec::new();
    gemm::pack_panels(w, k, o, 1, k, &mut a);
    by_image_groups(
        g.n,
        (dx, g.image_in()),
        (dy, o * p),
        (p, COLS),
        |s, dxg, dyg, gn| {
            let cols = gn * p;
            let ld = row_len(cols);
            let b = s.b.take(o * ld);
            gather_rows(dyg, o, p, gn, b, ld);
            let col = s.col.take(k * cols);
            gemm::gemm_nn(isa, &a, k, o, b, ld, cols, col, cols, false);
            // `dxg` arrives zeroed (`by_image_groups`): col2im adds onto it.
            col2im(g, col, cols, gn, dxg);
        },
    );
}

/// `dst` (`gn * plane` rows of `ld` values, `ld >= cols.next_multiple_of(LANES)`) `=` the
/// transpose of `gn` images' `[cols][plane]` blocks of `src` (NCHW, `cols` channels): row
/// `i * plane + px` holds pixel `px` of image `i` across the channels, lanes past `cols` zero.
/// With AVX-512, whole 16 x 16 blocks go through registers.
fn transpose_images(
    isa: Isa,
    src: &[f32],
    cols: usize,
    plane: usize,
    gn: usize,
    dst: &mut [f32],
    ld: usize,
) {
    const B: usize = 16;
    assert!(dst.len() == gn * plane * ld && src.len() >= gn * cols * plane && ld >= cols);
    for i in 0..gn {
        let img = &src[i * cols * plane..(i + 1) * cols * plane];
        let out = &mut dst[i * plane * ld..(i + 1) * plane * ld];
        let (mut c_done, mut px_done) = (0, plane);
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx512() {
            (c_done, px_done) = (cols - cols % B, plane - plane % B);
            for c0 in (0..c_done).step_by(B) {
                for px0 in (0..px_done).step_by(B) {
                    // SAFETY: AVX-512 F was detected; rows `c0..c0 + 16` of `img` hold pixels
                    // `px0..px0 + 16` (`c0 + 16 <= cols`, `px0 + 16 <= plane`), and rows
                    // `px0..px0 + 16` of `out` lanes `c0..c0 + 16` (`c0 + 16 <= cols <= ld`).
                    unsafe {
                        transpose16(
                            img.as_ptr().add(c0 * plane + px0),
                            plane,
                            out.as_mut_ptr().add(px0 * ld + c0),
                            ld,
                        )
                    };
                }
            }
        }
        let _ = isa;
        for c0 in (0..cols).step_by(B) {
            let cb = B.min(cols - c0);
            let from = if c0 < c_done { px_done } else { 0 };
            for px in from..plane {
                let row = &mut out[px * ld + c0..px * ld + c0 + cb];
                for (j, v) in row.iter_mut().enumerate() {
                    *v = img[(c0 + j) * plane + px];
                }
            }
        }
        for px in 0..plane {
            out[px * ld + cols..(px + 1) * ld].fill(0.0);
        }
    }
}

/// `dst[r * lds + c] = src[c * lss + r]` for a 16 x 16 block: 16 rows in registers, the classic
/// unpack / shuffle / lane-shuffle transpose.
///
/// # Safety
/// AVX-512 F; `src` readable at `c * lss .. c * lss + 16` and `dst` writable at `r * lds ..
/// r * lds + 16`, for every `c`, `r < 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, lss: usize, dst: *mut f32, lds: usize) {
    use std::arch::x86_64::{
        __m512, _mm512_loadu_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_storeu_ps,
        _mm512_unpackhi_ps, _mm512_unpacklo_ps,
    };
    // SAFETY: the caller's bounds.
    let r: [__m512; 16] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(src.add(c * lss)) });
    // Pairs of rows interleaved within 128-bit lanes.
    let mut t = r;
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Lane L of q[4 i + j]: column 4 L + j of rows 4 i .. 4 i + 4.
    let mut q = t;
    for i in 0..4 {
        q[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
        q[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
        q[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
        q[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
    }
    // Then the 128-bit lanes: column 4 L + j is lane L of q[j], q[4 + j], q[8 + j], q[12 + j].
    let mut u = q;
    for j in 0..4 {
        u[j] = _mm512_shuffle_f32x4::<0x88>(q[j], q[4 + j]);
        u[4 + j] = _mm512_shuffle_f32x4::<0xDD>(q[j], q[4 + j]);
        u[8 + j] = _mm512_shuffle_f32x4::<0x88>(q[8 + j], q[12 + j]);
        u[12 + j] = _mm512_shuffle_f32x4::<0xDD>(q[8 + j], q[12 + j]);
    }
    for j in 0..4 {
        let rows = [
            (j, _mm512_shuffle_f32x4::<0x88>(u[j], u[8 + j])),
            (8 + j, _mm512_shuffle_f32x4::<0xDD>(u[j], u[8 + j])),
            (4 + j, _mm512_shuffle_f32x4::<0x88>(u[4 + j], u[12 + j])),
            (12 + j, _mm512_shuffle_f32x4::<0xDD>(u[4 + j], u[12 + j])),
        ];
        for (row, v) in rows {
            // SAFETY: the caller's bounds.
            unsafe { _mm512_storeu_ps(dst.add(row * lds), v) };
        }
    }
}

/// Cuts `0..k` into at most one range per rayon thread, each starting at a multiple of
/// `gemm::MR` (the weight gradients' rows, one range per worker).
fn row_parts(k: usize) -> Vec<std::ops::Range<usize>> {
    let workers = rayon::current_num_threads().clamp(1, k.div_ceil(gemm::MR).max(1));
    (0..workers)
        .map(|t| {
            let cut = |t: usize| (t * k / workers).next_multiple_of(gemm::MR).min(k);
            cut(t)..cut(t + 1)
        })
        .filter(|r| !r.is_empty())
        .collect()
}

per_isa! {
    /// `A dY A^T` of every 2x2 tile of the output gradient of `gn` images (the adjoint of
    /// [`output_transform`]), from `py`: pixel rows of `ld` lanes, one per output channel, as
    /// [`transpose_images`] writes them (`h x w` pixels per image, `g`'s output being its input's
    /// size). `wt[(xi * cols + i * tiles + t) * ld + lane]`, `cols = gn * tiles`; the pixels past
    /// the image count as zero.
    fn grad_tiles<V>(g: &Geom, py: &[f32], gn: usize, wt: &mut [f32], ld: usize) {
        let (h, w) = (g.h, g.w);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        let cols = gn * tiles;
        assert!(py.len() >= gn * h * w * ld && wt.len() >= 16 * cols * ld);
        assert!(ld.is_multiple_of(V::N));
        let zero = vec![0f32; ld];
        for i in 0..gn {
            for ty in 0..th {
                for tx in 0..tw {
                    let t = i * tiles + ty * tw + tx;
                    let px = |r: usize, q: usize| {
                        let (y, x) = (2 * ty + r, 2 * tx + q);
                        if y < h && x < w {
                            &py[(i * h * w + y * w + x) * ld..][..ld]
                        } else {
                            &zero[..]
                        }
                    };
                    let d = [px(0, 0), px(0, 1), px(1, 0), px(1, 1)];
                    let mut rows = wt.chunks_exact_mut(cols * ld);
                    let mut out: [&mut [f32]; 16] = std::array::from_fn(|_| {
                        let r = rows.next().expect("16 blocks of tiles");
                        &mut r[t * ld..(t + 1) * ld]
                    });
                    // `ld` is whole vectors (`row_len`).
                    let mut l = 0;
                    while l < ld {
                        grad_tile::<V>(&d, &mut out, l);
                        l += V::N;
                    }
                }
            }
        }
    }
}

/// [`grad_tiles`] of one tile's lanes `l..l + V::N`: `d` its four output-gradient pixels
/// (row-major), `out[xi]` the 16 values of `A dY A^T`.
#[inline(always)]
fn grad_tile<V: Lanes>(d: &[&[f32]; 4], out: &mut [&mut [f32]; 16], l: usize) {
    let [a, b, c, e] = d.map(|p| V::load(p, l));
    // Rows of `A dY`: (a, b), (a + c, b + e), (a - c, b - e), (-c, -e); each row (p, q) times
    // `A^T`: (p, p + q, p - q, -q).
    let r = [
        (a, b),
        (a.add(c), b.add(e)),
        (a.sub(c), b.sub(e)),
        (V::ZERO.sub(c), V::ZERO.sub(e)),
    ];
    for (j, (p, q)) in r.into_iter().enumerate() {
        p.store(out[4 * j], l);
        p.add(q).store(out[4 * j + 1], l);
        p.sub(q).store(out[4 * j + 2], l);
        V::ZERO.sub(q).store(out[4 * j + 3], l);
    }
}

/// `G^T du G`: the gradient of a 3x3 kernel (row-major) from that of its transform `G k G^T`
/// (`du[4 row + column]`), the adjoint of [`kernel_transform`].
fn kernel_grad(du: &[f32; 16]) -> [f32; 9] {
    // `G^T` over the rows, per column of `du`.
    let mut s = [[0f32; 4]; 3];
    for q in 0..4 {
        let (u0, u1, u2, u3) = (du[q], du[4 + q], du[8 + q], du[12 + q]);
        s[0][q] = u0 + 0.5 * (u1 + u2);
        s[1][q] = 0.5 * (u1 - u2);
        s[2][q] = 0.5 * (u1 + u2) + u3;
    }
    let mut k = [0f32; 9];
    for (r, sr) in s.iter().enumerate() {
        k[3 * r] = sr[0] + 0.5 * (sr[1] + sr[2]);
        k[3 * r + 1] = 0.5 * (sr[1] - sr[2]);
        k[3 * r + 2] = 0.5 * (sr[1] + sr[2]) + sr[3];
    }
    k
}

/// [`backward_weight`] as Winograd F(2x2, 3x3) ([`winograd`] holds for `g`): the adjoint of
/// [`forward_winograd`]. Per tile `t`, `Y_t = A^T (U . V_t) A` with `U = G k G^T` and `V_t =
/// B^T d_t B`, so `dU = sum_t (A dY_t A^T) . V_t` and `dk = G^T dU G`: 16 products of `c x
/// tiles` (the forward's input transforms) by `tiles x o` (the output gradient's), 2.25x fewer
/// multiplies than the im2col product. As there, each worker owns a range of input channels and
/// sums over the whole batch in order: the same bits with any number of threads.
fn backward_weight_winograd(isa: Isa, g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (c, o, plane) = (g.c, g.o, g.h * g.w);
    let tiles = g.h.div_ceil(2) * g.w.div_ceil(2);
    let parts = row_parts(c);
    let gi = group(tiles, g.n, WINO_COLS);
    let ldo = row_len(o);
    let blocks: Vec<Vec<f32>> = parts
        .par_iter()
        .map(|chans| {
            SCRATCH.with_borrow_mut(|s| {
                let (kr, kp) = (chans.len(), chans.len().next_multiple_of(gemm::MR));
                // `dU^T` per `xi`: `kr` rows (this worker's channels) of `o` values.
                let mut acc = vec![0f32; 16 * kr * ldo];
                let mut i0 = 0;
                while i0 < g.n {
                    let gn = gi.min(g.n - i0);
                    let cols = gn * tiles;
                    let ld = row_len(cols);
                    let xg = &x[i0 * c * plane..(i0 + gn) * c * plane];
                    // Each `xi`'s block padded to whole register blocks of rows (zero; their
                    // results are dropped).
                    let v = s.col.take(16 * kp * ld);
                    input_transform(isa, g, xg, gn, chans.clone(), v, ld, &mut s.t);
                    for blk in v.chunks_exact_mut(kp * ld) {
                        blk[kr * ld..].fill(0.0);
                    }
                    let dyg = &dy[i0 * o * plane..(i0 + gn) * o * plane];
                    let py = s.c.take(gn * plane * ldo);
                    transpose_images(isa, dyg, o, plane, gn, py, ldo);
                    let wt = s.b.take(16 * cols * ldo);
                    grad_tiles(isa, g, py, gn, wt, ldo);
                    for xi in 0..16 {
                        gemm::gemm(
                            isa,
                            gemm::Lhs::Rows(&v[xi * kp * ld..(xi + 1) * kp * ld], ld),
                            kr,
                            cols,
                            &wt[xi * cols * ldo..(xi + 1) * cols * ldo],
                            ldo,
                            o,
                            &mut acc[xi * kr * ldo..(xi + 1) * kr * ldo],
                            ldo,
                            i0 > 0,
                        );
                    }
                    i0 += gn;
                }
                acc
            })
        })
        .collect();
    // Each kernel's gradient from its 16 transformed ones, `dw`'s rows in parallel.
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(oo, row)| {
        for (chans, block) in parts.iter().zip(&blocks) {
            let kr = chans.len();
            for (r, ci) in chans.clone().enumerate() {
                let du = std::array::from_fn(|xi| block[(xi * kr + r) * ldo + oo]);
                row[ci * 9..(ci + 1) * 9].copy_from_slice(&kernel_grad(&du));
            }
        }
    });
}

/// The weight gradient: `dw = conv(x, w)`'s gradient with respect to `w` for the output
/// gradient `dy` (`dw` is overwritten).
pub fn backward_weight(isa: Isa, g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (oh, ow) = check(g, x.len(), dw.len(), dy.len());
    let (k, p, o) = (g.fan_in(), oh * ow, g.o);
    dw.fill(0.0);
    if dy.is_empty() || dw.is_empty() {
        return;
    }
    if winograd_weight(g) {
        return backward_weight_winograd(isa, g, x, dy, dw);
    }
    // `dW^T = col dY^T`: each worker owns a range of fan-in rows (rows of `dW^T`) and sums over
    // the whole batch in order: no partial sums to add up, the same bits with any number of
    // threads (every element is one chain of the same products in the same order).
    let parts = row_parts(k);
    let gi = group(p, g.n, COLS);
    let ldo = row_len(o);
    let blocks: Vec<Vec<f32>> = parts
        .par_iter()
        .map(|rows| {
            SCRATCH.with_borrow_mut(|s| {
                let kr = rows.len();
                let mut acc = vec![0f32; kr * ldo];
                let mut i0 = 0;
                while i0 < g.n {
                    let gn = gi.min(g.n - i0);
                    let cols = gn * p;
                    let ld = row_len(cols);
                    let xg = &x[i0 * g.image_in()..(i0 + gn) * g.image_in()];
                    // `col`'s rows padded to whole register blocks (the padding rows' results
                    // are dropped).
                    let col = s.col.take(kr.next_multiple_of(gemm::MR) * ld);
                    let (filled, pad) = col.split_at_mut(kr * ld);
                    pad.fill(0.0);
                    im2col_rows(isa, g, xg, gn, filled, ld, rows.clone());
                    let dyg = &dy[i0 * o * p..(i0 + gn) * o * p];
                    let b = s.b.take(cols * ldo);
                    transpose_images(isa, dyg, o, p, gn, b, ldo);
                    let a = gemm::Lhs::Rows(col, ld);
                    gemm::gemm(isa, a, kr, cols, b, ldo, o, &mut acc, ldo, i0 > 0);
                    i0 += gn;
                }
                acc
            })
        })
        .collect();
    // `dW` from the blocks of `dW^T`, its rows in parallel.
    dw.par_chunks_mut(k).enumerate().for_each(|(oo, row)| {
        for (rows, block) in parts.iter().zip(&blocks) {
            for (r, kk) in rows.clone().enumerate() {
                row[kk] = block[r * ldo + oo];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain loops in `f64`: the definition.
    fn reference(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let (oh, ow) = g.out().unwrap();
        let mut y = vec![0f64; g.n * g.o * oh * ow];
        for n in 0..g.n {
            for o in 0..g.o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = 0f64;
                        for c in 0..g.c {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let (iy, ix) = (oy * g.stride + ky, ox * g.stride + kx);
                                    if iy < g.pad || ix < g.pad {
                                        continue;
                                    }
                                    let (iy, ix) = (iy - g.pad, ix - g.pad);
                                    if iy >= g.h || ix >= g.w {
                                        continue;
                                    }
                                    s += f64::from(x[((n * g.c + c) * g.h + iy) * g.w + ix])
                                        * f64::from(w[((o * g.c + c) * g.kh + ky) * g.kw + kx]);
                                }
                            }
                        }
                        y[((n * g.o + o) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(a) - b).abs() <= 1e-5 * scale,
                "{what}[{i}]: {a} vs {b} (scale {scale})"
            );
        }
    }

    /// Forward against the definition; both gradients against the adjoint identities
    /// `<conv(x), dy> = <x, dx(dy)> = <w, dw(x, dy)>` component by component: `dx[j]` is
    /// `<conv(e_j, w), dy>` and `dw[j]` is `<conv(x, e_j), dy>` — checked on small shapes in
    /// full, for every path this CPU has.
    #[test]
    fn forward_and_gradients_match_the_definition_on_every_path() {
        let shapes = [
            Geom {
                n: 2,
                c: 3,
                h: 5,
                w: 7,
                o: 5,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            },
            Geom {
                n: 3,
                c: 2,
                h: 6,
                w: 5,
                o: 9,
                kh: 3,
                kw: 3,
                stride: 2,
                pad: 1,
            },
            Geom {
                n: 1,
                c: 4,
                h: 4,
                w: 4,
                o: 3,
                kh: 1,
                kw: 1,
                stride: 2,
                pad: 0,
            },
            Geom {
                n: 5,
                c: 1,
                h: 8,
                w: 8,
                o: 17,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 0,
            },
            Geom {
                n: 2,
                c: 3,
                h: 3,
                w: 3,
                o: 2,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 2,
            },
            // Winograd F(2x2, 3x3): odd sizes (partial tiles), channels on both sides of 16, at
            // least 16 tiles per image.
            Geom {
                n: 1,
                c: 16,
                h: 7,
                w: 9,
                o: 17,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            },
            Geom {
                n: 2,
                c: 18,
                h: 8,
                w: 7,
                o: 16,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            },
            // The weight gradient's Winograd path too: 32 input channels, 4 x 4 tiles, odd
            // width (a partial column of tiles).
            Geom {
                n: 1,
                c: 32,
                h: 8,
                w: 7,
                o: 16,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            },
        ];
        // The last three take the Winograd path (forward and input gradient), the others not;
        // the last one's weight gradient too.
        let wino: Vec<bool> = shapes.iter().map(winograd).collect();
        assert_eq!(wino, [false, false, false, false, false, true, true, true]);
        // 4 x 4 images (4 tiles) take the im2col products.
        assert!(!winograd(&Geom {
            h: 4,
            w: 4,
            ..shapes[7]
        }));
        let wino_weight: Vec<bool> = shapes.iter().map(winograd_weight).collect();
        assert_eq!(
            wino_weight,
            [false, false, false, false, false, false, false, true]
        );
        for isa in Isa::available() {
            for (t, g) in shapes.iter().enumerate() {
                let (oh, ow) = g.out().unwrap();
                let x = values(g.n * g.c * g.h * g.w, t as u64 + 1);
                let w = values(g.o * g.c * g.kh * g.kw, t as u64 + 100);
                let dy = values(g.n * g.o * oh * ow, t as u64 + 200);
                let mut y = vec![f32::NAN; dy.len()];
                forward(isa, g, &x, &w, &mut y);
                close(&y, &reference(g, &x, &w), &format!("{isa:?} {g:?} y"));
                // Component j of the adjoint: dy . f(e_j), `f` linear in an `n`-vector.
                let adjoint = |n: usize, f: &dyn Fn(&[f32]) -> Vec<f64>| -> Vec<f64> {
                    (0..n)
                        .map(|j| {
                            let mut e = vec![0f32; n];
                            e[j] = 1.0;
                            f(&e).iter().zip(&dy).map(|(a, &b)| a * f64::from(b)).sum()
                        })
                        .collect()
                };
                let mut dx = vec![f32::NAN; x.len()];
                backward_input(isa, g, &w, &dy, &mut dx);
                let want_dx = adjoint(x.len(), &|e| reference(g, e, &w));
                close(&dx, &want_dx, &format!("{isa:?} {g:?} dx"));
                let mut dw = vec![f32::NAN; w.len()];
                backward_weight(isa, g, &x, &dy, &mut dw);
                let want_dw = adjoint(w.len(), &|e| reference(g, &x, e));
                close(&dw, &want_dw, &format!("{isa:?} {g:?} dw"));
            }
        }
    }

    /// The Winograd input transform gives the portable path's bits on every path the CPU has
    /// (the AVX-512 body spreads rows of up to 32 values with permutes): every width 1 to 40,
    /// even and odd, and heights 1 to 5, two images, two channels.
    #[test]
    fn input_transform_matches_the_portable_bits() {
        for w in 1..=40usize {
            for h in 1..=5usize {
                let g = Geom {
                    n: 2,
                    c: 2,
                    h,
                    w,
                    o: 16,
                    kh: 3,
                    kw: 3,
                    stride: 1,
                    pad: 1,
                };
                let x = values(g.n * g.c * h * w, (w * 8 + h) as u64);
                let tiles = h.div_ceil(2) * w.div_ceil(2);
                let ld = g.n * tiles + 3;
                let run = |isa| {
                    let mut v = vec![f32::NAN; 16 * g.c * ld];
                    input_transform(isa, &g, &x, g.n, 0..g.c, &mut v, ld, &mut Vec::new());
                    let cols = g.n * tiles;
                    v.chunks(ld)
                        .flat_map(|r| r[..cols].iter().map(|x| x.to_bits()))
                        .collect::<Vec<_>>()
                };
                let want = run(Isa::Portable);
                for isa in Isa::available() {
                    assert!(run(isa) == want, "{isa:?} {h}x{w}");
                }
            }
        }
    }

    /// im2col gives the portable path's bits on every path the CPU has (the AVX-512 body picks
    /// stride-2 rows of up to 32 values with permutes): strides 1-3, widths 1-40, padding 0-2.
    #[test]
    fn im2col_matches_the_portable_bits() {
        for stride in 1..=3 {
            for w in 1..=40usize {
                for pad in 0..=2 {
                    let g = Geom {
                        n: 2,
                        c: 2,
                        h: 5,
                        w,
                        o: 1,
                        kh: 3,
                        kw: 3,
                        stride,
                        pad,
                    };
                    let Some((oh, ow)) = g.out() else { continue };
                    let x = values(g.n * g.c * g.h * w, (w * 8 + stride) as u64);
                    let ld = g.n * oh * ow + 5;
                    let run = |isa| {
                        let mut col = vec![f32::NAN; g.fan_in() * ld];
                        im2col(isa, &g, &x, g.n, &mut col, ld);
                        col.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    let want = run(Isa::Portable);
                    for isa in Isa::available() {
                        assert!(run(isa) == want, "{isa:?} stride {stride} w {w} pad {pad}");
                    }
                }
            }
        }
    }

    /// The three passes give the same bits on one thread as on three (the weight gradient's
    /// sum order does not depend on the thread count).
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for g in [(5, 12, 10), (16, 20, 7), (32, 20, 8)].map(|(c, o, h)| Geom {
            n: 9,
            c,
            h,
            w: 10,
            o,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        }) {
            thread_count_check(&g);
        }
    }

    fn thread_count_check(g: &Geom) {
        let g = *g;
        let (oh, ow) = g.out().unwrap();
        let x = values(g.n * g.c * g.h * g.w, 3);
        let w = values(g.o * g.c * 9, 4);
        let dy = values(g.n * g.o * oh * ow, 5);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (mut y, mut dx, mut dw) = (
                    vec![0f32; dy.len()],
                    vec![0f32; x.len()],
                    vec![0f32; w.len()],
                );
                forward(Isa::detect(), &g, &x, &w, &mut y);
                backward_input(Isa::detect(), &g, &w, &dy, &mut dx);
                backward_weight(Isa::detect(), &g, &x, &dy, &mut dw);
                [y, dx, dw].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    #[should_panic(expected = "kernel does not fit")]
    fn a_kernel_larger_than_the_padded_input_is_refused() {
        let g = Geom {
            n: 1,
            c: 1,
            h: 2,
            w: 2,
            o: 1,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 0,
        };
        forward(Isa::Portable, &g, &[0.0; 4], &[0.0; 9], &mut []);
    }
}
