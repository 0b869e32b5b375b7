//! Executor tests: kernels against naive loops, the float64 reference, both paths, corruption.

use alloc::{vec, vec::Vec};

use proptest::prelude::*;

use super::*;
use crate::format::Model;
use crate::format::build::{
    InputSpec, Layer, ModelDesc, Node, PackConfig, Readback, TestBatch, calibrate, forward,
    noisy_weights, pack,
};
use crate::rng::mix64;
use crate::tile::Adc;

/// Deterministic values in `[-scale, scale)`.
pub(crate) fn rand_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((mix64(seed ^ (i as u64) << 20) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
                * scale
        })
        .collect()
}

fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (mix64(seed.wrapping_mul(31) ^ i as u64) >> 56) as u8)
        .collect()
}

/// Owns the arrays a description borrows.
pub(crate) struct Net {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub arrays: Vec<Vec<f32>>,
}

/// Runs the int engine on `image`; returns logits, class and the arena.
fn run_int(
    model: &Model<'_>,
    path: Path,
    var: &VariationConfig,
    seed: u64,
    run: u32,
    image: &[u8],
) -> (Vec<i32>, usize, Vec<u8>) {
    let mut state = vec![0i16; model.state_len(path)];
    program(model, var, seed, run, path, &mut state).unwrap();
    let s = model.scratch();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let class = infer(
        model,
        path,
        &state,
        image,
        &mut Scratch {
            act: &mut act,
            patch: &mut patch,
        },
        &mut logits,
    )
    .unwrap();
    (logits, class, act)
}

/// A small VGG-like net: conv3x3(pad 1)+BN+ReLU, maxpool 2, conv3x3 stride 2 + ReLU,
/// conv1x1 + BN + ReLU, avgpool 2, flatten, linear + ReLU, linear.
fn small_vgg(seed: u64, c_in: usize, hw: usize) -> (Net, usize) {
    let (c1, c2, c3, f1, classes) = (6, 8, 5, 12, 4);
    let s2 = (hw / 2 + 2 - 3) / 2 + 1; // after maxpool and the stride-2 conv
    let flat = c3 * (s2 / 2) * (s2 / 2);
    let arrays = vec![
        rand_vec(seed, c1 * c_in * 9, 0.5),
        rand_vec(seed + 1, c1, 0.1),
        rand_vec(seed + 2, c1, 0.5)
            .iter()
            .map(|v| 1.0 + v)
            .collect(),
        rand_vec(seed + 3, c1, 0.2),
        rand_vec(seed + 4, c1, 0.2),
        rand_vec(seed + 5, c1, 0.3)
            .iter()
            .map(|v| 1.0 + v)
            .collect(),
        rand_vec(seed + 6, c2 * c1 * 9, 0.3),
        rand_vec(seed + 7, c3 * c2, 0.5),
        rand_vec(seed + 8, f1 * flat, 0.3),
        rand_vec(seed + 9, f1, 0.1),
        rand_vec(seed + 10, classes * f1, 0.4),
        rand_vec(seed + 11, c3, 0.2)
            .iter()
            .map(|v| 1.0 + v)
            .collect(),
        rand_vec(seed + 12, c3, 0.1),
    ];
    (
        Net {
            mean: vec![0.2; c_in],
            std: vec![0.3; c_in],
            arrays,
        },
        classes,
    )
}

fn small_vgg_nodes<'a>(n: &'a Net, c_in: usize, hw: usize, classes: usize) -> ModelDesc<'a> {
    let a = &n.arrays;
    let nodes = vec![
        Node::new(Layer::Conv2d {
            weight: &a[0],
            bias: Some(&a[1]),
            out_channels: 6,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            groups: 1,
        }),
        Node::new(Layer::BatchNorm {
            gamma: &a[2],
            beta: &a[3],
            mean: &a[4],
            var: &a[5],
            eps: 1e-5,
        }),
        Node::new(Layer::Relu),
        Node::new(Layer::MaxPool {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0; 4],
        }),
        Node::new(Layer::Conv2d {
            weight: &a[6],
            bias: None,
            out_channels: 8,
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1; 4],
            groups: 1,
        }),
        Node::new(Layer::Relu),
        Node::new(Layer::Conv2d {
            weight: &a[7],
            bias: None,
            out_channels: 5,
            kernel: [1, 1],
            stride: [1, 1],
            padding: [0; 4],
            groups: 1,
        }),
        Node::new(Layer::BatchNorm {
            gamma: &a[11],
            beta: &a[12],
            mean: &a[12],
            var: &a[11],
            eps: 1e-5,
        }),
        Node::new(Layer::Relu),
        Node::new(Layer::AvgPool {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0; 4],
            count_include_pad: true,
        }),
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: &a[8],
            bias: Some(&a[9]),
            out_features: 12,
        }),
        Node::new(Layer::Relu),
        Node::new(Layer::Linear {
            weight: &a[10],
            bias: None,
            out_features: classes,
        }),
    ];
    ModelDesc {
        input: InputSpec {
            channels: c_in,
            height: hw,
            width: hw,
            mean: &n.mean,
            std: &n.std,
        },
        classes,
        nodes: alloc::boxed::Box::leak(nodes.into_boxed_slice()),
    }
}

/// Sets every node's `act_max` from calibration on `images`.
fn calibrated<'a>(desc: &ModelDesc<'a>, images: &[u8]) -> ModelDesc<'a> {
    let maxes = calibrate(desc, images).unwrap();
    let nodes: Vec<Node<'a>> = desc
        .nodes
        .iter()
        .zip(maxes)
        .map(|(n, m)| Node { act_max: m, ..*n })
        .collect();
    ModelDesc {
        nodes: alloc::boxed::Box::leak(nodes.into_boxed_slice()),
        ..*desc
    }
}

