//! Integer dot products: plain-Rust references and the Cortex-M4's SIMD multiply-accumulate.
//!
//! Two kernels, each in two versions that agree bit for bit:
//! - `i8 x i8 -> i32` ([`dot_i8`], reference [`dot_i8_plain`]): SXTB16 splits four bytes into
//!   two halfword pairs, SMLAD multiplies and accumulates a pair per instruction;
//! - `i16 x i16 -> i32` ([`dot_i16`], reference [`dot_i16_plain`]): SMLAD straight on halfword
//!   pairs loaded four words at a time by LDM. This is the engine's kernel for `i16` weights
//!   times `u8` activations: widen the activation vector once per layer with [`widen_u8`] and
//!   reuse it for every output row.
//!
//! Integer semantics: products are exact in `i32` (`|i8 * i8| <= 2^14`, `|i16 * i16| <= 2^30`);
//! the accumulator is `i32` and **wraps** (two's complement, as SMLAD does; SMLAD's Q flag is
//! ignored). A caller that needs an exact sum bounds it: with `|w| <= 2^11` and `x <= 255`,
//! 2^31 / (2^11 * 255) = 4112 MACs cannot overflow. Both versions wrap identically, so the
//! results are bit-exact even past that bound.
//!
//! The vectors are the common prefix of the two slices (as `zip`): `n = min(a.len(), b.len())`.
//! The SMLAD versions exist on `target_arch = "arm", target_os = "none"` (the firmware's
//! thumbv7em target, Armv7E-M with the DSP extension); elsewhere [`dot_i8`] and [`dot_i16`]
//! are the plain versions, so this module builds and tests on the host.
//!
//! ```
//! use nvcim_firmware::kernel::{dot_i16, dot_i16_plain, widen_u8};
//! let w: [i16; 5] = [-300, 2, 7, 1000, -1];
//! let mut x = [0i16; 5];
//! widen_u8(&[255, 1, 0, 3, 200], &mut x);
//! assert_eq!(dot_i16(&w, &x), -300 * 255 + 2 + 3000 - 200);
//! assert_eq!(dot_i16(&w, &x), dot_i16_plain(&w, &x));
//! ```

/// `sum a[i] * b[i]` over the common prefix, plain Rust (the reference).
#[inline(never)]
pub fn dot_i8_plain(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).fold(0i32, |acc, (&x, &y)| {
        acc.wrapping_add(i32::from(x) * i32::from(y))
    })
}

/// `sum a[i] * b[i]` over the common prefix, plain Rust (the reference).
#[inline(never)]
pub fn dot_i16_plain(a: &[i16], b: &[i16]) -> i32 {
    a.iter().zip(b).fold(0i32, |acc, (&x, &y)| {
        acc.wrapping_add(i32::from(x) * i32::from(y))
    })
}

/// Widens `u8` activations into `i16` lanes for [`dot_i16`]: `dst[i] = src[i]` over the common
/// prefix.
pub fn widen_u8(src: &[u8], dst: &mut [i16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = i16::from(s);
    }
}

/// `sum a[i] * b[i]` over the common prefix; SMLAD on the Cortex-M4, [`dot_i8_plain`] elsewhere.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(all(target_arch = "arm", target_os = "none"))]
    {
        smlad::dot_i8(a, b)
    }
    #[cfg(not(all(target_arch = "arm", target_os = "none")))]
    {
        dot_i8_plain(a, b)
    }
}

/// `sum a[i] * b[i]` over the common prefix; SMLAD on the Cortex-M4, [`dot_i16_plain`] elsewhere.
///
/// Fastest when both slices start at the same offset modulo 4 bytes (then the main loop loads
/// with LDM); otherwise it falls back to single-word loads.
#[inline]
pub fn dot_i16(a: &[i16], b: &[i16]) -> i32 {
    #[cfg(all(target_arch = "arm", target_os = "none"))]
    {
        smlad::dot_i16(a, b)
    }
    #[cfg(not(all(target_arch = "arm", target_os = "none")))]
    {
        dot_i16_plain(a, b)
    }
}

