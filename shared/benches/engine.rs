//! The integer engine on one core (`cargo bench -p nvcim-shared --bench engine`).
//!
//! Prints, before the criterion groups:
//! - the **int8 peak** of this core as built: multiply-accumulates per second of a tight
//!   `i8 * i8 -> i32` dot product (4096 elements, in L1) that the compiler auto-vectorizes with
//!   the same target features as the engine (SSE2 for the default x86-64 target);
//! - the **collapsed path**'s MACs per second on a whole VGG-8 at width 0.25 (conv 16, 32, pool,
//!   64, 64, pool, 128, 128, pool, FC 2048 -> 256 -> 10 on a 1x32x32 image), and its ratio to the
//!   peak (target >= 25 %);
//! - bytes of programmed state per weight (collapsed and per-slice) and the peak scratch.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group};
use nvcim_shared::exec::{Scratch, infer, program};
use nvcim_shared::format::build::{InputSpec, Layer, ModelDesc, Node, PackConfig, pack};
use nvcim_shared::format::{Model, OpKind};
use nvcim_shared::tile::{Adc, Path, dot_collapsed};
use nvcim_shared::variation::VariationConfig;

fn values(seed: u32, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed.wrapping_mul(0x9E37_79B9))
                .wrapping_mul(0x85EB_CA6B)
                .rotate_left(13);
            (h % 2001) as f32 / 1000.0 * scale - scale
        })
        .collect()
}

/// VGG-8 at width 0.25 on 1x32x32, 10 classes, random weights.
fn vgg8_blob() -> Vec<u8> {
    let widths = [16usize, 32, 64, 64, 128, 128];
    let mut arrays: Vec<Vec<f32>> = Vec::new();
    let mut c_in = 1;
    for (i, &c) in widths.iter().enumerate() {
        arrays.push(values(i as u32, c * c_in * 9, 0.3));
        c_in = c;
    }
    arrays.push(values(10, 256 * 2048, 0.05));
    arrays.push(values(11, 10 * 256, 0.1));
    let conv = |i: usize, a: &'static [f32]| Node {
        act_max: 4.0,
        ..Node::new(Layer::Conv2d {
            weight: a,
            bias: None,
            out_channels: widths[i],
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1; 4],
            groups: 1,
        })
    };
    let a: &'static [Vec<f32>] = Box::leak(arrays.into_boxed_slice());
    let relu = || Node {
        act_max: 4.0,
        ..Node::new(Layer::Relu)
    };
    let pool = || Node {
        act_max: 4.0,
        ..Node::new(Layer::MaxPool {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0; 4],
        })
    };
    let mut nodes = Vec::new();
    for (i, w) in a.iter().take(6).enumerate() {
        nodes.push(conv(i, w));
        nodes.push(relu());
        if i % 2 == 1 {
            nodes.push(pool());
        }
    }
    nodes.push(Node::new(Layer::Flatten));
    nodes.push(Node {
        act_max: 4.0,
        ..Node::new(Layer::Linear {
            weight: &a[6],
            bias: None,
            out_features: 256,
        })
    });
    nodes.push(relu());
    nodes.push(Node {
        act_max: 8.0,
        ..Node::new(Layer::Linear {
            weight: &a[7],
            bias: None,
            out_features: 10,
        })
    });
    let desc = ModelDesc {
        input: InputSpec {
            channels: 1,
            height: 32,
            width: 32,
            mean: &[0.1307],
            std: &[0.3081],
        },
        classes: 10,
        nodes: &nodes,
    };
    pack(
        &desc,
        &PackConfig::new(VariationConfig::paper(0.4).unwrap()),
        None,
    )
    .expect("VGG-8 packs")
}

fn macs(model: &Model<'_>) -> u64 {
    (0..model.op_count())
        .map(|i| model.op(i).unwrap())
        .filter(|op| matches!(op.kind, OpKind::Conv | OpKind::Linear))
        .map(|op| (op.out.len() * model.fan_in(&op)) as u64)
        .sum()
}

/// The auto-vectorized int8 reference dot product.
#[inline(never)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).fold(0i32, |s, (&x, &y)| {
        s.wrapping_add(i32::from(x) * i32::from(y))
    })
}

