//! Programmed crossbar tiles and their matrix-vector products.
//!
//! A weight layer is a matrix of `K` inputs (fan-in: `in` for a linear layer, `in * kh * kw` for
//! a convolution) by `O` outputs, stored output-major in PyTorch's canonical order
//! (`[out][in]`, `[out][in][kh][kw]`). It is cut into crossbar tiles of `rows` inputs by `cols`
//! outputs; a tile's column produces one partial sum per device slice.
//!
//! **Device state in fixed point.** Each device's read conductance `g_j + dg_j` (in levels) is
//! kept with [`FRAC_BITS`] = 4 fractional bits, from [`crate::variation::Readout::devices_fixed`], and saturated to
//! `±device_limit(cfg)` so that the collapsed weight always fits an `i16`:
//! `device_limit = floor(32767 / sum_j 2^(jN))` (385 = 24.06 levels for M = 8, N = 2; about
//! `8 (2^N - 1)` levels for M = 8 in general, i.e. 8 standard deviations of the noise at
//! sigma = 1 in the `range` convention, beyond what the Gaussian sampler produces in practice).
//! **Rounding error:** at most `2^-5` level per device (half a fixed-point step), an rms of
//! `2^-4 / sqrt(12) = 0.018` level, against a noise std of `0.3` level at sigma = 0.1 (`range`,
//! N = 2): the rounding adds 0.36 % to the noise variance, so the sampled noise is not rounded
//! away. With sigma = 0 the state is exact (levels are integers).
//!
//! **Collapsed path** (ideal ADC): one `i16` per weight (2 bytes of programmed state),
//! `W = ±sum_j 2^(jN) * d_j` where `d_j` are the fixed-point devices, which is exact integer
//! arithmetic. **Sliced path**: `M/N` `i16` per weight, laid out `[out][slice][in]`; each tile
//! column's per-slice partial sum goes through the [`Adc`], then the slices are shifted by
//! `2^(jN)` and added, and the tiles are added. With [`Adc::Ideal`] the two paths agree bit for
//! bit, since `sum_j 2^(jN) sum_i x_i d_ij = sum_i x_i W_i` exactly.
//!
//! **Accumulator bounds** (the format enforces `rows <= 256` and `K <= 65536`): inputs satisfy
//! `|x| <= 255`, collapsed weights `|W| <= 32767`, so one tile's column sum is at most
//! `255 * 32767 * 256 < 2^31` and is accumulated in `i32` (the inner loop uses wrapping adds
//! that provably never wrap, which lets it vectorize); the sum over tiles is `i64`, at most
//! `65536 * 255 * 32767 < 2^39` ([`ACC_LIMIT`]).

use rand_core::RngCore;

use crate::error::{Error, Result};
use crate::quant::{MAX_SLICES, QuantConfig, Quantized};
use crate::rng::Xoshiro128PlusPlus;
use crate::variation::VariationConfig;

/// Fractional bits of a device conductance in the programmed state.
pub const FRAC_BITS: u32 = 4;

/// Largest number of tile rows (inputs summed by one tile column) the engine accepts.
pub const MAX_TILE_ROWS: usize = 256;

/// Largest fan-in of a layer the engine accepts.
pub const MAX_FAN_IN: usize = 65536;

/// Bound on `|accumulator|` of a layer on the ideal paths: `65536 * 255 * 32767 < 2^39`.
/// A non-ideal ADC can exceed it; the executor saturates the accumulator to `±ACC_LIMIT` before
/// requantization (which keeps `acc * multiplier` inside `i64`).
pub const ACC_LIMIT: i64 = 1 << 39;

/// The saturation bound of one fixed-point device, `floor(32767 / sum_j 2^(jN))`.
pub fn device_limit(cfg: QuantConfig) -> i32 {
    let n = u32::from(cfg.n_bits());
    let gain: i32 = (0..cfg.slices() as u32).map(|j| 1i32 << (j * n)).sum();
    32767 / gain
}

/// The largest rounded deviation `r` (in `2^-FRAC_BITS` levels) that cannot take any device
/// level `g << FRAC_BITS` (`0 <= g <= 2^N - 1`) outside `±device_limit`: below it, `g ± r`
/// needs no clamp. The tile programmer tests `r` against it once per device.
pub fn unclamped_deviation(cfg: QuantConfig) -> u32 {
    let mask = (1i32 << cfg.n_bits()) - 1;
    (device_limit(cfg) - (mask << FRAC_BITS)) as u32
}

