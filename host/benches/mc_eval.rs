//! Monte Carlo throughput (runs x images per second) of `nvcim eval`'s float and integer engines,
//! for `cargo xtask bench eval`, against `bench/reference/mc_eval.py` on the same model.
//!
//! Model: VGG-8 backbone at `--width` (default 0.25), randomly initialised (throughput does not
//! depend on the weights), on the first `--images` Fashion-MNIST test images padded to 32x32.
//! The engines are built and driven by the same functions `nvcim eval` calls
//! (`engine::float::float_engine`, `engine::int::int_engine` and `eval::mc::monte_carlo`), at sigma `--sigma` in
//! the `range` unit, `--mc` runs. The timed part is `monte_carlo` alone, as in `eval.json`'s
//! `wall_seconds`. Not a criterion bench: one run takes seconds and the figure is a throughput.
//!
//! ```text
//! cargo bench -p nvcim --bench mc_eval -- --mc 10 --images 1000 [--jobs 1,2] [--engine float|int|both] [--float-batch N]
//! ```
//! Prints one JSON line with each engine's runs x images per second at each `--jobs` value.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use nvcim::{
    data::DatasetKind,
    engine::{
        NoisyClassifier,
        float::{FLOAT_BATCH, float_engine},
        int::int_engine,
    },
    eval::mc::{McPlan, monte_carlo},
    ir::convert::Loaded,
    model::{Arch, ModelSpec},
};
use nvcim_shared::{
    format::build::PackConfig,
    quant::{QuantConfig, ScaleMode},
    variation::{Faults, Profile, SigmaUnit, VariationConfig},
};

struct Args {
    mc: u32,
    images: usize,
    sigma: f32,
    width: f64,
    jobs: Vec<usize>,
    batch: usize,
    calibration: usize,
    float: bool,
    int: bool,
    data_dir: PathBuf,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        mc: 10,
        images: 1000,
        sigma: 0.4,
        width: 0.25,
        jobs: vec![1, 2],
        batch: FLOAT_BATCH,
        calibration: 256,
        float: true,
        int: true,
        data_dir: DatasetKind::FashionMnist.default_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mc" => a.mc = v.parse()?,
            "--images" => a.images = v.parse()?,
            "--sigma" => a.sigma = v.parse()?,
            "--width" => a.width = v.parse()?,
            "--data-dir" => a.data_dir = v.into(),
            "--float-batch" => a.batch = v.parse()?,
            "--calibration-images" => a.calibration = v.parse()?,
            "--jobs" => {
                a.jobs = v
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--jobs takes a list like 1,2")?;
            }
            "--engine" => (a.float, a.int) = (v != "int", v != "float"),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Runs x images per second of one Monte Carlo evaluation (`monte_carlo` timed alone).
fn throughput<C: NoisyClassifier>(
    engine: &C,
    data: &C::Data,
    var: &VariationConfig,
    a: &Args,
    jobs: usize,
) -> Result<f64> {
    let plan = McPlan {
        variation: *var,
        sigmas: vec![a.sigma],
        mc: a.mc,
        seed: 0,
        jobs,
        progress: false,
    };
    let t = Instant::now();
    let runs = monte_carlo(engine, data, &plan)?;
    let secs = t.elapsed().as_secs_f64();
    let images = runs[0].examples;
    eprintln!(
        "  jobs {jobs}: {} runs x {images} images in {secs:.2} s, correct per run {:?}",
        a.mc, runs[0].correct
    );
    Ok(f64::from(a.mc) * images as f64 / secs)
}

fn main() -> Result<()> {
    let a = parse()?;
    let device = Device::flex();
    // A fixed initialisation, so that runs with other settings (`--float-batch`) can be compared
    // run by run.
    device.seed(0);
    let spec = ModelSpec {
        arch: Arch::Vgg8,
        width: a.width,
        in_channels: 1,
        image_size: 32,
        num_classes: 10,
        graph: None,
    };
    let loaded = Loaded {
        path: PathBuf::from("random-init"),
        backbone: spec.init_backbone(&device),
        spec,
        config: serde_json::json!({ "method": "vanilla" }),
        dataset: DatasetKind::FashionMnist,
        data_dir: a.data_dir.clone(),
        pad32: true,
        preprocess: nvcim::data::Preprocess::Pad,
    };
    let (train, test) = loaded.data(None)?;
    let idx: Vec<usize> = (0..a.images.min(test.len())).collect();
    let test = test.subset(&idx);
    let var = VariationConfig::new(
        QuantConfig::new(8, 2)?,
        0.0,
        SigmaUnit::Range,
        Profile::Uniform,
        Faults::NONE,
    )?;
    let mut fields = vec![
        format!("\"mc\": {}", a.mc),
        format!("\"images\": {}", test.len()),
        format!("\"sigma\": {}", a.sigma),
        "\"sigma_unit\": \"range\"".into(),
        format!("\"width\": {}", a.width),
        format!("\"float_batch\": {}", a.batch),
    ];
    if a.float {
        eprintln!("float engine (layer-wise f32)");
        let (engine, data) = float_engine(&loaded, &test, ScaleMode::PerLayer, a.batch)?;
        for &jobs in &a.jobs {
            let t = throughput(&engine, &data, &var, &a, jobs)?;
            fields.push(format!("\"float_jobs{jobs}\": {t:.1}"));
        }
    }
    if a.int {
        eprintln!("integer engine (collapsed tiles, ideal ADC)");
        let cfg = PackConfig {
            variation: var,
            tile_rows: 128,
            tile_cols: 128,
            scale_mode: ScaleMode::PerLayer,
        };
        let engine = int_engine(
            &loaded,
            &train,
            &test,
            a.calibration,
            &cfg,
            None,
            a.sigma,
            None,
        )?;
        for &jobs in &a.jobs {
            let t = throughput(&engine, &(), &var, &a, jobs)?;
            fields.push(format!("\"int_jobs{jobs}\": {t:.1}"));
        }
    }
    println!("{{{}}}", fields.join(", "));
    Ok(())
}
