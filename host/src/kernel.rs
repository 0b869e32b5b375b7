//! The host's tile-column kernel for the integer engine: AVX-512 VNNI or AVX2 when the CPU has
//! it, `shared`'s portable [`Plain`] otherwise.
//!
//! The workspace is built for generic x86-64, where [`Plain`]'s reduction vectorizes to SSE2
//! `pmaddwd` (8 products per instruction). [`HostKernel`] detects the CPU's features at run
//! time and uses, in order of preference:
//! - AVX-512 VNNI `_mm512_dpwssd_epi32` (32 products accumulated per instruction; the last
//!   partial vector of a tile through a masked load), with [`DotKernel::dot_rows2`] loading
//!   each input vector once for both rows;
//! - AVX2 `_mm256_madd_epi16` (16 products per instruction, two accumulators).
//!
//! All compute each tile in `i32` modulo `2^32` — `vpmaddwd` and `vpdpwssd` are exact modulo
//! `2^32`, their one overflowing case (`-32768 * -32768` twice) gives `2^31` wrapped, like
//! `Plain`'s wrapping adds — so [`DotKernel::dot_i16`] returns `Plain`'s bits for every input,
//! and `dot_row` / `dot_rows2` sum the same tiles in `i64` in the same order. The integer
//! engine's results therefore do not depend on the CPU (the tests compare every path that the
//! machine running them has with `Plain`).
//!
//! ```
//! use nvcim::kernel::HostKernel;
//! use nvcim_shared::tile::{DotKernel, Plain};
//! let (w, x): (Vec<i16>, Vec<i16>) = ((0..300).map(|i| i * 7 - 900).collect(), (0..300).map(|i| i % 256).collect());
//! assert_eq!(HostKernel::dot_row(&w, &x, 128), Plain::dot_row(&w, &x, 128));
//! ```

use nvcim_shared::tile::{DotKernel, MAX_TILE_ROWS, Plain};

/// AVX-512 VNNI or AVX2 when detected at run time, else [`Plain`]; bit-identical to [`Plain`]
/// (module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostKernel;

/// The path [`HostKernel`] takes on this CPU.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Vnni,
    Avx2,
    Portable,
}

/// The detection, once: one load per dot product instead of three feature tests.
fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        if has_avx512_vnni() {
            Simd::Vnni
        } else if has_avx2() {
            Simd::Avx2
        } else {
            Simd::Portable
        }
    })
}

