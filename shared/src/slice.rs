//! Bit slicing (the paper's eq. 3): an M-bit magnitude on M/N devices of N bits each.
//!
//! Device `j` holds bits `jN .. jN + N - 1` of the magnitude, so
//! `q = sum_j 2^(jN) * g_j`. A signed weight occupies one side of a differential pair: its
//! devices in the positive array when it is positive, in the negative array when negative; the
//! other side's devices are at level 0 (off).

use crate::error::{Error, Result};
use crate::quant::{MAX_SLICES, QuantConfig, Quantized};

/// The level of one N-bit device, `0 ..= 2^N - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Level(u8);

impl Level {
    /// A level of an `n_bits` device, or `None` when `v` does not fit.
    ///
    /// ```
    /// use nvcim_shared::slice::Level;
    /// assert_eq!(Level::new(3, 2).map(|l| l.get()), Some(3));
    /// assert_eq!(Level::new(4, 2), None);
    /// ```
    pub const fn new(v: u8, n_bits: u8) -> Option<Level> {
        if n_bits <= 8 && (v as u16) < (1u16 << n_bits) {
            Some(Level(v))
        } else {
            None
        }
    }

    /// The level as a number.
    pub const fn get(self) -> u8 {
        self.0
    }
}

/// The M/N device levels of one magnitude, least significant device first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slices {
    levels: [Level; MAX_SLICES],
    len: u8,
}

impl Slices {
    /// The levels, least significant device first.
    pub fn levels(&self) -> &[Level] {
        &self.levels[..usize::from(self.len)]
    }

    /// Builds slices from raw levels, checking each against the device width.
    pub fn from_levels(levels: &[u8], cfg: QuantConfig) -> Result<Slices> {
        if levels.len() != cfg.slices() {
            return Err(Error::LengthMismatch {
                expected: cfg.slices(),
                found: levels.len(),
            });
        }
        let mut out = Slices {
            levels: [Level(0); MAX_SLICES],
            len: levels.len() as u8,
        };
        for (o, &v) in out.levels.iter_mut().zip(levels) {
            *o = Level::new(v, cfg.n_bits()).ok_or(Error::LevelOutOfRange {
                level: v,
                n_bits: cfg.n_bits(),
            })?;
        }
        Ok(out)
    }

    /// Reassembles the magnitude, `sum_j 2^(jN) * g_j`.
    pub fn magnitude(&self, cfg: QuantConfig) -> u16 {
        self.levels()
            .iter()
            .enumerate()
            .map(|(j, l)| u16::from(l.get()) << (j as u32 * u32::from(cfg.n_bits())))
            .sum()
    }
}

/// Cuts a magnitude into device levels.
///
/// ```
/// use nvcim_shared::{quant::QuantConfig, slice::slice};
/// let s = slice(0b11_10_01_00, QuantConfig::DEFAULT).unwrap();
/// let v: Vec<u8> = s.levels().iter().map(|l| l.get()).collect();
/// assert_eq!(v, [0, 1, 2, 3]);
/// ```
pub fn slice(magnitude: u16, cfg: QuantConfig) -> Result<Slices> {
    if magnitude > cfg.max_magnitude() {
        return Err(Error::MagnitudeOutOfRange {
            magnitude,
            m_bits: cfg.m_bits(),
        });
    }
    Ok(slice_unchecked(magnitude, cfg))
}

/// [`slice`] for a magnitude known to fit M bits (higher bits are ignored).
pub fn slice_unchecked(magnitude: u16, cfg: QuantConfig) -> Slices {
    let n = u32::from(cfg.n_bits());
    let mask = u16::from(cfg.max_level());
    let mut levels = [Level(0); MAX_SLICES];
    for (j, l) in levels.iter_mut().take(cfg.slices()).enumerate() {
        *l = Level(((magnitude >> (j as u32 * n)) & mask) as u8);
    }
    Slices {
        levels,
        len: cfg.slices() as u8,
    }
}

/// The two sides of a differential pair for one weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DifferentialPair {
    /// Devices of the positive array.
    pub positive: Slices,
    /// Devices of the negative array.
    pub negative: Slices,
}

impl DifferentialPair {
    /// Places a quantized weight on its side of the pair; the other side is all zeros.
    pub fn new(q: Quantized, cfg: QuantConfig) -> Result<Self> {
        let on = slice(q.magnitude, cfg)?;
        let off = slice_unchecked(0, cfg);
        Ok(if q.negative {
            DifferentialPair {
                positive: off,
                negative: on,
            }
        } else {
            DifferentialPair {
                positive: on,
                negative: off,
            }
        })
    }

    /// The signed value read back, `positive - negative`.
    pub fn signed(&self, cfg: QuantConfig) -> i32 {
        i32::from(self.positive.magnitude(cfg)) - i32::from(self.negative.magnitude(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIGS: [(u8, u8); 9] = [
        (2, 1),
        (2, 2),
        (4, 1),
        (4, 2),
        (4, 4),
        (6, 1),
        (6, 2),
        (8, 1),
        (8, 2),
    ];

    #[test]
    fn every_magnitude_round_trips_for_every_config_and_sign() {
        let mut configs = CONFIGS.to_vec();
        configs.push((8, 4));
        for (m, n) in configs {
            let cfg = QuantConfig::new(m, n).unwrap();
            for mag in 0..=cfg.max_magnitude() {
                let s = slice(mag, cfg).unwrap();
                assert_eq!(s.levels().len(), usize::from(m / n));
                assert!(s.levels().iter().all(|l| l.get() <= cfg.max_level()));
                assert_eq!(s.magnitude(cfg), mag, "M={m} N={n}");
                for negative in [false, true] {
                    let q = Quantized {
                        negative,
                        magnitude: mag,
                    };
                    let pair = DifferentialPair::new(q, cfg).unwrap();
                    assert_eq!(pair.signed(cfg), q.signed());
                    let idle = if negative {
                        pair.positive
                    } else {
                        pair.negative
                    };
                    assert_eq!(idle.magnitude(cfg), 0);
                }
            }
            assert!(slice(cfg.max_magnitude() + 1, cfg).is_err());
        }
    }

    #[test]
    fn from_levels_checks_width_and_count() {
        let cfg = QuantConfig::DEFAULT;
        assert_eq!(
            Slices::from_levels(&[3, 0, 1, 2], cfg)
                .unwrap()
                .magnitude(cfg),
            3 + 16 + 128
        );
        assert_eq!(
            Slices::from_levels(&[4, 0, 0, 0], cfg),
            Err(Error::LevelOutOfRange {
                level: 4,
                n_bits: 2
            })
        );
        assert!(Slices::from_levels(&[1, 2], cfg).is_err());
    }
}
