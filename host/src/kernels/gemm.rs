//! The `f32` register-blocked matrix-product kernels that the float engine's layers and the
//! training convolutions ([`crate::kernels::conv`]) share: one place for the micro-kernels,
//! each with an AVX-512, an AVX2 and a portable path chosen at run time ([`Isa`]).
//!
//! - `tile`: an `MR x (nr * LANES)` block `acc = W X` with `W` packed `[k][MR]` (one panel of
//!   `pack_panels`) and `X` row-major (`k` rows of `stride` values) — the float engine's
//!   im2col product, and `gemm_nn`'s block on AVX2 and portable;
//! - `tile_direct`: the same block reading a padded image through tap offsets (the float
//!   engine's direct convolution);
//! - `gemm_nn`: `C (+)= A B` over whole matrices, `A` packed by `pack_panels`, blocked for
//!   the caches (`KC` or `KC_WIDE` fan-in rows x `NC` columns of `B` per block);
//! - [`gemm`]: the same with `A` packed or row-major (`Lhs`). On AVX-512 its register block
//!   (`avx512::tile_into`) starts from `C` and ends in it, and reads `A`'s rows in place
//!   (broadcasting from `MR` rows); the other paths pack the rows first, sum each block from
//!   zero and add it to `C`.
//!
//! The sums run in another order than Burn's: results agree with it within `f32` rounding,
//! which the float engine's and the training kernels' tests bound.

use super::Isa;

/// Rows of a register block (one packed panel).
pub(crate) const MR: usize = 8;
/// `f32` lanes of a vector block (one AVX-512 register, two AVX2 registers).
pub(crate) const LANES: usize = 16;
/// Vectors per register-block row.
pub(crate) const NR: usize = 3;
/// Widest kernel of the float engine's direct path.
pub(crate) const MAX_KW: usize = 16;
/// Fan-in rows of one [`gemm_nn`] block when `B` is narrow (at most [`NARROW`] columns): the
/// block of `B` that every panel of `A` re-reads then stays in L1 (32 KiB at 64 columns).
const KC: usize = 128;
/// Fan-in rows of one block when `B` is wider: its block is read from L2 either way, and a
/// deeper block halves the passes over `C` (the weight gradient's `C` is megabytes).
const KC_WIDE: usize = 256;
/// The widest `B` that takes [`KC`].
const NARROW: usize = 128;
/// Columns of `B` per [`gemm_nn`] block (`KC_WIDE x NC` floats: 480 KiB, inside L2).
const NC: usize = 480;

/// Packs the `m x k` matrix `A` (element `(i, j)` at `a[i * rs + j * cs]`) into panels of
/// [`MR`] rows, `[m / MR][k][MR]`, rows past `m` zero: the `W` operand of [`tile`] and
/// [`gemm_nn`]. `out` is resized (kept between calls by the caller).
pub(crate) fn pack_panels(a: &[f32], m: usize, k: usize, rs: usize, cs: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(m.div_ceil(MR) * k * MR, 0.0);
    pack_panels_into(a, m, k, rs, cs, out);
}

/// [`pack_panels`] into `out` (`m.div_ceil(MR) * k * MR` values; the rows past `m` are zeroed).
pub(crate) fn pack_panels_into(
    a: &[f32],
    m: usize,
    k: usize,
    rs: usize,
    cs: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), m.div_ceil(MR) * k * MR, "packed panel length");
    for i in m..m.next_multiple_of(MR) {
        let dst = &mut out[(i / MR) * k * MR + i % MR..];
        for j in 0..k {
            dst[j * MR] = 0.0;
        }
    }
    for i in 0..m {
        let dst = &mut out[(i / MR) * k * MR + i % MR..];
        if cs == 1 {
            for (j, &v) in a[i * rs..i * rs + k].iter().enumerate() {
                dst[j * MR] = v;
            }
        } else {
            for j in 0..k {
                dst[j * MR] = a[i * rs + j * cs];
            }
        }
    }
}