/// The analog-to-digital converter that reads a tile column's per-slice partial sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Adc {
    /// Exact read-out (the collapsed fast path gives the same numbers).
    #[default]
    Ideal,
    /// A symmetric mid-tread ADC: `code = clamp(round_half_away(p / step), -L, L)` with
    /// `L = 2^(bits-1) - 1`, read back as `code * step`. Its full-scale range is `±L * step`
    /// (in units of one input LSB times `2^-FRAC_BITS` level).
    Quantized {
        /// Resolution in bits, 2..=16.
        bits: u8,
        /// The value of one code, at least 1.
        step: u32,
    },
}

impl Adc {
    /// A `bits`-bit ADC whose largest code reads `full_scale` (rounded up to a multiple of the
    /// code count). Fails unless `2 <= bits <= 16` and `1 <= full_scale < 2^31`.
    pub fn with_full_scale(bits: u8, full_scale: u32) -> Result<Adc> {
        if !(2..=16).contains(&bits) {
            return Err(Error::InvalidField {
                field: "adc.bits",
                value: i64::from(bits),
            });
        }
        let levels = (1u32 << (bits - 1)) - 1;
        if full_scale == 0 || full_scale >= 1 << 31 {
            return Err(Error::InvalidField {
                field: "adc.full_scale",
                value: i64::from(full_scale),
            });
        }
        Ok(Adc::Quantized {
            bits,
            step: full_scale.div_ceil(levels),
        })
    }

    /// Checks the fields of an [`Adc::Quantized`] built by hand.
    pub fn validate(self) -> Result<Adc> {
        if let Adc::Quantized { bits, step } = self {
            if !(2..=16).contains(&bits) {
                return Err(Error::InvalidField {
                    field: "adc.bits",
                    value: i64::from(bits),
                });
            }
            let levels = (1u64 << (bits - 1)) - 1;
            if step == 0 || levels * u64::from(step) >= 1 << 31 {
                return Err(Error::InvalidField {
                    field: "adc.step",
                    value: i64::from(step),
                });
            }
        }
        Ok(self)
    }

    /// Converts one partial sum. Exact for [`Adc::Ideal`]; otherwise `|result| < 2^31`.
    #[inline]
    pub fn convert(self, p: i64) -> i64 {
        match self {
            Adc::Ideal => p,
            Adc::Quantized { bits, step } => {
                let step = i64::from(step);
                let levels = (1i64 << (bits - 1)) - 1;
                let code = ((2 * p.abs() + step) / (2 * step)).min(levels);
                if p < 0 { -code * step } else { code * step }
            }
        }
    }
}

/// Which programmed state a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Path {
    /// One effective `i16` per weight; ideal ADC only.
    #[default]
    Collapsed,
    /// `M/N` `i16` devices per weight, read per slice through the ADC.
    Sliced(Adc),
}

impl Path {
    /// `i16` elements of programmed state per weight.
    pub const fn state_per_weight(self, cfg: QuantConfig) -> usize {
        match self {
            Path::Collapsed => 1,
            Path::Sliced(_) => cfg.slices(),
        }
    }
}

/// Programs one layer of `outputs x fan_in` quantized weights (canonical order) into `state`,
/// drawing one [`VariationConfig::sample`] per weight, in order, from `rng` (the layer's
/// `stream(seed, run, layer)`). `state` must hold `weights.len() * path.state_per_weight()`.
pub fn program_layer(
    var: &VariationConfig,
    weights: impl Iterator<Item = Quantized>,
    fan_in: usize,
    path: Path,
    rng: &mut Xoshiro128PlusPlus,
    state: &mut [i16],
) -> Result<()> {
    let cfg = var.quant();
    let slices = cfg.slices();
    let n = u32::from(cfg.n_bits());
    let lim = device_limit(cfg);
    let per = path.state_per_weight(cfg);
    let mut count = 0usize;
    // Without faults, the collapsed path samples each device straight into the weight: the same
    // draws, the same `f32` values and the same clamping as `device_state`, without building a
    // `Readout` (the tile-programming hot path on the Cortex-M). The usual quantizations get
    // their own copy of the loop, with the slicing shifts and masks as constants.
    if path == Path::Collapsed && !var.faults().any() {
        let mut local = rng.clone();
        let (filled, more) = match (slices, n) {
            (4, 2) => program_collapsed_for::<4, 2>(var, weights, &mut local, state),
            (8, 1) => program_collapsed_for::<8, 1>(var, weights, &mut local, state),
            (2, 4) => program_collapsed_for::<2, 4>(var, weights, &mut local, state),
            _ => program_collapsed_any(var, weights, &mut local, state),
        };
        if filled < state.len() {
            return Err(Error::LengthMismatch {
                expected: filled,
                found: state.len(),
            });
        }
        *rng = local;
        if more {
            return Err(Error::BufferTooSmall {
                what: "tile state",
                needed: filled + 1,
                found: filled,
            });
        }
        return Ok(());
    }
    for (i, q) in weights.enumerate() {
        let devices = device_state(var, q, rng, lim);
        let sign = if q.negative { -1 } else { 1 };
        match path {
            Path::Collapsed => {
                let w: i32 = devices
                    .iter()
                    .take(slices)
                    .enumerate()
                    .map(|(j, &d)| d << (j as u32 * n))
                    .sum();
                let slot = state.get_mut(i).ok_or(Error::BufferTooSmall {
                    what: "tile state",
                    needed: i + 1,
                    found: i,
                })?;
                // |w| <= lim * sum_j 2^(jN) <= 32767 by the choice of `lim`.
                *slot = (sign * w) as i16;
            }
            Path::Sliced(_) => {
                let (o, k) = (i / fan_in.max(1), i % fan_in.max(1));
                for (j, &d) in devices.iter().take(slices).enumerate() {
                    let idx = (o * slices + j) * fan_in + k;
                    let slot = state.get_mut(idx).ok_or(Error::BufferTooSmall {
                        what: "tile state",
                        needed: idx + 1,
                        found: idx,
                    })?;
                    *slot = (sign * d) as i16;
                }
            }
        }
        count = i + 1;
    }
    if count * per != state.len() {
        return Err(Error::LengthMismatch {
            expected: count * per,
            found: state.len(),
        });
    }
    Ok(())
}

