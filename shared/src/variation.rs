//! The device-variation model (the paper's eqs. 4-5) and its closed-form weight noise.
//!
//! Programming adds `dg_j ~ N(0, sigma_d)` to the conductance of each of a weight's M/N devices
//! (in units of one conductance level); the weight read back is
//! `±max|W| / (2^M - 1) * sum_j 2^(jN) * (g_j + dg_j)`. Only the devices on the weight's side of
//! the differential pair vary; the idle side is off and read as exactly 0 — this is the model
//! of the authors' code, and what the closed forms below assume.
//!
//! **Two sigma conventions**, always named in outputs ([`SigmaUnit`]):
//! - `range` (default; the authors' released code, whose numbers the paper's tables report):
//!   `sigma_d = sigma * (2^N - 1)`, i.e. sigma is a fraction of one device's full range;
//! - `level` (eq. 4 as printed): `sigma_d = sigma`, in units of one level.
//!
//! The effective weight-noise std is `sigma_d * max|W| * sqrt(sum_j 4^(jN)) / (2^M - 1)`; for
//! M = 8, N = 2 that is `0.7776 * sigma * max|W|` (`range`) or `0.2592 * sigma * max|W|`
//! (`level`). See [`VariationConfig::weight_std`].
//!
//! **State-dependent profiles** ([`Profile`]): a weight with `0.25 < q / (2^M - 1) < 0.75`
//! (its quantized magnitude) gets `s` times the noise, and sigma is renormalised by
//! `sqrt(0.4 s^2 + 0.6)`, with s = 1, 2, 4, 6 for RRAM1, FeFET2, RRAM4, FeFET6.
//!
//! **Stuck-at faults** ([`Faults`]) compose with any of the above: each device is, independently,
//! stuck at level 0 with probability `stuck_low`, at level `2^N - 1` with probability
//! `stuck_high`, and otherwise programmed with variation. A stuck device does not vary.
//!
//! **Draw order** (what makes the host, a parallel run and the firmware agree): weights are
//! visited in their layer's canonical order; for each weight, devices `j = 0 .. M/N - 1`; for each
//! device, when faults are enabled one 32-bit draw decides the fault (`u < t_low` stuck low,
//! `u < t_low + t_high` stuck high, thresholds `floor(rate * 2^32)`), then, unless stuck, one
//! [`standard_normal`] draw.

use rand_core::RngCore;

use crate::error::{Error, Result};
use crate::quant::{MAX_SLICES, QuantConfig, Quantized};
use crate::rng::{Xoshiro128PlusPlus, standard_normal};
use crate::slice::slice_unchecked;

/// What sigma is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigmaUnit {
    /// A fraction of a device's full range, `2^N - 1` levels (the authors' code; default).
    #[default]
    Range,
    /// One conductance level (eq. 4 as printed; the SWIM code).
    Level,
}

impl SigmaUnit {
    /// The name used on command lines and in result files.
    pub const fn name(self) -> &'static str {
        match self {
            SigmaUnit::Range => "range",
            SigmaUnit::Level => "level",
        }
    }

    /// Parses `range` or `level`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "range" => Some(SigmaUnit::Range),
            "level" => Some(SigmaUnit::Level),
            _ => None,
        }
    }
}

/// State-dependent variation profiles of the authors' later code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Every weight gets the same noise (the paper).
    #[default]
    Uniform,
    /// Mid-range multiplier s = 1.
    Rram1,
    /// s = 2.
    Fefet2,
    /// s = 4.
    Rram4,
    /// s = 6.
    Fefet6,
}

impl Profile {
    /// Every profile, in order.
    pub const ALL: [Profile; 5] = [
        Profile::Uniform,
        Profile::Rram1,
        Profile::Fefet2,
        Profile::Rram4,
        Profile::Fefet6,
    ];

