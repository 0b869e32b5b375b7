//! Weight quantization (the paper's eq. 2).
//!
//! A weight `w` is stored as a sign and an M-bit magnitude
//! `q = round(|w| / s * (2^M - 1))` against a scale `s = max|W|`, taken per layer (default) or
//! over the whole model ([`ScaleMode`]). The sign selects the positive or the negative array of a
//! differential pair.
//!
//! **Rounding rule:** `|w| / s` is computed in `f32`, multiplied by `2^M - 1` in `f32`, and rounded
//! half away from zero (`libm::roundf`); the result is clamped to `2^M - 1` (it can only exceed
//! it when a per-layer scale is smaller than the layer's own maximum, which [`layer_scale`] never
//! produces). `-0.0` and `+0.0` are both positive.

use crate::error::{Error, Result};

/// Largest supported number of devices per weight (M = 8, N = 1).
pub const MAX_SLICES: usize = 8;

/// Bit widths of the weight magnitude (M) and of one device (N).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    m_bits: u8,
    n_bits: u8,
}

impl QuantConfig {
    /// The paper's setting: 8-bit magnitudes on four 2-bit devices.
    pub const DEFAULT: QuantConfig = QuantConfig {
        m_bits: 8,
        n_bits: 2,
    };

    /// Checks that M is in {2, 4, 6, 8}, N in {1, 2, 4} and M a multiple of N.
    ///
    /// ```
    /// use nvcim_shared::quant::QuantConfig;
    /// assert_eq!(QuantConfig::new(8, 2).unwrap().slices(), 4);
    /// assert!(QuantConfig::new(6, 4).is_err());
    /// ```
    pub fn new(m_bits: u8, n_bits: u8) -> Result<Self> {
        if !matches!(m_bits, 2 | 4 | 6 | 8) {
            return Err(Error::UnsupportedWeightBits { m_bits });
        }
        if !matches!(n_bits, 1 | 2 | 4) {
            return Err(Error::UnsupportedDeviceBits { n_bits });
        }
        if !m_bits.is_multiple_of(n_bits) {
            return Err(Error::BitsNotDivisible { m_bits, n_bits });
        }
        Ok(QuantConfig { m_bits, n_bits })
    }

    /// Magnitude bits M.
    pub const fn m_bits(self) -> u8 {
        self.m_bits
    }

    /// Bits per device N.
    pub const fn n_bits(self) -> u8 {
        self.n_bits
    }

    /// Devices per weight, M / N.
    pub const fn slices(self) -> usize {
        (self.m_bits / self.n_bits) as usize
    }

    /// Largest magnitude, `2^M - 1`.
    pub const fn max_magnitude(self) -> u16 {
        (1u16 << self.m_bits) - 1
    }

    /// Top level of one device, `2^N - 1`.
    pub const fn max_level(self) -> u8 {
        ((1u16 << self.n_bits) - 1) as u8
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Whether `max|W|` is taken per layer or over the whole model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleMode {
    /// One scale per layer (default; the authors' code).
    #[default]
    PerLayer,
    /// One scale for every layer of the model.
    PerModel,
}

impl ScaleMode {
    /// The name used on command lines and in result files.
    pub const fn name(self) -> &'static str {
        match self {
            ScaleMode::PerLayer => "layer",
            ScaleMode::PerModel => "model",
        }
    }
}

/// A quantized weight: a sign and an M-bit magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quantized {
    /// True when the weight lives in the negative array of the differential pair.
    pub negative: bool,
    /// Magnitude, `0 ..= 2^M - 1`.
    pub magnitude: u16,
}

impl Quantized {
    /// The signed integer value, `±magnitude`.
    pub const fn signed(self) -> i32 {
        if self.negative {
            -(self.magnitude as i32)
        } else {
            self.magnitude as i32
        }
    }

    /// The weight this code stands for, `±magnitude * scale / (2^M - 1)`.
    pub fn dequantize(self, scale: f32, cfg: QuantConfig) -> f32 {
        self.signed() as f32 * (scale / f32::from(cfg.max_magnitude()))
    }
}

/// Checks that a scale is finite and positive.
pub fn check_scale(scale: f32) -> Result<f32> {
    if scale.is_finite() && scale > 0.0 {
        Ok(scale)
    } else {
        Err(Error::InvalidScale { scale })
    }
}

/// `max|W|` of a layer. Fails on a NaN or infinite weight and on an all-zero layer.
pub fn layer_scale(weights: &[f32]) -> Result<f32> {
    check_scale(f32::from_bits(max_abs_bits(weights)?))
}

/// The largest `|w|`'s bits (`|w|` orders as its bits), or the first non-finite weight's
/// index. One branch-free pass that vectorizes; the index is looked up only on that error.
fn max_abs_bits(weights: &[f32]) -> Result<u32> {
    let max = weights
        .iter()
        .fold(0u32, |m, w| m.max(w.to_bits() & 0x7fff_ffff));
    if max >= f32::INFINITY.to_bits() {
        let index = weights.iter().position(|w| !w.is_finite()).unwrap_or(0);
        return Err(Error::NonFiniteWeight { index });
    }
    Ok(max)
}

