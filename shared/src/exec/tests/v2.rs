//! Format version 2: grouped and rectangular convs, padded pools, clip, concat; version-1
//! compatibility; corrupt version-2 fields.

use alloc::{vec, vec::Vec};

use super::*;
use crate::format::{HEADER_LEN, OP_LEN, OP_LEN_V1, Op};

// ---- helpers ---------------------------------------------------------------------------------

/// A version-1 blob with the same model as a version-2 `blob` whose ops version 1 can express
/// (kinds 1..=7, one stride and pad per op, no groups, pools unpadded, type-range bounds): the
/// "v1 writer" of these tests.
pub(super) fn to_v1(blob: &[u8]) -> Vec<u8> {
    let model = Model::parse(blob).unwrap();
    let ops_at = HEADER_LEN + 256 * model.input_shape().c;
    let n = model.op_count();
    let mut out = blob[..ops_at].to_vec();
    out[8..10].copy_from_slice(&1u16.to_le_bytes());
    for i in 0..n {
        let op = model.op(i).unwrap();
        assert!(op.kind.code() <= 7 && op.groups == 1);
        assert_eq!(op.stride[0], op.stride[1]);
        assert!(op.pad.iter().all(|&p| p == op.pad[0]));
        assert_eq!(op.clip, op.out_kind.range());
        let r = &blob[ops_at + i * OP_LEN..ops_at + (i + 1) * OP_LEN];
        out.extend_from_slice(&[
            r[0],
            r[1],
            r[2],
            r[3],
            op.stride[0] as u8,
            op.pad[0] as u8,
            0,
            0,
        ]);
        out.extend_from_slice(&r[14..26]); // src, src2, out c/h/w, layer
        out.extend_from_slice(&r[32..52]); // out_off, weights_start, params_start, scales
    }
    out.extend_from_slice(&blob[ops_at + n * OP_LEN..blob.len() - 4]);
    assert_eq!(out.len() + 4, blob.len() - n * (OP_LEN - OP_LEN_V1));
    let total = (out.len() + 4) as u32;
    out[72..76].copy_from_slice(&total.to_le_bytes());
    let crc = crate::crc::crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn state_crc(model: &Model<'_>, path: Path, seed: u64, run: u32) -> (u32, Vec<i16>) {
    let mut state = vec![0i16; model.state_len(path)];
    program(model, &model.variation(), seed, run, path, &mut state).unwrap();
    let bytes: Vec<u8> = state.iter().flat_map(|v| v.to_le_bytes()).collect();
    (crate::crc::crc32(&bytes), state)
}

fn conv<'a>(
    w: &'a [f32],
    out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    groups: usize,
) -> Layer<'a> {
    Layer::Conv2d {
        weight: w,
        bias: None,
        out_channels: out,
        kernel,
        stride,
        padding,
        groups,
    }
}

fn bn(a: &[Vec<f32>], at: usize) -> Layer<'_> {
    Layer::BatchNorm {
        gamma: &a[at],
        beta: &a[at + 1],
        mean: &a[at + 2],
        var: &a[at + 3],
        eps: 1e-5,
    }
}

/// Four BatchNorm arrays of `c` channels.
fn bn_arrays(seed: u64, c: usize) -> [Vec<f32>; 4] {
    [
        rand_vec(seed, c, 0.3).iter().map(|v| 1.0 + v).collect(),
        rand_vec(seed + 1, c, 0.2),
        rand_vec(seed + 2, c, 0.2),
        rand_vec(seed + 3, c, 0.3).iter().map(|v| 1.0 + v).collect(),
    ]
}

fn desc_of<'a>(
    net: &'a Net,
    c: usize,
    h: usize,
    w: usize,
    classes: usize,
    nodes: Vec<Node<'a>>,
) -> ModelDesc<'a> {
    ModelDesc {
        input: InputSpec {
            channels: c,
            height: h,
            width: w,
            mean: &net.mean,
            std: &net.std,
        },
        classes,
        nodes: alloc::boxed::Box::leak(nodes.into_boxed_slice()),
    }
}

/// Depthwise-separable block with ReLU6 (MobileNetV1): conv 3x3 s2 + BN + ReLU6, depthwise
/// 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6, global pool, linear.
fn mobilenet_net(seed: u64) -> Net {
    let (c_in, c1, c2) = (3, 8, 12);
    let mut arrays = vec![
        rand_vec(seed, c1 * c_in * 9, 0.4),
        rand_vec(seed + 1, c1 * 9, 0.6),
        rand_vec(seed + 2, c2 * c1, 0.5),
        rand_vec(seed + 3, 5 * c2, 0.5),
    ];
    arrays.extend(bn_arrays(seed + 10, c1));
    arrays.extend(bn_arrays(seed + 20, c1));
    arrays.extend(bn_arrays(seed + 30, c2));
    Net {
        mean: vec![0.45; c_in],
        std: vec![0.25; c_in],
        arrays,
    }
}

fn mobilenet(net: &Net) -> ModelDesc<'_> {
    let a = &net.arrays;
    let relu6 = || Node::new(Layer::Clip { min: 0.0, max: 6.0 });
    let nodes = vec![
        Node::new(conv(&a[0], 8, [3, 3], [2, 2], [0, 0, 1, 1], 1)),
        Node::new(bn(a, 4)),
        relu6(),
        Node::new(conv(&a[1], 8, [3, 3], [1, 1], [1; 4], 8)),
        Node::new(bn(a, 8)),
        relu6(),
        Node::new(conv(&a[2], 12, [1, 1], [1, 1], [0; 4], 1)),
        Node::new(bn(a, 12)),
        relu6(),
        Node::new(Layer::GlobalAvgPool),
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: &a[3],
            bias: None,
            out_features: 5,
        }),
    ];
    desc_of(net, 3, 11, 11, 5, nodes)
}