    /// The name used on command lines and in result files.
    pub const fn name(self) -> &'static str {
        match self {
            Profile::Uniform => "uniform",
            Profile::Rram1 => "rram1",
            Profile::Fefet2 => "fefet2",
            Profile::Rram4 => "rram4",
            Profile::Fefet6 => "fefet6",
        }
    }

    /// Parses a profile name (case-insensitive).
    pub fn from_name(s: &str) -> Option<Self> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
    }

    /// The mid-range multiplier `s`, or `None` for [`Profile::Uniform`].
    pub const fn multiplier(self) -> Option<f32> {
        match self {
            Profile::Uniform => None,
            Profile::Rram1 => Some(1.0),
            Profile::Fefet2 => Some(2.0),
            Profile::Rram4 => Some(4.0),
            Profile::Fefet6 => Some(6.0),
        }
    }

    /// Whether a magnitude lies in the band that gets `s` times the noise.
    pub fn in_band(self, magnitude: u16, cfg: QuantConfig) -> bool {
        // 0.25 < q / max < 0.75, in integers: 4q > max and 4q < 3 max.
        let (q, max) = (u32::from(magnitude), u32::from(cfg.max_magnitude()));
        self.multiplier().is_some() && 4 * q > max && 4 * q < 3 * max
    }

    /// The factor on sigma for a weight of this magnitude.
    pub fn factor(self, magnitude: u16, cfg: QuantConfig) -> f32 {
        match self.multiplier() {
            None => 1.0,
            Some(s) => {
                let norm = libm::sqrtf(0.4 * s * s + 0.6);
                if self.in_band(magnitude, cfg) {
                    s / norm
                } else {
                    1.0 / norm
                }
            }
        }
    }
}

/// Stuck-at faults: fractions of devices stuck at level 0 and at the top level.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    stuck_low: f32,
    stuck_high: f32,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        stuck_low: 0.0,
        stuck_high: 0.0,
    };

    /// Checks that both rates are in [0, 1] and sum to at most 1.
    pub fn new(stuck_low: f32, stuck_high: f32) -> Result<Self> {
        let ok = |r: f32| r.is_finite() && (0.0..=1.0).contains(&r);
        if ok(stuck_low) && ok(stuck_high) && stuck_low + stuck_high <= 1.0 {
            Ok(Faults {
                stuck_low,
                stuck_high,
            })
        } else {
            Err(Error::InvalidFaultRate {
                stuck_low,
                stuck_high,
            })
        }
    }

    /// Fraction of devices stuck at level 0.
    pub const fn stuck_low(self) -> f32 {
        self.stuck_low
    }

    /// Fraction of devices stuck at the top level.
    pub const fn stuck_high(self) -> f32 {
        self.stuck_high
    }

    /// Whether any fault can occur (then each device costs one extra draw).
    pub fn any(self) -> bool {
        self.stuck_low > 0.0 || self.stuck_high > 0.0
    }

    /// The two draw thresholds, `floor(rate * 2^32)` saturated.
    fn thresholds(self) -> (u64, u64) {
        let t = |r: f32| libm::floor(f64::from(r) * 4_294_967_296.0) as u64;
        let low = t(self.stuck_low);
        (low, low + t(self.stuck_high))
    }
}

/// A complete device-variation configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariationConfig {
    quant: QuantConfig,
    sigma: f32,
    unit: SigmaUnit,
    profile: Profile,
    faults: Faults,
    /// Per-device std in levels outside and inside the profile's band (derived, cached).
    sd: [f32; 2],
    /// The fault draw thresholds (derived, cached: no `f64` work per sample on the M4F).
    thresholds: (u64, u64),
}

impl VariationConfig {
    /// Checks sigma (finite, >= 0); the other parts are valid by construction.
    pub fn new(
        quant: QuantConfig,
        sigma: f32,
        unit: SigmaUnit,
        profile: Profile,
        faults: Faults,
    ) -> Result<Self> {
        if !sigma.is_finite() || sigma < 0.0 {
            return Err(Error::InvalidSigma { sigma });
        }
        let unit_levels = match unit {
            SigmaUnit::Range => f32::from(quant.max_level()),
            SigmaUnit::Level => 1.0,
        };
        // Representative magnitudes outside (0) and inside (half scale) the profile's band.
        let half = quant.max_magnitude() / 2;
        let sd = [
            sigma * unit_levels * profile.factor(0, quant),
            sigma * unit_levels * profile.factor(half, quant),
        ];
        Ok(VariationConfig {
            quant,
            sigma,
            unit,
            profile,
            faults,
            sd,
            thresholds: faults.thresholds(),
        })
    }