/// `Err(NonFiniteWeight { index })` for the first NaN or infinite weight.
pub fn check_finite(weights: &[f32]) -> Result<()> {
    max_abs_bits(weights).map(|_| ())
}

/// Quantizes one weight against `scale` (see the module docs for the rounding rule).
///
/// ```
/// use nvcim_shared::quant::{quantize, QuantConfig, Quantized};
/// let q = quantize(-0.5, 1.0, QuantConfig::DEFAULT).unwrap();
/// assert_eq!(q, Quantized { negative: true, magnitude: 128 }); // 127.5 rounds away from zero
/// ```
pub fn quantize(w: f32, scale: f32, cfg: QuantConfig) -> Result<Quantized> {
    check_scale(scale)?;
    if !w.is_finite() {
        return Err(Error::NonFiniteWeight { index: 0 });
    }
    Ok(quantize_unchecked(w, scale, cfg))
}

/// [`quantize`] without the checks, for loops that validated `scale` and the weights already.
pub fn quantize_unchecked(w: f32, scale: f32, cfg: QuantConfig) -> Quantized {
    let max = cfg.max_magnitude();
    let q = libm::roundf(libm::fabsf(w) / scale * f32::from(max));
    let magnitude = if q >= f32::from(max) { max } else { q as u16 };
    Quantized {
        negative: w < 0.0,
        magnitude,
    }
}

/// Quantizes a layer into `out` and returns its scale (`max|W|` unless `scale` is given).
pub fn quantize_layer(
    weights: &[f32],
    scale: Option<f32>,
    cfg: QuantConfig,
    out: &mut [Quantized],
) -> Result<f32> {
    if out.len() != weights.len() {
        return Err(Error::LengthMismatch {
            expected: weights.len(),
            found: out.len(),
        });
    }
    let own = layer_scale(weights);
    let scale = match scale {
        Some(s) => check_scale(s)?,
        None => own?,
    };
    for (o, &w) in out.iter_mut().zip(weights) {
        *o = quantize_unchecked(w, scale, cfg);
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        for m in 0..=10u8 {
            for n in 0..=5u8 {
                let ok = matches!(m, 2 | 4 | 6 | 8) && matches!(n, 1 | 2 | 4) && m % n == 0;
                assert_eq!(QuantConfig::new(m, n).is_ok(), ok, "M={m} N={n}");
            }
        }
        assert_eq!(
            QuantConfig::new(6, 4),
            Err(Error::BitsNotDivisible {
                m_bits: 6,
                n_bits: 4
            })
        );
        assert_eq!(
            QuantConfig::new(2, 4),
            Err(Error::BitsNotDivisible {
                m_bits: 2,
                n_bits: 4
            })
        );
    }

    #[test]
    fn rounding_and_extremes() {
        let c = QuantConfig::DEFAULT;
        assert_eq!(quantize(1.0, 1.0, c).unwrap().magnitude, 255);
        assert_eq!(
            quantize(-1.0, 1.0, c).unwrap(),
            Quantized {
                negative: true,
                magnitude: 255
            }
        );
        assert_eq!(
            quantize(0.0, 1.0, c).unwrap(),
            Quantized {
                negative: false,
                magnitude: 0
            }
        );
        assert!(!quantize(-0.0, 1.0, c).unwrap().negative);
        // 0.5/255 rounds up to 1, just below it rounds down to 0.
        assert_eq!(quantize(0.5 / 255.0, 1.0, c).unwrap().magnitude, 1);
        assert_eq!(quantize(0.49 / 255.0, 1.0, c).unwrap().magnitude, 0);
        let c4 = QuantConfig::new(4, 2).unwrap();
        assert_eq!(quantize(0.5, 2.0, c4).unwrap().magnitude, 4); // 3.75 -> 4
    }

    #[test]
    fn bad_scales_and_weights() {
        let c = QuantConfig::DEFAULT;
        for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(
                matches!(quantize(0.1, s, c), Err(Error::InvalidScale { .. })),
                "{s}"
            );
        }
        assert_eq!(
            quantize(f32::NAN, 1.0, c),
            Err(Error::NonFiniteWeight { index: 0 })
        );
        assert_eq!(
            layer_scale(&[0.0, 0.0]),
            Err(Error::InvalidScale { scale: 0.0 })
        );
        assert_eq!(
            layer_scale(&[0.1, f32::NAN]),
            Err(Error::NonFiniteWeight { index: 1 })
        );
        assert_eq!(layer_scale(&[0.1, -0.3]), Ok(0.3));
    }

    #[test]
    fn dequantize_error_is_half_a_step() {
        let c = QuantConfig::DEFAULT;
        let ws: [f32; 7] = [0.3, -0.7, 0.01, -0.999, 0.5, 0.0, 1.0];
        let mut q = [Quantized::default(); 7];
        let s = quantize_layer(&ws, None, c, &mut q).unwrap();
        for (w, q) in ws.iter().zip(q) {
            let err = (q.dequantize(s, c) - w).abs();
            assert!(err <= 0.5 * s / 255.0 + 1e-7, "{w}: {err}");
        }
    }
}