/// Calibrates on the clean weights and on runs `0..runs` of `seed` (the weights do not depend
/// on the scales, so a first pack gives the quantized weights to perturb).
fn noise_calibrated<'a>(
    desc: &ModelDesc<'a>,
    cfg: &PackConfig,
    images: &[u8],
    seed: u64,
    runs: u32,
) -> ModelDesc<'a> {
    let blob = pack(desc, cfg, None).unwrap();
    let model = Model::parse(&blob).unwrap();
    let sets: Vec<Vec<Vec<f64>>> = (0..runs)
        .map(|r| noisy_weights(&model, &cfg.variation, seed, r, Readback::Exact).unwrap())
        .collect();
    let mut which: Vec<Option<&[Vec<f64>]>> = vec![None];
    which.extend(sets.iter().map(|s| Some(&s[..])));
    let maxes = crate::format::build::calibrate_with(desc, &which, images).unwrap();
    let nodes: Vec<Node<'a>> = desc
        .nodes
        .iter()
        .zip(maxes)
        .map(|(n, m)| Node { act_max: m, ..*n })
        .collect();
    ModelDesc {
        nodes: alloc::boxed::Box::leak(nodes.into_boxed_slice()),
        ..*desc
    }
}

/// A packed small VGG with 3 test images, for the corruption tests.
fn small_blob() -> Vec<u8> {
    let (net, classes) = small_vgg(7, 1, 8);
    let desc = small_vgg_nodes(&net, 1, 8, classes);
    let images = rand_bytes(3, 3 * 64);
    let desc = calibrated(&desc, &images);
    let cfg = PackConfig {
        tile_rows: 16,
        tile_cols: 4,
        ..PackConfig::new(VariationConfig::paper(0.2).unwrap())
    };
    pack(
        &desc,
        &cfg,
        Some(TestBatch {
            images: &images,
            labels: &[0, 3, 1],
        }),
    )
    .unwrap()
}

#[test]
fn int_logits_track_the_float_reference_and_paths_agree() {
    let (c_in, hw) = (2, 12);
    let (net, classes) = small_vgg(11, c_in, hw);
    let desc = small_vgg_nodes(&net, c_in, hw, classes);
    let images = rand_bytes(5, 8 * c_in * hw * hw);
    let var = VariationConfig::paper(0.1).unwrap();
    let cfg = PackConfig {
        tile_rows: 32,
        tile_cols: 8,
        ..PackConfig::new(var)
    };
    let desc = noise_calibrated(&desc, &cfg, &images, 99, 3);
    let blob = pack(&desc, &cfg, None).unwrap();
    let model = Model::parse(&blob).unwrap();
    let logit_scale = f64::from(model.op(model.op_count() - 1).unwrap().out_scale);
    let (mut worst, mut worst_fixed) = (0.0f64, 0.0f64);
    for run in 0..3 {
        let w = noisy_weights(&model, &var, 99, run, Readback::Exact).unwrap();
        let wf = noisy_weights(&model, &var, 99, run, Readback::Fixed).unwrap();
        for img in images.chunks(c_in * hw * hw) {
            let float = forward(&desc, Some(&w), img).unwrap().pop().unwrap();
            let float_fixed = forward(&desc, Some(&wf), img).unwrap().pop().unwrap();
            let (logits, class, _) = run_int(&model, Path::Collapsed, &var, 99, run, img);
            let (sliced, class_s, _) =
                run_int(&model, Path::Sliced(Adc::Ideal), &var, 99, run, img);
            assert_eq!(
                logits, sliced,
                "ideal sliced path == collapsed path, bit for bit"
            );
            assert_eq!(class, class_s);
            let range = float.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for ((l, f), g) in logits.iter().zip(&float).zip(&float_fixed) {
                worst = worst.max((f64::from(*l) * logit_scale - f).abs() / range);
                worst_fixed = worst_fixed.max((f64::from(*l) * logit_scale - g).abs() / range);
            }
        }
    }
    std::eprintln!("worst relative logit error: exact devices {worst}, fixed-point {worst_fixed}");
    // Documented bounds (crate docs), scales calibrated on the noisy runs, relative to the
    // largest |logit|: against the reference with the tile's own fixed-point devices, only the
    // 8-bit activations at five requantization points differ: < 3 % (measured 2.2 %); against
    // exact devices the 2^-5-level device rounding adds up to 85/32 LSB per weight: < 8 %
    // (measured 6.0 %).
    assert!(worst_fixed < 0.03, "relative logit error {worst_fixed}");
    assert!(worst < 0.08, "relative logit error {worst}");
}

