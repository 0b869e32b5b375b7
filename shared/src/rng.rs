//! Seeded randomness: the xoshiro128++ generator, keyed streams and a ziggurat Gaussian.
//!
//! Every random number nvcim draws comes from a [`Xoshiro128PlusPlus`] created by
//! [`stream`]`(seed, run, layer)`. A stream's state is derived from its key alone (SplitMix64
//! over the three numbers), so Monte Carlo runs and layers can be sampled in any order, on any
//! number of threads, on the host or on the Cortex-M, and give the same numbers.
//!
//! xoshiro128++ (Blackman & Vigna, 2019) is used because it needs only 32-bit operations, which
//! the Cortex-M4 executes in one cycle each, and passes BigCrush. The Gaussian sampler is the
//! ziggurat of Marsaglia & Tsang (2000) in Doornik's (2005) formulation, with 128 strips; its
//! fast path (98.8% of draws) costs one 32-bit draw, a table look-up, a compare and a multiply.
//! Strip index, sign and magnitude come from disjoint bits of the draw (bits 0-6, 7 and 9-31),
//! which avoids the correlation of the original RNOR.
//!
//! ```
//! use nvcim_shared::rng::{stream, standard_normal};
//! use rand_core::RngCore;
//! let mut a = stream(42, 0, 0);
//! // Pinned: these values must never change, or every published result moves.
//! assert_eq!([a.next_u32(), a.next_u32()], [0x4512_599d, 0xfcbe_198f]);
//! let mut b = stream(42, 0, 0);
//! let z = standard_normal(&mut b);
//! assert_eq!(z.to_bits(), 0xbf0f_d6b8);
//! ```

use rand_core::{RngCore, SeedableRng, impls};

include!(concat!(env!("OUT_DIR"), "/ziggurat.rs"));

/// The xoshiro128++ generator: 128 bits of state, 32-bit outputs, period 2^128 - 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xoshiro128PlusPlus {
    s: [u32; 4],
}

impl Xoshiro128PlusPlus {
    /// A generator from a 64-bit seed, expanded by SplitMix64 (never the all-zero state).
    pub fn from_u64(seed: u64) -> Self {
        let mut sm = SplitMix64(seed);
        let a = sm.next();
        let b = sm.next();
        let mut s = [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32];
        if s == [0; 4] {
            s[0] = 1;
        }
        Xoshiro128PlusPlus { s }
    }

    /// The raw state, for checkpoints.
    pub fn state(&self) -> [u32; 4] {
        self.s
    }

    /// Restores a state saved by [`Self::state`]; `None` for the invalid all-zero state.
    pub fn from_state(s: [u32; 4]) -> Option<Self> {
        (s != [0; 4]).then_some(Xoshiro128PlusPlus { s })
    }

    /// The next 32 bits.
    #[inline(always)]
    #[allow(clippy::should_implement_trait)] // an infinite generator, not an Iterator
    pub fn next(&mut self) -> u32 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(7).wrapping_add(s[0]);
        let t = s[1] << 9;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(11);
        result
    }
}

impl RngCore for Xoshiro128PlusPlus {
    #[inline(always)]
    fn next_u32(&mut self) -> u32 {
        self.next()
    }

    fn next_u64(&mut self) -> u64 {
        impls::next_u64_via_u32(self)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        impls::fill_bytes_via_next(self, dst)
    }
}

impl SeedableRng for Xoshiro128PlusPlus {
    type Seed = [u8; 16];

    fn from_seed(seed: [u8; 16]) -> Self {
        let mut s = [0u32; 4];
        for (w, c) in s.iter_mut().zip(seed.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Self::from_state(s).unwrap_or_else(|| Self::from_u64(0))
    }

    fn seed_from_u64(state: u64) -> Self {
        Self::from_u64(state)
    }
}

/// SplitMix64 (Steele, Lea & Flood, 2014), used only to derive stream states.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 bits.
    #[allow(clippy::should_implement_trait)] // an infinite generator, not an Iterator
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

/// SplitMix64's finalizer: a bijection on u64 with full avalanche.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a stream is used for, so that unrelated uses of one (seed, run) never share numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Purpose {
    /// Device variation of a layer's weights (Monte Carlo evaluation, firmware, training noise).
    Variation = 0,
    /// Anything on the host side that is not device variation (shuffles, splits, init).
    Host = 1,
    /// The noisy validation of training (model selection): its own draws, never those of a
    /// Monte Carlo evaluation run with the same seed.
    Validation = 2,
}

