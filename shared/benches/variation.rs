//! Gaussian samples and noisy weights per second on one core (`cargo xtask bench variation`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nvcim_shared::{
    quant::{QuantConfig, Quantized, quantize_layer},
    rng::{standard_normal, stream},
    variation::VariationConfig,
};

fn gaussian(c: &mut Criterion) {
    const N: usize = 1 << 16;
    let mut g = c.benchmark_group("gaussian");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("ziggurat_f32", |b| {
        let mut rng = stream(1, 0, 0);
        let mut buf = vec![0.0f32; N];
        b.iter(|| {
            for x in buf.iter_mut() {
                *x = standard_normal(&mut rng);
            }
            black_box(&buf);
        })
    });
    g.bench_function("ziggurat_f32_block", |b| {
        let mut rng = stream(1, 0, 0);
        let mut buf = vec![0.0f32; N];
        b.iter(|| {
            rng.ahead().fill_normals(&mut buf);
            black_box(&buf);
        })
    });
    g.bench_function("xoshiro_u32", |b| {
        let mut rng = stream(1, 0, 0);
        let mut buf = vec![0u32; N];
        b.iter(|| {
            for x in buf.iter_mut() {
                *x = rng.next();
            }
            black_box(&buf);
        })
    });
    g.finish();
}

fn noisy_weights(c: &mut Criterion) {
    const N: usize = 1 << 16;
    let w: Vec<f32> = (0..N)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut q = vec![Quantized::default(); N];
    let s = quantize_layer(&w, None, QuantConfig::DEFAULT, &mut q).unwrap();
    let var = VariationConfig::paper(0.4).unwrap();
    let mut out = vec![0.0f32; N];
    let mut g = c.benchmark_group("noisy_weights");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("m8_n2_f32", |b| {
        let mut rng = stream(1, 0, 0);
        b.iter(|| {
            var.perturb_f32(black_box(&w), s, &mut rng, &mut out)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, gaussian, noisy_weights);
criterion_main!(benches);
