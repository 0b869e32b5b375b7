//! The reference forward pass of a [`Network`]: plain loops, `f64` accumulation, no SIMD —
//! slow and obviously correct, the oracle every engine and exporter is tested against.

use anyhow::{Result, ensure};

use super::{Conv2d, Linear, Network, Op, Pool, Shape, Value};

impl Network {
    /// The reference forward pass: `input` is a normalized NCHW batch of `batch` images; returns
    /// `[batch][num_classes]` logits. Accumulates in `f64`.
    pub fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        let shapes = self.check_input(input, batch)?;
        let mut values: Vec<Vec<f32>> = Vec::with_capacity(self.nodes.len());
        for i in 0..self.nodes.len() {
            let out = self.eval(i, input, &values, &shapes, batch);
            values.push(out);
        }
        Ok(values.pop().expect("non-empty graph"))
    }

    /// Sets every BatchNorm's running mean and (biased) variance to the statistics of its input
    /// over `batch` images of `input`, as training would leave them, so that activations stay
    /// near unit scale. Used to make random test networks well conditioned.
    pub fn calibrate_batchnorm(&mut self, input: &[f32], batch: usize) -> Result<()> {
        let shapes = self.check_input(input, batch)?;
        let mut values: Vec<Vec<f32>> = Vec::with_capacity(self.nodes.len());
        for i in 0..self.nodes.len() {
            let src = self.nodes[i].inputs[0];
            if let Op::BatchNorm(bn) = &mut self.nodes[i].op {
                let (x, s) = match src.producer() {
                    None => (input, self.input),
                    Some(p) => (values[p].as_slice(), shapes[p]),
                };
                let plane = s[1] * s[2];
                let (mut sum, mut sq) = (vec![0.0f64; s[0]], vec![0.0f64; s[0]]);
                for (k, ch) in x.chunks(plane).enumerate() {
                    for &v in ch {
                        sum[k % s[0]] += f64::from(v);
                        sq[k % s[0]] += f64::from(v) * f64::from(v);
                    }
                }
                let n = (batch * plane) as f64;
                for c in 0..s[0] {
                    let mean = sum[c] / n;
                    bn.mean[c] = mean as f32;
                    bn.var[c] = (sq[c] / n - mean * mean).max(1e-3) as f32;
                }
            }
            let out = self.eval(i, input, &values, &shapes, batch);
            values.push(out);
        }
        Ok(())
    }

    fn check_input(&self, input: &[f32], batch: usize) -> Result<Vec<Shape>> {
        let shapes = self.shapes()?;
        let [c, h, w] = self.input;
        ensure!(
            input.len() == batch * c * h * w,
            "input has {} values, expected {batch} x {c} x {h} x {w}",
            input.len()
        );
        Ok(shapes)
    }

    /// The output of node `i` given the outputs of the nodes before it.
    fn eval(
        &self,
        i: usize,
        input: &[f32],
        values: &[Vec<f32>],
        shapes: &[Shape],
        batch: usize,
    ) -> Vec<f32> {
        let node = &self.nodes[i];
        let get = |v: Value| match v.producer() {
            None => (input, self.input),
            Some(p) => (values[p].as_slice(), shapes[p]),
        };
        let (x, s) = get(node.inputs[0]);
        match &node.op {
            Op::Conv2d(conv) => conv_forward(conv, x, batch, s, shapes[i]),
            Op::BatchNorm(bn) => {
                let plane = s[1] * s[2];
                let aff = bn.affine();
                x.chunks(plane)
                    .enumerate()
                    .flat_map(|(k, ch)| {
                        let (m, b) = aff[k % s[0]];
                        ch.iter().map(move |&v| (f64::from(v) * m + b) as f32)
                    })
                    .collect()
            }
            Op::Relu => x.iter().map(|&v| v.max(0.0)).collect(),
            Op::Clip { min, max } => x.iter().map(|&v| v.max(*min).min(*max)).collect(),
            Op::MaxPool(p) => pool(x, batch, s, shapes[i], p, true),
            Op::AvgPool(p) => pool(x, batch, s, shapes[i], p, false),
            Op::GlobalAvgPool => x
                .chunks(s[1] * s[2])
                .map(|ch| (ch.iter().map(|&v| f64::from(v)).sum::<f64>() / ch.len() as f64) as f32)
                .collect(),
            Op::Flatten => x.to_vec(),
            Op::Linear(lin) => linear_forward(lin, x, batch),
            Op::Add => {
                let (y, _) = get(node.inputs[1]);
                x.iter().zip(y).map(|(a, b)| a + b).collect()
            }
            Op::Concat => {
                let (y, t) = get(node.inputs[1]);
                let (a, b) = (s[0] * s[1] * s[2], t[0] * t[1] * t[2]);
                let mut out = Vec::with_capacity(x.len() + y.len());
                for n in 0..batch {
                    out.extend_from_slice(&x[n * a..(n + 1) * a]);
                    out.extend_from_slice(&y[n * b..(n + 1) * b]);
                }
                out
            }
        }
    }
}