/// The collapsed weights of a layer without faults, in order, until `state` is full or the
/// weights run out; returns how many were written and whether weights were left over. Weight `i` is
/// `±sum_j 2^(jN) clamp((g_j << F) + round_fixed(sd z_j 2^F), ±lim)`, bit for bit
/// `device_state` summed: the same draws, the same `f32` value of each device (`z * (sd 2^F)`,
/// see [`VariationConfig::device_sigma_fixed`]), the same rounding, saturation and clamp.
///
/// Per weight: its band's scale and the sign; per device: one
/// [`Xoshiro128PlusPlus::next_normal_split`], one multiply, the rounding, and a few integer
/// operations (the clamp is a range test whose rare failure takes a cold call). Inlined with
/// constant `slices` and `n`, the device loop unrolls into shifts by constants.
///
/// **Why the sign may be split off.** With `v = z * sd` (`sd >= 0`), `|v|` is `|z| * sd` bit for
/// bit (round to nearest is symmetric), and for `v < 0`, `v - 0.5 == -(|v| + 0.5)` exactly, so
/// `round_fixed(v) == -round_fixed(|v|)`; for `v == -0.0` both are 0. The one difference is
/// saturation (`|v| >= 2^31`, sigma beyond about 10^7): `i32::MIN` against `-i32::MAX`, and
/// either device is then far below `-lim` and clamps to it. The integer adds wrap as the
/// release build of `device_state` does, so the clamp sees the same values.
#[inline(always)]
fn program_collapsed(
    var: &VariationConfig,
    weights: impl Iterator<Item = Quantized>,
    rng: &mut Xoshiro128PlusPlus,
    state: &mut [i16],
    slices: usize,
    n: u32,
) -> (usize, bool) {
    // Everything below derives from `slices` and `n` (constants in the specialised copies).
    let mask = (1i32 << n) - 1;
    let gain: i32 = (0..slices as u32).map(|j| 1i32 << (j * n)).sum();
    let lim = 32767 / gain; // `device_limit`
    let safe = (lim - (mask << FRAC_BITS)) as u32; // `unclamped_deviation`
    let max = (1u32 << (slices as u32 * n)) - 1;
    // `Profile::in_band` without its `multiplier().is_some()`: under `Profile::Uniform` both
    // entries of `sd_fixed` are the same, so the band test only matters where it applies.
    let sd_fixed = var.device_sigma_fixed(FRAC_BITS);
    // A local copy that never has its address taken: its four words stay in registers.
    let mut draws = rng.clone();
    let mut filled = 0;
    let mut weights = weights;
    for slot in state.iter_mut() {
        let Some(q) = weights.next() else { break };
        let q4 = 4 * u32::from(q.magnitude);
        let sd = sd_fixed[usize::from(q4 > max && q4 < 3 * max)];
        let mag = i32::from(q.magnitude);
        let mut w = 0i32;
        for j in 0..slices as u32 {
            let g = (mag >> (j * n)) & mask;
            // `round_fixed(z * sd)` as `±round_fixed(|z| * sd)` (see above), applied to `g`.
            let (z, negative) = draws.next_normal_split();
            let r = round_fixed_nonneg(z * sd);
            let g = g << FRAC_BITS;
            // `0 <= g <= top`, so `r <= safe` keeps `g ± r` inside `±lim`: one unsigned compare
            // (`r` is never negative) instead of the clamp's two.
            let d = if r as u32 > safe {
                clamp_device(g, r, negative, lim)
            } else {
                // `±r` as `(r ^ s) - s` with the sign mask `s`: no compare-and-branch.
                let s = -i32::from(negative);
                g + ((r ^ s) - s)
            };
            w += d << (j * n);
        }
        // |w| <= lim * sum_j 2^(jN) <= 32767 by the choice of `lim`.
        *slot = (if q.negative { -w } else { w }) as i16;
        filled += 1;
    }
    *rng = draws;
    (filled, weights.next().is_some())
}

