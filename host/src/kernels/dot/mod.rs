//! The host's tile-column kernel for the integer engine: AVX-512 VNNI or AVX2 when the CPU has
//! it, `shared`'s portable [`Plain`] otherwise.
//!
//! The workspace is built for generic x86-64, where [`Plain`]'s reduction vectorizes to SSE2
//! `pmaddwd` (8 products per instruction). [`HostKernel`] detects the CPU's features at run
//! time ([`Isa::detect`]) and uses, in order of preference:
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
//! use nvcim::kernels::dot::HostKernel;
//! use nvcim_shared::tile::{DotKernel, Plain};
//! let (w, x): (Vec<i16>, Vec<i16>) = ((0..300).map(|i| i * 7 - 900).collect(), (0..300).map(|i| i % 256).collect());
//! assert_eq!(HostKernel::dot_row(&w, &x, 128), Plain::dot_row(&w, &x, 128));
//! ```

use nvcim_shared::tile::{DotKernel, MAX_TILE_ROWS, Plain};

use super::Isa;

/// AVX-512 VNNI or AVX2 as the CPU's [`Isa`] has them, else [`Plain`]; bit-identical to
/// [`Plain`] (module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostKernel;

impl DotKernel for HostKernel {
    #[inline]
    fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
        match Isa::detect() {
            // SAFETY: `Isa::Avx512Vnni` is detected only when AVX-512 F, BW and VNNI were.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { avx512::dot_i16(w, x) },
            // SAFETY: `Isa::Avx512` and `Isa::Avx2` are detected only when AVX2 was.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx2 => unsafe { avx2::dot_i16(w, x) },
            _ => Plain::dot_i16(w, x),
        }
    }

    #[inline]
    fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
        match Isa::detect() {
            // SAFETY: as in `dot_i16`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { avx512::dot_row(w, x, rows) },
            // SAFETY: as in `dot_i16`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx2 => unsafe { avx2::dot_row(w, x, rows) },
            _ => Plain::dot_row(w, x, rows),
        }
    }

    #[inline]
    fn dot_rows2(w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
        match Isa::detect() {
            // SAFETY: as in `dot_i16`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { avx512::dot_rows2(w, x, rows) },
            _ => [Self::dot_row(w[0], x, rows), Self::dot_row(w[1], x, rows)],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod portable;

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
                    "vnni" => avx512::dot_i16(w, x),
                    _ => avx2::dot_i16(w, x),
                }
            }
        }

        fn row(&self, w: &[i16], x: &[i16], rows: usize) -> i64 {
            // SAFETY: as in `i16`.
            unsafe {
                match self.0 {
                    "vnni" => avx512::dot_row(w, x, rows),
                    _ => avx2::dot_row(w, x, rows),
                }
            }
        }

        fn rows2(&self, w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
            // SAFETY: as in `i16`.
            unsafe {
                match self.0 {
                    "vnni" => avx512::dot_rows2(w, x, rows),
                    _ => [avx2::dot_row(w[0], x, rows), avx2::dot_row(w[1], x, rows)],
                }
            }
        }
    }

    fn each_path(mut f: impl FnMut(&str, &Path)) {
        if Isa::detect().has_vnni() {
            f("vnni", &Path("vnni"));
        }
        if Isa::detect().has_avx2() {
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