/// The stream for device variation of `layer` in Monte Carlo run `run` under `seed`.
///
/// Independent of the order in which streams are created or drawn.
pub fn stream(seed: u64, run: u32, layer: u32) -> Xoshiro128PlusPlus {
    stream_for(Purpose::Variation, seed, run, layer)
}

/// A stream keyed by purpose, seed, run and layer.
pub fn stream_for(purpose: Purpose, seed: u64, run: u32, layer: u32) -> Xoshiro128PlusPlus {
    let key = mix64(seed ^ 0x6e76_6369_6d00_0000) // "nvcim"
        ^ mix64((u64::from(run) << 32 | u64::from(layer)) ^ 0x5851_f42d_4c95_7f2d);
    Xoshiro128PlusPlus::from_u64(mix64(key ^ (purpose as u64) << 56))
}

/// A uniform `f32` in (0, 1]: 24 random bits, never 0 (safe under `ln`).
#[inline]
pub fn uniform_open01(rng: &mut impl RngCore) -> f32 {
    ((rng.next_u32() >> 8) + 1) as f32 * (1.0 / 16_777_216.0)
}

/// One standard normal sample (ziggurat).
///
/// Fast path: bits 0-7 of one draw index the signed tables, bits 9-31 are the magnitude `m`,
/// and `(r >> 8) | 1 == 2m + 1` is exact in `f32` (24 bits).
#[inline(always)]
pub fn standard_normal(rng: &mut impl RngCore) -> f32 {
    let r = rng.next_u32();
    match ziggurat_fast(r) {
        Some(z) => z,
        None => normal_slow(rng, r),
    }
}

impl Xoshiro128PlusPlus {
    /// One [`standard_normal`] sample from this generator: the same draws, the same value.
    ///
    /// For hot loops that own their generator (tile programming): the slow path (1.2% of
    /// draws) receives the state by value and hands it back, so a caller's local generator
    /// never has its address taken and its four words can stay in registers across the loop.
    ///
    /// ```
    /// use nvcim_shared::rng::{stream, standard_normal};
    /// let (mut a, mut b) = (stream(3, 1, 4), stream(3, 1, 4));
    /// for _ in 0..1000 {
    ///     assert_eq!(a.next_normal().to_bits(), standard_normal(&mut b).to_bits());
    /// }
    /// assert_eq!(a, b);
    /// ```
    #[inline(always)]
    pub fn next_normal(&mut self) -> f32 {
        let r = self.next();
        match ziggurat_fast(r) {
            Some(z) => z,
            None => {
                let (z, next) = normal_slow_owned(self.clone(), r);
                *self = next;
                z
            }
        }
    }
}

impl Xoshiro128PlusPlus {
    /// [`Self::next_normal`] as its magnitude and sign, `(|z|, z < 0)`: the same draws, and
    /// `|z|` has the bits of `z` without its sign bit.
    ///
    /// On the fast path the sign is bit 7 of the draw (the signed tables mirror each other), so
    /// a caller that applies the sign in integer arithmetic (the tile programmer) spends no
    /// float compare on it.
    ///
    /// ```
    /// use nvcim_shared::rng::stream;
    /// let (mut a, mut b) = (stream(5, 0, 2), stream(5, 0, 2));
    /// for _ in 0..1000 {
    ///     let (m, negative) = a.next_normal_split();
    ///     let z = b.next_normal();
    ///     assert_eq!((m.to_bits(), negative), (z.abs().to_bits(), z < 0.0));
    /// }
    /// ```
    #[inline(always)]
    pub fn next_normal_split(&mut self) -> (f32, bool) {
        let r = self.next();
        // Strips 0..127 (bits 0-6; the table's upper half differs only in W's sign).
        let strip = &ZIG_STRIPS[(r & 0x7f) as usize];
        if (r >> 9) < strip.k {
            return (((r >> 8) | 1) as f32 * strip.w, r & 0x80 != 0);
        }
        let (z, next) = normal_slow_owned(self.clone(), r);
        *self = next;
        let bits = z.to_bits();
        (f32::from_bits(bits & 0x7fff_ffff), bits >> 31 != 0)
    }
}