/// `round_fixed(v)` for `v >= 0` (or `-0.0`): `trunc(v + 0.5)`, saturating.
#[inline(always)]
fn round_fixed_nonneg(v: f32) -> i32 {
    (v + 0.5) as i32
}

/// [`program_collapsed`] for `S` slices of `N` bits, compiled on its own: the loop gets the
/// whole register file (the generator's four words, the tables, the constants).
#[inline(never)]
fn program_collapsed_for<const S: usize, const N: u32>(
    var: &VariationConfig,
    weights: impl Iterator<Item = Quantized>,
    rng: &mut Xoshiro128PlusPlus,
    state: &mut [i16],
) -> (usize, bool) {
    program_collapsed(var, weights, rng, state, S, N)
}

/// [`program_collapsed`] for any other quantization.
#[inline(never)]
fn program_collapsed_any(
    var: &VariationConfig,
    weights: impl Iterator<Item = Quantized>,
    rng: &mut Xoshiro128PlusPlus,
    state: &mut [i16],
) -> (usize, bool) {
    let cfg = var.quant();
    program_collapsed(
        var,
        weights,
        rng,
        state,
        cfg.slices(),
        u32::from(cfg.n_bits()),
    )
}

/// A device `g ± r` whose deviation `r` may take it outside `±lim` (rare: about 21 levels, 8
/// standard deviations at sigma 1), clamped, out of the programming loop. The adds wrap as the
/// release build of `device_state` does.
#[cold]
#[inline(never)]
fn clamp_device(g: i32, r: i32, negative: bool, lim: i32) -> i32 {
    let d = if negative {
        g.wrapping_sub(r)
    } else {
        g.wrapping_add(r)
    };
    d.clamp(-lim, lim)
}

/// The fixed-point devices of one weight, saturated to `±lim`.
#[inline]
fn device_state(
    var: &VariationConfig,
    q: Quantized,
    rng: &mut impl RngCore,
    lim: i32,
) -> [i32; MAX_SLICES] {
    let mut d = var.sample(q, rng).devices_fixed(var.quant(), FRAC_BITS);
    for x in d.iter_mut() {
        *x = (*x).clamp(-lim, lim);
    }
    d
}

/// The inner product the executor runs on one tile column: `sum w_i x_i` over the common
/// prefix, `i32` with wrapping adds (callers keep it below `2^31`, see the module docs).
///
/// This is the engine's one hook for target-specific kernels: `shared` forbids `unsafe`, so a
/// firmware implements it with its DSP instructions (the Cortex-M4's `SMLAD`) and runs
/// [`crate::exec::infer_with`]; an implementation must return the same bits as [`Plain`] for
/// every input, including the wrapping.
pub trait DotKernel {
    /// `sum w[i] * x[i]` over `i < min(w.len(), x.len())`, wrapping in `i32`.
    fn dot_i16(w: &[i16], x: &[i16]) -> i32;

    /// A whole collapsed weight row: the tile sums of `rows` inputs ([`Self::dot_i16`]) added
    /// in `i64`. Under the engine's bound (`|w| <= 32767`, `-128 <= x <= 255`, `rows <= 256`)
    /// no tile sum wraps, so this is the exact `sum w_i x_i`, and an implementation may
    /// compute it in any grouping (e.g. one pass over the row with a wide accumulator), as
    /// long as it returns that exact sum for every input within the bound.
    #[inline]
    fn dot_row(w: &[i16], x: &[i16], rows: usize) -> i64 {
        let rows = rows.clamp(1, MAX_TILE_ROWS);
        let mut acc = 0i64;
        for (wc, xc) in w.chunks(rows).zip(x.chunks(rows)) {
            acc += i64::from(Self::dot_i16(wc, xc));
        }
        acc
    }