/// The `A` operand of [`gemm`]: `m x k`.
#[derive(Clone, Copy)]
pub(crate) enum Lhs<'a> {
    /// Packed by [`pack_panels`].
    Packed(&'a [f32]),
    /// Row-major, `lda` values per row, `m.next_multiple_of(MR)` rows (the rows past `m` are
    /// read and their results dropped): no packing, each register block broadcasts its rows'
    /// values straight from the rows.
    Rows(&'a [f32], usize),
}

/// `C = A B` (`accumulate`: `C += A B`) for `A` `m x k` packed by [`pack_panels`], `B` `k`
/// rows of `ldb >= n.next_multiple_of(LANES)` values (the lanes past `n` are read and their
/// results dropped), `C` `m` rows of `ldc >= n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nn(
    isa: Isa,
    a: &[f32],
    m: usize,
    k: usize,
    b: &[f32],
    ldb: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    gemm(isa, Lhs::Packed(a), m, k, b, ldb, n, c, ldc, accumulate);
}

/// [`gemm_nn`] for either form of `A` ([`Lhs`]); both give the same bits (every element is the
/// same chain of products in the same order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    isa: Isa,
    a: Lhs<'_>,
    m: usize,
    k: usize,
    b: &[f32],
    ldb: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let a_fits = match a {
        Lhs::Packed(a) => a.len() >= m.div_ceil(MR) * k * MR,
        Lhs::Rows(a, lda) => {
            m == 0 || (lda >= k && a.len() >= (m.next_multiple_of(MR) - 1) * lda + k)
        }
    };
    assert!(
        ldb >= n.next_multiple_of(LANES)
            && b.len() >= k * ldb
            && a_fits
            && ldc >= n
            && (m == 0 || c.len() >= (m - 1) * ldc + n)
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    if let (Lhs::Rows(rows, lda), false) = (a, cfg!(target_arch = "x86_64") && isa.has_avx512()) {
        // Only the AVX-512 kernel reads rows in place; the others take the packed panels.
        let mut packed = Vec::new();
        pack_panels(rows, m, k, lda, 1, &mut packed);
        return gemm(
            isa,
            Lhs::Packed(&packed),
            m,
            k,
            b,
            ldb,
            n,
            c,
            ldc,
            accumulate,
        );
    }
    let mut acc = [[0f32; NR * LANES]; MR];
    let kc_max = if n <= NARROW { KC } else { KC_WIDE };
    let mut k0 = 0;
    while k0 < k {
        let kc = (k - k0).min(kc_max);
        let add = accumulate || k0 > 0;
        let bk = &b[k0 * ldb..];
        let mut n0 = 0;
        while n0 < n {
            let nc = (n - n0).min(NC);
            let nv = nc.div_ceil(LANES);
            for p in 0..m.div_ceil(MR) {
                let rows = MR.min(m - p * MR);
                let mut v = 0;
                while v < nv {
                    let nr = (nv - v).min(NR);
                    let x0 = n0 + v * LANES;
                    let valid = (nc - v * LANES).min(nr * LANES);
                    #[cfg(target_arch = "x86_64")]
                    if isa.has_avx512() {
                        // The register block starts from `C` (or zero) and ends in it: a
                        // whole block straight from and to `C`, a partial one through `acc`.
                        let whole = rows == MR && valid == nr * LANES;
                        let at = p * MR * ldc + x0;
                        let (dst, ld) = if whole {
                            assert!(c.len() >= at + (MR - 1) * ldc + valid);
                            (c[at..].as_mut_ptr(), ldc)
                        } else {
                            if add {
                                for (r, accr) in acc.iter_mut().enumerate().take(rows) {
                                    let at = at + r * ldc;
                                    accr[..valid].copy_from_slice(&c[at..at + valid]);
                                }
                            }
                            (acc.as_mut_ptr().cast::<f32>(), NR * LANES)
                        };
                        let ap = match a {
                            Lhs::Packed(a) => avx512::Weights::Packed(&a[(p * k + k0) * MR..]),
                            Lhs::Rows(a, lda) => {
                                let ap = &a[p * MR * lda + k0..];
                                assert!(ap.len() >= (MR - 1) * lda + kc);
                                avx512::Weights::Rows(ap, lda)
                            }
                        };
                        assert!(x0 + nr * LANES <= ldb);
                        // SAFETY: AVX-512 F and FMA were detected; the weights, `B`'s `kc`
                        // rows (the operands' assertion) and the `MR` rows of `nr * LANES`
                        // values at `dst`, `ld` apart (checked above, or `acc`), are in bounds.
                        unsafe {
                            match nr {
                                3 => avx512::tile_into::<3>(ap, bk, ldb, x0, kc, dst, ld, add),
                                2 => avx512::tile_into::<2>(ap, bk, ldb, x0, kc, dst, ld, add),
                                _ => avx512::tile_into::<1>(ap, bk, ldb, x0, kc, dst, ld, add),
                            }
                        }
                        if !whole {
                            for (r, accr) in acc.iter().enumerate().take(rows) {
                                let at = at + r * ldc;
                                c[at..at + valid].copy_from_slice(&accr[..valid]);
                            }
                        }
                        v += nr;
                        continue;
                    }
                    let Lhs::Packed(a) = a else {
                        unreachable!("packed above")
                    };
                    let ap = &a[(p * k + k0) * MR..];
                    tile(isa, ap, bk, ldb, x0, kc, nr, &mut acc);
                    for (r, accr) in acc.iter().enumerate().take(rows) {
                        let at = (p * MR + r) * ldc + x0;
                        let dst = &mut c[at..at + valid];
                        if add {
                            for (d, &s) in dst.iter_mut().zip(accr) {
                                *d += s;
                            }
                        } else if let Ok(dst) = <&mut [f32; NR * LANES]>::try_from(&mut *dst) {
                            // A whole block: a fixed-size copy, inlined (not a `memmove` call).
                            *dst = *accr;
                        } else {
                            dst.copy_from_slice(&accr[..valid]);
                        }
                    }
                    v += nr;
                }
            }
            n0 += nc;
        }
        k0 += kc;
    }
}

