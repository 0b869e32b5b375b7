//! Latency (batch 1) and throughput (batch 128) of a VGG-8 at width 0.25 exported from the IR,
//! in tract and in ONNX Runtime, measured in the same run. (Burn joins when checkpoints are
//! connected.) ONNX Runtime runs with its default thread count, tract on one thread.
//!
//! `cargo bench -p nvcim --bench onnx_runtimes` (needs `cargo xtask setup` for ONNX Runtime).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nvcim::{
    ir::{Network, RandomArch},
    onnx::{
        export::{ExportOptions, export},
        run::{OrtRunner, TractRunner},
    },
};
use nvcim_shared::rng::{Purpose, standard_normal, stream_for};

fn runtimes(c: &mut Criterion) {
    let net = Network::vgg8(&RandomArch::new(3, 0.25)).expect("VGG-8 builds");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("vgg8-w0.25.onnx");
    export(&net, &ExportOptions::default(), &path).expect("export");
    let mut tract = TractRunner::load(&path).expect("tract loads the export");
    let mut ort = OrtRunner::load(&path, 0)
        .unwrap_or_else(|e| panic!("{e:#}: run `cargo xtask setup` for ONNX Runtime"));
    let per: usize = net.input.iter().product();
    let mut rng = stream_for(Purpose::Host, 0, 0, 0);
    let x: Vec<f32> = (0..128 * per).map(|_| standard_normal(&mut rng)).collect();

    let mut group = c.benchmark_group("vgg8_w0.25");
    group.sample_size(10);
    for batch in [1usize, 128] {
        let input = &x[..batch * per];
        group.throughput(Throughput::Elements(batch as u64));
        tract.prepare(batch).expect("tract plan");
        group.bench_with_input(BenchmarkId::new("tract", batch), &batch, |b, &n| {
            b.iter(|| tract.run(input, n).expect("tract runs"))
        });
        group.bench_with_input(BenchmarkId::new("onnxruntime", batch), &batch, |b, &n| {
            b.iter(|| ort.run(input, n).expect("onnxruntime runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, runtimes);
criterion_main!(benches);