    /// Two collapsed rows against the same inputs: `[dot_row(w[0], x, rows), dot_row(w[1], x,
    /// rows)]`, the same bits. The executor calls it for pairs of output channels so that a
    /// kernel can load each input word once for both rows and pay its set-up once per pair.
    #[inline]
    fn dot_rows2(w: [&[i16]; 2], x: &[i16], rows: usize) -> [i64; 2] {
        [Self::dot_row(w[0], x, rows), Self::dot_row(w[1], x, rows)]
    }
}

/// The tile programmer's hook for target-specific code, as [`DotKernel`] is the inner
/// product's: [`crate::exec::program_with`] programs every layer through it. The provided
/// method is [`program_layer`] on the decoded records; a firmware overrides it with a loop
/// written for its core (the Cortex-M4's is in assembly) and must write the same state and
/// leave `rng` in the same state as [`program_layer`] for every input, errors included.
pub trait Programmer {
    /// [`program_layer`] on a layer's weight records as the packed model stores them
    /// ([`crate::format::Model::layer_weight_bytes`]: little-endian `u16`, bit 15 the sign,
    /// bits 0-14 the magnitude; a trailing odd byte is ignored).
    #[inline]
    fn program_records(
        var: &VariationConfig,
        records: &[u8],
        fan_in: usize,
        path: Path,
        rng: &mut Xoshiro128PlusPlus,
        state: &mut [i16],
    ) -> Result<()> {
        program_layer(var, decode_records(records), fan_in, path, rng, state)
    }
}

/// Weight records (little-endian `u16`: bit 15 the sign, bits 0-14 the magnitude) as
/// [`Quantized`] weights; a trailing odd byte is ignored.
pub fn decode_records(records: &[u8]) -> impl Iterator<Item = Quantized> + '_ {
    records.chunks_exact(2).map(|c| {
        let v = u16::from_le_bytes([c[0], c[1]]);
        Quantized {
            negative: v & 0x8000 != 0,
            magnitude: v & 0x7FFF,
        }
    })
}

impl Programmer for Plain {}

/// The portable reference kernel, a plain reduction that LLVM vectorizes (`pmaddwd` on x86).
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl DotKernel for Plain {
    #[inline]
    fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
        dot_i16(w, x)
    }
}

/// Dot product of one collapsed weight row with the inputs, summed per tile of `rows` inputs.
///
/// **Bound:** with `|x| <= 255`, `|w| <= 32767` and `rows <= 256`, one tile's sum is below
/// `2^31` (`i32`, wrapping adds that never wrap); tiles add in `i64`, below `2^39` for
/// `len <= 65536`. Lengths: `w.len() == x.len()`; extra elements of the longer are ignored.
#[inline]
pub fn dot_collapsed(w: &[i16], x: &[i16], rows: usize) -> i64 {
    dot_collapsed_with::<Plain>(w, x, rows)
}

/// [`dot_collapsed`] with the tile-column kernel `K`.
#[inline]
pub fn dot_collapsed_with<K: DotKernel>(w: &[i16], x: &[i16], rows: usize) -> i64 {
    K::dot_row(w, x, rows)
}

/// One tile column: `sum w_i x_i` in `i32` with wrapping adds (callers keep it below `2^31`).
#[inline]
pub fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
    // A plain reduction: LLVM turns it into `pmaddwd` on x86 (and `SMLAD` on the M4 with DSP).
    w.iter().zip(x).fold(0i32, |s, (&a, &b)| {
        s.wrapping_add(i32::from(a) * i32::from(b))
    })
}

/// Dot product of one output's sliced devices (`[slice][fan_in]`, `slices * x.len()` values)
/// with the inputs: per tile of `rows` inputs and per slice, the column sum goes through `adc`,
/// is shifted by `2^(jN)` and added.
///
/// **Bound:** a slice column sum is at most `255 * 32767 * 256 < 2^31` (devices are below
/// `32767 / sum_j 2^(jN)`), `i32`; ADC outputs are below `2^31`, shifted by at most `2^7`, over at
/// most 8 slices and 65536 tiles: below `2^57`, `i64`.
#[inline]
pub fn dot_sliced(dev: &[i16], x: &[i16], slices: usize, n_bits: u8, rows: usize, adc: Adc) -> i64 {
    dot_sliced_with::<Plain>(dev, x, slices, n_bits, rows, adc)
}

