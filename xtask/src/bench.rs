//! `cargo xtask bench [WHAT]`: criterion benchmarks, and the Python references they are compared
//! with side by side in the same run.
//!
//! Each benchmark prints a short summary after criterion's own output and writes it to
//! `target/bench/<what>.json`, so the README's figures can be traced to a run.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{python::bench_python, target_dir};

/// Mean time in nanoseconds of one criterion benchmark, from its `estimates.json`.
pub fn criterion_mean_ns(target_dir: &Path, group: &str, id: &str) -> Result<f64> {
    let path = target_dir
        .join("criterion")
        .join(group)
        .join(id)
        .join("new")
        .join("estimates.json");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading criterion's estimates {}", path.display()))?;
    let v = json_number_after(&text, "\"mean\"", "\"point_estimate\"")
        .with_context(|| format!("no mean.point_estimate in {}", path.display()))?;
    Ok(v)
}

/// The throughput in elements that a criterion benchmark declared (its `benchmark.json`).
pub fn criterion_elements(target_dir: &Path, group: &str, id: &str) -> Result<f64> {
    let path = target_dir
        .join("criterion")
        .join(group)
        .join(id)
        .join("new")
        .join("benchmark.json");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading criterion's benchmark record {}", path.display()))?;
    json_number_after(&text, "\"throughput\"", "\"Elements\"")
        .with_context(|| format!("no Elements throughput in {}", path.display()))
}

/// Finds `"key2": <number>` after the first occurrence of `key1` (criterion's flat JSON).
fn json_number_after(text: &str, key1: &str, key2: &str) -> Option<f64> {
    let rest = &text[text.find(key1)?..];
    let rest = &rest[rest.find(key2)? + key2.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))?;
    rest[..end].parse().ok()
}

/// Runs a Python reference script that prints one JSON object on its last stdout line.
pub fn python_reference(python: &Path, script: &Path, args: &[String]) -> Result<String> {
    eprintln!("\n==> {} {}", script.display(), args.join(" "));
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .env("OMP_NUM_THREADS", "2")
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .last()
        .map(str::to_string)
        .context("the reference printed nothing")
}

/// Writes a benchmark summary to `target/bench/<name>.json` and prints it.
pub fn record(root: &Path, name: &str, json: &str) -> Result<()> {
    let dir = target_dir(root).join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    // Every summary names the CPU it was measured on: figures from different machines are never
    // one series.
    let (model, flags) = cpu();
    let json = match json.trim_end().strip_suffix('}') {
        Some(body) => format!(
            "{body}, \"cpu\": {}, \"cpu_flags\": {}}}",
            json_string(&model),
            json_string(&flags)
        ),
        None => json.to_string(),
    };
    let json = json.as_str();
    fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    println!("{json}");
    eprintln!("    summary written to {}", path.display());
    Ok(())
}