    /// The paper's default (M = 8, N = 2, `range`, uniform, no faults) at `sigma`.
    pub fn paper(sigma: f32) -> Result<Self> {
        Self::new(
            QuantConfig::DEFAULT,
            sigma,
            SigmaUnit::Range,
            Profile::Uniform,
            Faults::NONE,
        )
    }

    /// The quantization this variation applies to.
    pub const fn quant(&self) -> QuantConfig {
        self.quant
    }

    /// sigma, in [`Self::unit`].
    pub const fn sigma(&self) -> f32 {
        self.sigma
    }

    /// The sigma convention.
    pub const fn unit(&self) -> SigmaUnit {
        self.unit
    }

    /// The state-dependent profile.
    pub const fn profile(&self) -> Profile {
        self.profile
    }

    /// The stuck-at fault model.
    pub const fn faults(&self) -> Faults {
        self.faults
    }

    /// This configuration at another sigma.
    pub fn with_sigma(&self, sigma: f32) -> Result<Self> {
        Self::new(self.quant, sigma, self.unit, self.profile, self.faults)
    }

    /// The per-device std times `2^frac_bits`, outside and inside the profile's band (equal
    /// for [`Profile::Uniform`]): the factor a fixed-point tile programmer applies to each
    /// standard normal draw. Index it with `usize::from(profile.in_band(q, quant))`.
    ///
    /// `z * (sd * 2^F)` is bit for bit `(sd * z) * 2^F`: scaling by a power of two is exact and
    /// commutes with rounding in the normal range; they differ only where `sd * z` is subnormal,
    /// i.e. below `2^-126` in magnitude, where both round to the fixed-point value 0.
    pub fn device_sigma_fixed(&self, frac_bits: u32) -> [f32; 2] {
        let one = (1u32 << frac_bits) as f32;
        [self.sd[0] * one, self.sd[1] * one]
    }

    /// Per-device std in conductance levels for a weight of this magnitude.
    #[inline]
    pub fn device_sigma(&self, magnitude: u16) -> f32 {
        self.sd[usize::from(self.profile.in_band(magnitude, self.quant))]
    }

    /// `sqrt(sum_j 4^(jN)) / (2^M - 1)`: weight std per unit device std, as a fraction of max|W|.
    pub fn slice_gain(&self) -> f64 {
        let n = u32::from(self.quant.n_bits());
        let sum: f64 = (0..self.quant.slices() as u32)
            .map(|j| libm::pow(4.0, f64::from(j * n)))
            .sum();
        libm::sqrt(sum) / f64::from(self.quant.max_magnitude())
    }

    /// Closed-form std of the read-back weight, as a fraction of max|W|, for a weight of this
    /// magnitude, without faults: `device_sigma(q) * sqrt(sum_j 4^(jN)) / (2^M - 1)`.
    ///
    /// ```
    /// use nvcim_shared::variation::VariationConfig;
    /// let v = VariationConfig::paper(0.4).unwrap();
    /// assert!((v.weight_std(0) - 0.311).abs() < 5e-4); // 0.7776 * 0.4
    /// ```
    pub fn weight_std(&self, magnitude: u16) -> f64 {
        f64::from(self.device_sigma(magnitude)) * self.slice_gain()
    }

    /// Closed-form root-mean-square error of the read-back weight (fraction of max|W|) for a
    /// weight of this magnitude, with faults: `sqrt(sum_j 4^(jN) Var_j + (sum_j 2^(jN) mu_j)^2)`
    /// over independent devices, where a device at level `g` has mean error
    /// `mu = -p_low g + p_high (top - g)` and second moment
    /// `(1 - p_low - p_high) sd^2 + p_low g^2 + p_high (top - g)^2`. Without faults this is
    /// [`Self::weight_std`].
    pub fn weight_rms(&self, magnitude: u16) -> f64 {
        let sd = f64::from(self.device_sigma(magnitude));
        let (pl, ph) = (
            f64::from(self.faults.stuck_low),
            f64::from(self.faults.stuck_high),
        );
        let top = f64::from(self.quant.max_level());
        let n = u32::from(self.quant.n_bits());
        let (mut var, mut mean) = (0.0f64, 0.0f64);
        for (j, l) in slice_unchecked(magnitude, self.quant)
            .levels()
            .iter()
            .enumerate()
        {
            let g = f64::from(l.get());
            let w = libm::pow(2.0, f64::from(j as u32 * n));
            let mu = -pl * g + ph * (top - g);
            let second = (1.0 - pl - ph) * sd * sd + pl * g * g + ph * (top - g) * (top - g);
            var += w * w * (second - mu * mu);
            mean += w * mu;
        }
        libm::sqrt(var + mean * mean) / f64::from(self.quant.max_magnitude())
    }