fn conv_forward(conv: &Conv2d, x: &[f32], batch: usize, s: Shape, o: Shape) -> Vec<f32> {
    let [ci, h, w] = s;
    let [co, oh, ow] = o;
    let [kh, kw] = conv.kernel;
    let (sy, sx) = (conv.stride[0] as isize, conv.stride[1] as isize);
    let (top, left) = (conv.padding[0] as isize, conv.padding[1] as isize);
    let groups = conv.groups.max(1);
    let (cig, cog) = (ci / groups, co / groups);
    let mut out = vec![0.0f32; batch * co * oh * ow];
    for n in 0..batch {
        for oc in 0..co {
            let g = oc / cog;
            let bias = conv.bias.as_ref().map_or(0.0, |b| f64::from(b[oc]));
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias;
                    for j in 0..cig {
                        let ic = g * cig + j;
                        for ky in 0..kh {
                            let iy = oy as isize * sy - top + ky as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = ox as isize * sx - left + kx as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((n * ci + ic) * h + iy as usize) * w + ix as usize];
                                let wv = conv.weight[((oc * cig + j) * kh + ky) * kw + kx];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    out[((n * co + oc) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    out
}

fn linear_forward(lin: &Linear, x: &[f32], batch: usize) -> Vec<f32> {
    let (fi, fo) = (lin.in_features, lin.out_features);
    let mut out = Vec::with_capacity(batch * fo);
    for n in 0..batch {
        let row = &x[n * fi..(n + 1) * fi];
        for o in 0..fo {
            let w = &lin.weight[o * fi..(o + 1) * fi];
            let mut acc = lin.bias.as_ref().map_or(0.0, |b| f64::from(b[o]));
            for (a, b) in row.iter().zip(w) {
                acc += f64::from(*a) * f64::from(*b);
            }
            out.push(acc as f32);
        }
    }
    out
}

fn pool(x: &[f32], batch: usize, s: Shape, o: Shape, p: &Pool, max: bool) -> Vec<f32> {
    let [c, h, w] = s;
    let [_, oh, ow] = o;
    let [kh, kw] = p.kernel;
    let mut out = Vec::with_capacity(batch * c * oh * ow);
    for plane in x.chunks(h * w).take(batch * c) {
        for oy in 0..oh {
            for ox in 0..ow {
                let y0 = (oy * p.stride[0]) as isize - p.padding[0] as isize;
                let x0 = (ox * p.stride[1]) as isize - p.padding[1] as isize;
                let window = (0..kh as isize).flat_map(|ky| {
                    (0..kw as isize).filter_map(move |kx| {
                        let (iy, ix) = (y0 + ky, x0 + kx);
                        (iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize)
                            .then(|| plane[iy as usize * w + ix as usize])
                    })
                });
                out.push(if max {
                    window.fold(f32::NEG_INFINITY, f32::max)
                } else {
                    let (sum, n) =
                        window.fold((0f64, 0usize), |(s, n), v| (s + f64::from(v), n + 1));
                    let count = if p.count_include_pad { kh * kw } else { n };
                    (sum / count as f64) as f32
                });
            }
        }
    }
    out
}