/// The CPU's model name and its SIMD flags (`/proc/cpuinfo`; "unknown" elsewhere).
fn cpu() -> (String, String) {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags")
        .map(|f| {
            f.split_whitespace()
                .filter(|f| f.starts_with("avx") || f.starts_with("fma") || f.starts_with("amx"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    (model, flags)
}

fn json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `cargo bench` of one bench target in the release profile and the workspace's feature set —
/// the profile and features `cargo xtask test` and the demo build with, so a bench reuses that
/// build instead of compiling Burn and tract again — with `extra` arguments for the bench.
fn bench_args<'a>(bench: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "bench",
        "--profile",
        "release",
        "--workspace",
        "--exclude",
        "nvcim-firmware",
        "--exclude",
        "nvcim-python",
        "--bench",
        bench,
        "--",
    ];
    args.extend(extra);
    args
}

/// `cargo xtask bench variation`: Gaussian samples/s and noisy weights/s on one core.
pub fn variation(root: &Path) -> Result<()> {
    crate::cargo(&bench_args("variation", &[]))?;
    let t = target_dir(root);
    let n = 65536.0;
    let gauss = n / criterion_mean_ns(&t, "gaussian", "ziggurat_f32")? * 1e3;
    let noisy = n / criterion_mean_ns(&t, "noisy_weights", "m8_n2_f32")? * 1e3;
    record(
        root,
        "variation",
        &format!(
            "{{\"gaussian_msamples_per_s\": {gauss:.1}, \"noisy_weights_m_per_s\": {noisy:.1}, \
             \"target_gaussian_msamples_per_s\": 100}}"
        ),
    )
}

/// `cargo xtask bench engine`: MAC/s of the integer engine's collapsed path on VGG-8 at width
/// 0.25, against an int8 dot product in L1 compiled with the same flags (the bench prints the
/// MAC count, programmed state per weight and peak scratch).
pub fn engine(root: &Path) -> Result<()> {
    crate::cargo(&bench_args("engine", &[]))?;
    let t = target_dir(root);
    let per_ns = |group: &str, id: &str| -> Result<(f64, f64)> {
        let ns = criterion_mean_ns(&t, group, id)?;
        Ok((criterion_elements(&t, group, id)? / ns, ns))
    };
    let (engine, image_ns) = per_ns("vgg8_w025", "collapsed")?;
    let (peak, _) = per_ns("kernel", "int8_peak_dot_1152")?;
    record(
        root,
        "engine",
        &format!(
            "{{\"vgg8_w025_collapsed_gmac_per_s\": {engine:.2}, \"int8_dot_gmac_per_s\": {peak:.2}, \
             \"ratio\": {:.2}, \"ms_per_image\": {:.2}}}",
            engine / peak,
            image_ns / 1e6
        ),
    )
}

/// The training steps of [`train`] and [`layers`]: model, width, and the criterion id of the
/// `train_step` bench.
const STEP_RUNS: [(&str, &str, &str); 3] = [
    ("vgg8", "0.25", "vgg8_w0.25_b128_nft"),
    ("vgg8", "1.0", "vgg8_w1_b128_nft"),
    ("resnet18", "0.25", "resnet18_w0.25_b128_nft"),
];

/// `cargo bench ... --bench train_step` for one model and width ([`STEP_RUNS`]), the command
/// [`train`] and [`layers`] add their output variable to.
fn train_step_bench(model: &str, width: &str) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(bench_args("train_step", &[]))
        .env("NVCIM_BENCH_WIDTHS", width)
        .env("NVCIM_BENCH_ARCH", model);
    cmd
}

/// Alternating rounds of nvcim and PyTorch in `cargo xtask bench train`, as in [`eval`]: this
/// VM's speed drifts by +-15% (nvcim's own step by up to 30%) from minute to minute, so each
/// side's best round is compared, and every round's own ratio is recorded too.
const TRAIN_ROUNDS: usize = 2;

/// `cargo xtask bench train`: nvcim's training step against PyTorch's, same model, loss and
/// noise injection, batch 128: VGG-8 at the demo width and at width 1.0, ResNet-18 at width 0.25,
/// in one run of [`TRAIN_ROUNDS`] alternating rounds (nvcim, then PyTorch, per model and width).
pub fn train(root: &Path) -> Result<()> {
    let python = bench_python(root, &["torch", "numpy"])?;
    let script = root.join("bench/reference/train_step.py");
    let t = target_dir(root);
    let dir = t.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Per run of STEP_RUNS, per round: nvcim's ms and peak RSS, PyTorch's.
    let mut rounds: Vec<Vec<[f64; 4]>> = vec![Vec::new(); STEP_RUNS.len()];
    for round in 1..=TRAIN_ROUNDS {
        for (r, (model, width, id)) in STEP_RUNS.into_iter().enumerate() {
            eprintln!("\n==> round {round}/{TRAIN_ROUNDS}: {model} width {width}");
            // One process per width, so that each width's peak resident set is its own.
            let rss_file = t
                .join("bench")
                .join(format!("train_step_{model}_w{width}_rss_mb.txt"));
            crate::step(
                train_step_bench(model, width).env("NVCIM_BENCH_RSS_FILE", &rss_file),
                &format!("cargo bench train_step ({model}, width {width})"),
            )?;
            let ours_rss: f64 = fs::read_to_string(&rss_file)
                .with_context(|| format!("reading {}", rss_file.display()))?
                .trim()
                .parse()
                .with_context(|| format!("{} holds no number", rss_file.display()))?;
            let ours_ms = criterion_mean_ns(&t, "train_step", id)? / 1e6;
            let line = python_reference(
                &python,
                &script,
                &[
                    "--model".into(),
                    model.into(),
                    "--width".into(),
                    width.into(),
                    "--batch".into(),
                    "128".into(),
                ],
            )?;
            let torch_ms = json_number_after(&line, "{", "\"ms_per_step\"")
                .with_context(|| format!("no ms_per_step in the reference's output: {line}"))?;
            let torch_rss = json_number_after(&line, "{", "\"peak_rss_mb\"")
                .with_context(|| format!("no peak_rss_mb in the reference's output: {line}"))?;
            eprintln!(
                "    round {round}: nvcim {ours_ms:.1} ms, pytorch {torch_ms:.1} ms ({:.3})",
                ours_ms / torch_ms
            );
            rounds[r].push([ours_ms, ours_rss, torch_ms, torch_rss]);
        }
    }
    let rows: Vec<String> = STEP_RUNS
        .iter()
        .zip(&rounds)
        .map(|((model, width, _), rs)| {
            let best = |i: usize| rs.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min);
            let most = |i: usize| rs.iter().map(|r| r[i]).fold(0f64, f64::max);
            let (ours_ms, torch_ms) = (best(0), best(2));
            let per_round: Vec<String> = rs
                .iter()
                .map(|r| {
                    format!(
                        "{{\"nvcim_ms\": {:.2}, \"pytorch_ms\": {:.2}, \"ratio\": {:.3}}}",
                        r[0],
                        r[2],
                        r[0] / r[2]
                    )
                })
                .collect();
            format!(
                "{{\"model\": \"{model}\", \"width\": {width}, \"nvcim_ms\": {ours_ms:.2}, \"pytorch_ms\": {torch_ms:.2}, \"ratio\": {:.3}, \"nvcim_peak_rss_mb\": {:.1}, \"pytorch_peak_rss_mb\": {:.1}, \"rounds\": [{}]}}",
                ours_ms / torch_ms,
                most(1),
                most(3),
                per_round.join(", ")
            )
        })
        .collect();
    record(
        root,
        "train",
        &format!(
            "{{\"train_step_batch128_nft\": [{}], \"best_of_rounds\": {TRAIN_ROUNDS}, \"target_ratio_max\": 1.0}}",
            rows.join(", ")
        ),
    )
}

