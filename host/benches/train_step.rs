//! One NFT training step of VGG-8 + exits (noise injection, eq. 1, Adam), batch 128, 1 x 32 x 32,
//! on Burn's flex backend — the counterpart of `bench/reference/train_step.py`.
//!
//! `cargo bench -p nvcim --bench train_step` (ids `train_step/vgg8_w0.25_b128_nft`,
//! `train_step/vgg8_w1_b128_nft`). `NVCIM_BENCH_WIDTHS=0.25` limits the widths; with
//! `NVCIM_BENCH_RSS_FILE=PATH` the process writes its peak resident set (`VmHWM`, MiB) there at
//! the end (`cargo xtask bench train` runs one width per process to get each width's).
//! `NVCIM_BENCH_ARCH=resnet18` times ResNet-18 instead. With `NVCIM_BENCH_PROFILE=PATH` it
//! skips criterion and writes, for each width, where the time of [`PROFILE_STEPS`] steps went
//! (the step's phases and every routed kernel by shape, `nvcim::kernels::profile`) to `PATH` as
//! JSON lines: the nvcim side of `cargo xtask bench layers`.

use std::hint::black_box;
use std::io::Write;
use std::time::Instant;

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use nvcim::model::noise::{DrawAhead, TrainingNoise};
use nvcim::model::{Arch, ModelSpec, TrainModel};
use nvcim::training::{Method, method, step_forward};
use nvcim_shared::variation::VariationConfig;

fn bench(c: &mut Criterion) {
    let widths: Vec<f64> = std::env::var("NVCIM_BENCH_WIDTHS")
        .ok()
        .map(|s| s.split(',').filter_map(|w| w.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0.25, 1.0]);
    nvcim::training::keep_freed_memory();
    nvcim::kernels::Isa::log_choice();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for width in widths {
        let ad = Device::flex().autodiff();
        ad.seed(0);
        let arch = match std::env::var("NVCIM_BENCH_ARCH").as_deref() {
            Ok("resnet18") => Arch::Resnet18,
            _ => Arch::Vgg8,
        };
        let spec = ModelSpec {
            arch,
            width,
            in_channels: 1,
            image_size: 32,
            num_classes: 10,
            graph: None,
        };
        let backbone = spec.init_backbone(&ad);
        let mut model = TrainModel {
            backbone,
            exits: spec.init_exits(&ad),
        };
        let mut optim = AdamConfig::new().init();
        let noise = TrainingNoise::new(VariationConfig::paper(0.4).expect("valid sigma"));
        let x = Tensor::<4>::random([128, 1, 32, 32], Distribution::Normal(0.0, 1.0), &ad);
        let labels: Vec<i64> = (0..128).map(|i| i % 10).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [128]), &ad);
        let name = format!("{arch:?}").to_lowercase();
        // As inside a training epoch: each step's noise is drawn while the step before runs.
        let ahead = DrawAhead::scope();
        let mut step = |phases: &mut [f64; 3]| {
            ahead.begin_step(true);
            let t0 = Instant::now();
            let (out, fb) = step_forward(&model, Method::Nft, &noise, x.clone()).expect("forward");
            let loss = method::loss(Method::Nft, out, &fb, y.clone(), 0.1, None);
            black_box(loss.clone().into_scalar::<f32>());
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let t2 = Instant::now();
            model = optim.step(1e-3, model.clone(), grads);
            let t3 = Instant::now();
            for (p, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
                *p += (b - a).as_secs_f64() * 1e3;
            }
        };
        if let Some(path) = std::env::var_os("NVCIM_BENCH_PROFILE") {
            profile(&path, &name, width, &mut step);
            continue;
        }
        group.bench_function(format!("{name}_w{width}_b128_nft"), |b| {
            b.iter(|| step(&mut [0.0; 3]))
        });
    }
    group.finish();
    if let Some(path) = std::env::var_os("NVCIM_BENCH_RSS_FILE") {
        let status =
            std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/self/status");
        std::fs::write(&path, format!("{:.1}\n", kib / 1024.0)).expect("writing the peak RSS file");
    }
}

/// Steps [`profile`] accounts for, after as many unaccounted ones.
const PROFILE_STEPS: usize = 10;

/// Appends to `path` the phases of [`PROFILE_STEPS`] steps and the routed kernels' times, per
/// step, as JSON lines.
fn profile(path: &std::ffi::OsStr, model: &str, width: f64, step: &mut impl FnMut(&mut [f64; 3])) {
    use nvcim::kernels::profile;
    for _ in 0..PROFILE_STEPS {
        step(&mut [0.0; 3]);
    }
    let mut phases = [0.0; 3];
    profile::take();
    profile::enable(true);
    let t = Instant::now();
    for _ in 0..PROFILE_STEPS {
        step(&mut phases);
    }
    let total = t.elapsed().as_secs_f64() * 1e3;
    profile::enable(false);
    let per = PROFILE_STEPS as f64;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("opening the profile file");
    let mut row = |op: &str, shape: &str, calls: u64, ms: f64| {
        writeln!(
            out,
            "{{\"model\": \"{model}\", \"width\": {width}, \"op\": \"{op}\", \"shape\": \"{shape}\", \"calls\": {calls}, \"ms\": {ms:.4}}}"
        )
        .expect("writing the profile file");
    };
    row("step", "", 1, total / per);
    for (op, ms) in ["phase forward", "phase backward", "phase optimizer"]
        .iter()
        .zip(phases)
    {
        row(op, "", 1, ms / per);
    }
    for ((op, shape), e) in profile::take() {
        row(
            op,
            &shape,
            e.calls / PROFILE_STEPS as u64,
            e.ns as f64 / 1e6 / per,
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