/// DS-CNN-like front: conv 10x4 stride 2 with asymmetric padding + ReLU, padded max pool,
/// avg pools (exclude-pad, include-pad), a plain Clip on a pooled tensor, linear.
fn dscnn_net(seed: u64) -> Net {
    let (c1, h, w) = (6, 20, 9);
    let oh = (h + 4 + 5 - 10) / 2 + 1; // 10
    let ow = (w + 1 + 2 - 4) / 2 + 1; // 5
    let (ph, pw) = ((oh + 2 - 3) / 2 + 1, (ow + 2 - 3) / 2 + 1); // max pool 3 s2 p1: 5, 3
    let (qh, qw) = ((ph + 1 - 2) / 2 + 1, (pw + 1 - 2) / 2 + 1); // avg 2 s2 p[1,1,0,0]: 3, 2
    Net {
        mean: vec![0.5],
        std: vec![0.3],
        arrays: vec![
            rand_vec(seed, c1 * 40, 0.3),
            rand_vec(seed + 1, c1, 0.2),
            rand_vec(seed + 2, 4 * c1 * qh * qw, 0.5),
        ],
    }
}

fn dscnn(net: &Net) -> ModelDesc<'_> {
    let a = &net.arrays;
    let nodes = vec![
        Node::new(Layer::Conv2d {
            weight: &a[0],
            bias: Some(&a[1]),
            out_channels: 6,
            kernel: [10, 4],
            stride: [2, 2],
            padding: [4, 1, 5, 2],
            groups: 1,
        }),
        Node::new(Layer::Relu),
        Node::new(Layer::MaxPool {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1; 4],
        }),
        Node::new(Layer::AvgPool {
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            count_include_pad: false,
        }),
        Node::new(Layer::AvgPool {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [1, 1, 0, 0],
            count_include_pad: true,
        }),
        Node::new(Layer::Clip { min: 0.0, max: 1.5 }),
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: &a[2],
            bias: None,
            out_features: 4,
        }),
    ];
    desc_of(net, 1, 20, 9, 4, nodes)
}

/// A SqueezeNet fire module (squeeze 1x1 + ReLU, expand 1x1 + ReLU and expand 3x3 + ReLU,
/// concat), then a groups = 2 conv with a fused clip, a signed concat with a pooled branch,
/// global pool and linear.
fn fire_net(seed: u64) -> Net {
    let c = 4;
    Net {
        mean: vec![0.5; c],
        std: vec![0.25; c],
        arrays: vec![
            rand_vec(seed, 3 * c, 0.6),
            rand_vec(seed + 1, 4 * 3, 0.6),
            rand_vec(seed + 2, 4 * 3 * 9, 0.4),
            rand_vec(seed + 3, 6 * 4 * 9, 0.4), // groups 2: 8 in -> 6 out, 4 in per group
            rand_vec(seed + 4, 3 * 10, 0.5),
            rand_vec(seed + 5, 6, 0.2),
        ],
    }
}

fn fire(net: &Net) -> ModelDesc<'_> {
    let a = &net.arrays;
    let node = |layer, input| Node {
        input,
        ..Node::new(layer)
    };
    let nodes = vec![
        Node::new(conv(&a[0], 3, [1, 1], [1, 1], [0; 4], 1)), // 0 squeeze
        Node::new(Layer::Relu),                               // 1
        Node::new(conv(&a[1], 4, [1, 1], [1, 1], [0; 4], 1)), // 2 expand 1x1
        Node::new(Layer::Relu),                               // 3
        node(conv(&a[2], 4, [3, 3], [1, 1], [1; 4], 1), Some(1)), // 4 expand 3x3
        Node::new(Layer::Relu),                               // 5
        Node::new(Layer::Concat { other: 3 }),                // 6: 8 channels
        Node::new(Layer::Conv2d {
            weight: &a[3],
            bias: Some(&a[5]),
            out_channels: 6,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            groups: 2,
        }), // 7
        Node::new(Layer::Clip {
            min: -1.0,
            max: 2.0,
        }), // 8 (fused, i8)
        node(
            Layer::MaxPool {
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1; 4],
            },
            Some(3),
        ), // 9: u8, 4 channels
        node(Layer::Concat { other: 9 }, Some(8)),            // 10: 10 channels, i8
        Node::new(Layer::GlobalAvgPool),                      // 11
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: &a[4],
            bias: None,
            out_features: 3,
        }),
    ];
    desc_of(net, 4, 7, 6, 3, nodes)
}

/// Packs `desc` (noise-calibrated), runs `images` through both ideal paths (bit-identical) and a
/// quantizing ADC, and returns the worst relative logit error against the float reference with
/// fixed-point and with exact devices (relative to the largest |logit|).
fn track(desc: &ModelDesc<'_>, images: &[u8], rows: usize, cols: usize) -> (f64, f64) {
    let var = VariationConfig::paper(0.1).unwrap();
    let cfg = PackConfig {
        tile_rows: rows,
        tile_cols: cols,
        ..PackConfig::new(var)
    };
    let desc = noise_calibrated(desc, &cfg, images, 99, 3);
    let blob = pack(&desc, &cfg, None).unwrap();
    let model = Model::parse(&blob).unwrap();
    assert_eq!(model.version(), 2);
    let logit_scale = f64::from(model.op(model.op_count() - 1).unwrap().out_scale);
    let len = desc.input.channels * desc.input.height * desc.input.width;
    let (mut worst, mut worst_fixed) = (0.0f64, 0.0f64);
    for run in 0..3 {
        let w = noisy_weights(&model, &var, 99, run, Readback::Exact).unwrap();
        let wf = noisy_weights(&model, &var, 99, run, Readback::Fixed).unwrap();
        for img in images.chunks(len) {
            let float = forward(&desc, Some(&w), img).unwrap().pop().unwrap();
            let float_fixed = forward(&desc, Some(&wf), img).unwrap().pop().unwrap();
            let (logits, class, _) = run_int(&model, Path::Collapsed, &var, 99, run, img);
            let (sliced, class_s, _) =
                run_int(&model, Path::Sliced(Adc::Ideal), &var, 99, run, img);
            assert_eq!(logits, sliced, "ideal sliced path == collapsed path");
            assert_eq!(class, class_s);
            let adc = Path::Sliced(Adc::Quantized { bits: 6, step: 200 });
            let (coarse, class_c, _) = run_int(&model, adc, &var, 99, run, img);
            assert!(class_c < desc.classes && coarse.len() == desc.classes);
            let range = float.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for ((l, f), g) in logits.iter().zip(&float).zip(&float_fixed) {
                worst = worst.max((f64::from(*l) * logit_scale - f).abs() / range);
                worst_fixed = worst_fixed.max((f64::from(*l) * logit_scale - g).abs() / range);
            }
        }
    }
    (worst_fixed, worst)
}