/// `cargo xtask bench layers`: where a training step's time goes, nvcim against PyTorch, per
/// layer and phase, in one run: the `train_step` bench's profile mode (`NVCIM_BENCH_PROFILE`:
/// every convolution, batch norm, pool and ReLU the extension routes, timed per shape, and the
/// step's forward, backward and optimizer phases) and `bench/reference/train_profile.py`
/// (torch.profiler, the same shapes), for VGG-8 at widths 0.25 and 1.0 and ResNet-18 at 0.25.
/// Writes `target/bench/layers.json` (every row) and `layers.md` (the tables).
///
/// How to read it: nvcim's rows are wall times of its kernels, PyTorch's are CPU times of the
/// aten ops under the profiler (which slows PyTorch's step: its profiled step is in the table
/// beside the unprofiled one `bench train` measures); PyTorch computes a convolution's input
/// and weight gradients in one call, so its row stands against the sum of nvcim's two.
pub fn layers(root: &Path) -> Result<()> {
    let python = bench_python(root, &["torch", "numpy"])?;
    let script = root.join("bench/reference/train_profile.py");
    let t = target_dir(root);
    let dir = t.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ours, theirs) = (
        dir.join("layers_nvcim.jsonl"),
        dir.join("layers_pytorch.jsonl"),
    );
    for f in [&ours, &theirs] {
        if f.exists() {
            fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
        }
    }
    for (model, width, _) in STEP_RUNS {
        crate::step(
            train_step_bench(model, width).env("NVCIM_BENCH_PROFILE", &ours),
            &format!("nvcim's training step by layer ({model}, width {width})"),
        )?;
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--model", model, "--width", width, "--out"])
            .arg(&theirs)
            .current_dir(root.join("bench/reference"));
        crate::step(
            &mut cmd,
            &format!("PyTorch's training step by op ({model}, width {width})"),
        )?;
    }
    let read = |f: &Path| -> Result<Vec<serde_json::Value>> {
        fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", f.display())))
            .collect()
    };
    let (ours, theirs) = (read(&ours)?, read(&theirs)?);
    let (md, rows) = layer_tables(&ours, &theirs);
    fs::write(dir.join("layers.md"), &md).context("writing target/bench/layers.md")?;
    eprintln!("{md}");
    record(
        root,
        "layers",
        &format!(
            "{{\"rows\": [{}], \"nvcim_unit\": \"wall ms per step\", \"pytorch_unit\": \"profiled CPU ms per step (aten op and children)\"}}",
            rows.join(", ")
        ),
    )
}