#[test]
fn program_and_infer_check_their_buffers() {
    let blob = small_blob();
    let model = Model::parse(&blob).unwrap();
    let var = model.variation();
    let mut state = vec![0i16; model.state_len(Path::Collapsed) - 1];
    assert!(matches!(
        program(&model, &var, 1, 0, Path::Collapsed, &mut state),
        Err(Error::LengthMismatch { .. })
    ));
    let other = VariationConfig::new(
        crate::quant::QuantConfig::new(4, 2).unwrap(),
        0.1,
        Default::default(),
        Default::default(),
        Default::default(),
    )
    .unwrap();
    let mut state = vec![0i16; model.state_len(Path::Collapsed)];
    assert!(program(&model, &other, 1, 0, Path::Collapsed, &mut state).is_err());
    program(&model, &var, 1, 0, Path::Collapsed, &mut state).unwrap();
    let s = model.scratch();
    let (img, _) = model.test_image(0).unwrap();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let mut small = vec![0u8; s.act_bytes - 1];
    let r = infer(
        &model,
        Path::Collapsed,
        &state,
        img,
        &mut Scratch {
            act: &mut small,
            patch: &mut patch,
        },
        &mut logits,
    );
    assert!(matches!(r, Err(Error::BufferTooSmall { what: "act", .. })));
    let r = infer(
        &model,
        Path::Collapsed,
        &state,
        &img[1..],
        &mut Scratch {
            act: &mut act,
            patch: &mut patch,
        },
        &mut logits,
    );
    assert!(matches!(r, Err(Error::LengthMismatch { .. })));
    let r = infer(
        &model,
        Path::Sliced(Adc::Ideal),
        &state,
        img,
        &mut Scratch {
            act: &mut act,
            patch: &mut patch,
        },
        &mut logits,
    );
    assert!(matches!(r, Err(Error::LengthMismatch { .. })));
    let mut short_logits = vec![0i32; s.logits - 1];
    let r = infer(
        &model,
        Path::Collapsed,
        &state,
        img,
        &mut Scratch {
            act: &mut act,
            patch: &mut patch,
        },
        &mut short_logits,
    );
    assert!(matches!(
        r,
        Err(Error::BufferTooSmall { what: "logits", .. })
    ));
}

#[test]
fn runs_differ_and_repeat() {
    let blob = small_blob();
    let model = Model::parse(&blob).unwrap();
    let var = model.variation();
    let (img, _) = model.test_image(1).unwrap();
    let a = run_int(&model, Path::Collapsed, &var, 3, 0, img).0;
    assert_eq!(a, run_int(&model, Path::Collapsed, &var, 3, 0, img).0);
    assert_ne!(a, run_int(&model, Path::Collapsed, &var, 3, 1, img).0);
    // A coarse ADC changes the result; an ideal one does not.
    let coarse = Path::Sliced(Adc::Quantized {
        bits: 3,
        step: 4000,
    });
    assert_ne!(a, run_int(&model, coarse, &var, 3, 0, img).0);
}

// ---- kernels against naive loops --------------------------------------------------------------

/// The integer conv output the executor must produce, by direct loops over the collapsed or
/// sliced state (tiles of `rows` inputs, ADC per slice column sum).
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    model: &Model<'_>,
    op: &crate::format::Op,
    state: &[i16],
    path: Path,
    x: &[i16],
    xs: Shape,
) -> Vec<i64> {
    let icg = xs.c / op.groups;
    let (k, q) = (icg * op.kh * op.kw, model.quant());
    assert_eq!(k, model.fan_in(op));
    let mut out = vec![0i64; op.out.len()];
    for o in 0..op.out.c {
        let g = o / (op.out.c / op.groups);
        for oy in 0..op.out.h {
            for ox in 0..op.out.w {
                let mut patch = vec![0i64; k];
                for c in 0..icg {
                    for ky in 0..op.kh {
                        for kx in 0..op.kw {
                            let iy = (oy * op.stride[0] + ky) as i64 - op.pad[0] as i64;
                            let ix = (ox * op.stride[1] + kx) as i64 - op.pad[1] as i64;
                            if iy >= 0 && ix >= 0 && (iy as usize) < xs.h && (ix as usize) < xs.w {
                                patch[(c * op.kh + ky) * op.kw + kx] = i64::from(
                                    x[((g * icg + c) * xs.h + iy as usize) * xs.w + ix as usize],
                                );
                            }
                        }
                    }
                }
                let base = op.weights_start * path.state_per_weight(q);
                let acc: i64 = match path {
                    Path::Collapsed => (0..k)
                        .map(|i| patch[i] * i64::from(state[base + o * k + i]))
                        .sum(),
                    Path::Sliced(adc) => {
                        let s = q.slices();
                        let mut acc = 0i64;
                        for j in 0..s {
                            for t0 in (0..k).step_by(model.tile_rows()) {
                                let p: i64 = (t0..(t0 + model.tile_rows()).min(k))
                                    .map(|i| {
                                        patch[i] * i64::from(state[base + (o * s + j) * k + i])
                                    })
                                    .sum();
                                acc += adc.convert(p) << (j as u32 * u32::from(q.n_bits()));
                            }
                        }
                        acc
                    }
                };
                out[(o * op.out.h + oy) * op.out.w + ox] =
                    requant(acc, model.record(op.params_start + o));
            }
        }
    }
    out
}

fn clamp_kind(v: i64, kind: ActKind) -> i64 {
    match kind {
        ActKind::U8 => v.clamp(0, 255),
        _ => v.clamp(-127, 127),
    }
}

/// One convolution to check against [`naive_conv`].
#[derive(Debug, Clone, Copy)]
struct ConvCase {
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
    groups: usize,
    rows: usize,
    /// The activation fused into the conv: none, ReLU, or a clip.
    act: Option<Layer<'static>>,
}

/// A square conv, ungrouped, with or without ReLU.
#[allow(clippy::too_many_arguments)]
fn check_conv(
    seed: u64,
    c_in: usize,
    hw: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    rows: usize,
    relu: bool,
    path: Path,
    sigma: f32,
) {
    let case = ConvCase {
        c_in,
        h: hw,
        w: hw,
        c_out,
        kernel: [k, k],
        stride: [stride, stride],
        pad: [pad; 4],
        groups: 1,
        rows,
        act: relu.then_some(Layer::Relu),
    };
    check_conv_case(seed, case, path, sigma);
}

