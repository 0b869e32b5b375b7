//! ReLU and its gradient over `f32` slices, in parallel chunks: Burn Flex's are one loop on the
//! calling thread, which in the training step is the one thread while the others wait. Same
//! rule as Flex's (NaN passes, `-0.0` becomes `0.0`), so the same bits.

use rayon::prelude::*;

use super::Isa;
use super::lanes::per_isa;

/// Values per parallel chunk (256 KiB).
const CHUNK: usize = 1 << 16;

per_isa! {
    /// `v = relu(v)` in place.
    fn relu_chunk<V>(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = if x.is_nan() || *x > 0.0 { *x } else { 0.0 };
        }
    }
}

per_isa! {
    /// `g = 0` where `out` is neither positive nor NaN, in place.
    fn relu_grad_chunk<V>(g: &mut [f32], out: &[f32]) {
        for (g, &o) in g.iter_mut().zip(out) {
            *g = if o.is_nan() || o > 0.0 { *g } else { 0.0 };
        }
    }
}

/// `v = relu(v)`.
pub fn relu(v: &mut [f32]) {
    let isa = Isa::detect();
    v.par_chunks_mut(CHUNK).for_each(|c| relu_chunk(isa, c));
}

/// ReLU's gradient in place: `g` where `out` (ReLU's output) is positive or NaN, else 0.
pub fn relu_grad(g: &mut [f32], out: &[f32]) {
    assert_eq!(g.len(), out.len(), "relu gradient lengths");
    let isa = Isa::detect();
    g.par_chunks_mut(CHUNK)
        .zip(out.par_chunks(CHUNK))
        .for_each(|(g, o)| relu_grad_chunk(isa, g, o));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flex_rule_on_every_isa_across_chunks() {
        let n = 2 * CHUNK + 37;
        let x: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => f32::NAN,
                1 => -0.0,
                2 => 0.0,
                k => (k as f32 - 4.5) * (i as f32 + 1.0).ln(),
            })
            .collect();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| if v.is_nan() || v > 0.0 { v } else { 0.0 })
            .collect();
        let g: Vec<f32> = (0..n).map(|i| i as f32 - 5.0).collect();
        let want_g: Vec<f32> = want
            .iter()
            .zip(&g)
            .map(|(&o, &g)| if o.is_nan() || o > 0.0 { g } else { 0.0 })
            .collect();
        for isa in Isa::available() {
            let mut y = x.clone();
            y.par_chunks_mut(CHUNK).for_each(|c| relu_chunk(isa, c));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want), "{isa:?}");
            let mut d = g.clone();
            d.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK))
                .for_each(|(d, o)| relu_grad_chunk(isa, d, o));
            assert_eq!(bits(&d), bits(&want_g), "{isa:?}");
        }
    }
}