// ---- the new ops against the float reference -------------------------------------------------

/// The bounds of `int_logits_track_the_float_reference_and_paths_agree` (crate docs): < 3 %
/// against the fixed-point reference, < 8 % against exact devices.
fn assert_tracks(name: &str, (fixed, exact): (f64, f64)) {
    std::eprintln!("{name}: worst relative logit error fixed-point {fixed}, exact {exact}");
    assert!(fixed < 0.03, "{name}: relative logit error {fixed}");
    assert!(exact < 0.08, "{name}: relative logit error {exact}");
}

#[test]
fn depthwise_separable_relu6_tracks_the_float_reference() {
    let net = mobilenet_net(41);
    let desc = mobilenet(&net);
    let images = rand_bytes(8, 6 * 3 * 11 * 11);
    assert_tracks("mobilenet", track(&desc, &images, 16, 4));
    // The depthwise layer: fan-in 9 per channel, one tile per channel.
    let blob = pack(
        &calibrated(&desc, &images),
        &PackConfig::new(VariationConfig::paper(0.1).unwrap()),
        None,
    )
    .unwrap();
    let model = Model::parse(&blob).unwrap();
    let dw = model.op(1).unwrap();
    assert_eq!(
        (dw.kind, dw.groups, model.fan_in(&dw)),
        (OpKind::Conv, 8, 9)
    );
    assert_eq!(model.tile_count(&dw), 8);
    assert_eq!(model.layer_weight_bytes(&dw).len(), 2 * 8 * 9);
    // ReLU6 fused: u8 out, bound round(6 / scale) or 255.
    let scale = f64::from(dw.out_scale);
    let hi = libm::round(6.0 / scale).min(255.0) as i32;
    assert_eq!((dw.out_kind, dw.clip), (ActKind::U8, [0, hi]));
    assert_eq!(model.op_count(), 5); // three fused convs, global pool, linear
}

#[test]
fn rectangular_strided_conv_and_padded_pools_track_the_float_reference() {
    let net = dscnn_net(5);
    let desc = dscnn(&net);
    let images = rand_bytes(9, 6 * 20 * 9);
    assert_tracks("dscnn", track(&desc, &images, 32, 4));
}

#[test]
fn fire_module_concat_and_grouped_conv_track_the_float_reference() {
    let net = fire_net(17);
    let desc = fire(&net);
    let images = rand_bytes(10, 6 * 4 * 7 * 6);
    assert_tracks("fire", track(&desc, &images, 16, 4));
    let blob = pack(
        &calibrated(&desc, &images),
        &PackConfig::new(VariationConfig::paper(0.1).unwrap()),
        None,
    )
    .unwrap();
    let model = Model::parse(&blob).unwrap();
    let kinds: Vec<OpKind> = (0..model.op_count())
        .map(|i| model.op(i).unwrap().kind)
        .collect();
    use OpKind::*;
    assert_eq!(
        kinds,
        [
            Conv,
            Conv,
            Conv,
            Concat,
            Conv,
            MaxPool,
            Concat,
            GlobalAvgPool,
            Linear
        ]
    );
    let cat = model.op(3).unwrap();
    assert_eq!((cat.out.c, cat.out_kind), (8, ActKind::U8)); // both inputs u8
    let g = model.op(4).unwrap();
    assert_eq!(
        (g.groups, model.fan_in(&g), g.out_kind),
        (2, 36, ActKind::I8)
    );
    assert!(g.clip[0] < 0 && g.clip[0] > -127, "{:?}", g.clip);
    let cat2 = model.op(6).unwrap();
    assert_eq!((cat2.out.c, cat2.out_kind), (10, ActKind::I8));
}

// ---- hand-computed cases ---------------------------------------------------------------------

/// `nodes` on a 1-channel `h x w` image (mean `mean`, std 0.5: codes `-127..=127` at scale
/// 1/127 when mean is 0.5), then flatten and a 2-class linear; returns the model's blob and the
/// arena after running `img`.
fn tiny(
    mean: f32,
    h: usize,
    w: usize,
    nodes: Vec<Node<'static>>,
    flat: usize,
    img: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let lin: &'static [f32] = Vec::leak(rand_vec(3, 2 * flat, 1.0));
    let mut nodes = nodes;
    nodes.push(Node::new(Layer::Flatten));
    nodes.push(Node {
        act_max: 50.0,
        ..Node::new(Layer::Linear {
            weight: lin,
            bias: None,
            out_features: 2,
        })
    });
    let mean: &'static [f32] = Vec::leak(vec![mean]);
    let desc = ModelDesc {
        input: InputSpec {
            channels: 1,
            height: h,
            width: w,
            mean,
            std: &[0.5],
        },
        classes: 2,
        nodes: Vec::leak(nodes),
    };
    let var = VariationConfig::paper(0.0).unwrap();
    let blob = pack(&desc, &PackConfig::new(var), None).unwrap();
    let model = Model::parse(&blob).unwrap();
    let (_, _, act) = run_int(&model, Path::Collapsed, &var, 0, 0, img);
    (blob, act)
}

fn codes(model: &Model<'_>, act: &[u8], t: usize) -> Vec<i16> {
    let t = model.tensor(t).unwrap();
    act[t.off..t.off + t.shape.len()]
        .iter()
        .map(|&b| value(t.kind, b))
        .collect()
}

