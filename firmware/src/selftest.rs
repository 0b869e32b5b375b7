//! The kernel self-test: every DSP kernel against its plain reference, bit for bit, on seeded
//! random vectors of awkward lengths and at every start offset modulo 4 bytes.
//!
//! Portable: on the host it compares the reference with itself (the plumbing is still
//! tested); on the Cortex-M4 it compares SMLAD with plain Rust.

use core::fmt;

use nvcim_shared::rng::Xoshiro128PlusPlus;

use nvcim_shared::tile::{DotKernel, Plain};

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

#[cfg(test)]
mod tests {
    use super::*;

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