/// A generator's draws made ahead, a block at a time ([`Xoshiro128PlusPlus::ahead`]): reading
/// them one by one gives the generator's own sequence, and when this is dropped the generator is
/// left exactly where those reads leave it (the draws made ahead and not read are undone).
///
/// The draws are made 512 at a time in a loop of their own, and [`Self::fill_normals`] takes the
/// ziggurat's fast path eight draws at a time. Measured on one core (`cargo xtask bench
/// variation`, 2026-12-06, with the wedge squeeze): 407 M samples/s, a little below
/// [`standard_normal`] one at a time (458 M/s); what it buys is the block structure of
/// `VariationConfig::perturb_f32`, which went from 22 to 92 M weights/s.
///
/// ```
/// use nvcim_shared::rng::{stream, standard_normal};
/// let (mut a, mut b) = (stream(4, 2, 7), stream(4, 2, 7));
/// let mut block = vec![0.0f32; 1003];
/// a.ahead().fill_normals(&mut block);
/// for z in &block {
///     assert_eq!(z.to_bits(), standard_normal(&mut b).to_bits());
/// }
/// assert_eq!(a, b);
/// ```
pub struct DrawsAhead<'a> {
    rng: &'a mut Xoshiro128PlusPlus,
    /// The generator as it was before the current block was drawn.
    start: Xoshiro128PlusPlus,
    buf: [u32; AHEAD],
    pos: usize,
    len: usize,
}

const AHEAD: usize = 512;

impl Xoshiro128PlusPlus {
    /// Draws made ahead from this generator (see [`DrawsAhead`]).
    pub fn ahead(&mut self) -> DrawsAhead<'_> {
        DrawsAhead {
            start: self.clone(),
            rng: self,
            buf: [0; AHEAD],
            pos: 0,
            len: 0,
        }
    }
}

impl DrawsAhead<'_> {
    #[cold]
    #[inline(never)]
    fn refill(&mut self) {
        self.start = self.rng.clone();
        let mut s = self.rng.clone();
        for x in &mut self.buf {
            *x = s.next();
        }
        *self.rng = s;
        self.pos = 0;
        self.len = AHEAD;
    }

    /// Fills `out` with the next `out.len()` [`standard_normal`] samples of the generator.
    pub fn fill_normals(&mut self, out: &mut [f32]) {
        let mut i = 0;
        while i < out.len() {
            if self.pos == self.len {
                self.refill();
            }
            // The fast path over the buffered draws, with the position in a register; a miss
            // leaves the loop for the wedge or tail, which may draw more (and refill).
            let mut pos = self.pos;
            let end = pos + (out.len() - i).min(self.len - pos);
            // Eight at a time while all eight take the fast path (91% of groups), without a
            // branch per draw; the scalar loop below takes the group with the miss.
            while pos + 8 <= end {
                let r: [u32; 8] = self.buf[pos..pos + 8].try_into().expect("eight draws");
                let mut fast = true;
                let mut z = [0.0f32; 8];
                for (z, &r) in z.iter_mut().zip(&r) {
                    let k = (r & 0xff) as usize;
                    fast &= (r >> 9) < ZIG_K[k];
                    *z = ((r >> 8) | 1) as f32 * ZIG_W[k];
                }
                if !fast {
                    break;
                }
                out[i..i + 8].copy_from_slice(&z);
                i += 8;
                pos += 8;
            }
            let mut miss = None;
            while pos < end {
                let r = self.buf[pos];
                pos += 1;
                match ziggurat_fast(r) {
                    Some(z) => {
                        out[i] = z;
                        i += 1;
                    }
                    None => {
                        miss = Some(r);
                        break;
                    }
                }
            }
            self.pos = pos;
            if let Some(r) = miss {
                out[i] = normal_slow(self, r);
                i += 1;
            }
        }
    }
}

impl DrawsAhead<'_> {
    /// Reads past the next `n` [`standard_normal`] samples without computing them: the draws
    /// [`Self::fill_normals`] would read for them are read (the fast path's test alone, the
    /// wedge and tail in full, since they decide how many more draws a sample takes). Making
    /// the draws dominates, so this costs 0.77 of drawing the samples (2026-12-06); the host's
    /// threads for one layer start from here.
    pub fn skip_normals(&mut self, mut n: usize) {
        while n > 0 {
            if self.pos == self.len {
                self.refill();
            }
            let start = self.pos;
            let end = start + n.min(self.len - start);
            let mut pos = start;
            let mut miss = None;
            while pos < end {
                let r = self.buf[pos];
                pos += 1;
                if (r >> 9) >= ZIG_K[(r & 0xff) as usize] {
                    miss = Some(r);
                    break;
                }
            }
            self.pos = pos;
            n -= pos - start;
            if let Some(r) = miss {
                // The missed draw's sample, which may read more draws (and refill).
                normal_slow(self, r);
            }
        }
    }
}