#[test]
fn avg_pool_at_a_padded_corner_divides_by_in_bounds_or_by_the_window() {
    // Mean 0, std 0.5: values 2 p / 255 up to 2, input scale 2/127, codes round(p 127 / 255).
    let img: Vec<u8> = (0..16).map(|i| 2 * i as u8).collect();
    for include in [false, true] {
        let pool = Node::new(Layer::AvgPool {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1; 4],
            count_include_pad: include,
        });
        let (blob, act) = tiny(0.0, 4, 4, vec![pool], 4, &img);
        let model = Model::parse(&blob).unwrap();
        let lut = model.input_table(0);
        let x: Vec<i32> = img
            .iter()
            .map(|&p| i32::from(lut[usize::from(p)] as i8))
            .collect();
        // Pixels 0, 2, 4, ...: codes round(p * 127 / 255) = 0, 1, 2, 3, 4, 5, 6, 7, 8, ...
        assert_eq!(&x[..6], [0, 1, 2, 3, 4, 5]);
        let y = codes(&model, &act, 1);
        assert_eq!(y.len(), 4); // 2 x 2 outputs
        // Corner (0, 0): rows 0..2, columns 0..2 in bounds: x0 + x1 + x4 + x5 = 0 + 1 + 4 + 5 = 10.
        let corner = x[0] + x[1] + x[4] + x[5];
        assert_eq!(corner, 10);
        // Exclude: 10 / 4 = 2.5 rounds half up to 3. Include: 10 / 9 = 1.1 -> 1.
        assert_eq!(y[0], if include { 1 } else { 3 });
        // Output (1, 1): rows 1..4, columns 1..4, all in bounds: the same either way.
        let inner: i32 = [5, 6, 7, 9, 10, 11, 13, 14, 15].iter().map(|&i| x[i]).sum();
        let want = if include {
            (f64::from(inner) / 9.0).round() as i16
        } else {
            ((2 * inner + 9) / 18) as i16
        };
        assert_eq!(y[3], want);
        assert_eq!(model.op(0).unwrap().count_include_pad, include);
    }
}

#[test]
fn max_pool_ignores_padding_even_below_zero() {
    // Mean 0.5: codes below 0 for dark pixels; a padded window must not see a 0.
    let img = [0u8, 10, 20, 30, 40, 50, 60, 70, 80];
    let pool = Node::new(Layer::MaxPool {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [1, 1, 0, 0],
    });
    let (blob, act) = tiny(0.5, 3, 3, vec![pool], 4, &img);
    let model = Model::parse(&blob).unwrap();
    let x = codes(&model, &act, 0);
    assert!(x.iter().all(|&v| v < 0), "{x:?}");
    let y = codes(&model, &act, 1);
    // Windows: {x0}, {x1, x2}, {x3, x6}, {x4, x5, x7, x8}.
    assert_eq!(y, [x[0], x[2], x[6], x[8]]);
}

#[test]
fn standalone_clip_quantizes_its_bounds_with_the_input_scale() {
    // Mean 0.5, std 0.5: input scale 1/127; bounds round(-0.25 * 127) = -32, round(0.6 * 127) = 76.
    let img: Vec<u8> = (0..16).map(|i| (i * 17) as u8).collect();
    let pool = Node::new(Layer::MaxPool {
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
    });
    let clip = Node::new(Layer::Clip {
        min: -0.25,
        max: 0.6,
    });
    let (blob, act) = tiny(0.5, 4, 4, vec![pool, clip], 16, &img);
    let model = Model::parse(&blob).unwrap();
    let op = model.op(1).unwrap();
    assert_eq!(
        (op.kind, op.out_kind, op.clip),
        (OpKind::Clip, ActKind::I8, [-32, 76])
    );
    let x = codes(&model, &act, 1);
    let y = codes(&model, &act, 2);
    assert!(x.iter().any(|&v| v < -32) && x.iter().any(|&v| v > 76));
    let want: Vec<i16> = x.iter().map(|&v| v.clamp(-32, 76)).collect();
    assert_eq!(y, want);
}

#[test]
fn concat_rescales_two_scales_into_one() {
    // A = input codes (scale 1/127 with mean 0.5, std 0.5). B = A + A at act_max 2: scale
    // 2/127, codes equal to A's. Concat(B, A) at act_max 1 (scale 1/127): [2 B, A].
    let img: Vec<u8> = (0..4).map(|i| 128 + 20 * i as u8).collect();
    let id = Node::new(Layer::MaxPool {
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
    });
    let add = Node {
        act_max: 2.0,
        ..Node::new(Layer::Add { other: 0 })
    };
    let cat = Node {
        act_max: 1.0,
        ..Node::new(Layer::Concat { other: 0 })
    };
    let (blob, act) = tiny(0.5, 2, 2, vec![id, add, cat], 8, &img);
    let model = Model::parse(&blob).unwrap();
    let a = codes(&model, &act, 1);
    let b = codes(&model, &act, 2);
    assert_eq!(a, b);
    assert!(a.iter().all(|&v| (0..=63).contains(&v)), "{a:?}");
    let t = model.tensor(2).unwrap();
    assert!((f64::from(t.scale) - 2.0 / 127.0).abs() < 1e-7);
    let op = model.op(2).unwrap();
    assert_eq!(
        (op.kind, op.out.c, op.out_kind),
        (OpKind::Concat, 2, ActKind::I8)
    );
    let y = codes(&model, &act, 3);
    let want: Vec<i16> = b.iter().map(|&v| 2 * v).chain(a.iter().copied()).collect();
    assert_eq!(y, want);
}