/// conv (+activation or not) -> flatten -> linear; checks the conv output in the arena against
/// [`naive_conv`], and the logits against a naive linear over that output.
fn check_conv_case(seed: u64, case: ConvCase, path: Path, sigma: f32) {
    let ConvCase {
        c_in,
        h,
        w,
        c_out,
        kernel,
        stride,
        pad,
        groups,
        rows,
        act,
    } = case;
    let oh = (h + pad[0] + pad[2] - kernel[0]) / stride[0] + 1;
    let ow = (w + pad[1] + pad[3] - kernel[1]) / stride[1] + 1;
    let arrays = vec![
        rand_vec(seed, c_out * c_in / groups * kernel[0] * kernel[1], 1.0),
        rand_vec(seed + 1, c_out, 0.2),
        rand_vec(seed + 2, 3 * c_out * oh * ow, 1.0),
    ];
    let net = Net {
        mean: vec![0.5; c_in],
        std: vec![0.25; c_in],
        arrays,
    };
    let a = &net.arrays;
    let mut nodes = vec![Node::new(Layer::Conv2d {
        weight: &a[0],
        bias: Some(&a[1]),
        out_channels: c_out,
        kernel,
        stride,
        padding: pad,
        groups,
    })];
    if let Some(act) = act {
        nodes.push(Node::new(act));
    }
    nodes.push(Node::new(Layer::Flatten));
    nodes.push(Node::new(Layer::Linear {
        weight: &a[2],
        bias: None,
        out_features: 3,
    }));
    let desc = ModelDesc {
        input: InputSpec {
            channels: c_in,
            height: h,
            width: w,
            mean: &net.mean,
            std: &net.std,
        },
        classes: 3,
        nodes: &nodes,
    };
    let img = rand_bytes(seed, c_in * h * w);
    let desc = calibrated(&desc, &img);
    let var = VariationConfig::paper(sigma).unwrap();
    let cfg = PackConfig {
        tile_rows: rows,
        tile_cols: 2,
        ..PackConfig::new(var)
    };
    let blob = pack(&desc, &cfg, None).unwrap();
    let model = Model::parse(&blob).unwrap();
    let mut state = vec![0i16; model.state_len(path)];
    program(&model, &var, seed, 0, path, &mut state).unwrap();
    let s = model.scratch();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    infer(
        &model,
        path,
        &state,
        &img,
        &mut Scratch {
            act: &mut act,
            patch: &mut patch,
        },
        &mut logits,
    )
    .unwrap();
    let x0 = model.tensor(0).unwrap();
    let x: Vec<i16> = act[x0.off..x0.off + x0.shape.len()]
        .iter()
        .map(|&b| i16::from(b as i8))
        .collect();
    let op = model.op(0).unwrap();
    let y = model.tensor(1).unwrap();
    let want: Vec<i64> = naive_conv(&model, &op, &state, path, &x, x0.shape)
        .into_iter()
        .map(|v| clamp_kind(v, y.kind).clamp(i64::from(op.clip[0]), i64::from(op.clip[1])))
        .collect();
    let got: Vec<i64> = act[y.off..y.off + y.shape.len()]
        .iter()
        .map(|&b| i64::from(value(y.kind, b)))
        .collect();
    assert_eq!(got, want, "{case:?}");
    // The linear layer over the flattened conv output.
    let lin = model.op(1).unwrap();
    let fan_in = y.shape.len();
    let per = path.state_per_weight(model.quant());
    for o in 0..3 {
        let acc: i64 = match path {
            Path::Collapsed => (0..fan_in)
                .map(|i| got[i] * i64::from(state[lin.weights_start + o * fan_in + i]))
                .sum(),
            Path::Sliced(_) => {
                let base = lin.weights_start * per + o * per * fan_in;
                let (sl, n) = (model.quant().slices(), u32::from(model.quant().n_bits()));
                let Path::Sliced(adc) = path else {
                    unreachable!()
                };
                let mut acc = 0i64;
                for j in 0..sl {
                    for t0 in (0..fan_in).step_by(rows) {
                        let p: i64 = (t0..(t0 + rows).min(fan_in))
                            .map(|i| got[i] * i64::from(state[base + j * fan_in + i]))
                            .sum();
                        acc += adc.convert(p) << (j as u32 * n);
                    }
                }
                acc
            }
        };
        let r = requant(acc, model.record(lin.params_start + o));
        assert_eq!(
            i64::from(logits[o]),
            r.clamp(-i64::from(i32::MAX), i64::from(i32::MAX))
        );
    }
}

