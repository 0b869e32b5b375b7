//! AVX2 tile-column dot products (`vpmaddwd`, 16 products per instruction).

use std::arch::x86_64::{
    __m256i, _mm256_add_epi32, _mm256_loadu_si256, _mm256_madd_epi16, _mm256_setzero_si256,
    _mm256_storeu_si256,
};

use super::MAX_TILE_ROWS;

/// 16 `i16` lanes from `s[..16]`.
#[inline]
#[target_feature(enable = "avx2")]
fn load(s: &[i16]) -> __m256i {
    assert!(s.len() >= 16, "a 256-bit load reads 16 values");
    // SAFETY: `s` holds at least 16 `i16` (32 bytes, asserted); `loadu` has no alignment
    // requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// The wrapping sum of the 8 `i32` lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes_sum(v: __m256i) -> i32 {
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` is 32 writable bytes; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v) };
    lanes.iter().fold(0i32, |s, &l| s.wrapping_add(l))
}

/// [`super::Plain`]'s `dot_i16`: `sum w[i] x[i]` over the shorter length, modulo `2^32`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(load(&w[i..]), load(&x[i..])));
        a1 = _mm256_add_epi32(
            a1,
            _mm256_madd_epi16(load(&w[i + 16..]), load(&x[i + 16..])),
        );
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(load(&w[i..]), load(&x[i..])));
        i += 16;
    }
    let mut s = lanes_sum(_mm256_add_epi32(a0, a1));
    for (&a, &b) in w[i..].iter().zip(&x[i..]) {
        s = s.wrapping_add(i32::from(a) * i32::from(b));
    }
    s
}

/// [`super::Plain`]'s `dot_row`: per tile of `rows` inputs, [`dot_i16`], added in `i64`.
#[target_feature(enable = "avx2")]
pub(super) fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
    let rows = rows.clamp(1, MAX_TILE_ROWS);
    let mut acc = 0i64;
    for (wc, xc) in w.chunks(rows).zip(x.chunks(rows)) {
        acc += i64::from(dot_i16(wc, xc));
    }
    acc
}