#[test]
fn fused_relu6_saturates_at_its_quantized_bound() {
    // conv 1x1 weight 1 on codes up to 127 at scale 1/127 (values up to 1) times 12: up to 12,
    // ReLU6 at act_max 10 (scale 10/255): bound round(6 * 25.5) = 153.
    let w: &'static [f32] = Vec::leak(vec![12.0f32]);
    let nodes = vec![
        Node::new(Layer::Conv2d {
            weight: w,
            bias: None,
            out_channels: 1,
            kernel: [1, 1],
            stride: [1, 1],
            padding: [0; 4],
            groups: 1,
        }),
        Node {
            act_max: 10.0,
            ..Node::new(Layer::Clip { min: 0.0, max: 6.0 })
        },
    ];
    let img: Vec<u8> = (0..9).map(|i| (i * 31) as u8).collect();
    let (blob, act) = tiny(0.5, 3, 3, nodes, 9, &img);
    let model = Model::parse(&blob).unwrap();
    let op = model.op(0).unwrap();
    assert_eq!((op.out_kind, op.clip), (ActKind::U8, [0, 153]));
    let x = codes(&model, &act, 0);
    let y = codes(&model, &act, 1);
    for (&xi, &yi) in x.iter().zip(&y) {
        // 12 * x / 127 in units of 10 / 255, clamped to [0, 153] (1 LSB of rounding slack).
        let exact = (12.0 * f64::from(xi) / 127.0 / (10.0 / 255.0)).clamp(0.0, 153.0);
        assert!(
            (f64::from(yi) - exact).abs() <= 1.0,
            "{xi} -> {yi}, {exact}"
        );
    }
    assert!(y.contains(&153) && y.contains(&0), "{y:?}");
}

// ---- version 1 -------------------------------------------------------------------------------

/// The checked-in version-1 model parses and runs with the state and logits it gave before
/// version 2 existed (pinned from the version-1 build).
#[test]
fn checked_in_version_1_model_runs_as_before() {
    let blob = include_bytes!("../../../../models/vgg8-w0.25-fmnist-nft.cimb");
    let model = Model::parse(blob).unwrap();
    assert_eq!(model.version(), 1);
    assert_eq!((model.op_count(), model.layer_count()), (11, 8));
    for (path, want_state, want_logits, first) in [
        (Path::Collapsed, 0xc746_cf22u32, 0x53b9_f6a0u32, -310_157),
        (
            Path::Sliced(Adc::Quantized {
                bits: 6,
                step: 2000,
            }),
            0xeb28_5060,
            0xe352_8f95,
            -329_860,
        ),
    ] {
        let (crc, _) = state_crc(&model, path, 7, 3);
        assert_eq!(crc, want_state, "{path:?}");
        let mut all = Vec::new();
        for i in 0..4 {
            let (img, _) = model.test_image(i).unwrap();
            all.extend(run_int(&model, path, &model.variation(), 7, 3, img).0);
        }
        let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            (crate::crc::crc32(&bytes), all[0]),
            (want_logits, first),
            "{path:?}"
        );
    }
}

/// An ungrouped model packs to the same weights, records and scales as before: its programmed
/// state and logits equal the version-1 build's (pinned), and its version-1 rewrite runs the
/// same bits.
#[test]
fn ungrouped_model_state_and_logits_are_unchanged() {
    let blob = small_blob();
    let model = Model::parse(&blob).unwrap();
    let v1 = to_v1(&blob);
    let old = Model::parse(&v1).unwrap();
    assert_eq!(old.version(), 1);
    for (path, want_state, want_logits) in [
        (
            Path::Collapsed,
            0x088c_c935u32,
            [-448_470, 63_538, 573_031, 613_796],
        ),
        (
            Path::Sliced(Adc::Ideal),
            0xc0a2_6ca3,
            [-448_470, 63_538, 573_031, 613_796],
        ),
        (
            Path::Sliced(Adc::Quantized { bits: 5, step: 300 }),
            0xc0a2_6ca3,
            [-115_621, 181_157, 142_616, 216_471],
        ),
    ] {
        let (crc, state) = state_crc(&model, path, 42, 0);
        assert_eq!(crc, want_state, "{path:?}");
        assert_eq!(state_crc(&old, path, 42, 0).1, state);
        let (img, _) = model.test_image(1).unwrap();
        let logits = run_int(&model, path, &model.variation(), 42, 0, img).0;
        assert_eq!(logits, want_logits, "{path:?}");
        for i in 0..model.test_len() {
            let (img, _) = model.test_image(i).unwrap();
            assert_eq!(
                run_int(&old, path, &old.variation(), 42, 0, img).0,
                run_int(&model, path, &model.variation(), 42, 0, img).0
            );
        }
    }
    // Every op decodes to the same meaning.
    for i in 0..model.op_count() {
        assert_eq!(old.op(i).unwrap(), model.op(i).unwrap());
    }
}

#[test]
fn version_1_cannot_hold_version_2_kinds() {
    let mut v1 = to_v1(&small_blob());
    let ops_at = HEADER_LEN + 256;
    // Op 1 is the max pool: a pad is not version-1 pool semantics, kind 8 is not a v1 kind.
    for (at, v, field) in [
        (ops_at + OP_LEN_V1 + 5, 1u8, "op.pad"),
        (ops_at + OP_LEN_V1, 8, "op.kind"),
    ] {
        let keep = v1[at];
        v1[at] = v;
        reseal(&mut v1);
        assert!(
            matches!(Model::parse(&v1), Err(Error::InvalidField { field: f, .. }) if f == field),
            "{field}: {:?}",
            Model::parse(&v1)
        );
        v1[at] = keep;
        reseal(&mut v1);
    }
    assert!(Model::parse(&v1).is_ok());
}

// ---- corrupt version-2 fields ----------------------------------------------------------------

/// The fire model, calibrated and packed (v2, with every new field in use).
pub(super) fn fire_blob() -> Vec<u8> {
    let net = fire_net(17);
    let desc = fire(&net);
    let images = rand_bytes(10, 3 * 4 * 7 * 6);
    let desc = calibrated(&desc, &images);
    let mut cfg = PackConfig::new(VariationConfig::paper(0.1).unwrap());
    cfg.tile_rows = 16;
    pack(
        &desc,
        &cfg,
        Some(TestBatch {
            images: &images,
            labels: &[0, 1, 2],
        }),
    )
    .unwrap()
}