#[test]
fn named_conv_cases() {
    // 1x1 and 3x3, stride 2, padding, fan-in larger than the tile rows, more outputs than columns.
    check_conv(1, 3, 6, 5, 1, 1, 0, 128, true, Path::Collapsed, 0.3);
    check_conv(2, 3, 7, 4, 3, 1, 1, 128, false, Path::Collapsed, 0.3);
    check_conv(3, 4, 9, 6, 3, 2, 1, 5, true, Path::Collapsed, 0.5);
    check_conv(4, 20, 4, 9, 3, 2, 0, 16, true, Path::Collapsed, 0.0);
    check_conv(
        5,
        20,
        4,
        9,
        3,
        1,
        1,
        7,
        true,
        Path::Sliced(Adc::Quantized { bits: 6, step: 900 }),
        0.4,
    );
    check_conv(
        6,
        2,
        5,
        3,
        3,
        2,
        2,
        4,
        false,
        Path::Sliced(Adc::Quantized {
            bits: 4,
            step: 3000,
        }),
        0.2,
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn conv_matches_naive(
        seed in any::<u64>(),
        c_in in 1usize..6,
        hw in 3usize..9,
        c_out in 1usize..7,
        k in prop::sample::select(vec![1usize, 3]),
        stride in 1usize..3,
        pad_on in any::<bool>(),
        rows in 1usize..40,
        relu in any::<bool>(),
        adc_bits in prop::option::of(3u8..9),
        sigma in 0.0f32..1.0,
    ) {
        let pad = if pad_on && k == 3 { 1 } else { 0 };
        let path = match adc_bits {
            None => Path::Collapsed,
            Some(bits) => Path::Sliced(Adc::Quantized { bits, step: 64 }),
        };
        check_conv(seed, c_in, hw, c_out, k, stride, pad, rows, relu, path, sigma);
    }

    /// Rectangular kernels, per-axis strides, asymmetric padding, groups (depthwise included)
    /// and fused clips against the naive loops.
    #[test]
    fn general_conv_matches_naive(
        seed in any::<u64>(),
        groups in 1usize..4,
        in_per in 1usize..4,
        out_per in 1usize..4,
        h in 3usize..11,
        w in 3usize..11,
        kernel in (1usize..5, 1usize..5),
        stride in (1usize..4, 1usize..4),
        pad in (0usize..5, 0usize..5, 0usize..5, 0usize..5),
        rows in 1usize..40,
        act in 0u8..4,
        adc_bits in prop::option::of(3u8..9),
        sigma in 0.0f32..1.0,
    ) {
        let kernel = [kernel.0.min(h), kernel.1.min(w)];
        let pad = [
            pad.0 % kernel[0],
            pad.1 % kernel[1],
            pad.2 % kernel[0],
            pad.3 % kernel[1],
        ];
        let act = match act {
            0 => None,
            1 => Some(Layer::Relu),
            2 => Some(Layer::Clip { min: 0.0, max: 0.5 }),
            _ => Some(Layer::Clip { min: -0.3, max: 0.4 }),
        };
        let path = match adc_bits {
            None => Path::Collapsed,
            Some(bits) => Path::Sliced(Adc::Quantized { bits, step: 64 }),
        };
        let case = ConvCase {
            c_in: groups * in_per,
            h,
            w,
            c_out: groups * out_per,
            kernel,
            stride: [stride.0, stride.1],
            pad,
            groups,
            rows,
            act,
        };
        check_conv_case(seed, case, path, sigma);
    }
}

#[test]
fn residual_add_matches_naive() {
    let (c, hw) = (3, 6);
    let arrays = vec![
        rand_vec(21, c * c * 9, 0.6),
        rand_vec(22, c * c * 9, 0.6),
        rand_vec(23, 2 * c * hw * hw, 0.5),
    ];
    let net = Net {
        mean: vec![0.4; c],
        std: vec![0.3; c],
        arrays,
    };
    let a = &net.arrays;
    let nodes = [
        Node::new(Layer::Conv2d {
            weight: &a[0],
            bias: None,
            out_channels: c,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            groups: 1,
        }),
        Node::new(Layer::Relu), // node 1: the shortcut
        Node::new(Layer::Conv2d {
            weight: &a[1],
            bias: None,
            out_channels: c,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            groups: 1,
        }),
        Node::new(Layer::Add { other: 1 }),
        Node::new(Layer::Relu),
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: &a[2],
            bias: None,
            out_features: 2,
        }),
    ];
    let desc = ModelDesc {
        input: InputSpec {
            channels: c,
            height: hw,
            width: hw,
            mean: &net.mean,
            std: &net.std,
        },
        classes: 2,
        nodes: &nodes,
    };
    let img = rand_bytes(9, c * hw * hw);
    let var = VariationConfig::paper(0.2).unwrap();
    let desc = noise_calibrated(&desc, &PackConfig::new(var), &img, 4, 1);
    let blob = pack(&desc, &PackConfig::new(var), None).unwrap();
    let model = Model::parse(&blob).unwrap();
    assert_eq!(model.op_count(), 4); // conv+relu, conv, add+relu, linear
    let (_, _, act) = run_int(&model, Path::Collapsed, &var, 4, 0, &img);
    let add = model.op(2).unwrap();
    assert_eq!(add.kind, OpKind::Add);
    let (ta, tb, ty) = (
        model.tensor(add.src).unwrap(),
        model.tensor(add.src2).unwrap(),
        model.tensor(3).unwrap(),
    );
    let (ra, rb) = (
        model.record(add.params_start),
        model.record(add.params_start + 1),
    );
    for i in 0..ty.shape.len() {
        let va = i64::from(value(ta.kind, act[ta.off + i]));
        let vb = i64::from(value(tb.kind, act[tb.off + i]));
        let want = ((va * i64::from(ra.m) + vb * i64::from(rb.m) + (1 << (ra.shift - 1)))
            >> ra.shift)
            .clamp(0, 255);
        assert_eq!(i64::from(act[ty.off + i]), want, "{i}");
    }
    // And the whole net still tracks the float reference.
    let w = noisy_weights(&model, &var, 4, 0, Readback::Fixed).unwrap();
    let float = forward(&desc, Some(&w), &img).unwrap().pop().unwrap();
    let (logits, _, _) = run_int(&model, Path::Collapsed, &var, 4, 0, &img);
    let scale = f64::from(model.op(3).unwrap().out_scale);
    let range = float.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (l, f) in logits.iter().zip(&float) {
        assert!(
            (f64::from(*l) * scale - f).abs() < 0.03 * range,
            "{} vs {f}",
            f64::from(*l) * scale
        );
    }
}