/// [`direct`]'s register block: `acc[r][16 v + j] = sum_k W[r][k] padded[taps[k] + bases[v]
/// + j]`, lane `j` zero where bit `j` of `masks[v][tap_x[k]]` is clear, `v < nr`. `rows3`: the
/// taps come in rows of three (`tap_x` = 0, 1, 2, 0, 1, 2, ...: a 3-wide kernel).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn tile_direct(
    isa: Isa,
    w: &[f32],
    padded: &[f32],
    taps: &[usize],
    tap_x: &[u8],
    rows3: bool,
    max_tap: usize,
    bases: [usize; NR],
    masks: &[[u16; MAX_KW]; NR],
    nr: usize,
    acc: &mut [[f32; NR * LANES]; MR],
) {
    let k = taps.len();
    // `max_tap` and every `tap_x < MAX_KW` were checked once per node by `direct`.
    let reach = max_tap + bases.iter().max().copied().unwrap_or(0);
    assert!(w.len() >= k * MR && tap_x.len() == k && reach + LANES <= padded.len());
    match isa {
        // SAFETY: detected AVX-512 F and FMA; every load `taps[j] + bases[v] .. + 16` is
        // inside `padded` and every `tap_x` indexes the mask rows (checked above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni | Isa::Avx512 => unsafe {
            // Taps in rows of three (`kx` 0, 1, 2), the middle one unmasked: the masks stay in
            // registers (see `avx512::tile_direct3`).
            if rows3 && masks.iter().all(|m| m[1] == u16::MAX) {
                assert!(k.is_multiple_of(3));
                debug_assert!(tap_x.chunks_exact(3).all(|t| t == [0, 1, 2]));
                match nr {
                    3 => avx512::tile_direct3::<3>(w, padded, taps, bases, masks, acc),
                    2 => avx512::tile_direct3::<2>(w, padded, taps, bases, masks, acc),
                    _ => avx512::tile_direct3::<1>(w, padded, taps, bases, masks, acc),
                }
                return;
            }
            match nr {
                3 => avx512::tile_direct::<3>(w, padded, taps, tap_x, bases, masks, acc),
                2 => avx512::tile_direct::<2>(w, padded, taps, tap_x, bases, masks, acc),
                _ => avx512::tile_direct::<1>(w, padded, taps, tap_x, bases, masks, acc),
            }
        },
        _ => {
            for a in acc.iter_mut() {
                a.fill(0.0);
            }
            for (j, (&t, &kx)) in taps.iter().zip(tap_x).enumerate() {
                for v in 0..nr {
                    let m = masks[v][usize::from(kx)];
                    let xs = &padded[t + bases[v]..t + bases[v] + LANES];
                    for (r, a) in acc.iter_mut().enumerate() {
                        let wv = w[j * MR + r];
                        let lanes = a[v * LANES..(v + 1) * LANES].iter_mut().zip(xs);
                        for (l, (a, &xv)) in lanes.enumerate() {
                            if m >> l & 1 != 0 {
                                *a += wv * xv;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `acc[r][j] = sum_k W[r][k] X[k][col0 + j]`, `j < nr * LANES`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn tile(
    isa: Isa,
    w: &[f32],
    col: &[f32],
    stride: usize,
    col0: usize,
    k: usize,
    nr: usize,
    acc: &mut [[f32; NR * LANES]; MR],
) {
    assert!(w.len() >= k * MR && col0 + nr * LANES <= stride && col.len() >= k * stride);
    match isa {
        // SAFETY: detected AVX-512 F and FMA; the bounds were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni | Isa::Avx512 => unsafe {
            match nr {
                3 => avx512::tile::<3>(w, col, stride, col0, k, acc),
                2 => avx512::tile::<2>(w, col, stride, col0, k, acc),
                _ => avx512::tile::<1>(w, col, stride, col0, k, acc),
            }
        },
        // SAFETY: detected AVX2 and FMA; the bounds were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::tile(w, col, stride, col0, k, nr, acc) },
        _ => {
            let n = nr * LANES;
            for a in acc.iter_mut() {
                a.fill(0.0);
            }
            for j in 0..k {
                let xs = &col[j * stride + col0..j * stride + col0 + n];
                for (r, a) in acc.iter_mut().enumerate() {
                    let wv = w[j * MR + r];
                    for (a, &xv) in a[..n].iter_mut().zip(xs) {
                        *a += wv * xv;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, __mmask16, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask3_fmadd_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use super::{LANES, MAX_KW, MR, NR};

    /// One fan-in row of the register block: `a[r][v] += w[r] * x[v]`.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn fma_rows<const N: usize>(a: &mut [[__m512; N]; MR], w: &[f32; MR], x: &[__m512; N]) {
        for (ar, &wr) in a.iter_mut().zip(w) {
            let wv = _mm512_set1_ps(wr);
            for (av, &xv) in ar.iter_mut().zip(x) {
                *av = _mm512_fmadd_ps(wv, xv, *av);
            }
        }
    }

    /// The register block into `acc[r][16 v ..]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store<const N: usize>(a: &[[__m512; N]; MR], acc: &mut [[f32; NR * LANES]; MR]) {
        for (ar, accr) in a.iter().zip(acc.iter_mut()) {
            for (v, &av) in ar.iter().enumerate() {
                let dst: &mut [f32; LANES] = (&mut accr[v * LANES..(v + 1) * LANES])
                    .try_into()
                    .expect("N <= NR vectors per row");
                // SAFETY: `dst` is 16 writable `f32`s.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), av) };
            }
        }
    }

    /// [`tile_direct`] for taps in rows of three, `tap_x` = 0, 1, 2, 0, 1, 2, ..., the middle
    /// tap's masks all ones (a 3-wide kernel, padding 1): every load is whole, and the outer
    /// taps' lanes are masked in the FMA instead (`vfmadd231ps` with a merge mask), with their
    /// six masks in mask registers for the whole loop. A masked load costs a shuffle-port uop
    /// next to the FMAs, and a mask read per tap another; this runs at the FMA peak (87 against
    /// 68 GMAC/s on one core of the Intel Xeon, 3x3 taps, 8 x 48 block).
    ///
    /// The same bits as [`tile_direct`]: a masked-off lane there adds `W * 0.0 = +-0.0` to an
    /// accumulator that starts at `+0.0` and so is never `-0.0` (a sum is `-0.0` only when both
    /// terms are), and `x + +-0.0 = x` for every other `x`; here it adds nothing. (The weights
    /// are finite: an infinite one would make `W * 0.0` NaN there.)
    ///
    /// # Safety
    /// AVX-512 F and FMA; `w` holds `k * MR` values, every `taps[j] + bases[v] + 16` is at most
    /// `padded.len()`, `k = taps.len()` is a multiple of 3.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub unsafe fn tile_direct3<const N: usize>(
        w: &[f32],
        padded: &[f32],
        taps: &[usize],
        bases: [usize; NR],
        masks: &[[u16; MAX_KW]; NR],
        acc: &mut [[f32; NR * LANES]; MR],
    ) {
        let mut a = [[_mm512_setzero_ps(); N]; MR];
        let (wp, xp) = (w.as_ptr(), padded.as_ptr());
        let left: [__mmask16; N] = std::array::from_fn(|v| masks[v][0]);
        let right: [__mmask16; N] = std::array::from_fn(|v| masks[v][2]);
        for g in 0..taps.len() / 3 {
            for kx in 0..3 {
                // SAFETY: `3 g + kx < taps.len()`.
                let t = unsafe { *taps.get_unchecked(3 * g + kx) };
                let mut x = [_mm512_setzero_ps(); N];
                for (v, xv) in x.iter_mut().enumerate() {
                    // SAFETY: the caller checked `t + bases[v] + 16 <= padded.len()`.
                    *xv = unsafe { _mm512_loadu_ps(xp.add(t + bases[v])) };
                }
                // SAFETY: `(3 g + kx + 1) * MR <= k * MR <= w.len()`.
                let wr = unsafe { &*wp.add((3 * g + kx) * MR).cast::<[f32; MR]>() };
                for (ar, &wv) in a.iter_mut().zip(wr) {
                    let wv = _mm512_set1_ps(wv);
                    for (v, (av, &xv)) in ar.iter_mut().zip(&x).enumerate() {
                        *av = match kx {
                            0 => _mm512_mask3_fmadd_ps(wv, xv, *av, left[v]),
                            2 => _mm512_mask3_fmadd_ps(wv, xv, *av, right[v]),
                            _ => _mm512_fmadd_ps(wv, xv, *av),
                        };
                    }
                }
            }
        }
        store(&a, acc);
    }

    /// # Safety
    /// AVX-512 F and FMA; `w` holds `k * MR` values, every `taps[j] + bases[v] + 16` is at most
    /// `padded.len()` and every `tap_x[j] < MAX_KW`.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub unsafe fn tile_direct<const N: usize>(
        w: &[f32],
        padded: &[f32],
        taps: &[usize],
        tap_x: &[u8],
        bases: [usize; NR],
        masks: &[[u16; MAX_KW]; NR],
        acc: &mut [[f32; NR * LANES]; MR],
    ) {
        let mut a = [[_mm512_setzero_ps(); N]; MR];
        let (wp, xp) = (w.as_ptr(), padded.as_ptr());
        for (j, (&t, &kx)) in taps.iter().zip(tap_x).enumerate() {
            let mut x = [_mm512_setzero_ps(); N];
            for (v, xv) in x.iter_mut().enumerate() {
                // SAFETY: the caller checked `t + bases[v] + 16 <= padded.len()` and `kx <
                // MAX_KW`; masked-off lanes are not read.
                *xv = unsafe {
                    let m = *masks[v].get_unchecked(usize::from(kx));
                    _mm512_maskz_loadu_ps(m, xp.add(t + bases[v]))
                };
            }
            // SAFETY: `(j + 1) * MR <= k * MR <= w.len()`.
            fma_rows(&mut a, unsafe { &*wp.add(j * MR).cast::<[f32; MR]>() }, &x);
        }
        store(&a, acc);
    }

    /// # Safety
    /// AVX-512 F and FMA; `w` holds `k * MR` values, `col` `k` rows of `stride >= col0 + N *
    /// LANES` values.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub unsafe fn tile<const N: usize>(
        w: &[f32],
        col: &[f32],
        stride: usize,
        col0: usize,
        k: usize,
        acc: &mut [[f32; NR * LANES]; MR],
    ) {
        let dst = acc.as_mut_ptr().cast::<f32>();
        // SAFETY: the caller's bounds; `acc` is `MR` rows of `NR * LANES >= N * LANES` values.
        unsafe {
            tile_into::<N>(
                Weights::Packed(w),
                col,
                stride,
                col0,
                k,
                dst,
                NR * LANES,
                false,
            )
        }
    }

    /// A register block's weights: packed `[k][MR]`, or `MR` rows `lda` apart.
    #[derive(Clone, Copy)]
    pub enum Weights<'a> {
        Packed(&'a [f32]),
        Rows(&'a [f32], usize),
    }

    /// `C[r][j] (+)= sum_k W[r][k] X[k][col0 + j]`, `j < N * LANES`, `C` row `r` at `c + r *
    /// ldc`: the register block starts from `C` when `add` (zero otherwise), takes the products
    /// in `k` order, and is stored back.
    ///
    /// # Safety
    /// AVX-512 F and FMA; the weights hold `k` fan-in values per row (`Packed`: `k * MR`
    /// values; `Rows`: `(MR - 1) * lda + k`), `col` `k` rows of `stride >= col0 + N * LANES`
    /// values, and `c + r * ldc .. + N * LANES` is writable for every `r < MR`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub unsafe fn tile_into<const N: usize>(
        w: Weights<'_>,
        col: &[f32],
        stride: usize,
        col0: usize,
        k: usize,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let mut a = [[_mm512_setzero_ps(); N]; MR];
        if add {
            for (r, ar) in a.iter_mut().enumerate() {
                for (v, av) in ar.iter_mut().enumerate() {
                    // SAFETY: row `r < MR` of `C` has `N * LANES` values (the caller).
                    *av = unsafe { _mm512_loadu_ps(c.add(r * ldc + v * LANES)) };
                }
            }
        }
        let xp = col.as_ptr();
        let x_at = |j: usize| {
            let mut x = [_mm512_setzero_ps(); N];
            for (v, xv) in x.iter_mut().enumerate() {
                // SAFETY: row `j < k` has `stride >= col0 + N * LANES` values.
                *xv = unsafe { _mm512_loadu_ps(xp.add(j * stride + col0 + v * LANES)) };
            }
            x
        };
        match w {
            Weights::Packed(w) => {
                let wp = w.as_ptr();
                for j in 0..k {
                    // SAFETY: `(j + 1) * MR <= k * MR <= w.len()`.
                    fma_rows(
                        &mut a,
                        unsafe { &*wp.add(j * MR).cast::<[f32; MR]>() },
                        &x_at(j),
                    );
                }
            }
            Weights::Rows(w, lda) => {
                let wp = w.as_ptr();
                for j in 0..k {
                    // SAFETY: `r * lda + j < (MR - 1) * lda + k <= w.len()`.
                    let wj = std::array::from_fn(|r| unsafe { *wp.add(r * lda + j) });
                    fma_rows(&mut a, &wj, &x_at(j));
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (v, &av) in ar.iter().enumerate() {
                // SAFETY: as the loads above.
                unsafe { _mm512_storeu_ps(c.add(r * ldc + v * LANES), av) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{LANES, MR, NR};

    /// [`super::tile`] with AVX2: per 16 columns and half panel, 4 rows x 2 vectors of 8.
    ///
    /// # Safety
    /// AVX2 and FMA; `w` holds `k * MR` values, `col` `k` rows of `stride >= col0 + nr *
    /// LANES` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        w: &[f32],
        col: &[f32],
        stride: usize,
        col0: usize,
        k: usize,
        nr: usize,
        acc: &mut [[f32; NR * LANES]; MR],
    ) {
        let (wp, xp) = (w.as_ptr(), col.as_ptr());
        for v in 0..nr {
            for half in 0..2 {
                let mut a = [[_mm256_setzero_ps(); 2]; 4];
                for j in 0..k {
                    // SAFETY: row `j < k` has `col0 + nr * LANES <= stride` values, and
                    // `j * MR + 8 <= k * MR <= w.len()`.
                    unsafe {
                        let x = xp.add(j * stride + col0 + v * LANES);
                        let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                        for (r, ar) in a.iter_mut().enumerate() {
                            let wv = _mm256_broadcast_ss(&*wp.add(j * MR + half * 4 + r));
                            ar[0] = _mm256_fmadd_ps(wv, x0, ar[0]);
                            ar[1] = _mm256_fmadd_ps(wv, x1, ar[1]);
                        }
                    }
                }
                for (r, ar) in a.iter().enumerate() {
                    let dst = &mut acc[half * 4 + r][v * LANES..(v + 1) * LANES];
                    // SAFETY: `dst` is 16 writable `f32`s.
                    unsafe {
                        _mm256_storeu_ps(dst.as_mut_ptr(), ar[0]);
                        _mm256_storeu_ps(dst.as_mut_ptr().add(8), ar[1]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release -p nvcim --lib gemm_rate -- --ignored --nocapture`: one core's
    /// multiply-adds per second in `gemm_nn` for the shapes of training's products, packed and
    /// row-major `A` (which must give the same bits).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn gemm_rate() {
        let isa = Isa::detect();
        for (m, k, n) in [
            (64usize, 64usize, 64usize),
            (128, 128, 64),
            (256, 256, 64),
            (512, 512, 64),
            (64, 576, 512),
            (256, 2304, 512),
            (512, 4608, 512),
            (64, 64, 1024),
            (2304, 512, 512),
            (288, 1024, 128),
            (1152, 512, 256),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let mut packed = Vec::new();
            pack_panels(&a, m, k, k, 1, &mut packed);
            let ldb = n.next_multiple_of(LANES);
            let b: Vec<f32> = (0..k * ldb).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut c = vec![0f32; m * n];
            let reps = (2e9 / (m * k * n) as f64).ceil() as usize;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gemm_nn(isa, &packed, m, k, &b, ldb, n, &mut c, n, false);
            }
            let s = t.elapsed().as_secs_f64();
            let rows = Lhs::Rows(&a, k);
            let mut c2 = vec![0f32; m * n];
            let t2 = std::time::Instant::now();
            for _ in 0..reps {
                gemm(isa, rows, m, k, &b, ldb, n, &mut c2, n, false);
            }
            let s2 = t2.elapsed().as_secs_f64();
            assert!(
                c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()),
                "m {m} k {k} n {n}: packed and row-major A differ"
            );
            let g = |s: f64| (m * k * n * reps) as f64 / s / 1e9;
            println!(
                "{isa:?} m {m} k {k} n {n}: packed {:.1} GMAC/s, rows {:.1}",
                g(s),
                g(s2)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvcim_shared::rng::mix64;

    /// `tile_direct`'s rows-of-three path (whole loads, masked FMAs) gives the bits of its
    /// masked-load path, for every block width, with negative weights and zeros (the `-0.0`
    /// case), masks that drop every lane, and garbage where lanes are masked off.
    #[test]
    fn rows_of_three_match_masked_loads_bit_for_bit() {
        let isas: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|i| matches!(i, Isa::Avx512 | Isa::Avx512Vnni))
            .collect();
        let value = |i: u64, salt: u64| {
            let r = mix64(i ^ salt << 40);
            match r % 9 {
                0 => 0.0,
                1 => -0.0,
                _ => (r >> 8) as u32 as f32 / u32::MAX as f32 * 4.0 - 2.0,
            }
        };
        for isa in isas {
            for case in 0..24u64 {
                let k = 3 * (1 + case as usize % 7);
                let padded: Vec<f32> = (0..400u64).map(|i| value(i, case)).collect();
                let w: Vec<f32> = (0..(k * MR) as u64).map(|i| value(i, case + 99)).collect();
                let taps: Vec<usize> = (0..k as u64)
                    .map(|j| (mix64(j + case) % 300) as usize)
                    .collect();
                let tap_x: Vec<u8> = (0..k).map(|j| (j % 3) as u8).collect();
                let max_tap = taps.iter().copied().max().unwrap();
                let bases = [0, 16 + case as usize % 5, 40];
                let masks: [[u16; MAX_KW]; NR] = std::array::from_fn(|v| {
                    let m = mix64(case * 7 + v as u64);
                    let mut row = [0u16; MAX_KW];
                    row[0] = if case % 5 == 0 { 0 } else { m as u16 };
                    row[1] = u16::MAX;
                    row[2] = (m >> 16) as u16;
                    row
                });
                for nr in 1..=NR {
                    let run = |rows3| {
                        let mut acc = [[f32::NAN; NR * LANES]; MR];
                        tile_direct(
                            isa, &w, &padded, &taps, &tap_x, rows3, max_tap, bases, &masks, nr,
                            &mut acc,
                        );
                        acc.map(|r| {
                            r[..nr * LANES]
                                .iter()
                                .map(|x| x.to_bits())
                                .collect::<Vec<_>>()
                        })
                    };
                    assert_eq!(run(true), run(false), "{isa:?} case {case} nr {nr}");
                }
            }
        }
    }
}