impl RngCore for DrawsAhead<'_> {
    #[inline(always)]
    fn next_u32(&mut self) -> u32 {
        if self.pos == self.len {
            self.refill();
        }
        let r = self.buf[self.pos];
        self.pos += 1;
        r
    }

    fn next_u64(&mut self) -> u64 {
        impls::next_u64_via_u32(self)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        impls::fill_bytes_via_next(self, dst)
    }
}

impl Drop for DrawsAhead<'_> {
    fn drop(&mut self) {
        let mut s = self.start.clone();
        for _ in 0..self.pos {
            s.next();
        }
        *self.rng = s;
    }
}

impl Xoshiro128PlusPlus {
    /// The rest of [`Self::next_normal`] after its first draw `r` missed the ziggurat's fast
    /// path (see [`Strip`]): the wedge or tail test, drawing more as needed. `self` is the
    /// generator just after drawing `r`. For target code that runs the fast path itself.
    ///
    /// ```
    /// use nvcim_shared::rng::{stream, ziggurat_strips};
    /// let (mut a, mut b) = (stream(9, 1, 0), stream(9, 1, 0));
    /// for _ in 0..2000 {
    ///     let r = a.next();
    ///     let strip = &ziggurat_strips()[(r & 0x7f) as usize];
    ///     let z = if (r >> 9) < strip.k {
    ///         let m = ((r >> 8) | 1) as f32 * strip.w;
    ///         if r & 0x80 != 0 { -m } else { m }
    ///     } else {
    ///         a.normal_after_fast_miss(r)
    ///     };
    ///     assert_eq!(z.to_bits(), b.next_normal().to_bits());
    /// }
    /// assert_eq!(a, b);
    /// ```
    #[inline(never)]
    pub fn normal_after_fast_miss(&mut self, r: u32) -> f32 {
        normal_slow(self, r)
    }
}

/// Strip `i`'s fast-path bound `ZIG_K[i]` and width `ZIG_W[i]` side by side (`i < 128`, the
/// positive half), so that the fast path reads both through one base address.
///
/// Public, with a fixed layout (`k` at byte 0, `w` at byte 4), for target code that
/// re-implements [`Xoshiro128PlusPlus::next_normal_split`]'s fast path (the firmware's
/// tile-programming loop): draw `r`, strip `r & 0x7f`; the fast path applies when
/// `(r >> 9) < k`, and then `|z| = ((r >> 8) | 1) as f32 * w` and `z < 0` is bit 7 of `r`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Strip {
    /// The fast path's bound on `r >> 9`.
    pub k: u32,
    /// The strip's width: `|z| = ((r >> 8) | 1) as f32 * w`.
    pub w: f32,
}

/// The ziggurat's fast-path table (see [`Strip`]).
pub fn ziggurat_strips() -> &'static [Strip; ZIG_LAYERS] {
    &ZIG_STRIPS
}

static ZIG_STRIPS: [Strip; ZIG_LAYERS] = {
    let mut t = [Strip { k: 0, w: 0.0 }; ZIG_LAYERS];
    let mut i = 0;
    while i < ZIG_LAYERS {
        t[i] = Strip {
            k: ZIG_K[i],
            w: ZIG_W[i],
        };
        i += 1;
    }
    t
};

/// The ziggurat's fast path for the draw `r` (see [`standard_normal`]), `None` when it falls
/// in a wedge or the tail.
#[inline(always)]
fn ziggurat_fast(r: u32) -> Option<f32> {
    let i = (r & 0xff) as usize;
    if (r >> 9) < ZIG_K[i] {
        Some(((r >> 8) | 1) as f32 * ZIG_W[i])
    } else {
        None
    }
}

/// [`normal_slow`] on a generator passed by value and returned.
#[cold]
#[inline(never)]
fn normal_slow_owned(mut rng: Xoshiro128PlusPlus, r: u32) -> (f32, Xoshiro128PlusPlus) {
    let z = normal_slow(&mut rng, r);
    (z, rng)
}

