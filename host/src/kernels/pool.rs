//! 2x2 max pooling with stride 2 (VGG-8's pool) over `f32` NCHW planes, forward and backward.
//!
//! Floor mode, no padding: an odd last row or column is dropped, as Burn's `MaxPool2d` does.
//! Ties and NaN follow Flex's rule, so both give the same output and route the gradient to the
//! same input: a window's maximum starts at its top-left value and moves to a later value
//! (row-major) that is greater or NaN. The backward pass finds the maximum again from the input
//! instead of keeping indices from the forward pass.
//!
//! Planes run in parallel; every output value is computed by one task, so the bits do not depend
//! on the thread count.

use rayon::prelude::*;

use super::Isa;
use super::lanes::{Lanes, per_isa};

/// The window's maximum and its position (0..4, row-major) under Flex's rule: the maximum
/// starts at the first value and moves to a later one that is greater or NaN (the kernels below
/// apply it with [`Lanes::later_max`]).
#[cfg(test)]
fn argmax(v: [f32; 4]) -> (f32, u32) {
    let (mut m, mut at) = (v[0], 0);
    for (k, &x) in (1..).zip(&v[1..]) {
        if x > m || x.is_nan() {
            m = x;
            at = k;
        }
    }
    (m, at)
}

per_isa! {
    /// [`forward`] of one plane.
    fn forward_plane<V>(p: &[f32], w: usize, y: &mut [f32], ow: usize) {
        for (i, yr) in y.chunks_exact_mut(ow).enumerate() {
            let a = &p[2 * i * w..][..2 * ow];
            let b = &p[(2 * i + 1) * w..][..2 * ow];
            let mut j = 0;
            while j + V::N <= ow {
                window_max::<V>(a, b, 2 * j).0.store(yr, j);
                j += V::N;
            }
            while j < ow {
                yr[j] = window_max::<f32>(a, b, 2 * j).0;
                j += 1;
            }
        }
    }
}

per_isa! {
    /// [`backward`] of one plane: every input of a window is written (the gradient at the
    /// window's maximum, 0 elsewhere); an odd last row or column is left to the caller.
    fn backward_plane<V>(p: &[f32], g: &[f32], w: usize, d: &mut [f32], ow: usize) {
        for (i, gr) in g.chunks_exact(ow).enumerate() {
            let a = &p[2 * i * w..][..2 * ow];
            let b = &p[(2 * i + 1) * w..][..2 * ow];
            let (da, db) = d[2 * i * w..(2 * i + 2) * w].split_at_mut(w);
            let mut j = 0;
            while j + V::N <= ow {
                window_grad::<V>(a, b, gr, (da, db), j);
                j += V::N;
            }
            for j in j..ow {
                window_grad::<f32>(a, b, gr, (da, db), j);
            }
        }
    }
}

/// The maxima and their positions (0.0..=3.0) of the `V::N` windows whose top-left values are
/// `a[at]`, `a[at + 2]`, ... (rows `a` over `b`).
#[inline(always)]
fn window_max<V: Lanes>(a: &[f32], b: &[f32], at: usize) -> (V, V) {
    let (a0, a1) = V::load_pairs(a, at);
    let (b0, b1) = V::load_pairs(b, at);
    let (m, k) = V::later_max(a0, V::ZERO, a1, 1.0);
    let (m, k) = V::later_max(m, k, b0, 2.0);
    V::later_max(m, k, b1, 3.0)
}

/// Windows `j..j + V::N` of [`backward_plane`]: the gradient `g[j..]` to each window's maximum.
#[inline(always)]
fn window_grad<V: Lanes>(
    a: &[f32],
    b: &[f32],
    g: &[f32],
    (da, db): (&mut [f32], &mut [f32]),
    j: usize,
) {
    let (_, k) = window_max::<V>(a, b, 2 * j);
    let g = V::load(g, j);
    V::store_pairs(V::where_eq(k, 0.0, g), V::where_eq(k, 1.0, g), da, 2 * j);
    V::store_pairs(V::where_eq(k, 2.0, g), V::where_eq(k, 3.0, g), db, 2 * j);
}