#[test]
fn corrupt_version_2_fields_are_typed_errors() {
    let blob = fire_blob();
    let model = Model::parse(&blob).unwrap();
    let ops_at = HEADER_LEN + 256 * 4;
    let find = |k: OpKind, pred: &dyn Fn(&Op) -> bool| {
        (0..model.op_count())
            .find(|&i| {
                let op = model.op(i).unwrap();
                op.kind == k && pred(&op)
            })
            .unwrap()
    };
    let grouped = find(OpKind::Conv, &|op| op.groups == 2);
    let padded = find(OpKind::Conv, &|op| op.kh == 3);
    let pool = find(OpKind::MaxPool, &|_| true);
    let cat = find(OpKind::Concat, &|_| true);
    let clipped = find(OpKind::Conv, &|op| op.clip[0] < 0);
    let at = |i: usize, off: usize| ops_at + i * OP_LEN + off;
    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        (at(grouped, 12), 3u16.to_le_bytes().to_vec(), "op.groups"), // 8 in, 6 out
        (at(grouped, 12), 0u16.to_le_bytes().to_vec(), "op.groups"),
        (at(grouped, 12), 4u16.to_le_bytes().to_vec(), "op.groups"), // 6 % 4 != 0
        (at(pool, 12), 2u16.to_le_bytes().to_vec(), "op.groups"),
        (at(padded, 6), vec![3], "op.conv_shape"), // top pad == kernel
        (at(padded, 9), vec![3], "op.conv_shape"), // right pad == kernel
        (at(pool, 8), vec![3], "op.pool_shape"),
        (at(pool, 4), vec![0], "op.pool_shape"), // stride 0
        (at(padded, 5), vec![2], "op.conv_shape"),
        (at(pool, 10), vec![1], "op.flags"), // count_include_pad on a max pool
        (at(pool, 11), vec![1], "op.reserved"),
        (at(pool, 30), vec![1], "op.reserved"),
        (
            at(clipped, 26),
            (model.op(clipped).unwrap().clip[1] as i16 + 1)
                .to_le_bytes()
                .to_vec(),
            "op.clip",
        ), // lo > hi
        (at(clipped, 26), (-128i16).to_le_bytes().to_vec(), "op.clip"),
        (at(padded, 28), 256i16.to_le_bytes().to_vec(), "op.clip"), // u8 above 255
        (
            at(model.op_count() - 1, 26),
            1i16.to_le_bytes().to_vec(),
            "op.clip",
        ), // logits
        (at(cat, 18), 9u16.to_le_bytes().to_vec(), "op.binary_shape"),
        (at(cat, 2), vec![1], "op.kernel"),
    ];
    for (pos, bytes, field) in cases {
        let mut b = blob.clone();
        b[pos..pos + bytes.len()].copy_from_slice(&bytes);
        if b == blob {
            continue;
        }
        reseal(&mut b);
        let r = Model::parse(&b);
        assert!(
            matches!(r, Err(Error::InvalidField { field: f, .. }) if f == field),
            "{field} at {pos}: {r:?}"
        );
    }
}

// ---- a global pool writing the logits (SqueezeNet's head) -------------------------------------

/// A fire module (squeeze 1x1 + ReLU, expand 1x1 + ReLU and expand 3x3 + ReLU, concat), then
/// SqueezeNet's classifier head: conv 1x1 to 10 classes + ReLU, global pool (the logits), and
/// with `flatten` a trailing Flatten.
fn squeeze_net(seed: u64) -> Net {
    let c = 3;
    Net {
        mean: vec![0.5; c],
        std: vec![0.25; c],
        arrays: vec![
            rand_vec(seed, 4 * c, 0.6),
            rand_vec(seed + 1, 6 * 4, 0.6),
            rand_vec(seed + 2, 6 * 4 * 9, 0.4),
            rand_vec(seed + 3, 10 * 12, 0.5),
            // Positive biases keep every class channel alive after the ReLU.
            rand_vec(seed + 4, 10, 0.1)
                .iter()
                .map(|v| 0.3 + v)
                .collect(),
        ],
    }
}

fn squeeze(net: &Net, flatten: bool) -> ModelDesc<'_> {
    let a = &net.arrays;
    let mut nodes = vec![
        Node::new(conv(&a[0], 4, [1, 1], [1, 1], [0; 4], 1)), // 0 squeeze
        Node::new(Layer::Relu),                               // 1
        Node::new(conv(&a[1], 6, [1, 1], [1, 1], [0; 4], 1)), // 2 expand 1x1
        Node::new(Layer::Relu),                               // 3
        Node {
            input: Some(1),
            ..Node::new(conv(&a[2], 6, [3, 3], [1, 1], [1; 4], 1))
        }, // 4 expand 3x3
        Node::new(Layer::Relu),                               // 5
        Node::new(Layer::Concat { other: 3 }),                // 6: 12 channels
        Node::new(Layer::Conv2d {
            weight: &a[3],
            bias: Some(&a[4]),
            out_channels: 10,
            kernel: [1, 1],
            stride: [1, 1],
            padding: [0; 4],
            groups: 1,
        }), // 7 classifier conv
        Node::new(Layer::Relu),                               // 8 (fused: u8)
        Node::new(Layer::GlobalAvgPool),                      // 9: the logits
    ];
    if flatten {
        nodes.push(Node::new(Layer::Flatten));
    }
    desc_of(net, 3, 8, 7, 10, nodes)
}

/// The squeeze model, calibrated and packed with 4 test images.
pub(super) fn squeeze_blob() -> Vec<u8> {
    let net = squeeze_net(23);
    let desc = squeeze(&net, true);
    let images = rand_bytes(12, 4 * 3 * 8 * 7);
    let desc = calibrated(&desc, &images);
    let mut cfg = PackConfig::new(VariationConfig::paper(0.1).unwrap());
    cfg.tile_rows = 8;
    pack(
        &desc,
        &cfg,
        Some(TestBatch {
            images: &images,
            labels: &[0, 9, 3, 5],
        }),
    )
    .unwrap()
}