#[test]
fn global_pool_and_max_pool_match_naive() {
    let (c, hw) = (2, 5);
    let arrays = vec![rand_vec(31, c * c * 9, 0.6), rand_vec(32, 3 * c, 0.5)];
    let net = Net {
        mean: vec![0.4; c],
        std: vec![0.3; c],
        arrays,
    };
    let a = &net.arrays;
    let nodes = [
        Node::new(Layer::Conv2d {
            weight: &a[0],
            bias: None,
            out_channels: c,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            groups: 1,
        }),
        Node::new(Layer::MaxPool {
            kernel: [2, 2],
            stride: [1, 1],
            padding: [0; 4],
        }),
        Node::new(Layer::GlobalAvgPool),
        Node::new(Layer::Linear {
            weight: &a[1],
            bias: None,
            out_features: 3,
        }),
    ];
    let desc = ModelDesc {
        input: InputSpec {
            channels: c,
            height: hw,
            width: hw,
            mean: &net.mean,
            std: &net.std,
        },
        classes: 3,
        nodes: &nodes,
    };
    let img = rand_bytes(2, c * hw * hw);
    let desc = calibrated(&desc, &img);
    let var = VariationConfig::paper(0.0).unwrap();
    let blob = pack(&desc, &PackConfig::new(var), None).unwrap();
    let model = Model::parse(&blob).unwrap();
    let (_, _, act) = run_int(&model, Path::Collapsed, &var, 0, 0, &img);
    let (t1, t2, t3) = (
        model.tensor(1).unwrap(),
        model.tensor(2).unwrap(),
        model.tensor(3).unwrap(),
    );
    assert_eq!(t1.kind, ActKind::I8);
    let v = |t: &Tensor, i: usize| i64::from(value(t.kind, act[t.off + i]));
    let mut pooled = vec![0i64; c * 16];
    for ch in 0..c {
        for y in 0..4 {
            for x in 0..4 {
                let m = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|(dy, dx)| v(&t1, (ch * 5 + y + dy) * 5 + x + dx))
                    .max()
                    .unwrap();
                pooled[(ch * 4 + y) * 4 + x] = m;
                assert_eq!(v(&t2, (ch * 4 + y) * 4 + x), m);
            }
        }
        let r = model.record(model.op(2).unwrap().params_start);
        let sum: i64 = pooled[ch * 16..(ch + 1) * 16].iter().sum();
        assert_eq!(v(&t3, ch), requant(sum, r).clamp(-127, 127));
    }
}

#[test]
fn all_zero_layer_is_a_typed_error_and_all_max_saturates_cleanly() {
    let zeros = vec![0.0f32; 2 * 4];
    let net = Net {
        mean: vec![0.5],
        std: vec![0.5],
        arrays: vec![],
    };
    let nodes = [
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: &zeros,
            bias: None,
            out_features: 2,
        }),
    ];
    let desc = ModelDesc {
        input: InputSpec {
            channels: 1,
            height: 2,
            width: 2,
            mean: &net.mean,
            std: &net.std,
        },
        classes: 2,
        nodes: &nodes,
    };
    let cfg = PackConfig::new(VariationConfig::paper(0.1).unwrap());
    assert!(matches!(
        pack(&desc, &cfg, None),
        Err(Error::InvalidScale { .. })
    ));
    // All weights at +max and all-max pixels: every accumulator is the same largest value.
    let ones = vec![1.0f32; 2 * 300];
    let nodes = [
        Node::new(Layer::Flatten),
        Node {
            act_max: 400.0,
            ..Node::new(Layer::Linear {
                weight: &ones,
                bias: None,
                out_features: 2,
            })
        },
    ];
    let desc = ModelDesc {
        input: InputSpec {
            channels: 3,
            height: 10,
            width: 10,
            mean: &[0.0; 3],
            std: &[1.0; 3],
        },
        classes: 2,
        nodes: &nodes,
    };
    let blob = pack(
        &desc,
        &PackConfig::new(VariationConfig::paper(0.0).unwrap()),
        None,
    )
    .unwrap();
    let model = Model::parse(&blob).unwrap();
    let (logits, class, _) = run_int(
        &model,
        Path::Collapsed,
        &model.variation(),
        0,
        0,
        &[255; 300],
    );
    let scale = f64::from(model.op(0).unwrap().out_scale);
    assert_eq!(logits[0], logits[1]);
    assert_eq!(class, 0);
    assert!(
        (f64::from(logits[0]) * scale - 300.0).abs() < 0.01 * 300.0,
        "{}",
        f64::from(logits[0]) * scale
    );
}

// ---- corruption ------------------------------------------------------------------------------

#[test]
fn every_byte_flip_and_truncation_is_a_typed_error() {
    let blob = small_blob();
    assert!(Model::parse(&blob).is_ok());
    let mut copy = blob.clone();
    for i in 0..blob.len() {
        for flip in [0xFFu8, 0x01] {
            copy[i] ^= flip;
            assert!(
                Model::parse(&copy).is_err(),
                "flip {flip:#x} at {i} accepted"
            );
            copy[i] ^= flip;
        }
    }
    for len in 0..blob.len() {
        match Model::parse(&blob[..len]) {
            Err(Error::Truncated { .. } | Error::BadMagic) => {}
            other => panic!("truncation to {len}: {other:?}"),
        }
    }
}

/// Fixes the CRC of a mutated blob so that the field validation, not the checksum, is tested.
fn reseal(b: &mut [u8]) {
    if b.len() >= 4 {
        let n = b.len() - 4;
        let c = crate::crc::crc32(&b[..n]);
        b[n..].copy_from_slice(&c.to_le_bytes());
    }
}

