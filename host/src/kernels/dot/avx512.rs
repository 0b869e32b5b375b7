//! AVX-512 VNNI tile-column dot products (`vpdpwssd`, 32 products per instruction).

use std::arch::x86_64::{
    __m512i, _mm512_dpwssd_epi32, _mm512_maskz_loadu_epi16, _mm512_reduce_add_epi32,
    _mm512_setzero_si512,
};

use super::MAX_TILE_ROWS;

/// `s[..min(n, 32)]` in the low `i16` lanes, zeros above; never reads past that prefix.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn load(s: &[i16], n: usize) -> __m512i {
    let n = n.min(32).min(s.len());
    let mask = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
    // SAFETY: the masked load touches only the `n` lanes its mask selects, all inside `s`
    // (masked-off lanes are neither read nor able to fault); no alignment requirement.
    unsafe { _mm512_maskz_loadu_epi16(mask, s.as_ptr()) }
}

/// One tile of one row: `sum w[i] x[i]` over the shorter length, modulo `2^32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
    let n = w.len().min(x.len());
    let mut acc = _mm512_setzero_si512();
    let mut i = 0;
    while i < n {
        acc = _mm512_dpwssd_epi32(acc, load(&w[i..], n - i), load(&x[i..], n - i));
        i += 32;
    }
    _mm512_reduce_add_epi32(acc)
}

/// One tile of two rows of equal length against the same inputs, each modulo `2^32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dot2(w0: &[i16], w1: &[i16], x: &[i16]) -> [i32; 2] {
    let n = x.len().min(w0.len()).min(w1.len());
    let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut i = 0;
    while i < n {
        let xv = load(&x[i..], n - i);
        a0 = _mm512_dpwssd_epi32(a0, load(&w0[i..], n - i), xv);
        a1 = _mm512_dpwssd_epi32(a1, load(&w1[i..], n - i), xv);
        i += 32;
    }
    [_mm512_reduce_add_epi32(a0), _mm512_reduce_add_epi32(a1)]
}

/// [`super::Plain`]'s `dot_row`: per tile of `rows` inputs, [`dot_i16`], added in `i64`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
    let rows = rows.clamp(1, MAX_TILE_ROWS);
    let mut acc = 0i64;
    for (wc, xc) in w.chunks(rows).zip(x.chunks(rows)) {
        acc += i64::from(dot_i16(wc, xc));
    }
    acc
}

/// `[dot_row(w[0], x, rows), dot_row(w[1], x, rows)]`, each input vector loaded once.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) fn dot_rows2(w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
    let rows = rows.clamp(1, MAX_TILE_ROWS);
    if w[0].len() != w[1].len() {
        return [dot_row(w[0], x, rows), dot_row(w[1], x, rows)];
    }
    let mut acc = [0i64; 2];
    for ((w0, w1), xc) in w[0].chunks(rows).zip(w[1].chunks(rows)).zip(x.chunks(rows)) {
        let [s0, s1] = dot2(w0, w1, xc);
        acc[0] += i64::from(s0);
        acc[1] += i64::from(s1);
    }
    acc
}