#[test]
fn squeeze_head_global_pool_logits_track_the_float_reference() {
    let net = squeeze_net(23);
    let desc = squeeze(&net, true);
    let images = rand_bytes(12, 6 * 3 * 8 * 7);
    // Both ideal paths bit for bit, the float reference within the crate's bounds.
    assert_tracks("squeeze", track(&desc, &images, 8, 4));
    assert_tracks("squeeze 128", track(&desc, &images, 128, 128));

    let cfg = PackConfig::new(VariationConfig::paper(0.1).unwrap());
    let desc = calibrated(&desc, &images);
    let blob = pack(&desc, &cfg, None).unwrap();
    let model = Model::parse(&blob).unwrap();
    assert_eq!(model.version(), 2);
    use OpKind::*;
    let kinds: Vec<OpKind> = (0..model.op_count())
        .map(|i| model.op(i).unwrap().kind)
        .collect();
    assert_eq!(kinds, [Conv, Conv, Conv, Concat, Conv, GlobalAvgPool]);
    assert_eq!(model.layer_count(), 4);
    // The classifier conv fuses its ReLU and writes u8; the pool writes the logits.
    let head = model.op(4).unwrap();
    assert_eq!(
        (head.out_kind, head.clip, head.out),
        (ActKind::U8, [0, 255], Shape { c: 10, h: 8, w: 7 })
    );
    let gap = model.op(5).unwrap();
    assert_eq!(
        (gap.out_kind, gap.out, gap.layer, gap.src),
        (ActKind::I32, Shape { c: 10, h: 1, w: 1 }, None, 5)
    );
    assert_eq!(gap.clip, ActKind::I32.range());
    assert_eq!(
        gap.out_scale,
        (f64::from(desc.nodes[9].act_max) / f64::from(1u32 << 20)) as f32
    );
    // Its record: the window sum from the conv's scale to the logits'.
    let r = model.record(gap.params_start);
    let want = f64::from(head.out_scale) / 56.0 / f64::from(gap.out_scale);
    let got = f64::from(r.m) / libm::exp2(f64::from(r.shift));
    assert!((got / want - 1.0).abs() < 1e-6, "{got} vs {want}");
    assert!((1 << 22..1 << 23).contains(&r.m) && r.bias == 0, "{r:?}");
    // A trailing Flatten is a view: the same blob without it.
    let bare = ModelDesc {
        nodes: &desc.nodes[..10],
        ..desc
    };
    assert_eq!(pack(&bare, &cfg, None).unwrap(), blob);
    // Some logits are positive (the float reference's are all >= 0 after the ReLU).
    let img = &images[..3 * 8 * 7];
    let (logits, class, _) = run_int(&model, Path::Collapsed, &cfg.variation, 1, 0, img);
    assert!(
        logits.iter().all(|&l| l >= 0) && logits[class] > 0,
        "{logits:?}"
    );
}

/// 1 x 2 x 4 input (mean 0.5, std 0.5: scale 1/127), conv 1x1 to `[x, -x]` at act_max
/// 127/128 (i8, scale 2^-7), global pool at act_max `gap_max` (the logits, scale
/// `gap_max / 2^20`), Flatten: the pool's record is `2^-7 / 8 / (gap_max / 2^20)` exactly.
fn gap_tiny(gap_max: f32) -> Vec<u8> {
    let w: &'static [f32] = Vec::leak(vec![1.0f32, -1.0]);
    let nodes = vec![
        Node {
            act_max: 127.0 / 128.0,
            ..Node::new(conv(w, 2, [1, 1], [1, 1], [0; 4], 1))
        },
        Node {
            act_max: gap_max,
            ..Node::new(Layer::GlobalAvgPool)
        },
        Node::new(Layer::Flatten),
    ];
    let desc = ModelDesc {
        input: InputSpec {
            channels: 1,
            height: 2,
            width: 4,
            mean: &[0.5],
            std: &[0.5],
        },
        classes: 2,
        nodes: Vec::leak(nodes),
    };
    pack(
        &desc,
        &PackConfig::new(VariationConfig::paper(0.0).unwrap()),
        None,
    )
    .unwrap()
}

#[test]
fn global_pool_logits_record_by_hand() {
    let bright = [255u8; 8];
    let mixed = [128u8, 150, 120, 100, 140, 135, 90, 160];
    // gap_max 1: record 2^10 = (2^22, shift 12); logits = 1024 * sum exactly.
    // gap_max 2^-12: record 2^22 = (2^22, shift 0); |sum| >= 512 saturates to +-(2^31 - 1).
    for (gap_max, record) in [(1.0f32, (1 << 22, 12)), (1.0 / 4096.0, (1 << 22, 0))] {
        let blob = gap_tiny(gap_max);
        let model = Model::parse(&blob).unwrap();
        assert_eq!(model.op_count(), 2);
        let gap = model.op(1).unwrap();
        assert_eq!(
            (gap.kind, gap.out_kind),
            (OpKind::GlobalAvgPool, ActKind::I32)
        );
        let r = model.record(gap.params_start);
        assert_eq!((r.m, r.shift, r.bias), (record.0, record.1, 0));
        assert_eq!(model.tensor(1).unwrap().scale, 1.0 / 128.0);
        let var = model.variation();
        for img in [&bright, &mixed] {
            let (logits, class, act) = run_int(&model, Path::Collapsed, &var, 0, 0, img);
            let x = codes(&model, &act, 1);
            let sums = [
                x[..8].iter().map(|&v| i64::from(v)).sum::<i64>(),
                x[8..].iter().map(|&v| i64::from(v)).sum::<i64>(),
            ];
            let want: Vec<i32> = sums
                .iter()
                .map(|&s| {
                    let v = if record.1 == 12 { s * 1024 } else { s << 22 };
                    v.clamp(-i64::from(i32::MAX), i64::from(i32::MAX)) as i32
                })
                .collect();
            assert_eq!(logits, want, "sums {sums:?}");
            assert_eq!(class, usize::from(want[1] > want[0]));
            let sliced = run_int(&model, Path::Sliced(Adc::Ideal), &var, 0, 0, img).0;
            assert_eq!(sliced, logits);
        }
        // The bright image: codes 127 and -127 (1.0 at scale 2^-7 is 128, saturated).
        let (logits, _, act) = run_int(&model, Path::Collapsed, &var, 0, 0, &bright);
        assert_eq!(codes(&model, &act, 1), [[127i16; 8], [-127; 8]].concat());
        if record.1 == 12 {
            assert_eq!(logits, [1016 * 1024, -1016 * 1024]);
        } else {
            assert_eq!(logits, [i32::MAX, -i32::MAX]);
        }
    }
    // The mixed image stays below the saturation: exact.
    let model_blob = gap_tiny(1.0 / 4096.0);
    let model = Model::parse(&model_blob).unwrap();
    let (logits, _, act) = run_int(&model, Path::Collapsed, &model.variation(), 0, 0, &mixed);
    let s: i64 = codes(&model, &act, 1)[..8]
        .iter()
        .map(|&v| i64::from(v))
        .sum();
    assert!(s != 0 && s.abs() < 512, "{s}");
    assert_eq!(i64::from(logits[0]), s << 22);
}