/// Parses arbitrary bytes and, when they parse, programs and runs the model: nothing panics.
fn exercise(bytes: &[u8]) -> bool {
    let Ok(model) = Model::parse(bytes) else {
        return false;
    };
    let var = model.variation();
    let s = model.scratch();
    if s.act_bytes > 1 << 22 || model.weight_count() > 1 << 20 {
        return true;
    }
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let img = vec![77u8; model.input_shape().len()];
    for path in [
        Path::Collapsed,
        Path::Sliced(Adc::Quantized { bits: 5, step: 100 }),
    ] {
        let mut state = vec![0i16; model.state_len(path)];
        program(&model, &var, 1, 0, path, &mut state).unwrap();
        let mut scratch = Scratch {
            act: &mut act,
            patch: &mut patch,
        };
        let class = infer(&model, path, &state, &img, &mut scratch, &mut logits).unwrap();
        assert!(class < model.classes());
    }
    true
}

/// Runs `cases` mutants of four models (the small model in version 2 and in version 1, the
/// fire model with every version-2 op, the squeeze model whose global pool writes the logits;
/// 1-4 random byte writes, CRC fixed up, all over the blob but mostly in the header and tables)
/// and `cases / 2` random blobs behind a valid magic, version (1 or 2) and length; returns how
/// many mutants parsed.
fn fuzz(cases: u64, salt: u64) -> usize {
    let small = small_blob();
    let blobs = [
        v2::to_v1(&small),
        v2::fire_blob(),
        small,
        v2::squeeze_blob(),
    ];
    let tables: Vec<usize> = blobs
        .iter()
        .map(|b| {
            let model = Model::parse(b).unwrap();
            let op_len = if model.version() == 1 {
                crate::format::OP_LEN_V1
            } else {
                crate::format::OP_LEN
            };
            crate::format::HEADER_LEN
                + 256 * model.input_shape().c
                + model.op_count() * op_len
                + 16 * 40
        })
        .collect();
    let mut accepted = 0;
    for case in 0..cases {
        let which = (case % blobs.len() as u64) as usize;
        let (blob, tables_end) = (&blobs[which], tables[which]);
        let mut b = blob.clone();
        let seed = mix64(case ^ salt << 40);
        let edits = 1 + (seed % 4) as usize;
        for e in 0..edits {
            let r = mix64(seed ^ (e as u64 + 1) << 56);
            let span = if r >> 62 == 0 {
                b.len() - 4
            } else {
                tables_end.min(b.len() - 4)
            };
            let at = (r as usize) % span;
            b[at] = (r >> 32) as u8;
        }
        reseal(&mut b);
        accepted += usize::from(exercise(&b));
    }
    for case in 0..cases / 2 {
        let seed = mix64(case ^ salt << 40 ^ 0xF00D);
        let mut b = rand_bytes(seed, 90 + (seed % 400) as usize);
        b[..8].copy_from_slice(&crate::format::MAGIC);
        let version = if case % 2 == 0 {
            crate::format::VERSION
        } else {
            crate::format::VERSION_1
        };
        b[8..10].copy_from_slice(&version.to_le_bytes());
        let total = b.len() as u32;
        b[72..76].copy_from_slice(&total.to_le_bytes());
        reseal(&mut b);
        exercise(&b);
    }
    accepted
}

#[test]
fn fuzz_resealed_mutations_of_a_valid_model() {
    // Bounded-time fuzz inside `cargo test`. Some mutations (scales, weights, table entries) are
    // legal and must then program and run; most are not.
    let accepted = fuzz(4000, 0);
    assert!(accepted < 4000, "{accepted}");
}