/// The engine's tile-column kernel on this target: [`dot_i16`] (SMLAD on the M4), plugged into
/// [`nvcim_shared::exec::infer_with`]. The engine's weights are `i16` and its patch holds the
/// activations already widened to `i16`, so the halfword SMLAD applies with no repacking; its
/// wrapping `i32` accumulator is the engine's (see [`nvcim_shared::tile::DotKernel`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Smlad;

impl nvcim_shared::tile::DotKernel for Smlad {
    #[inline(always)]
    fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
        dot_i16(w, x)
    }

    #[inline(always)]
    fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
        dot_row(w, x, rows)
    }

    #[inline(always)]
    fn dot_rows2(w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
        dot_rows2(w, x, rows)
    }
}

/// [`dot_row`] of two weight rows against the same inputs, `[dot_row(w[0], x), dot_row(w[1],
/// x)]` bit for bit, under the same bound. On the M4 one pass loads each input word once for
/// both rows (5 LDM and 8 SMLAD per 16 MACs) when both rows have `x`'s length and its
/// alignment modulo 4 bytes, a scalar loop for rows shorter than 16 (a first layer's 3x3
/// window, where any set-up costs more than the MACs); otherwise, and elsewhere, two
/// [`dot_row`]s.
#[inline]
pub fn dot_rows2(w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
    #[cfg(all(target_arch = "arm", target_os = "none"))]
    {
        let _ = rows;
        smlad::dot_rows2(w[0], w[1], x)
    }
    #[cfg(not(all(target_arch = "arm", target_os = "none")))]
    {
        <nvcim_shared::tile::Plain as nvcim_shared::tile::DotKernel>::dot_rows2(w, x, rows)
    }
}

/// The exact `sum w_i x_i` of a whole weight row in `i64`, for inputs within the engine's
/// bound (`|w| <= 32767`, `-128 <= x <= 255`): any 256 consecutive products then sum below
/// `2^31` in magnitude. On the M4 one pass of SMLAD over chunks of up to 256 elements, each
/// chunk's `i32` added to the `i64` (no per-tile call); elsewhere the plain tiles of `rows`.
/// Outside the bound the result is unspecified (but never a panic).
#[inline]
pub fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
    #[cfg(all(target_arch = "arm", target_os = "none"))]
    {
        let _ = rows;
        smlad::dot_row(w, x)
    }
    #[cfg(not(all(target_arch = "arm", target_os = "none")))]
    {
        <nvcim_shared::tile::Plain as nvcim_shared::tile::DotKernel>::dot_row(w, x, rows)
    }
}

#[cfg(all(target_arch = "arm", target_os = "none"))]
mod smlad {
    use core::arch::asm;

    /// The few leftover MACs (fewer than 8) after the SIMD loop, inlined: a call to the plain
    /// kernel costs more than the MACs themselves on short vectors.
    #[inline(always)]
    fn tail<T: Copy + Into<i32>>(mut acc: i32, a: &[T], b: &[T]) -> i32 {
        for (&x, &y) in a.iter().zip(b) {
            acc = acc.wrapping_add(x.into() * y.into());
        }
        acc
    }

