//! Latency (batch 1) and throughput (batch 128) of the VGG-8 backbone at width 0.25 (3 x 32 x 32,
//! random init): Burn (flex, the backbone `nvcim eval` runs) vs its ONNX export in tract and in
//! ONNX Runtime, measured in the same run. Burn and ONNX Runtime use their default thread pools
//! (both cores), tract one thread.
//!
//! `cargo bench -p nvcim --bench onnx_runtimes` (needs `cargo xtask setup` for ONNX Runtime).

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nvcim::{
    ir::{Normalization, Provenance, convert::to_network},
    model::{Arch, ModelSpec},
    onnx::{
        export::{ExportOptions, export},
        run::{OrtRunner, TractRunner},
    },
};
use nvcim_shared::rng::{Purpose, standard_normal, stream_for};

fn runtimes(c: &mut Criterion) {
    let spec = ModelSpec {
        arch: Arch::Vgg8,
        width: 0.25,
        in_channels: 3,
        image_size: 32,
        num_classes: 10,
        graph: None,
    };
    let dev = Device::flex();
    let backbone = spec.init_backbone(&dev);
    let net = to_network(
        &backbone,
        &spec,
        Normalization::identity(3),
        Provenance::default(),
    )
    .expect("the Burn backbone converts");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("vgg8-w0.25.onnx");
    export(&net, &ExportOptions::default(), &path).expect("export");
    let mut tract = TractRunner::load(&path).expect("tract loads the export");
    let mut ort = OrtRunner::load(&path, 0)
        .unwrap_or_else(|e| panic!("{e:#}: run `cargo xtask setup` for ONNX Runtime"));
    let per: usize = net.input.iter().product();
    let mut rng = stream_for(Purpose::Host, 0, 0, 0);
    let x: Vec<f32> = (0..128 * per).map(|_| standard_normal(&mut rng)).collect();

    // The three compute the same function (else the comparison means nothing).
    let burn1: Vec<f32> = backbone
        .forward(Tensor::<4>::from_data(
            TensorData::new(x[..per].to_vec(), [1, 3, 32, 32]),
            &dev,
        ))
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 logits");
    for (name, logits) in [
        ("tract", tract.run(&x[..per], 1).expect("tract runs")),
        (
            "onnxruntime",
            ort.run(&x[..per], 1).expect("onnxruntime runs"),
        ),
    ] {
        let d = burn1
            .iter()
            .zip(&logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = burn1.iter().fold(1f32, |m, v| m.max(v.abs()));
        assert!(d <= 1e-4 * scale, "{name} differs from Burn by {d}");
    }

    let mut group = c.benchmark_group("vgg8_w0.25");
    group.sample_size(10);
    for batch in [1usize, 128] {
        let input = &x[..batch * per];
        group.throughput(Throughput::Elements(batch as u64));
        tract.prepare(batch).expect("tract plan");
        group.bench_with_input(BenchmarkId::new("burn", batch), &batch, |b, &n| {
            b.iter(|| {
                let x =
                    Tensor::<4>::from_data(TensorData::new(input.to_vec(), [n, 3, 32, 32]), &dev);
                backbone.forward(x).into_data()
            })
        });
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