/// The long run: `NVCIM_FUZZ_CASES=1000000 cargo test --release -p nvcim-shared fuzz_long -- --ignored`.
#[test]
#[ignore = "long fuzz run; see the doc comment"]
fn fuzz_long() {
    let cases = std::env::var("NVCIM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let salt = std::env::var("NVCIM_FUZZ_SALT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let t = std::time::Instant::now();
    let accepted = fuzz(cases, salt);
    std::eprintln!(
        "fuzz: {cases} mutants + {} random blobs, {accepted} mutants parsed and ran, {:.1} s",
        cases / 2,
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn test_batch_round_trips() {
    let blob = small_blob();
    let model = Model::parse(&blob).unwrap();
    assert_eq!(model.test_len(), 3);
    assert_eq!(model.test_image(1).unwrap().1, 3);
    assert_eq!(
        model.test_image(1).unwrap().0,
        &rand_bytes(3, 3 * 64)[64..128]
    );
    assert!(model.test_image(3).is_none());
    assert_eq!(model.layer_count(), 5);
    assert_eq!(model.tile_rows(), 16);
    // The last linear: fan-in 12 on 16-row tiles, 4 outputs on 4-column tiles.
    let last = model.op(model.op_count() - 1).unwrap();
    assert_eq!(model.tile_count(&last), 1);
    // The first conv: fan-in 9, 6 outputs on 4 columns.
    assert_eq!(model.tile_count(&model.op(0).unwrap()), 2);
    assert_eq!(model.tile_count(&model.op(1).unwrap()), 0);
}

#[test]
fn paths_agree_under_faults_profiles_and_large_sigma() {
    use crate::quant::QuantConfig;
    use crate::variation::{Faults, Profile, SigmaUnit};
    let blob = small_blob();
    let model = Model::parse(&blob).unwrap();
    let (img, _) = model.test_image(2).unwrap();
    for (sigma, unit, profile, faults) in [
        (
            1.0,
            SigmaUnit::Range,
            Profile::Fefet6,
            Faults::new(0.05, 0.05).unwrap(),
        ),
        (3.0, SigmaUnit::Level, Profile::Uniform, Faults::NONE),
        (
            0.0,
            SigmaUnit::Range,
            Profile::Rram4,
            Faults::new(0.0, 1.0).unwrap(),
        ),
    ] {
        let var = VariationConfig::new(QuantConfig::DEFAULT, sigma, unit, profile, faults).unwrap();
        let (a, ca, _) = run_int(&model, Path::Collapsed, &var, 8, 2, img);
        let (b, cb, _) = run_int(&model, Path::Sliced(Adc::Ideal), &var, 8, 2, img);
        assert_eq!((a, ca), (b, cb), "{sigma} {unit:?} {profile:?}");
    }
}

/// Pins the packed bytes and the noisy logits of the small model (seed 42, run 0, image 0): any
/// change to quantization, packing, the draw order or the integer arithmetic shows up here, and
/// a port (the firmware) can check itself against these numbers.
#[test]
fn golden_blob_and_logits() {
    let blob = small_blob();
    // The stored CRC (the CRC of a whole blob, its CRC included, is the constant residue).
    let stored = u32::from_le_bytes(blob[blob.len() - 4..].try_into().unwrap());
    assert_eq!((blob.len(), stored), (2746, 0xaa7a_3045));
    let model = Model::parse(&blob).unwrap();
    let (img, _) = model.test_image(0).unwrap();
    let (logits, class, _) = run_int(&model, Path::Collapsed, &model.variation(), 42, 0, img);
    assert_eq!(logits, [-318_877, 815_797, 440_421, 978_595]);
    assert_eq!(class, 3);
    // The test batch: labels 0, 3, 1; count_correct agrees with per-image inference.
    let mut state = vec![0i16; model.state_len(Path::Collapsed)];
    program(
        &model,
        &model.variation(),
        42,
        0,
        Path::Collapsed,
        &mut state,
    )
    .unwrap();
    let s = model.scratch();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let mut scratch = Scratch {
        act: &mut act,
        patch: &mut patch,
    };
    let mut expected = 0;
    for i in 0..model.test_len() {
        let (img, label) = model.test_image(i).unwrap();
        expected += usize::from(
            infer(
                &model,
                Path::Collapsed,
                &state,
                img,
                &mut scratch,
                &mut logits,
            )
            .unwrap()
                == usize::from(label),
        );
    }
    assert_eq!(
        count_correct(&model, Path::Collapsed, &state, &mut scratch, &mut logits).unwrap(),
        expected
    );
}

#[test]
fn count_correct_counts_matching_labels() {
    // Label the test images with the classes the noiseless engine predicts: all match; then
    // shift every label by one class: none match.
    let (net, classes) = small_vgg(7, 1, 8);
    let desc = small_vgg_nodes(&net, 1, 8, classes);
    let images = rand_bytes(13, 6 * 64);
    let desc = calibrated(&desc, &images);
    let cfg = PackConfig {
        tile_rows: 16,
        tile_cols: 4,
        ..PackConfig::new(VariationConfig::paper(0.0).unwrap())
    };
    let plain = pack(&desc, &cfg, None).unwrap();
    let model = Model::parse(&plain).unwrap();
    let labels: Vec<u16> = images
        .chunks(64)
        .map(|img| run_int(&model, Path::Collapsed, &cfg.variation, 0, 0, img).1 as u16)
        .collect();
    for (shift, want) in [(0, 6), (1, 0)] {
        let l: Vec<u16> = labels
            .iter()
            .map(|&c| (c + shift) % classes as u16)
            .collect();
        let blob = pack(
            &desc,
            &cfg,
            Some(TestBatch {
                images: &images,
                labels: &l,
            }),
        )
        .unwrap();
        let model = Model::parse(&blob).unwrap();
        let mut state = vec![0i16; model.state_len(Path::Collapsed)];
        program(&model, &cfg.variation, 0, 0, Path::Collapsed, &mut state).unwrap();
        let s = model.scratch();
        let (mut act, mut patch, mut logits) = (
            vec![0u8; s.act_bytes],
            vec![0i16; s.patch],
            vec![0i32; s.logits],
        );
        let mut scratch = Scratch {
            act: &mut act,
            patch: &mut patch,
        };
        assert_eq!(
            count_correct(&model, Path::Collapsed, &state, &mut scratch, &mut logits).unwrap(),
            want
        );
    }
}

#[test]
fn preloaded_records_equal_the_model_records() {
    let blob = small_blob();
    let model = Model::parse(&blob).unwrap();
    let n = (0..model.op_count())
        .map(|i| model.op(i).unwrap().params_start + 1)
        .max()
        .unwrap();
    for start in [0, 1, n / 2, n - 1, n, n + 3] {
        let r = model.records(start, 5);
        for i in 0..7 {
            let want = if i < 5 {
                model.record(start + i)
            } else {
                Requant::default()
            };
            assert_eq!(r.get(i), want, "start {start} record {i}");
        }
    }
}

#[test]
fn shift_round_is_round_half_up() {
    let mut x = 0x1234_5678_9abc_def0u64;
    for i in 0..200_000u32 {
        x = mix64(x ^ u64::from(i));
        let shift = 1 + (x >> 58) as u32 % 62;
        // Values up to the executor's bound (|acc * m + bias| < 2^63 - 2^62), and small ones.
        let v = if i % 2 == 0 {
            (x as i64) >> 1
        } else {
            (x as i64) >> 50
        };
        let want = ((i128::from(v) + (1i128 << (shift - 1))) >> shift) as i64;
        assert_eq!(shift_round(v, shift), want, "{v} >> {shift}");
    }
    assert_eq!(shift_round(-3, 1), -1); // -1.5 rounds up to -1
    assert_eq!(shift_round(3, 1), 2);
    assert_eq!(shift_round(7, 0), 7);
}

mod v2;