/// Best of `reps` timings of `f`, in seconds per call (each timing runs `inner` calls).
fn best_time(reps: usize, inner: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn summary() {
    const N: usize = 4096;
    let a: Vec<i8> = (0..N).map(|i| (i * 37 % 255) as i8).collect();
    let b: Vec<i8> = (0..N).map(|i| (i * 91 % 253) as i8).collect();
    let peak = N as f64
        / best_time(20, 20_000, || {
            black_box(dot_i8(black_box(&a), black_box(&b)));
        });

    let blob = vgg8_blob();
    let model = Model::parse(&blob).unwrap();
    let var = model.variation();
    let mut state = vec![0i16; model.state_len(Path::Collapsed)];
    program(&model, &var, 1, 0, Path::Collapsed, &mut state).unwrap();
    let s = model.scratch();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let image: Vec<u8> = (0..1024).map(|i| (i * 13 % 256) as u8).collect();
    let per_image = best_time(10, 5, || {
        let mut scratch = Scratch {
            act: &mut act,
            patch: &mut patch,
        };
        black_box(
            infer(
                &model,
                Path::Collapsed,
                &state,
                &image,
                &mut scratch,
                &mut logits,
            )
            .unwrap(),
        );
    });
    let m = macs(&model);
    let engine = m as f64 / per_image;
    let t_prog = best_time(3, 1, || {
        program(&model, &var, 1, 0, Path::Collapsed, &mut state).unwrap()
    });
    println!(
        "int8 peak (auto-vectorized i8*i8->i32 dot, 4096 in L1): {:.2} GMAC/s",
        peak / 1e9
    );
    println!(
        "VGG-8 w0.25 collapsed path: {m} MACs/image, {:.3} ms/image, {:.2} GMAC/s = {:.0} % of the int8 peak",
        per_image * 1e3,
        engine / 1e9,
        100.0 * engine / peak
    );
    println!(
        "programming one run: {:.1} ms ({} weights, {:.1} ns/weight)",
        t_prog * 1e3,
        model.weight_count(),
        t_prog * 1e9 / model.weight_count() as f64
    );
    let q = model.quant();
    println!(
        "programmed state per weight: collapsed {} bytes, per-slice {} bytes; VGG-8 w0.25 state {} KiB (collapsed)",
        2 * Path::Collapsed.state_per_weight(q),
        2 * Path::Sliced(Adc::Ideal).state_per_weight(q),
        2 * model.state_len(Path::Collapsed) / 1024
    );
    println!(
        "peak scratch VGG-8 w0.25: {} bytes = activations {} + patch {} x i16 + logits {} x i32",
        s.total_bytes(),
        s.act_bytes,
        s.patch,
        s.logits
    );
}

fn engine(c: &mut Criterion) {
    let blob = vgg8_blob();
    let model = Model::parse(&blob).unwrap();
    let var = model.variation();
    let s = model.scratch();
    let image: Vec<u8> = (0..1024).map(|i| (i * 13 % 256) as u8).collect();
    let mut g = c.benchmark_group("vgg8_w025");
    g.throughput(Throughput::Elements(macs(&model)));
    for (name, path) in [
        ("collapsed", Path::Collapsed),
        (
            "sliced_adc6",
            Path::Sliced(Adc::Quantized { bits: 6, step: 512 }),
        ),
    ] {
        let mut state = vec![0i16; model.state_len(path)];
        program(&model, &var, 1, 0, path, &mut state).unwrap();
        let (mut act, mut patch, mut logits) = (
            vec![0u8; s.act_bytes],
            vec![0i16; s.patch],
            vec![0i32; s.logits],
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut scratch = Scratch {
                    act: &mut act,
                    patch: &mut patch,
                };
                infer(
                    &model,
                    path,
                    &state,
                    black_box(&image),
                    &mut scratch,
                    &mut logits,
                )
                .unwrap()
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("kernel");
    const K: usize = 1152;
    let w: Vec<i16> = (0..K).map(|i| (i * 37 % 8000) as i16 - 4000).collect();
    let x: Vec<i16> = (0..K).map(|i| (i * 11 % 256) as i16).collect();
    g.throughput(Throughput::Elements(K as u64));
    g.bench_function("dot_collapsed_1152_rows128", |b| {
        b.iter(|| dot_collapsed(black_box(&w), black_box(&x), 128))
    });
    let (a8, b8): (Vec<i8>, Vec<i8>) = (
        (0..K).map(|i| i as i8).collect(),
        (0..K).map(|i| (i * 3) as i8).collect(),
    );
    g.bench_function("int8_peak_dot_1152", |b| {
        b.iter(|| dot_i8(black_box(&a8), black_box(&b8)))
    });
    g.finish();
}

criterion_group!(benches, engine);

fn main() {
    summary();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