    /// Samples the devices of one quantized weight from `rng` (see the module docs for the
    /// draw order).
    #[inline]
    pub fn sample(&self, q: Quantized, rng: &mut impl RngCore) -> Readout {
        let cfg = self.quant;
        let n = cfg.slices();
        let sd = self.device_sigma(q.magnitude);
        let mut delta = [0.0f32; MAX_SLICES];
        if !self.faults.any() {
            for d in &mut delta[..n] {
                *d = sd * standard_normal(rng);
            }
            return Readout {
                q,
                delta,
                len: n as u8,
            };
        }
        let (t_low, t_high) = self.thresholds;
        let top = f32::from(cfg.max_level());
        for (d, l) in delta
            .iter_mut()
            .zip(slice_unchecked(q.magnitude, cfg).levels())
        {
            let g = f32::from(l.get());
            let u = u64::from(rng.next_u32());
            *d = if u < t_low {
                -g
            } else if u < t_high {
                top - g
            } else {
                sd * standard_normal(rng)
            };
        }
        Readout {
            q,
            delta,
            len: n as u8,
        }
    }

    /// Perturbs a float layer in place of `out`: `out[i] = w[i] + delta_i`, where `delta_i` is
    /// the read-back error of weight `i`'s devices (quantized against `scale`), drawn from `rng`.
    /// This is the float engine's noisy weight; [`Self::perturb_quantized`] gives the integer
    /// engine's from the same draws.
    pub fn perturb_f32(
        &self,
        weights: &[f32],
        scale: f32,
        rng: &mut Xoshiro128PlusPlus,
        out: &mut [f32],
    ) -> Result<()> {
        crate::quant::check_scale(scale)?;
        if out.len() != weights.len() {
            return Err(Error::LengthMismatch {
                expected: weights.len(),
                found: out.len(),
            });
        }
        crate::quant::check_finite(weights)?;
        if self.faults.any() {
            for (o, &w) in out.iter_mut().zip(weights) {
                let q = crate::quant::quantize_unchecked(w, scale, self.quant);
                *o = w + self.sample(q, rng).delta_weight(scale, self.quant);
            }
            return Ok(());
        }
        // Without faults every weight draws exactly `slices` normals, in order: draw them a
        // block at a time (`DrawsAhead`, the same values) and combine them with the
        // arithmetic of `sample` + `delta_weight`, operation for operation.
        const BLOCK: usize = 256;
        let slices = self.quant.slices();
        let n = u32::from(self.quant.n_bits());
        let mut gain = [0.0f32; MAX_SLICES];
        for (j, g) in gain.iter_mut().enumerate() {
            *g = (1u32 << (j as u32 * n)) as f32;
        }
        let step = scale / f32::from(self.quant.max_magnitude());
        let uniform = self.sd[0].to_bits() == self.sd[1].to_bits();
        let mut z = [0.0f32; BLOCK * MAX_SLICES];
        let mut draws = rng.ahead();
        for (ws, os) in weights.chunks(BLOCK).zip(out.chunks_mut(BLOCK)) {
            let z = &mut z[..ws.len() * slices];
            draws.fill_normals(z);
            if uniform {
                let sd = self.sd[0];
                // The slice counts of 8-bit weights, unrolled so that the loop vectorizes.
                match slices {
                    4 => combine(ws, z, os, 4, |_| sd, &gain, step),
                    2 => combine(ws, z, os, 2, |_| sd, &gain, step),
                    8 => combine(ws, z, os, 8, |_| sd, &gain, step),
                    1 => combine(ws, z, os, 1, |_| sd, &gain, step),
                    _ => combine(ws, z, os, slices, |_| sd, &gain, step),
                }
            } else {
                let sd = |w| {
                    let q = crate::quant::quantize_unchecked(w, scale, self.quant);
                    self.device_sigma(q.magnitude)
                };
                combine(ws, z, os, slices, sd, &gain, step);
            }
        }
        Ok(())
    }