#[test]
fn global_pool_logits_corrupt_fields_are_typed_errors() {
    let expect = |b: &[u8], field: &str| {
        let r = Model::parse(b);
        assert!(
            matches!(r, Err(Error::InvalidField { field: f, .. }) if f == field),
            "{field}: {r:?}"
        );
    };
    // The squeeze model: its last op is the pool writing the logits.
    let blob = squeeze_blob();
    let model = Model::parse(&blob).unwrap();
    let last = model.op_count() - 1;
    let at = |i: usize, off: usize| HEADER_LEN + 256 * 3 + i * OP_LEN + off;
    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        (at(last, 18), 9u16.to_le_bytes().to_vec(), "op.gap_shape"), // c != input c
        (at(last, 20), 2u16.to_le_bytes().to_vec(), "op.gap_shape"), // h = 2
        (at(last, 22), 3u16.to_le_bytes().to_vec(), "op.gap_shape"), // w = 3
        (38, 9u16.to_le_bytes().to_vec(), "op.logits_shape"),        // 9 classes, 10 pooled
        (38, 11u16.to_le_bytes().to_vec(), "op.logits_shape"),
        (at(last, 1), vec![1], "op.out_kind"), // the last op writes i8
        (at(last, 26), 1i16.to_le_bytes().to_vec(), "op.clip"), // logits have no bounds
        (at(4, 1), vec![2], "op.clip"),        // the head conv writes logits (bounds 0, 255)
    ];
    for (pos, bytes, field) in cases {
        let mut b = blob.clone();
        b[pos..pos + bytes.len()].copy_from_slice(&bytes);
        assert_ne!(b, blob);
        reseal(&mut b);
        expect(&b, field);
    }
    // The head conv writing logits with valid bounds: not the last op.
    let mut b = blob.clone();
    b[at(4, 1)] = 2;
    b[at(4, 26)..at(4, 30)].fill(0);
    reseal(&mut b);
    expect(&b, "op.out_kind");
    // The fire model's global pool (followed by a linear) writing logits: not the last op.
    let fire = fire_blob();
    let fm = Model::parse(&fire).unwrap();
    let gap = (0..fm.op_count())
        .find(|&i| fm.op(i).unwrap().kind == OpKind::GlobalAvgPool)
        .unwrap();
    assert!(gap + 1 < fm.op_count());
    let at4 = |i: usize, off: usize| HEADER_LEN + 256 * 4 + i * OP_LEN + off;
    let mut b = fire.clone();
    b[at4(gap, 1)] = 2;
    b[at4(gap, 26)..at4(gap, 30)].fill(0);
    reseal(&mut b);
    expect(&b, "op.out_kind");
    // Version 1 cannot hold a global pool writing logits (a combination new in version 2).
    let tiny = gap_tiny(1.0);
    assert!(Model::parse(&tiny).is_ok());
    expect(&to_v1(&tiny), "op.out_kind");
}

#[test]
fn pack_rejects_bad_global_pool_logits_naming_the_node() {
    let net = squeeze_net(23);
    // 9 classes for 10 pooled channels.
    let desc = ModelDesc {
        classes: 9,
        ..squeeze(&net, true)
    };
    let cfg = PackConfig::new(VariationConfig::paper(0.1).unwrap());
    assert!(matches!(
        pack(&desc, &cfg, None),
        Err(Error::InvalidField {
            field: "node.logits_shape",
            value: 10
        })
    ));
    // A global pool over 256 x 257 > MAX_POOL_WINDOW values, at node 1: named by pack.
    let lin: &'static [f32] = Vec::leak(vec![0.5f32, -0.5]);
    let id = Node::new(Layer::MaxPool {
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
    });
    let mut nodes = vec![
        id,
        Node::new(Layer::GlobalAvgPool),
        Node::new(Layer::Flatten),
        Node::new(Layer::Linear {
            weight: lin,
            bias: None,
            out_features: 2,
        }),
    ];
    let big = |h: usize, w: usize, nodes: &[Node<'static>]| {
        let desc = ModelDesc {
            input: InputSpec {
                channels: 1,
                height: h,
                width: w,
                mean: &[0.5],
                std: &[0.5],
            },
            classes: 2,
            nodes: Vec::leak(nodes.to_vec()),
        };
        pack(&desc, &cfg, None)
    };
    assert!(matches!(
        big(256, 257, &nodes),
        Err(Error::InvalidField {
            field: "node.pool_window",
            value: 1
        })
    ));
    // 256 x 256 = MAX_POOL_WINDOW is allowed, in the middle and as the logits.
    assert!(Model::parse(&big(256, 256, &nodes).unwrap()).is_ok());
    nodes.truncate(3);
    nodes[0] = Node::new(conv(lin, 2, [1, 1], [1, 1], [0; 4], 1));
    assert!(Model::parse(&big(256, 256, &nodes).unwrap()).is_ok());
    assert!(matches!(
        big(257, 256, &nodes),
        Err(Error::InvalidField {
            field: "node.pool_window",
            value: 1
        })
    ));
    // A pool that is neither the logits nor followed by them stays an error.
    nodes.pop();
    nodes.push(Node::new(Layer::Relu));
    assert!(matches!(
        big(4, 4, &nodes),
        Err(Error::InvalidField {
            field: "nodes.count",
            ..
        })
    ));
}