/// The wedges and the tail of the ziggurat, entered with the rejected draw `r`.
#[cold]
#[inline(never)]
fn normal_slow(rng: &mut impl RngCore, mut r: u32) -> f32 {
    loop {
        let i = (r & 0x7f) as usize;
        let negative = r & 0x80 != 0;
        if (r >> 9) < ZIG_K[i] {
            let x = ((r >> 8) | 1) as f32 * ZIG_W[i];
            return if negative { -x } else { x };
        }
        if i == 0 {
            // Tail beyond R (Marsaglia 1964).
            loop {
                let x = libm::logf(uniform_open01(rng)) / ZIG_R;
                let y = libm::logf(uniform_open01(rng));
                if -2.0 * y >= x * x {
                    let v = ZIG_R - x;
                    return if negative { -v } else { v };
                }
            }
        }
        let x = ((r >> 8) | 1) as f32 * ZIG_W[i];
        // Wedge: accept when a uniform height between f(x[i]) and f(x[i+1]) lies under f(x).
        let (f_out, f_in) = (ZIG_F[i], ZIG_F[i + 1]);
        let y = f_out + uniform_open01(rng) * (f_in - f_out);
        if wedge_accepts(i, x, y) {
            return if negative { -x } else { x };
        }
        r = rng.next_u32();
    }
}

/// The wedge test of strip `i` (`1 <= i < 128`) at `x` in the strip: `y < e^(-x^2/2)` as
/// [`exp_nonpositive`] computes it, decided without it for about 92% of calls (estimated from the strips' geometry).
///
/// The squeeze: `c = F[i+1] + (x - X[i+1]) S[i]` is the chord through the strip's corners, and
/// the build script bounds the density on the strip by `c + LO[i]` and `c + HI[i]`, each widened
/// by 4e-6. That margin is more than four times the largest gap between the values compared
/// here and the exact ones: `exp_nonpositive`'s result is within 7e-7 of `e^(-x^2/2)` (its
/// relative error 3e-7, plus 6e-8 relative in `x * x` times `x^2/2 <= 6`, on values at most 1);
/// `x - X[i+1]` is exact (Sterbenz: `x` lies between `X[i+1]` and `2 X[i+1]`, or `X[128] = 0`),
/// and the product, the sum and the offset add three roundings below 6e-8 each. So whenever
/// `y < c + LO` the exact test accepts, and whenever `y >= c + HI` it rejects: the answer is the
/// exact test's on every input (`tests::wedge_squeeze_brackets_the_density` checks the bounds
/// on every strip).
#[inline]
fn wedge_accepts(i: usize, x: f32, y: f32) -> bool {
    let c = ZIG_F[i + 1] + (x - ZIG_X[i + 1]) * ZIG_S[i];
    if y < c + ZIG_LO[i] {
        true
    } else if y >= c + ZIG_HI[i] {
        false
    } else {
        y < exp_nonpositive(-0.5 * x * x)
    }
}

