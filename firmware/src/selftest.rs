//! The kernel self-test: every DSP kernel against its plain reference, bit for bit, on seeded
//! random vectors of awkward lengths and at every start offset modulo 4 bytes; and the
//! tile-programming loop ([`crate::program`]) against [`nvcim_shared::tile::program_layer`].
//!
//! Portable: on the host it compares the reference with itself (the plumbing is still
//! tested); on the Cortex-M4 it compares SMLAD and the assembly with plain Rust.

use core::fmt;

use nvcim_shared::quant::QuantConfig;
use nvcim_shared::rng::Xoshiro128PlusPlus;
use nvcim_shared::tile::{DotKernel, Path, Plain, Programmer};
use nvcim_shared::variation::{Faults, Profile, SigmaUnit, VariationConfig};

use crate::kernel::Smlad;

use crate::kernel::{dot_i8, dot_i8_plain, dot_i16, dot_i16_plain, dot_row, dot_rows2};

/// Lengths tested: empty, tiny, around every unroll boundary, odd, and large.
pub const LENGTHS: [usize; 22] = [
    0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 255, 257, 1023, 4099,
];

/// Longest tested vector.
pub const MAX_LEN: usize = 4099;

/// The first disagreement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Kernel name.
    pub kernel: &'static str,
    /// Vector length.
    pub len: usize,
    /// Start offsets of the two vectors, in elements.
    pub offsets: (usize, usize),
    /// Random case index.
    pub case: u32,
    /// The DSP kernel's result.
    pub fast: i32,
    /// The reference result.
    pub plain: i32,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mismatch: len {} offsets {:?} case {}: dsp {} plain {}",
            self.kernel, self.len, self.offsets, self.case, self.fast, self.plain
        )
    }
}

/// How many comparisons ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Comparisons of the `i8` kernel.
    pub dot_i8: u32,
    /// Comparisons of the `i16` kernel.
    pub dot_i16: u32,
    /// Comparisons of the whole-row kernel (engine-range vectors only).
    pub dot_row: u32,
    /// Comparisons of the two-row kernel (engine-range vectors only), each of both rows.
    pub dot_rows2: u32,
}

/// Compares both kernels with their references on `cases` random vectors per length and
/// offset pair. Half the cases use full-range values (so the `i16` accumulator wraps), half
/// use the engine's range (`|w| < 2^11` or `|w| <= 32767`, activations 0..=255), where the
/// whole-row kernel [`dot_row`] is also compared with the plain tiles.
pub fn check_kernels(seed: u64, cases: u32) -> Result<Checked, Mismatch> {
    const PAD: usize = 4;
    let mut rng = Xoshiro128PlusPlus::from_u64(seed);
    let mut a8 = [0i8; MAX_LEN + PAD];
    let mut b8 = [0i8; MAX_LEN + PAD];
    let mut a16 = [0i16; MAX_LEN + PAD];
    let mut b16 = [0i16; MAX_LEN + PAD];
    let mut checked = Checked {
        dot_i8: 0,
        dot_i16: 0,
        dot_row: 0,
        dot_rows2: 0,
    };
    for case in 0..cases {
        let full_range = case % 2 == 0;
        for i in 0..MAX_LEN + PAD {
            let (r, s) = (rng.next(), rng.next());
            a8[i] = r as i8;
            b8[i] = s as i8;
            if full_range {
                a16[i] = (r >> 16) as i16;
                b16[i] = (s >> 16) as i16;
            } else {
                // Every other engine-range case uses the engine's full weight range.
                a16[i] = if case % 4 == 1 {
                    ((r >> 16) as i16).max(-32767)
                } else {
                    ((r >> 16) as i16) >> 4
                };
                b16[i] = (s >> 24) as i16;
            }
        }
        for &len in &LENGTHS {
            // Large vectors at two offset pairs, short ones at all sixteen.
            let offsets: &[(usize, usize)] = if len > 300 {
                &[(0, 0), (1, 3)]
            } else {
                &[
                    (0, 0),
                    (0, 1),
                    (0, 2),
                    (0, 3),
                    (1, 0),
                    (1, 1),
                    (1, 2),
                    (1, 3),
                    (2, 0),
                    (2, 1),
                    (2, 2),
                    (2, 3),
                    (3, 0),
                    (3, 1),
                    (3, 2),
                    (3, 3),
                ]
            };
            for &(oa, ob) in offsets {
                let (x, y) = (&a8[oa..oa + len], &b8[ob..ob + len]);
                let (fast, plain) = (dot_i8(x, y), dot_i8_plain(x, y));
                if fast != plain {
                    return Err(Mismatch {
                        kernel: "dot_i8",
                        len,
                        offsets: (oa, ob),
                        case,
                        fast,
                        plain,
                    });
                }
                checked.dot_i8 += 1;
                let (x, y) = (&a16[oa..oa + len], &b16[ob..ob + len]);
                let (fast, plain) = (dot_i16(x, y), dot_i16_plain(x, y));
                if fast != plain {
                    return Err(Mismatch {
                        kernel: "dot_i16",
                        len,
                        offsets: (oa, ob),
                        case,
                        fast,
                        plain,
                    });
                }
                checked.dot_i16 += 1;
                if !full_range {
                    // The whole-row kernel within the engine's bound, against the plain tiles.
                    for rows in [7usize, 128, 256] {
                        let fast = dot_row(x, y, rows);
                        let plain = <Plain as DotKernel>::dot_row(x, y, rows);
                        if fast != plain {
                            return Err(Mismatch {
                                kernel: "dot_row",
                                len,
                                offsets: (oa, ob),
                                case,
                                fast: fast as i32,
                                plain: plain as i32,
                            });
                        }
                        checked.dot_row += 1;
                        // A second row at the first's alignment (one pass) and at another
                        // (the fallback), different data.
                        for second in [oa + 2, oa + 1] {
                            let w1 = &a16[second..second + len];
                            let fast = dot_rows2([x, w1], y, rows);
                            let plain = [
                                <Plain as DotKernel>::dot_row(x, y, rows),
                                <Plain as DotKernel>::dot_row(w1, y, rows),
                            ];
                            if let Some(r) = (0..2).find(|&r| fast[r] != plain[r]) {
                                return Err(Mismatch {
                                    kernel: "dot_rows2",
                                    len,
                                    offsets: (if r == 0 { oa } else { second }, ob),
                                    case,
                                    fast: fast[r] as i32,
                                    plain: plain[r] as i32,
                                });
                            }
                            checked.dot_rows2 += 1;
                        }
                    }
                }
            }
            // Unequal lengths: the common prefix.
            let (fast, plain) = (
                dot_i16(&a16[..len + 1], &b16[..len]),
                dot_i16_plain(&a16[..len], &b16[..len]),
            );
            if fast != plain {
                return Err(Mismatch {
                    kernel: "dot_i16",
                    len,
                    offsets: (0, 0),
                    case,
                    fast,
                    plain,
                });
            }
        }
    }
    Ok(checked)
}