    /// 8 MACs per loop iteration: 4 LDR, 8 SXTB16, 4 SMLAD, SUBS, BNE (2.25 instructions/MAC).
    #[inline(never)]
    pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let blocks = n / 8;
        let mut acc = 0i32;
        if blocks > 0 {
            // SAFETY: the loop reads exactly `8 * blocks <= n` bytes from the start of each
            // slice, with single-word LDRs, which Armv7-M permits at any alignment
            // (CCR.UNALIGN_TRP is clear at reset and the firmware never sets it). It writes only
            // the named registers and the flags, and touches no stack.
            unsafe {
                asm!(
                    "2:",
                    "ldr {x}, [{pa}], #4",
                    "ldr {y}, [{pb}], #4",
                    "sxtb16 {s}, {x}",
                    "sxtb16 {t}, {y}",
                    "smlad {acc}, {s}, {t}, {acc}",
                    "sxtb16 {s}, {x}, ror #8",
                    "sxtb16 {t}, {y}, ror #8",
                    "smlad {acc}, {s}, {t}, {acc}",
                    "ldr {x}, [{pa}], #4",
                    "ldr {y}, [{pb}], #4",
                    "sxtb16 {s}, {x}",
                    "sxtb16 {t}, {y}",
                    "smlad {acc}, {s}, {t}, {acc}",
                    "sxtb16 {s}, {x}, ror #8",
                    "sxtb16 {t}, {y}, ror #8",
                    "smlad {acc}, {s}, {t}, {acc}",
                    "subs {n}, {n}, #1",
                    "bne 2b",
                    pa = inout(reg) a.as_ptr() => _,
                    pb = inout(reg) b.as_ptr() => _,
                    n = inout(reg) blocks => _,
                    acc = inout(reg) acc,
                    x = out(reg) _,
                    y = out(reg) _,
                    s = out(reg) _,
                    t = out(reg) _,
                    options(pure, readonly, nostack),
                );
            }
        }
        let done = blocks * 8;
        tail(acc, &a[done..n], &b[done..n])
    }

    /// [`super::dot_row`]: chunks of 32 blocks of 8 (256 MACs, the bound's run length) through
    /// the aligned LDM + SMLAD loop, each chunk's `i32` sign-extended into the `i64`; rows
    /// whose two vectors cannot both be word-aligned go through [`dot_i16`] in 256-chunks.
    #[inline(never)]
    pub fn dot_row(w: &[i16], x: &[i16]) -> i64 {
        let n = w.len().min(x.len());
        let (pa, pb) = (w.as_ptr() as usize, x.as_ptr() as usize);
        if pa % 4 != pb % 4 {
            return w[..n]
                .chunks(256)
                .zip(x[..n].chunks(256))
                .map(|(a, b)| i64::from(dot_i16(a, b)))
                .sum();
        }
        let skip = usize::from(pa % 4 == 2 && n > 0);
        let mut acc = i64::from(tail(0, &w[..skip], &x[..skip]));
        let (a, b) = (&w[skip..n], &x[skip..n]);
        let blocks = a.len() / 8;
        let (mut pa, mut pb) = (a.as_ptr(), b.as_ptr());
        let mut left = blocks;
        while left > 0 {
            let chunk = left.min(32);
            left -= chunk;
            let mut part = 0i32;
            // SAFETY: both pointers are word-aligned (same offset mod 4, one element peeled),
            // as LDM requires; this chunk reads `16 * chunk` bytes, and the chunks together
            // read `16 * blocks <= 2 * a.len()` bytes from each slice. r6, r7 (reserved by
            // LLVM) are not used. Writes only the named registers and the flags; no stack.
            unsafe {
                asm!(
                    "2:",
                    "ldm r0!, {{r4, r5, r8, r9}}",
                    "ldm r1!, {{r10, r11, r12, lr}}",
                    "smlad r3, r4, r10, r3",
                    "smlad r3, r5, r11, r3",
                    "smlad r3, r8, r12, r3",
                    "smlad r3, r9, lr, r3",
                    "subs r2, r2, #1",
                    "bne 2b",
                    inout("r0") pa,
                    inout("r1") pb,
                    inout("r2") chunk => _,
                    inout("r3") part,
                    out("r4") _,
                    out("r5") _,
                    out("r8") _,
                    out("r9") _,
                    out("r10") _,
                    out("r11") _,
                    out("r12") _,
                    out("lr") _,
                    options(readonly, nostack),
                );
            }
            acc += i64::from(part);
        }
        let done = blocks * 8;
        acc + i64::from(tail(0, &a[done..], &b[done..]))
    }

    /// [`super::dot_rows2`]: the LDM + SMLAD loop of [`dot_row`] over two rows at once, in
    /// chunks of 32 blocks of 8 (256 MACs per row, the bound's run length).
    #[inline(never)]
    pub fn dot_rows2(w0: &[i16], w1: &[i16], x: &[i16]) -> [i64; 2] {
        let n = x.len();
        let px = x.as_ptr() as usize;
        let aligned = |w: &[i16]| w.as_ptr() as usize % 4 == px % 4;
        if n < 16 {
            // Short rows (a first layer's 3x3 window): the inline scalar loop beats any set-up.
            return [i64::from(tail(0, w0, x)), i64::from(tail(0, w1, x))];
        }
        if w0.len() != n || w1.len() != n || !aligned(w0) || !aligned(w1) {
            return [dot_row(w0, x), dot_row(w1, x)];
        }
        let skip = usize::from(px % 4 == 2 && n > 0);
        let mut acc0 = i64::from(tail(0, &w0[..skip], &x[..skip]));
        let mut acc1 = i64::from(tail(0, &w1[..skip], &x[..skip]));
        let (a0, a1, b) = (&w0[skip..], &w1[skip..], &x[skip..]);
        let blocks = b.len() / 8;
        let (mut p0, mut p1, mut pb) = (a0.as_ptr(), a1.as_ptr(), b.as_ptr());
        let mut left = blocks;
        while left > 0 {
            let chunk = left.min(32);
            left -= chunk;
            let (mut s0, mut s1) = (0i32, 0i32);
            // SAFETY: the three pointers are word-aligned (same offset mod 4 as `x`, one
            // element peeled), as LDM requires; this chunk reads `16 * chunk` bytes from each,
            // and the chunks together `16 * blocks <= 2 * b.len()` bytes, within each slice (all
            // three have `b.len()` elements). r6, r7 (reserved by LLVM) are not used. Writes
            // only the named registers and the flags; no stack.
            unsafe {
                asm!(
                    "2:",
                    "ldm r0!, {{r4, r5, r8, r9}}",
                    "ldm r1!, {{r10, r11}}",
                    "smlad r12, r10, r4, r12",
                    "smlad r12, r11, r5, r12",
                    "ldm r1!, {{r10, r11}}",
                    "smlad r12, r10, r8, r12",
                    "smlad r12, r11, r9, r12",
                    "ldm r2!, {{r10, r11}}",
                    "smlad lr, r10, r4, lr",
                    "smlad lr, r11, r5, lr",
                    "ldm r2!, {{r10, r11}}",
                    "smlad lr, r10, r8, lr",
                    "smlad lr, r11, r9, lr",
                    "subs r3, r3, #1",
                    "bne 2b",
                    inout("r0") pb,
                    inout("r1") p0,
                    inout("r2") p1,
                    inout("r3") chunk => _,
                    inout("r12") s0,
                    inout("lr") s1,
                    out("r4") _,
                    out("r5") _,
                    out("r8") _,
                    out("r9") _,
                    out("r10") _,
                    out("r11") _,
                    options(readonly, nostack),
                );
            }
            acc0 += i64::from(s0);
            acc1 += i64::from(s1);
        }
        let done = blocks * 8;
        [
            acc0 + i64::from(tail(0, &a0[done..], &b[done..])),
            acc1 + i64::from(tail(0, &a1[done..], &b[done..])),
        ]
    }

    /// 8 MACs per loop iteration when aligned: 2 LDM of four words, 4 SMLAD, SUBS, BNE
    /// (1.0 instruction/MAC); otherwise 8 LDR, 4 SMLAD, SUBS, BNE (1.75).
    #[inline(never)]
    pub fn dot_i16(a: &[i16], b: &[i16]) -> i32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        // Peel one element when both start at 2 mod 4, so that both become word-aligned.
        let skip = usize::from(pa % 4 == 2 && pb % 4 == 2 && n > 0);
        let mut acc = tail(0, &a[..skip], &b[..skip]);
        let (a, b) = (&a[skip..n], &b[skip..n]);
        let blocks = a.len() / 8;
        if blocks > 0 {
            if (a.as_ptr() as usize).is_multiple_of(4) && (b.as_ptr() as usize).is_multiple_of(4) {
                // SAFETY: both pointers are word-aligned (checked above), as LDM requires; the
                // loop reads exactly `16 * blocks <= 2 * len` bytes from each slice. Registers
                // are named because LDM's list must ascend; r6, r7 (reserved by LLVM) are not
                // among them. Writes only those registers and the flags; no stack.
                unsafe {
                    asm!(
                        "2:",
                        "ldm r0!, {{r4, r5, r8, r9}}",
                        "ldm r1!, {{r10, r11, r12, lr}}",
                        "smlad r3, r4, r10, r3",
                        "smlad r3, r5, r11, r3",
                        "smlad r3, r8, r12, r3",
                        "smlad r3, r9, lr, r3",
                        "subs r2, r2, #1",
                        "bne 2b",
                        inout("r0") a.as_ptr() => _,
                        inout("r1") b.as_ptr() => _,
                        inout("r2") blocks => _,
                        inout("r3") acc,
                        out("r4") _,
                        out("r5") _,
                        out("r8") _,
                        out("r9") _,
                        out("r10") _,
                        out("r11") _,
                        out("r12") _,
                        out("lr") _,
                        options(pure, readonly, nostack),
                    );
                }
            } else {
                // SAFETY: the loop reads exactly `16 * blocks <= 2 * len` bytes from each
                // slice with single-word LDRs, which Armv7-M permits at any alignment
                // (CCR.UNALIGN_TRP stays clear). Writes only the named registers and the flags.
                unsafe {
                    asm!(
                        "2:",
                        "ldr {x}, [{pa}], #4",
                        "ldr {y}, [{pb}], #4",
                        "smlad {acc}, {x}, {y}, {acc}",
                        "ldr {x}, [{pa}], #4",
                        "ldr {y}, [{pb}], #4",
                        "smlad {acc}, {x}, {y}, {acc}",
                        "ldr {x}, [{pa}], #4",
                        "ldr {y}, [{pb}], #4",
                        "smlad {acc}, {x}, {y}, {acc}",
                        "ldr {x}, [{pa}], #4",
                        "ldr {y}, [{pb}], #4",
                        "smlad {acc}, {x}, {y}, {acc}",
                        "subs {n}, {n}, #1",
                        "bne 2b",
                        pa = inout(reg) a.as_ptr() => _,
                        pb = inout(reg) b.as_ptr() => _,
                        n = inout(reg) blocks => _,
                        acc = inout(reg) acc,
                        x = out(reg) _,
                        y = out(reg) _,
                        options(pure, readonly, nostack),
                    );
                }
            }
        }
        let done = blocks * 8;
        tail(acc, &a[done..], &b[done..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_on_known_values() {
        assert_eq!(dot_i8_plain(&[], &[]), 0);
        assert_eq!(
            dot_i8_plain(&[-128, 127, 3], &[-128, 127, -2, 99]),
            16_384 + 16_129 - 6
        );
        assert_eq!(
            dot_i16_plain(&[i16::MIN, i16::MIN], &[i16::MIN, i16::MIN]),
            i32::MIN
        );
        assert_eq!(
            dot_i16_plain(&[i16::MIN; 3], &[i16::MIN; 3]),
            i32::MIN + (1 << 30)
        );
    }

    #[test]
    fn widen() {
        let mut d = [7i16; 4];
        widen_u8(&[0, 255, 128], &mut d);
        assert_eq!(d, [0, 255, 128, 7]);
    }
}