    /// The read-back weights of a quantized layer: `out[i] = ±scale/(2^M-1) * sum_j 2^(jN) (g_j + dg_j)`.
    pub fn perturb_quantized(
        &self,
        q: &[Quantized],
        scale: f32,
        rng: &mut impl RngCore,
        out: &mut [f32],
    ) -> Result<()> {
        crate::quant::check_scale(scale)?;
        if out.len() != q.len() {
            return Err(Error::LengthMismatch {
                expected: q.len(),
                found: out.len(),
            });
        }
        for (o, &qi) in out.iter_mut().zip(q) {
            *o = self.sample(qi, rng).read_weight(scale, self.quant);
        }
        Ok(())
    }
}

/// `out[i] = w[i] ± delta_i` from weight `i`'s `slices` normals `z[slices i ..]`: the
/// arithmetic of [`VariationConfig::sample`] + [`Readout::delta_weight`], operation for
/// operation (`acc` starts at `0.0` and adds `sd * z * g` slice by slice). Always inlined, so
/// that a constant `slices` unrolls the inner loop and the weights' loop vectorizes.
#[inline(always)]
fn combine(
    ws: &[f32],
    z: &[f32],
    os: &mut [f32],
    slices: usize,
    sd: impl Fn(f32) -> f32,
    gain: &[f32; MAX_SLICES],
    step: f32,
) {
    for ((o, &w), z) in os.iter_mut().zip(ws).zip(z.chunks_exact(slices)) {
        let sd = sd(w);
        let mut acc = 0.0f32;
        for (&z, &g) in z.iter().zip(gain) {
            acc += sd * z * g;
        }
        let d = acc * step;
        *o = w + if w < 0.0 { -d } else { d };
    }
}

/// The sampled devices of one weight: its quantized code and each device's error in levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Readout {
    /// The programmed code.
    pub q: Quantized,
    delta: [f32; MAX_SLICES],
    len: u8,
}

impl Readout {
    /// Each device's error `dg_j` in levels (the difference between read and programmed level),
    /// least significant device first.
    pub fn deltas(&self) -> &[f32] {
        &self.delta[..usize::from(self.len)]
    }

    /// `sum_j 2^(jN) dg_j`: the error of the magnitude, in units of one magnitude step.
    pub fn delta_magnitude(&self, cfg: QuantConfig) -> f32 {
        let n = u32::from(cfg.n_bits());
        let mut acc = 0.0f32;
        for (j, d) in self.deltas().iter().enumerate() {
            acc += d * (1u32 << (j as u32 * n)) as f32;
        }
        acc
    }

    /// The signed weight error, `±scale/(2^M-1) * sum_j 2^(jN) dg_j`.
    pub fn delta_weight(&self, scale: f32, cfg: QuantConfig) -> f32 {
        let d = self.delta_magnitude(cfg) * (scale / f32::from(cfg.max_magnitude()));
        if self.q.negative { -d } else { d }
    }

    /// The signed weight read back, `±scale/(2^M-1) * sum_j 2^(jN) (g_j + dg_j)`.
    pub fn read_weight(&self, scale: f32, cfg: QuantConfig) -> f32 {
        let m = f32::from(self.q.magnitude) + self.delta_magnitude(cfg);
        let w = m * (scale / f32::from(cfg.max_magnitude()));
        if self.q.negative { -w } else { w }
    }

    /// Each device's read conductance `g_j + dg_j` in fixed point with `frac_bits` fractional
    /// bits: `(g_j << F) + round(dg_j * 2^F)`, rounding half away from zero (see [`round_fixed`]).
    /// This is the integer engine's tile state; the error is at most `2^-(F+1)` level per device.
    pub fn devices_fixed(&self, cfg: QuantConfig, frac_bits: u32) -> [i32; MAX_SLICES] {
        let one = (1u32 << frac_bits) as f32;
        let levels = slice_unchecked(self.q.magnitude, cfg);
        let mut out = [0i32; MAX_SLICES];
        for ((o, d), l) in out.iter_mut().zip(self.deltas()).zip(levels.levels()) {
            *o = (i32::from(l.get()) << frac_bits) + round_fixed(d * one);
        }
        out
    }
}