/// `y[plane][i][j] = max of x[plane][2i..2i+2][2j..2j+2]` for `planes` planes of `h x w`;
/// `y` holds `planes * (h / 2) * (w / 2)` values.
pub fn forward(x: &[f32], planes: usize, h: usize, w: usize, y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    assert_eq!(x.len(), planes * h * w, "max pool input length");
    assert_eq!(y.len(), planes * oh * ow, "max pool output length");
    if oh * ow == 0 {
        return;
    }
    let isa = Isa::detect();
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(y, p)| forward_plane(isa, p, w, y, ow));
}

/// The gradient of [`forward`] with respect to `x`: each output's gradient `dy` goes to its
/// window's maximum, every other input gets 0.
pub fn backward(x: &[f32], dy: &[f32], planes: usize, h: usize, w: usize, dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    assert_eq!(x.len(), planes * h * w, "max pool input length");
    assert_eq!(dy.len(), planes * oh * ow, "max pool gradient length");
    assert_eq!(dx.len(), x.len(), "max pool input-gradient length");
    if oh * ow == 0 {
        dx.fill(0.0);
        return;
    }
    let isa = Isa::detect();
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w))
        .zip(dy.par_chunks(oh * ow))
        .for_each(|((d, p), g)| {
            backward_plane(isa, p, g, w, d, ow);
            // What no window covers: an odd last column and an odd last row.
            if w % 2 == 1 {
                for r in 0..2 * oh {
                    d[r * w + w - 1] = 0.0;
                }
            }
            d[2 * oh * w..].fill(0.0);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_sized_forward_backward_ties_and_odd_sizes() {
        // One 3x5 plane: the last row and column are dropped.
        #[rustfmt::skip]
        let x = [
            1.0, 5.0,  2.0, 2.0,  9.0,
            3.0, 4.0, -1.0, 2.0,  9.0,
            7.0, 7.0,  7.0, 7.0,  7.0,
        ];
        let mut y = [0.0; 2];
        forward(&x, 1, 3, 5, &mut y);
        assert_eq!(y, [5.0, 2.0]);
        let mut dx = [f32::NAN; 15];
        backward(&x, &[10.0, 20.0], 1, 3, 5, &mut dx);
        // Window 2 ties (2, 2, -1, 2): the first 2 gets the gradient.
        #[rustfmt::skip]
        let want = [
            0.0, 10.0, 20.0, 0.0, 0.0,
            0.0,  0.0,  0.0, 0.0, 0.0,
            0.0,  0.0,  0.0, 0.0, 0.0,
        ];
        assert_eq!(dx, want);
        // NaN wins, as in Flex.
        let (m, at) = argmax([1.0, f32::NAN, 3.0, 2.0]);
        assert!(m.is_nan());
        assert_eq!(at, 1);
    }

    /// Every path this CPU has, on rows long enough to vectorize, with ties and NaNs: the
    /// rule's maximum and position, bit for bit.
    #[test]
    fn every_path_follows_the_rule_on_wide_planes() {
        let (h, w, ow) = (6, 37, 18);
        let x: Vec<f32> = (0..h * w)
            .map(|i| {
                if i % 13 == 5 {
                    f32::NAN
                } else {
                    ((i * 7) % 5) as f32
                }
            })
            .collect();
        let g: Vec<f32> = (0..3 * ow).map(|i| i as f32 + 1.0).collect();
        for isa in Isa::available() {
            let mut y = vec![0.0; 3 * ow];
            forward_plane(isa, &x, w, &mut y, ow);
            let mut d = vec![f32::INFINITY; h * w];
            backward_plane(isa, &x, &g, w, &mut d, ow);
            for i in 0..3 {
                for j in 0..ow {
                    let at = [2 * i * w + 2 * j, 2 * i * w + 2 * j + 1];
                    let at = [at[0], at[1], at[0] + w, at[1] + w];
                    let (m, k) = argmax(at.map(|a| x[a]));
                    assert_eq!(y[i * ow + j].to_bits(), m.to_bits(), "{isa:?} ({i}, {j})");
                    for (q, &a) in at.iter().enumerate() {
                        let want = if q as u32 == k { g[i * ow + j] } else { 0.0 };
                        assert_eq!(d[a], want, "{isa:?} ({i}, {j}) input {q}");
                    }
                }
            }
            // The odd last column is the caller's.
            assert!((0..h).all(|r| d[r * w + w - 1] == f32::INFINITY), "{isa:?}");
        }
    }
}