/// [`layers`]' markdown tables and JSON rows from both sides' JSON lines (`model`, `width`,
/// `op`, `shape`, `calls`, `ms`): per model and width, the phases, then one row per layer shape
/// and operation, PyTorch's convolution backward against nvcim's input plus weight gradients.
fn layer_tables(ours: &[serde_json::Value], theirs: &[serde_json::Value]) -> (String, Vec<String>) {
    use std::collections::BTreeMap;
    let key = |v: &serde_json::Value| {
        (
            v["model"].as_str().unwrap_or("?").to_string(),
            v["width"].as_f64().unwrap_or(0.0),
        )
    };
    let ms = |v: &serde_json::Value| v["ms"].as_f64().unwrap_or(0.0);
    let mut md = String::new();
    let mut rows = Vec::new();
    let mut runs: Vec<(String, f64)> = ours.iter().map(key).collect();
    runs.dedup();
    for (model, width) in runs {
        let mine: Vec<_> = ours
            .iter()
            .filter(|v| key(v) == (model.clone(), width))
            .collect();
        let pt: Vec<_> = theirs
            .iter()
            .filter(|v| key(v) == (model.clone(), width))
            .collect();
        // (op, shape) -> (nvcim ms, PyTorch ms, calls)
        let mut table: BTreeMap<(String, String), (f64, f64, u64)> = BTreeMap::new();
        for v in &mine {
            let op = v["op"].as_str().unwrap_or("?");
            let op = match op {
                "conv input grad" | "conv weight grad" => "conv backward",
                o => o,
            };
            let e = table
                .entry((
                    op.to_string(),
                    v["shape"].as_str().unwrap_or("").to_string(),
                ))
                .or_default();
            e.0 += ms(v);
            e.2 = e.2.max(v["calls"].as_u64().unwrap_or(0));
        }
        for v in &pt {
            let e = table
                .entry((
                    v["op"].as_str().unwrap_or("?").to_string(),
                    v["shape"].as_str().unwrap_or("").to_string(),
                ))
                .or_default();
            e.1 += ms(v);
            e.2 = e.2.max(v["calls"].as_u64().unwrap_or(0));
        }
        // nvcim's split of each convolution's backward, for its own column.
        let split = |op: &str, shape: &str| {
            mine.iter()
                .filter(|v| v["op"] == op && v["shape"] == shape)
                .map(|v| ms(v))
                .fold(0.0, |a, b| a + b)
        };
        md.push_str(&format!(
            "\n#### {model} width {width}\n\n| op | shape | calls | nvcim ms | PyTorch ms (profiled) | nvcim / PyTorch |\n|---|---|---:|---:|---:|---:|\n"
        ));
        let order = |op: &str| match op {
            "step" => 0,
            o if o.starts_with("phase") => 1,
            _ => 2,
        };
        let mut entries: Vec<_> = table.into_iter().collect();
        entries.sort_by_key(|((op, shape), _)| (order(op), op.clone(), shape.clone()));
        let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for ((op, shape), (a, b, calls)) in &entries {
            let ratio = if *a > 0.0 && *b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            };
            let mine_txt = if op == "conv backward" {
                format!(
                    "{a:.2} ({:.2} + {:.2})",
                    split("conv input grad", shape),
                    split("conv weight grad", shape)
                )
            } else {
                format!("{a:.2}")
            };
            md.push_str(&format!(
                "| {op} | {shape} | {calls} | {mine_txt} | {b:.2} | {ratio} |\n"
            ));
            if order(op) == 2 {
                let t = totals.entry(op.clone()).or_default();
                t.0 += a;
                t.1 += b;
            }
            rows.push(format!(
                "{{\"model\": \"{model}\", \"width\": {width}, \"op\": \"{op}\", \"shape\": \"{shape}\", \"calls\": {calls}, \"nvcim_ms\": {a:.3}, \"pytorch_ms\": {b:.3}}}"
            ));
        }
        for (op, (a, b)) in totals {
            md.push_str(&format!(
                "| **{op}, all layers** | | | {a:.2} | {b:.2} | {} |\n",
                if b > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "-".into()
                }
            ));
        }
    }
    (md, rows)
}