/// Rounds half away from zero to `i32`, as `trunc(v ± 0.5)` in `f32` with a saturating cast:
/// one compare, one add and one `VCVT` on the Cortex-M4F (which has no rounding instruction).
/// Host and firmware use this same formula, so their fixed-point tiles are bit-identical.
#[inline(always)]
pub fn round_fixed(v: f32) -> i32 {
    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::stream;

    #[test]
    fn closed_form_constants_of_the_design() {
        let range = VariationConfig::paper(1.0).unwrap();
        assert!(
            (range.weight_std(0) - 0.7776).abs() < 1e-4,
            "{}",
            range.weight_std(0)
        );
        let level = VariationConfig::new(
            QuantConfig::DEFAULT,
            1.0,
            SigmaUnit::Level,
            Profile::Uniform,
            Faults::NONE,
        )
        .unwrap();
        assert!((level.weight_std(0) - 0.2592).abs() < 1e-4);
        // General formula, M = 4, N = 1, level: sqrt(1+4+16+64)/15.
        let v = VariationConfig::new(
            QuantConfig::new(4, 1).unwrap(),
            0.5,
            SigmaUnit::Level,
            Profile::Uniform,
            Faults::NONE,
        )
        .unwrap();
        assert!((v.weight_std(3) - 0.5 * libm::sqrt(85.0) / 15.0).abs() < 1e-9);
    }

    #[test]
    fn profile_band_and_renormalisation() {
        let c = QuantConfig::DEFAULT;
        // 0.25 * 255 = 63.75, 0.75 * 255 = 191.25.
        assert!(!Profile::Fefet6.in_band(63, c));
        assert!(Profile::Fefet6.in_band(64, c));
        assert!(Profile::Fefet6.in_band(191, c));
        assert!(!Profile::Fefet6.in_band(192, c));
        assert!(!Profile::Uniform.in_band(128, c));
        // 40% in band at s and 60% at 1 average back to sigma^2.
        for p in Profile::ALL {
            let (a, b) = (p.factor(128, c), p.factor(0, c));
            assert!((0.4 * a * a + 0.6 * b * b - 1.0).abs() < 1e-6, "{p:?}");
        }
        assert_eq!(Profile::from_name("FeFET2"), Some(Profile::Fefet2));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        for s in [-0.1, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                VariationConfig::paper(s),
                Err(Error::InvalidSigma { .. })
            ));
        }
        for (l, h) in [(-0.1, 0.0), (0.0, 1.1), (0.6, 0.6), (f32::NAN, 0.0)] {
            assert!(matches!(
                Faults::new(l, h),
                Err(Error::InvalidFaultRate { .. })
            ));
        }
        let v = VariationConfig::paper(0.1).unwrap();
        let mut out = [0.0; 2];
        let mut rng = stream(1, 0, 0);
        assert!(v.perturb_f32(&[0.1, 0.2], 0.0, &mut rng, &mut out).is_err());
        assert!(
            v.perturb_f32(&[0.1, f32::NAN], 1.0, &mut rng, &mut out)
                .is_err()
        );
        assert!(v.perturb_f32(&[0.1], 1.0, &mut rng, &mut out).is_err());
    }

    #[test]
    fn zero_sigma_reads_back_the_quantized_weight() {
        let v = VariationConfig::paper(0.0).unwrap();
        let w = [0.3f32, -0.9, 0.0, 1.0];
        let mut out = [0.0; 4];
        v.perturb_f32(&w, 1.0, &mut stream(3, 0, 0), &mut out)
            .unwrap();
        assert_eq!(out, w);
        let r = v.sample(
            Quantized {
                negative: true,
                magnitude: 200,
            },
            &mut stream(3, 0, 0),
        );
        assert_eq!(
            r.read_weight(1.0, QuantConfig::DEFAULT),
            -(200.0 * (1.0 / 255.0))
        );
        assert_eq!(
            r.devices_fixed(QuantConfig::DEFAULT, 8)[..4],
            [0, 512, 0, 768]
        );
    }

    /// `perturb_f32`'s block path equals the definition: per weight, `sample` then
    /// `delta_weight`, one draw after another, bit for bit and with the same final state.
    #[test]
    fn perturb_f32_equals_the_per_weight_definition() {
        let configs = [
            (8, 2, Profile::Uniform, 0.4),
            (8, 2, Profile::Uniform, 0.0),
            (8, 2, Profile::Fefet6, 0.3),
            (6, 2, Profile::Rram4, 1.5),
            (4, 1, Profile::Uniform, 0.8),
            (8, 4, Profile::Uniform, 3.0),
            (2, 2, Profile::Rram1, 0.2),
        ];
        // Odd length (not a multiple of the block or of the 8-draw groups), signed zeros.
        let mut w: Vec<f32> = (0..1337)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        w[5] = -0.0;
        w[6] = 0.0;
        for (m, n, profile, sigma) in configs {
            let quant = QuantConfig::new(m, n).unwrap();
            let v = VariationConfig::new(quant, sigma, SigmaUnit::Range, profile, Faults::NONE)
                .unwrap();
            let scale = 1.0;
            let mut fast = vec![0.0f32; w.len()];
            let mut a = stream(11, 3, 2);
            v.perturb_f32(&w, scale, &mut a, &mut fast).unwrap();
            let mut b = stream(11, 3, 2);
            for (i, (&x, &y)) in w.iter().zip(&fast).enumerate() {
                let q = crate::quant::quantize_unchecked(x, scale, quant);
                let want = x + v.sample(q, &mut b).delta_weight(scale, quant);
                assert_eq!(
                    y.to_bits(),
                    want.to_bits(),
                    "M{m} N{n} {profile:?} sigma {sigma} #{i}"
                );
            }
            assert_eq!(
                a, b,
                "M{m} N{n}: the stream ends where the definition's does"
            );
        }
    }

    #[test]
    fn float_and_quantized_paths_share_their_draws() {
        let v = VariationConfig::paper(0.3).unwrap();
        let w: Vec<f32> = (0..50).map(|i| (i as f32 - 25.0) / 25.0).collect();
        let mut q = vec![Quantized::default(); 50];
        let s = crate::quant::quantize_layer(&w, None, v.quant(), &mut q).unwrap();
        let (mut a, mut b) = (vec![0.0; 50], vec![0.0; 50]);
        v.perturb_f32(&w, s, &mut stream(9, 2, 1), &mut a).unwrap();
        v.perturb_quantized(&q, s, &mut stream(9, 2, 1), &mut b)
            .unwrap();
        for i in 0..50 {
            // a = w + delta, b = dequant(q) + delta: they differ by the quantization error only.
            let qerr = w[i] - q[i].dequantize(s, v.quant());
            assert!((a[i] - b[i] - qerr).abs() < 1e-5, "{i}");
        }
    }

    #[test]
    fn every_device_stuck_gives_the_stuck_level() {
        let c = QuantConfig::DEFAULT;
        let all_low = VariationConfig::new(
            c,
            0.5,
            SigmaUnit::Range,
            Profile::Uniform,
            Faults::new(1.0, 0.0).unwrap(),
        )
        .unwrap();
        let all_high = VariationConfig::new(
            c,
            0.5,
            SigmaUnit::Range,
            Profile::Uniform,
            Faults::new(0.0, 1.0).unwrap(),
        )
        .unwrap();
        let q = Quantized {
            negative: false,
            magnitude: 0b01_10_11_00,
        };
        let mut rng = stream(1, 1, 1);
        assert_eq!(all_low.sample(q, &mut rng).read_weight(255.0, c), 0.0);
        assert_eq!(all_high.sample(q, &mut rng).read_weight(255.0, c), 255.0);
        assert!((all_low.weight_rms(q.magnitude) - f64::from(q.magnitude) / 255.0).abs() < 1e-9);
    }

    #[test]
    fn round_fixed_rounds_half_away_and_saturates() {
        assert_eq!(round_fixed(2.5), 3);
        assert_eq!(round_fixed(-2.5), -3);
        assert_eq!(round_fixed(-0.4), 0);
        assert_eq!(round_fixed(1e12), i32::MAX);
    }
}