/// [`dot_sliced`] with the tile-column kernel `K`.
#[inline]
pub fn dot_sliced_with<K: DotKernel>(
    dev: &[i16],
    x: &[i16],
    slices: usize,
    n_bits: u8,
    rows: usize,
    adc: Adc,
) -> i64 {
    let k = x.len();
    let rows = rows.clamp(1, MAX_TILE_ROWS);
    let mut acc = 0i64;
    for j in 0..slices {
        let row = dev.get(j * k..(j + 1) * k).unwrap_or(&[]);
        let shift = j as u32 * u32::from(n_bits);
        for (wc, xc) in row.chunks(rows).zip(x.chunks(rows)) {
            acc += adc.convert(i64::from(K::dot_i16(wc, xc))) << shift;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::stream;
    use crate::variation::{Faults, Profile, SigmaUnit};
    use proptest::prelude::*;

    fn naive(w: &[i16], x: &[i16]) -> i64 {
        w.iter()
            .zip(x)
            .map(|(&a, &b)| i64::from(a) * i64::from(b))
            .sum()
    }

    #[test]
    fn collapsed_fast_path_equals_the_readout_path() {
        // Large sigmas make the per-device clamp bite; profiles change sd per magnitude.
        for (sigma, profile) in [
            (0.0, Profile::Uniform),
            (0.4, Profile::Fefet6),
            (4.0, Profile::Uniform),
            (12.0, Profile::Rram4),
        ] {
            let var = VariationConfig::new(
                QuantConfig::DEFAULT,
                sigma,
                SigmaUnit::Range,
                profile,
                Faults::NONE,
            )
            .unwrap();
            let lim = device_limit(var.quant());
            let qs: Vec<Quantized> = (0..2048u32)
                .map(|i| Quantized {
                    negative: i % 3 == 0,
                    magnitude: (i * 37 % 256) as u16,
                })
                .collect();
            let mut got = vec![0i16; qs.len()];
            program_layer(
                &var,
                qs.iter().copied(),
                64,
                Path::Collapsed,
                &mut stream(9, 2, 1),
                &mut got,
            )
            .unwrap();
            let mut rng = stream(9, 2, 1);
            let mut clamped = 0;
            for (q, &g) in qs.iter().zip(&got) {
                let d = device_state(&var, *q, &mut rng, lim);
                clamped += d.iter().filter(|v| v.abs() == lim).count();
                let w: i32 = d[..4].iter().enumerate().map(|(j, v)| v << (2 * j)).sum();
                assert_eq!(
                    i32::from(g),
                    if q.negative { -w } else { w },
                    "{sigma} {q:?}"
                );
            }
            assert_eq!(
                clamped > 0,
                sigma >= 4.0,
                "sigma {sigma}: {clamped} clamped"
            );
        }
    }

    /// Every specialised copy of the collapsed loop (and the runtime one) against the
    /// `Readout` path, at sigmas from subnormal products to saturating roundings.
    #[test]
    fn collapsed_loops_equal_the_readout_path_for_every_quantization() {
        let mut sigmas = vec![0.0, 1e-40, 0.05, 0.7, 3.0, 30.0];
        if !cfg!(debug_assertions) {
            // `device_state`'s `(g << F) + round` overflows here, which only release wraps.
            sigmas.push(1e9);
        }
        for (m, nb) in [
            (8, 2),
            (8, 1),
            (8, 4),
            (4, 2),
            (6, 2),
            (2, 1),
            (4, 4),
            (6, 1),
        ] {
            let quant = QuantConfig::new(m, nb).unwrap();
            let lim = device_limit(quant);
            let slices = quant.slices();
            let top = u32::from(quant.max_magnitude()) + 1;
            let qs: Vec<Quantized> = (0..3000u32)
                .map(|i| Quantized {
                    negative: i % 5 < 2,
                    magnitude: (i * 97 % top) as u16,
                })
                .collect();
            for &sigma in &sigmas {
                for profile in [Profile::Uniform, Profile::Fefet6] {
                    let var =
                        VariationConfig::new(quant, sigma, SigmaUnit::Range, profile, Faults::NONE)
                            .unwrap();
                    let mut got = vec![0i16; qs.len()];
                    let mut rng = stream(4, 1, 3);
                    program_layer(
                        &var,
                        qs.iter().copied(),
                        50,
                        Path::Collapsed,
                        &mut rng,
                        &mut got,
                    )
                    .unwrap();
                    let mut want_rng = stream(4, 1, 3);
                    for (i, (q, &g)) in qs.iter().zip(&got).enumerate() {
                        let d = device_state(&var, *q, &mut want_rng, lim);
                        let w: i32 = d[..slices]
                            .iter()
                            .enumerate()
                            .map(|(j, v)| v << (j as u32 * u32::from(nb)))
                            .sum();
                        let w = if q.negative { -w } else { w };
                        assert_eq!(
                            i32::from(g),
                            w,
                            "M {m} N {nb} sigma {sigma} {profile:?} weight {i}"
                        );
                    }
                    assert_eq!(rng, want_rng, "the generator is written back");
                }
            }
        }
    }

    #[test]
    fn device_limits() {
        assert_eq!(device_limit(QuantConfig::DEFAULT), 385);
        // 385 - (3 << 4): any level 0..=3 plus or minus 337 sixteenths stays inside ±385.
        assert_eq!(unclamped_deviation(QuantConfig::DEFAULT), 337);
        assert_eq!(device_limit(QuantConfig::new(8, 1).unwrap()), 128);
        assert_eq!(device_limit(QuantConfig::new(8, 4).unwrap()), 1927);
        // The noiseless top magnitude fits: 255 << 4 = 4080.
        for (m, n) in [(8, 1), (8, 2), (8, 4), (4, 2), (2, 1), (6, 2)] {
            let c = QuantConfig::new(m, n).unwrap();
            assert!(device_limit(c) >= i32::from(c.max_level()) << FRAC_BITS);
        }
    }

    #[test]
    fn all_max_inputs_and_weights_do_not_overflow() {
        let w = vec![i16::MAX; MAX_TILE_ROWS * 4];
        let x = vec![255i16; MAX_TILE_ROWS * 4];
        assert_eq!(dot_collapsed(&w, &x, MAX_TILE_ROWS), naive(&w, &x));
        assert!(i64::from(i16::MAX) * 255 * MAX_TILE_ROWS as i64 <= i64::from(i32::MAX));
        let wn = vec![i16::MIN + 1; MAX_TILE_ROWS];
        assert_eq!(
            dot_collapsed(&wn, &x[..MAX_TILE_ROWS], MAX_TILE_ROWS),
            naive(&wn, &x)
        );
        // The whole-layer bound.
        let big = MAX_FAN_IN as i64 * 255 * i64::from(i16::MAX);
        assert!(big < ACC_LIMIT);
        let w = vec![i16::MAX; MAX_FAN_IN];
        let x = vec![255i16; MAX_FAN_IN];
        assert_eq!(dot_collapsed(&w, &x, MAX_TILE_ROWS), big);
        let lim = device_limit(QuantConfig::DEFAULT) as i16;
        let dev = vec![lim; 4 * MAX_TILE_ROWS];
        let got = dot_sliced(&dev, &x[..MAX_TILE_ROWS], 4, 2, MAX_TILE_ROWS, Adc::Ideal);
        assert_eq!(got, 85 * i64::from(lim) * 255 * MAX_TILE_ROWS as i64);
    }

    #[test]
    fn adc_rounds_half_away_and_clips() {
        let adc = Adc::Quantized { bits: 4, step: 10 };
        let cases = [
            (0, 0),
            (4, 0),
            (5, 10),
            (14, 10),
            (15, 20),
            (-5, -10),
            (-4, 0),
            (69, 70),
            (75, 70),
            (1000, 70),
            (-1000, -70),
        ];
        for (p, want) in cases {
            assert_eq!(adc.convert(p), want, "{p}");
        }
        assert_eq!(Adc::with_full_scale(4, 70).unwrap(), adc);
        assert!(Adc::with_full_scale(1, 70).is_err());
        assert!(
            Adc::Quantized {
                bits: 16,
                step: 1 << 16
            }
            .validate()
            .is_ok()
        );
        assert!(
            Adc::Quantized {
                bits: 16,
                step: 1 << 17
            }
            .validate()
            .is_err()
        );
        assert!(Adc::Quantized { bits: 8, step: 0 }.validate().is_err());
    }

    fn program(
        var: &VariationConfig,
        q: &[Quantized],
        k: usize,
        path: Path,
        seed: u64,
    ) -> Vec<i16> {
        let mut st = vec![0i16; q.len() * path.state_per_weight(var.quant())];
        program_layer(
            var,
            q.iter().copied(),
            k,
            path,
            &mut stream(seed, 0, 0),
            &mut st,
        )
        .unwrap();
        st
    }

    #[test]
    fn four_bit_adc_hand_computed() {
        // M = 4, N = 2, sigma = 0: devices are exact levels (x16 in fixed point).
        let var = VariationConfig::new(
            QuantConfig::new(4, 2).unwrap(),
            0.0,
            SigmaUnit::Range,
            Profile::Uniform,
            Faults::NONE,
        )
        .unwrap();
        // One output, fan-in 2, tile rows 2. Magnitudes 6 = (2, 1) and 13 = (1, 3), both positive.
        let q = [
            Quantized {
                negative: false,
                magnitude: 6,
            },
            Quantized {
                negative: false,
                magnitude: 13,
            },
        ];
        let x = [3i16, 1];
        let st = program(&var, &q, 2, Path::Sliced(Adc::Ideal), 1);
        assert_eq!(st, [32, 16, 16, 48]); // [slice 0: 2, 1][slice 1: 1, 3] levels * 16
        // Slice 0: 3*32 + 1*16 = 112; slice 1: 3*16 + 1*48 = 96. Ideal: 112 + 4*96 = 496 = 16*31.
        assert_eq!(dot_sliced(&st, &x, 2, 2, 2, Adc::Ideal), 496);
        // 4-bit ADC, step 20 (full scale 140): 112 -> code 6 (5.6) -> 120; 96 -> 5 (4.8) -> 100.
        // Total: 120 + 4 * 100 = 520.
        let adc = Adc::Quantized { bits: 4, step: 20 };
        assert_eq!(dot_sliced(&st, &x, 2, 2, 2, adc), 520);
        // Step 10 (full scale 70): both clip at 7 -> 70: 70 + 4*70 = 350.
        assert_eq!(
            dot_sliced(&st, &x, 2, 2, 2, Adc::Quantized { bits: 4, step: 10 }),
            350
        );
        // Tiles of one row: slice 0 sums 96, 16 and slice 1 sums 48, 48 separately.
        // step 20: 96->100, 16->20, 48->40, 48->40: 120 + 4*80 = 440.
        assert_eq!(dot_sliced(&st, &x, 2, 2, 1, adc), 440);
    }

    proptest! {
        #[test]
        fn collapsed_matches_naive(
            w in proptest::collection::vec(any::<i16>(), 0..700),
            seed in any::<u64>(),
            rows in 1usize..=256,
        ) {
            let x: Vec<i16> = (0..w.len()).map(|i| ((crate::rng::mix64(seed ^ i as u64) % 511) as i16) - 255).collect();
            let w: Vec<i16> = w.iter().map(|&v| v.max(-i16::MAX)).collect();
            prop_assert_eq!(dot_collapsed(&w, &x, rows), naive(&w, &x));
        }

        #[test]
        fn ideal_sliced_equals_collapsed(
            mags in proptest::collection::vec((any::<bool>(), 0u16..=255), 1..300),
            sigma in 0.0f32..1.5,
            seed in any::<u64>(),
            rows in 1usize..=64,
        ) {
            let var = VariationConfig::paper(sigma).unwrap();
            let q: Vec<Quantized> = mags.iter().map(|&(negative, magnitude)| Quantized { negative, magnitude }).collect();
            let k = q.len();
            let c = program(&var, &q, k, Path::Collapsed, seed);
            let s = program(&var, &q, k, Path::Sliced(Adc::Ideal), seed);
            let x: Vec<i16> = (0..k).map(|i| (crate::rng::mix64(seed ^ i as u64) % 256) as i16).collect();
            prop_assert_eq!(dot_collapsed(&c, &x, rows), dot_sliced(&s, &x, 4, 2, rows, Adc::Ideal));
            for i in 0..k {
                let collapsed: i32 = (0..4).map(|j| i32::from(s[j * k + i]) << (2 * j)).sum();
                prop_assert_eq!(i32::from(c[i]), collapsed);
            }
        }
    }

    #[test]
    fn state_matches_the_readout_within_rounding() {
        let var = VariationConfig::paper(0.3).unwrap();
        let q: Vec<Quantized> = (0..200)
            .map(|i| Quantized {
                negative: i % 3 == 0,
                magnitude: (i * 37 % 256) as u16,
            })
            .collect();
        let st = program(&var, &q, 200, Path::Collapsed, 5);
        let mut rng = stream(5, 0, 0);
        for (i, &qi) in q.iter().enumerate() {
            let r = var.sample(qi, &mut rng).read_weight(255.0, var.quant());
            let fixed = f32::from(st[i]) / 16.0;
            // 85 devices-weights of half a step each: at most 85 / 32 magnitude LSB.
            assert!(
                (fixed - r).abs() <= 85.0 / 32.0 + 1e-3,
                "{i}: {fixed} vs {r}"
            );
        }
        let mut short = vec![0i16; 10];
        assert!(
            program_layer(
                &var,
                q.iter().copied(),
                200,
                Path::Collapsed,
                &mut stream(5, 0, 0),
                &mut short
            )
            .is_err()
        );
    }
}