/// Monte Carlo runs and test images of `cargo xtask bench eval` (nvcim and PyTorch alike): an
/// even number of runs, so that neither of nvcim's two `--jobs 2` workers idles through the last
/// run while the other finishes it.
const EVAL_MC: u32 = 10;
const EVAL_IMAGES: usize = 1000;

/// Alternating rounds of nvcim and PyTorch in `cargo xtask bench eval`: this 2-core VM's speed
/// drifts by +-15% from minute to minute, so each side's best round is compared, and every
/// round's own ratio is recorded too.
const EVAL_ROUNDS: usize = 3;

/// `cargo xtask bench eval`: Monte Carlo throughput (runs x images per second) of `nvcim eval`'s
/// float and integer engines and of the PyTorch reference (`bench/reference/mc_eval.py`), in one
/// run, on VGG-8 w0.25 with random weights, the first 1000 Fashion-MNIST test images padded to
/// 32x32, sigma 0.4 (`range`), 10 runs, [`EVAL_ROUNDS`] alternating rounds. nvcim's figure per
/// engine and round is its best over `--jobs` 1 and 2 (the host bench `mc_eval` times
/// `eval::mc::monte_carlo` on the engines `nvcim eval` builds).
pub fn eval(root: &Path) -> Result<()> {
    let python = bench_python(root, &["torch", "numpy"])?;
    let (mc, images) = (EVAL_MC.to_string(), EVAL_IMAGES.to_string());
    let common = [
        "--mc",
        mc.as_str(),
        "--images",
        images.as_str(),
        "--sigma",
        "0.4",
    ];
    let mut args = bench_args("mc_eval", &common);
    args.extend(["--jobs", "1,2"]);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let script = root.join("bench/reference/mc_eval.py");
    let mut rounds = Vec::new();
    let (mut float, mut int, mut torch) = (0f64, 0f64, 0f64);
    let mut last = (String::new(), String::new());
    for round in 1..=EVAL_ROUNDS {
        eprintln!(
            "\n==> round {round}/{EVAL_ROUNDS}: cargo {}",
            args.join(" ")
        );
        let out = Command::new(&cargo)
            .current_dir(root)
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the mc_eval bench")?;
        if !out.status.success() {
            bail!("the mc_eval bench failed ({})", out.status);
        }
        let ours = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .map(str::to_string)
            .context("the mc_eval bench printed nothing")?;
        let best = |engine: &str| -> Result<f64> {
            ["1", "2"]
                .iter()
                .filter_map(|j| json_number_after(&ours, "{", &format!("\"{engine}_jobs{j}\"")))
                .reduce(f64::max)
                .with_context(|| format!("no {engine} figure in the bench's output: {ours}"))
        };
        let (f, i) = (best("float")?, best("int")?);
        let line = python_reference(
            &python,
            &script,
            &common.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )?;
        let t = json_number_after(&line, "{", "\"runs_x_images_per_s\"")
            .with_context(|| format!("no runs_x_images_per_s in the reference's output: {line}"))?;
        eprintln!("    round {round}: float {f:.0}, int {i:.0}, pytorch {t:.0}");
        rounds.push(format!(
            "{{\"nvcim_float\": {f:.1}, \"nvcim_int\": {i:.1}, \"pytorch\": {t:.1}, \
             \"float_over_pytorch\": {:.2}, \"int_over_pytorch\": {:.2}}}",
            f / t,
            i / t
        ));
        (float, int, torch) = (float.max(f), int.max(i), torch.max(t));
        last = (ours, line);
    }
    let (ours, line) = last;
    record(
        root,
        "eval",
        &format!(
            "{{\"runs_x_images_per_s\": {{\"nvcim_float\": {float:.1}, \"nvcim_int\": {int:.1}, \
             \"pytorch\": {torch:.1}}}, \"float_over_pytorch\": {:.2}, \"int_over_pytorch\": {:.2}, \
             \"best_of_rounds\": {EVAL_ROUNDS}, \"rounds\": [{}], \
             \"target_float_over_pytorch\": 2.0, \"target_int_over_pytorch\": 1.0, \
             \"model\": \"vgg8 w0.25 random weights, fashion-mnist 32x32\", \"mc\": {EVAL_MC}, \
             \"images\": {EVAL_IMAGES}, \"sigma\": 0.4, \"sigma_unit\": \"range\", \
             \"nvcim_last_round\": {ours}, \"pytorch_reference_last_round\": {line}}}",
            float / torch,
            int / torch,
            rounds.join(", ")
        ),
    )
}