/// Whether this CPU runs the AVX2 path (the detection result is cached by std).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512 F, BW, DQ and VL, the subset the layer-wise engines'
/// AVX-512 functions are compiled for (cached by std).
pub fn has_avx512_core() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has FMA (cached by std).
pub fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the AVX-512 VNNI path (AVX-512 F, BW and VNNI; cached by std).
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl DotKernel for HostKernel {
    #[inline]
    fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
        match simd() {
            // SAFETY: `simd` returns `Vnni` only when AVX-512 F, BW and VNNI were detected.
            #[cfg(target_arch = "x86_64")]
            Simd::Vnni => unsafe { vnni::dot_i16(w, x) },
            // SAFETY: `simd` returns `Avx2` only when AVX2 was detected.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2::dot_i16(w, x) },
            _ => Plain::dot_i16(w, x),
        }
    }

    #[inline]
    fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
        match simd() {
            // SAFETY: as in `dot_i16`.
            #[cfg(target_arch = "x86_64")]
            Simd::Vnni => unsafe { vnni::dot_row(w, x, rows) },
            // SAFETY: as in `dot_i16`.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2::dot_row(w, x, rows) },
            _ => Plain::dot_row(w, x, rows),
        }
    }

    #[inline]
    fn dot_rows2(w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
        match simd() {
            // SAFETY: as in `dot_i16`.
            #[cfg(target_arch = "x86_64")]
            Simd::Vnni => unsafe { vnni::dot_rows2(w, x, rows) },
            _ => [Self::dot_row(w[0], x, rows), Self::dot_row(w[1], x, rows)],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvcim_shared::rng::Xoshiro128PlusPlus;
    use rand_core::{RngCore, SeedableRng};

    fn uniform(rng: &mut Xoshiro128PlusPlus, lo: i32, hi: i32) -> i16 {
        let span = (hi - lo + 1) as u32;
        (lo + (rng.next_u32() % span) as i32) as i16
    }

    #[test]
    fn equals_plain_at_the_engines_bounds() {
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(5);
        for case in 0..2000 {
            // Lengths around the vector widths (not multiples of 16) and up to FC fan-ins.
            let len = match case % 4 {
                0 => (rng.next_u32() % 40) as usize,
                1 => 16 * (1 + (rng.next_u32() % 8) as usize) + 1 + (rng.next_u32() % 15) as usize,
                _ => (rng.next_u32() % 2400) as usize,
            };
            let rows = 1 + (rng.next_u32() % MAX_TILE_ROWS as u32) as usize;
            // Half the cases at the extremes of the bound, half uniform within it.
            let extreme = case % 2 == 0;
            let w: Vec<i16> = (0..len)
                .map(|_| {
                    if extreme {
                        [32767, -32767][(rng.next_u32() & 1) as usize]
                    } else {
                        uniform(&mut rng, -32767, 32767)
                    }
                })
                .collect();
            let x: Vec<i16> = (0..len)
                .map(|_| {
                    if extreme {
                        [255, -128][(rng.next_u32() & 1) as usize]
                    } else {
                        uniform(&mut rng, -128, 255)
                    }
                })
                .collect();
            assert_eq!(
                HostKernel::dot_row(&w, &x, rows),
                Plain::dot_row(&w, &x, rows),
                "case {case}: len {len} rows {rows}"
            );
            // A second row: the pair kernel, and every path this CPU has.
            let w1: Vec<i16> = w.iter().rev().map(|&v| v.wrapping_mul(3) / 2).collect();
            let plain2 = Plain::dot_rows2([&w, &w1], &x, rows);
            assert_eq!(
                HostKernel::dot_rows2([&w, &w1], &x, rows),
                plain2,
                "case {case}: pair, len {len} rows {rows}"
            );
            each_path(|name, k| {
                assert_eq!(
                    k.row(&w, &x, rows),
                    plain2[0],
                    "{name} case {case}: len {len} rows {rows}"
                );
                assert_eq!(
                    k.rows2([&w, &w1], &x, rows),
                    plain2,
                    "{name} case {case}: pair, len {len} rows {rows}"
                );
            });
            let k = len.min(rows);
            assert_eq!(
                HostKernel::dot_i16(&w[..k], &x[..k]),
                Plain::dot_i16(&w[..k], &x[..k]),
                "case {case}: dot_i16 len {k}"
            );
            each_path(|name, p| {
                assert_eq!(
                    p.i16(&w[..k], &x[..k]),
                    Plain::dot_i16(&w[..k], &x[..k]),
                    "{name} case {case}: dot_i16 len {k}"
                );
            });
        }
    }

    /// The SIMD paths this CPU has, called directly (the dispatch picks only the best one).
    struct Path(&'static str);

    impl Path {
        fn i16(&self, w: &[i16], x: &[i16]) -> i32 {
            // SAFETY: `each_path` hands out only the paths whose features were detected.
            unsafe {
                match self.0 {
                    "vnni" => vnni::dot_i16(w, x),
                    _ => avx2::dot_i16(w, x),
                }
            }
        }

        fn row(&self, w: &[i16], x: &[i16], rows: usize) -> i64 {
            // SAFETY: as in `i16`.
            unsafe {
                match self.0 {
                    "vnni" => vnni::dot_row(w, x, rows),
                    _ => avx2::dot_row(w, x, rows),
                }
            }
        }

        fn rows2(&self, w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
            // SAFETY: as in `i16`.
            unsafe {
                match self.0 {
                    "vnni" => vnni::dot_rows2(w, x, rows),
                    _ => [avx2::dot_row(w[0], x, rows), avx2::dot_row(w[1], x, rows)],
                }
            }
        }
    }

    fn each_path(mut f: impl FnMut(&str, &Path)) {
        if has_avx512_vnni() {
            f("vnni", &Path("vnni"));
        }
        if has_avx2() {
            f("avx2", &Path("avx2"));
        }
    }

    #[test]
    fn wraps_like_plain_outside_the_bound() {
        // Every i16, including -32768 * -32768 (vpmaddwd's one overflowing pair), and unequal
        // lengths (the shorter one counts).
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(9);
        for len in [1, 15, 16, 17, 31, 32, 33, 100, 1000, 4099] {
            let w: Vec<i16> = (0..len).map(|_| rng.next_u32() as i16).collect();
            let x: Vec<i16> = (0..len + 3).map(|_| rng.next_u32() as i16).collect();
            assert_eq!(HostKernel::dot_i16(&w, &x), Plain::dot_i16(&w, &x));
            let min = vec![i16::MIN; len];
            assert_eq!(HostKernel::dot_i16(&min, &min), Plain::dot_i16(&min, &min));
            assert_eq!(HostKernel::dot_row(&w, &x, 64), Plain::dot_row(&w, &x, 64));
            let pair = Plain::dot_rows2([&w, &min], &x, 200);
            assert_eq!(HostKernel::dot_rows2([&w, &min], &x, 200), pair);
            each_path(|name, k| {
                assert_eq!(k.i16(&w, &x), Plain::dot_i16(&w, &x), "{name} len {len}");
                assert_eq!(k.i16(&min, &min), Plain::dot_i16(&min, &min), "{name}");
                assert_eq!(k.rows2([&w, &min], &x, 200), pair, "{name} len {len}");
            });
        }
    }
}
