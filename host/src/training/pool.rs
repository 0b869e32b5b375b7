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

/// The window's maximum and its position (0..4, row-major) under Flex's rule.
#[inline(always)]
fn argmax(v: [f32; 4]) -> (f32, usize) {
    let (mut m, mut at) = (v[0], 0);
    for (k, &x) in v.iter().enumerate().skip(1) {
        if x > m || x.is_nan() {
            m = x;
            at = k;
        }
    }
    (m, at)
}

#[inline(always)]
fn window(p: &[f32], w: usize, i: usize, j: usize) -> [f32; 4] {
    let (a, b) = (2 * i * w + 2 * j, (2 * i + 1) * w + 2 * j);
    [p[a], p[a + 1], p[b], p[b + 1]]
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
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(y, p)| {
            for i in 0..oh {
                for j in 0..ow {
                    y[i * ow + j] = argmax(window(p, w, i, j)).0;
                }
            }
        });
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
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w))
        .zip(dy.par_chunks(oh * ow))
        .for_each(|((d, p), g)| {
            d.fill(0.0);
            for i in 0..oh {
                for j in 0..ow {
                    let (_, at) = argmax(window(p, w, i, j));
                    d[(2 * i + at / 2) * w + 2 * j + at % 2] = g[i * ow + j];
                }
            }
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
}