/// Alternating rounds of [`onnx`].
const ONNX_ROUNDS: usize = 3;

/// `cargo xtask bench onnx`: `nvcim eval --onnx` on the reference model (VGG-8 w0.25, 1000
/// Fashion-MNIST test images, sigma 0.4, 8 runs, both cores) through the imported network on
/// the float engine (the default) and through tract (`--engine tract`), alternating, in the
/// same run; the figure is each engine's best Monte Carlo wall time and tract's over the float
/// engine's (target >= 1: the new default at least as fast).
pub fn onnx(root: &Path) -> Result<()> {
    crate::cargo(&crate::BUILD)?;
    let nvcim = crate::nvcim_binary(root);
    let model = root.join("models/vgg8-w0.25-fmnist-nft.onnx");
    let data = Path::new("/usr/share/datasets/fashion-mnist");
    let out = target_dir(root).join("bench/onnx-eval-runs");
    let mut best = [f64::INFINITY; 2];
    let mut rounds = Vec::new();
    let mut counts: [Option<String>; 2] = [None, None];
    for round in 1..=ONNX_ROUNDS {
        let mut secs = [0f64; 2];
        for (k, engine) in ["float", "tract"].iter().enumerate() {
            let o = Command::new(&nvcim)
                .arg("eval")
                .arg("--onnx")
                .arg(&model)
                .arg("--data-dir")
                .arg(data)
                .args([
                    "--engine", engine, "--sigma", "0.4", "--mc", "8", "--seed", "1",
                ])
                .args(["--test-subset", "1000", "--jobs", "2", "--quiet", "--json"])
                .arg("--out")
                .arg(out.join(engine))
                .output()
                .with_context(|| format!("running {}", nvcim.display()))?;
            if !o.status.success() {
                bail!(
                    "nvcim eval --onnx --engine {engine} failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let s = json_number_after(&text, "{", "\"wall_seconds\"")
                .with_context(|| format!("no wall_seconds in {text}"))?;
            let correct = text
                .split("\"correct\"")
                .nth(1)
                .and_then(|r| r.split(']').next())
                .map(|r| r.split_whitespace().collect::<String>());
            counts[k] = correct;
            secs[k] = s;
            best[k] = best[k].min(s);
        }
        eprintln!(
            "    round {round}: float {:.2} s, tract {:.2} s",
            secs[0], secs[1]
        );
        rounds.push(format!(
            "{{\"float_s\": {:.3}, \"tract_s\": {:.3}}}",
            secs[0], secs[1]
        ));
    }
    if counts[0] != counts[1] {
        bail!(
            "the float engine and tract classified differently: {:?} vs {:?}",
            counts[0],
            counts[1]
        );
    }
    record(
        root,
        "onnx_eval",
        &format!(
            "{{\"seconds_best\": {{\"float\": {:.3}, \"tract\": {:.3}}}, \
             \"tract_over_float\": {:.2}, \"target_tract_over_float\": 1.0, \
             \"rounds\": [{}], \"model\": \"models/vgg8-w0.25-fmnist-nft.onnx\", \
             \"images\": 1000, \"mc\": 8, \"sigma\": 0.4, \"jobs\": 2, \
             \"same_counts\": true, \"cpu\": \"{}\"}}",
            best[0],
            best[1],
            best[1] / best[0],
            rounds.join(", "),
            cpu_model()
        ),
    )
}

/// The CPU's model name (`/proc/cpuinfo`), for the summaries.
fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().replace('"', "'"))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `cargo xtask bench python`: `nvcim.perturb` from the wheel vs a NumPy implementation of the
/// same device model, alternating rounds in one process (`bench/reference/perturb_numpy.py`);
/// the summary goes to `target/bench/python.json`.
pub fn python(root: &Path) -> Result<()> {
    crate::setup::run(root)?;
    crate::wheel::build(root)?;
    let python = root.join(".venv").join("bin").join("python");
    let line = python_reference(
        &python,
        &root
            .join("bench")
            .join("reference")
            .join("perturb_numpy.py"),
        &[],
    )?;
    record(root, "python", &line)
}

/// `cargo xtask bench export`: latency at batch 1 and throughput at batch 128 of an exported
/// VGG-8 backbone in tract and ONNX Runtime (criterion prints the table).
pub fn export() -> Result<()> {
    crate::cargo(&bench_args("onnx_runtimes", &[]))
}

/// `cargo xtask bench firmware`: instructions per MAC and per sampled device deviation of the
/// Cortex-M4F firmware in QEMU (`-icount shift=0`) on VGG-8 w0.25 with random weights
/// (`nvcim firmware bench`); the lines are also written to `target/bench/firmware.txt`.
pub fn firmware(root: &Path) -> Result<()> {
    let out = Command::new("cargo")
        .current_dir(root)
        .args(["run", "--release", "-p", "nvcim", "--", "firmware", "bench"])
        .output()
        .context("running cargo run -p nvcim -- firmware bench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    if !out.status.success() {
        bail!(
            "nvcim firmware bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = target_dir(root).join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("firmware.txt");
    fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_estimates() {
        let text = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},"point_estimate":2.5e3,"standard_error":0.1},"median":{"point_estimate":9.0}}"#;
        assert_eq!(
            json_number_after(text, "\"mean\"", "\"point_estimate\""),
            Some(2500.0)
        );
        assert_eq!(
            json_number_after(text, "\"median\"", "\"point_estimate\""),
            Some(9.0)
        );
        assert_eq!(
            json_number_after(text, "\"mode\"", "\"point_estimate\""),
            None
        );
    }
}