/// Weight counts of the programming check: empty, one, a partial pass, larger layers.
pub const PROGRAM_LENGTHS: [usize; 5] = [0, 1, 5, 64, 257];

/// Sigmas (`range`) of the programming check: none, typical, and large enough that the
/// clamp fires often (a weight with such a device restarts in Rust).
pub const PROGRAM_SIGMAS: [f32; 6] = [0.0, 0.1, 0.4, 1.0, 3.0, 20.0];

/// Compares [`Smlad`]'s tile programmer with the reference ([`Plain`]'s, i.e.
/// `program_layer`) on `cases` seeded random layers per length, sigma and profile (uniform and
/// `fefet6`, whose band gives two stds), records at an even and an odd byte address; one
/// record in eight has a random 15-bit magnitude (outside M = 8). Compares every state word,
/// the generator's state after the layer and the result. Returns the number of layers.
pub fn check_programming(seed: u64, cases: u32) -> Result<u32, Mismatch> {
    const MAX: usize = 257;
    let mut rng = Xoshiro128PlusPlus::from_u64(seed ^ 0x5eed_7111);
    let mut bytes = [0u8; 2 * MAX + 1];
    let mut fast = [0i16; MAX];
    let mut plain = [0i16; MAX];
    let mut checked = 0;
    let mismatch = |len, offsets, case, f: i32, p: i32| Mismatch {
        kernel: "program",
        len,
        offsets,
        case,
        fast: f,
        plain: p,
    };
    for case in 0..cases {
        for b in bytes.chunks_exact_mut(2) {
            let r = rng.next();
            let magnitude = if r.is_multiple_of(8) {
                (r >> 8) & 0x7fff
            } else {
                (r >> 8) & 0xff
            };
            let v = (magnitude | (r & 0x8000_0000) >> 16) as u16;
            b.copy_from_slice(&v.to_le_bytes());
        }
        for &len in &PROGRAM_LENGTHS {
            for &sigma in &PROGRAM_SIGMAS {
                for profile in [Profile::Uniform, Profile::Fefet6] {
                    let var = VariationConfig::new(
                        QuantConfig::DEFAULT,
                        sigma,
                        SigmaUnit::Range,
                        profile,
                        Faults::default(),
                    )
                    .map_err(|_| mismatch(len, (0, 0), case, 0, 0))?;
                    for odd in [0usize, 1] {
                        let records = &bytes[odd..odd + 2 * len];
                        let start = Xoshiro128PlusPlus::from_u64(u64::from(rng.next()));
                        let (mut a, mut b) = (start.clone(), start);
                        let rf = <Smlad as Programmer>::program_records(
                            &var,
                            records,
                            len.max(1),
                            Path::Collapsed,
                            &mut a,
                            &mut fast[..len],
                        );
                        let rp = <Plain as Programmer>::program_records(
                            &var,
                            records,
                            len.max(1),
                            Path::Collapsed,
                            &mut b,
                            &mut plain[..len],
                        );
                        if rf != rp {
                            return Err(mismatch(len, (0, odd), case, -1, -1));
                        }
                        if let Some(i) = (0..len).find(|&i| fast[i] != plain[i]) {
                            return Err(mismatch(
                                len,
                                (i, odd),
                                case,
                                i32::from(fast[i]),
                                i32::from(plain[i]),
                            ));
                        }
                        if a != b {
                            let (x, y) = (a.state(), b.state());
                            return Err(mismatch(len, (len, odd), case, x[0] as i32, y[0] as i32));
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_programming_agrees_and_counts() {
        let n = check_programming(5, 2).unwrap();
        assert_eq!(
            n as usize,
            2 * PROGRAM_LENGTHS.len() * PROGRAM_SIGMAS.len() * 2 * 2
        );
    }

    #[test]
    fn host_kernels_agree_and_count() {
        let c = check_kernels(3, 2).unwrap();
        let per_case = LENGTHS
            .iter()
            .map(|&l| if l > 300 { 2 } else { 16 })
            .sum::<u32>();
        assert_eq!(
            c,
            Checked {
                dot_i8: 2 * per_case,
                dot_i16: 2 * per_case,
                // Case 1 of 2 is engine-range: three tile sizes each.
                dot_row: 3 * per_case,
                dot_rows2: 6 * per_case,
            }
        );
    }
}