/// `e^x` for `-80 <= x <= 0` in pure `f32` arithmetic (relative error below 3e-7).
///
/// The wedge test needs `f(x)` only to about the resolution of a 24-bit uniform, and
/// `libm::expf` computes in `f64`, which the Cortex-M4F emulates in software (hundreds of
/// instructions). Range reduction `x = k ln2 + r`, `|r| <= ln2 / 2`, then a degree-7 Taylor
/// polynomial in Horner form; the same operations on every target give the same bits.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that k * LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = if x < -80.0 { -80.0 } else { x };
    let k = (x * LOG2E - 0.5) as i32; // round to nearest for x <= 0 (truncation toward zero)
    let kf = k as f32;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((127 + k) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The squeeze's bounds hold where the wedge test runs: on every strip, at 4,097 points
    /// spread over the draws that miss the fast path (both ends included),
    /// `c + LO <= exp_nonpositive(-x^2/2) <= c + HI` as computed, with room to spare against
    /// the exact density; and on random (strip, draw, height) triples the squeezed test answers
    /// what the exact one does.
    #[test]
    fn wedge_squeeze_brackets_the_density() {
        let mut decided = 0u32;
        for i in 1..ZIG_LAYERS {
            let first = ZIG_K[i]; // the first magnitude m that misses the fast path
            let last = (1u32 << 23) - 1;
            for t in 0..=4096u32 {
                let m = first + ((u64::from(last - first) * u64::from(t)) / 4096) as u32;
                let x = (2 * m + 1) as f32 * ZIG_W[i];
                let c = ZIG_F[i + 1] + (x - ZIG_X[i + 1]) * ZIG_S[i];
                let e = exp_nonpositive(-0.5 * x * x);
                let (lo, hi) = (c + ZIG_LO[i], c + ZIG_HI[i]);
                assert!(
                    lo <= e && e <= hi,
                    "strip {i}, x {x}: {lo} <= {e} <= {hi} fails"
                );
                let exact = libm::exp(-0.5 * f64::from(x) * f64::from(x));
                assert!(
                    exact - f64::from(lo) > 2e-6 && f64::from(hi) - exact > 2e-6,
                    "strip {i}, x {x}: the margin is under 2e-6 ({lo} {exact} {hi})"
                );
            }
        }
        let mut g = stream(11, 0, 0);
        for _ in 0..1_000_000 {
            let i = 1 + (g.next() % 127) as usize;
            let m = ZIG_K[i] + g.next() % ((1 << 23) - ZIG_K[i]);
            let x = (2 * m + 1) as f32 * ZIG_W[i];
            let (f_out, f_in) = (ZIG_F[i], ZIG_F[i + 1]);
            let y = f_out + uniform_open01(&mut g) * (f_in - f_out);
            let exact = y < exp_nonpositive(-0.5 * x * x);
            assert_eq!(wedge_accepts(i, x, y), exact, "strip {i}, x {x}, y {y}");
            let c = ZIG_F[i + 1] + (x - ZIG_X[i + 1]) * ZIG_S[i];
            decided += u32::from(y < c + ZIG_LO[i] || y >= c + ZIG_HI[i]);
        }
        // Uniform over strips (not weighted by how often each is entered): most decided early.
        assert!(
            decided > 900_000,
            "the squeeze decided only {decided} of 1,000,000"
        );
    }

    /// Reference outputs of xoshiro128++ for state [1, 2, 3, 4] (the authors' C code).
    #[test]
    fn xoshiro_matches_reference_vector() {
        let mut g = Xoshiro128PlusPlus::from_state([1, 2, 3, 4]).unwrap();
        let got: [u32; 4] = core::array::from_fn(|_| g.next());
        assert_eq!(got, [641, 1_573_767, 3_222_811_527, 3_517_856_514]);
    }

    #[test]
    fn streams_do_not_depend_on_draw_order() {
        let mut a = stream(7, 3, 1);
        let first: Vec<u32> = (0..8).map(|_| a.next()).collect();
        let mut other = stream(7, 3, 2);
        for _ in 0..1000 {
            other.next();
        }
        let mut b = stream(7, 3, 1);
        let again: Vec<u32> = (0..8).map(|_| b.next()).collect();
        assert_eq!(first, again);
        let keys = [(7, 3, 1), (7, 1, 3), (7, 3, 2), (8, 3, 1), (7, 4, 1)];
        for k in keys {
            for l in keys {
                if k != l {
                    assert_ne!(stream(k.0, k.1, k.2).next(), stream(l.0, l.1, l.2).next());
                }
            }
        }
        assert_ne!(
            stream_for(Purpose::Host, 1, 2, 3).next(),
            stream_for(Purpose::Variation, 1, 2, 3).next()
        );
    }

    #[test]
    fn ziggurat_tables_are_consistent() {
        assert_eq!(ZIG_X[1], ZIG_R);
        assert_eq!(ZIG_X[ZIG_LAYERS], 0.0);
        for i in 1..ZIG_LAYERS {
            assert!(ZIG_X[i + 1] < ZIG_X[i]);
        }
        // Strip 0's rectangle is R / x[0] of it: about 0.9857.
        let k0 = ZIG_K[0] as f64 / (1u32 << 23) as f64;
        assert!((k0 - f64::from(ZIG_X[1] / ZIG_X[0])).abs() < 1e-6);
        assert_eq!(ZIG_K[ZIG_LAYERS - 1], 0);
        for i in 0..ZIG_LAYERS {
            assert_eq!(ZIG_K[i], ZIG_K[i + ZIG_LAYERS]);
            assert_eq!(ZIG_W[i], -ZIG_W[i + ZIG_LAYERS]);
        }
    }

    #[test]
    fn uniform_is_in_open_closed_unit_interval() {
        struct Fixed(u32);
        impl RngCore for Fixed {
            fn next_u32(&mut self) -> u32 {
                self.0
            }
            fn next_u64(&mut self) -> u64 {
                u64::from(self.0)
            }
            fn fill_bytes(&mut self, _: &mut [u8]) {}
        }
        assert_eq!(uniform_open01(&mut Fixed(0)), 1.0 / 16_777_216.0);
        assert_eq!(uniform_open01(&mut Fixed(u32::MAX)), 1.0);
    }

    #[test]
    fn fast_exp_is_accurate_on_its_domain() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -8.0 * i as f32 / 200_000.0;
            let want = libm::exp(f64::from(x));
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert!(exp_nonpositive(-1000.0) > 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
