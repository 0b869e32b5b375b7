//! `cargo xtask demo`: the main job, a small end-to-end experiment on an embedded default.
//!
//! On Fashion-MNIST (Debian's `dataset-fashion-mnist`), train VGG-8 at a CPU-sized width with
//! `vanilla`, `noise` and `nft` at training sigma 0.4; evaluate each by Monte Carlo at sigma
//! 0.2, 0.4, 0.6, 0.8; merge the results into a Table-II-style report with plots; export the
//! nft backbone to ONNX and check it with tract and ONNX Runtime against Burn; pack it and run
//! the firmware in QEMU (mc 5), comparing every run with the host integer engine. Everything goes
//! to `runs/demo/`, indexed by `runs/demo/README.md`. Each finished step is skipped when the demo
//! is run again, and an interrupted training resumes from its last checkpoint.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result};

/// The demo's embedded default. Sized for about 10 minutes on a 2-core machine after the build;
/// with issue #16's kernels it takes about 6 (see the README for the last measured run). The
/// plan was kept rather than lengthened: every target of issue #15 is met on it, and a longer
/// plan would change the figures the README reports.
///
/// Noise injection and nft start from the trained vanilla model (`--init-from`), clip their
/// weights per layer (`--clip-weights`), and every evaluation recalibrates BatchNorm per Monte
/// Carlo run. Measured on the same budget: nft from scratch reached 47.9% at sigma 0.4 (61.7%
/// recalibrated), fine-tuned and recalibrated 72.4%; with clipping the fine-tuned models keep
/// their clean accuracy (75 -> 88-89% in the demo) and gain at every sigma (see the README).
pub struct Plan {
    /// VGG-8 width multiplier.
    pub width: &'static str,
    /// Training epochs of the vanilla model (from random weights).
    pub vanilla_epochs: &'static str,
    /// Training epochs of noise injection and nft (fine-tuning the vanilla model).
    pub finetune_epochs: &'static str,
    /// `--clip-weights` of noise injection and nft: every conv/linear weight clamped to this many
    /// standard deviations of its layer after each step (not in the paper; vanilla is not
    /// clipped). Under the `range` convention a layer's noise scales with its max|W|.
    pub clip_weights: &'static str,
    /// `--lr-schedule`: cosine annealing stepped per batch, so that a run of a few epochs ends
    /// at a small learning rate (per epoch, 2 epochs would run at 1e-3 then 5e-4).
    pub lr_schedule: &'static str,
    /// Training images used (a seeded subset of those left after the validation split).
    pub max_train: &'static str,
    /// Fraction of the training set held out for validation (checkpoint selection by noisy
    /// validation accuracy, 3 Monte Carlo runs per epoch).
    pub val_fraction: &'static str,
    /// Evaluation sigmas.
    pub sigmas: &'static str,
    /// Monte Carlo runs per sigma.
    pub mc: &'static str,
    /// Test images per Monte Carlo run.
    pub test_subset: &'static str,
    /// Training images each Monte Carlo run's BatchNorm statistics are re-estimated on
    /// (`nvcim eval --bn-recalibrate`).
    pub bn_recalibrate: &'static str,
}

/// The default plan.
pub const PLAN: Plan = Plan {
    width: "0.25",
    vanilla_epochs: "4",
    finetune_epochs: "4",
    clip_weights: "1.5",
    lr_schedule: "cosine-step",
    max_train: "10240",
    val_fraction: "0.04",
    sigmas: "0,0.2,0.4,0.6,0.8",
    mc: "8",
    test_subset: "1000",
    bn_recalibrate: "256",
};

const METHODS: [&str; 3] = ["vanilla", "noise", "nft"];

/// Runs the demo.
pub fn run(root: &Path) -> Result<()> {
    let total = Instant::now();
    crate::setup::run(root)?;
    // The build `cargo xtask test` already made (`crate::BUILD`): nothing compiles after it.
    crate::cargo(&crate::BUILD)?;
    let nvcim = crate::target_dir(root).join("release").join("nvcim");
    let out = root.join("runs").join("demo");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut timings: Vec<(String, f64)> = Vec::new();
    let mut timed = |label: &str, cmd: &mut Command| -> Result<()> {
        let t = Instant::now();
        crate::step(cmd, label)?;
        timings.push((label.to_string(), t.elapsed().as_secs_f64()));
        Ok(())
    };

    for method in METHODS {
        // A finished training resumes at its last epoch and returns at once.
        let dir = out.join("train").join(method);
        let mut cmd = Command::new(&nvcim);
        cmd.args([
            "train",
            "--dataset",
            "fashion-mnist",
            "--model",
            "vgg8",
            "--method",
            method,
        ])
        .args([
            "--width",
            PLAN.width,
            "--epochs",
            if method == "vanilla" {
                PLAN.vanilla_epochs
            } else {
                PLAN.finetune_epochs
            },
            "--lr-schedule",
            PLAN.lr_schedule,
            "--max-train",
            PLAN.max_train,
            "--val-fraction",
            PLAN.val_fraction,
        ])
        .args(["--sigma", "0.4", "--alpha", "0.1", "--seed", "0", "--out"])
        .arg(&dir);
        if method != "vanilla" {
            // Noise injection and nft fine-tune the vanilla model with clipped weights (see
            // `Plan`).
            cmd.arg("--init-from")
                .arg(out.join("train").join("vanilla"))
                .args(["--clip-weights", PLAN.clip_weights]);
        }
        if dir.exists() {
            cmd.arg("--resume");
        }
        timed(&format!("train {method}"), &mut cmd)?;
    }
    let mut evals = Vec::new();
    for method in METHODS {
        let dir = out.join("eval").join(method);
        evals.push(dir.clone());
        if dir.join("eval.json").exists() {
            eprintln!("==> eval {method}: already finished, skipped");
            continue;
        }
        timed(
            &format!("eval {method}"),
            Command::new(&nvcim)
                .arg("eval")
                .arg(out.join("train").join(method))
                .args(["--sigma", PLAN.sigmas, "--mc", PLAN.mc, "--seed", "1"])
                .args(["--bn-recalibrate", PLAN.bn_recalibrate])
                .args([
                    "--test-subset",
                    PLAN.test_subset,
                    "--engine",
                    "float",
                    "--jobs",
                    "2",
                ])
                .arg("--out")
                .arg(&dir),
        )?;
    }
    let report = out.join("report");
    timed(
        "report",
        Command::new(&nvcim)
            .arg("report")
            .args(["--match", "any"])
            .args(&evals)
            .arg("--out")
            .arg(&report),
    )?;
    let nft = out.join("train").join("nft");
    let onnx = out.join("nft.onnx");
    timed(
        "export",
        Command::new(&nvcim)
            .arg("export")
            .arg(&nft)
            .arg("-o")
            .arg(&onnx),
    )?;
    let check = capture(
        &mut timed,
        "check-onnx",
        Command::new(&nvcim)
            .arg("check-onnx")
            .arg(&onnx)
            .arg("--checkpoint")
            .arg(&nft)
            .args([
                "--data-dir",
                "/usr/share/datasets/fashion-mnist",
                "--limit",
                "500",
            ]),
        &out.join("check-onnx.txt"),
    )?;
    let cimb = out.join("nft.cimb");
    timed(
        "pack",
        Command::new(&nvcim)
            .arg("pack")
            .arg(&nft)
            .arg("-o")
            .arg(&cimb)
            .args(["--test-images", "32"]),
    )?;
    let firmware = capture(
        &mut timed,
        "firmware (QEMU)",
        Command::new(&nvcim)
            .args(["firmware", "run"])
            .arg(&cimb)
            .args(["--mc", "5", "--sigma", "0.4", "--seed", "1", "--emulated"]),
        &out.join("firmware.txt"),
    )?;
    let table = fs::read_to_string(report.join("report.md")).unwrap_or_default();
    println!("{}", targets(&out)?);
    let elapsed = total.elapsed().as_secs_f64();
    write_index(&out, &table, &check, &firmware, &timings, elapsed)?;
    println!("{table}");
    println!(
        "demo finished in {:.1} min; index: {}",
        elapsed / 60.0,
        out.join("README.md").display()
    );
    Ok(())
}

/// Runs a command, saves its stdout to `file` and returns it.
fn capture(
    timed: &mut impl FnMut(&str, &mut Command) -> Result<()>,
    label: &str,
    cmd: &mut Command,
    file: &Path,
) -> Result<String> {
    let f = fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    timed(label, cmd.stdout(f))?;
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    print!("{text}");
    Ok(text)
}

fn write_index(
    out: &Path,
    table: &str,
    check: &str,
    firmware: &str,
    timings: &[(String, f64)],
    elapsed: f64,
) -> Result<()> {
    let mut md = String::new();
    let p = &PLAN;
    writeln!(md, "# nvcim demo\n")?;
    writeln!(
        md,
        "VGG-8 (width {}) on Fashion-MNIST, {} training images: vanilla from random weights \
         ({} epochs), then noise injection and negative feedback training (nft, alpha 0.1) \
         fine-tuning that vanilla model ({} epochs, `--init-from`) with every conv and linear \
         weight clipped to ±{}σ of its layer after each step (`--clip-weights`, not in the \
         paper; vanilla unclipped), Adam with the learning \
         rate cosine-annealed per batch from 1e-3 (`--lr-schedule {}`), at training sigma 0.4 (`range` \
         convention: 0.7776 sigma max|W| weight noise, M = 8, N = 2); BatchNorm running \
         statistics from clean passes (`--bn-stats clean`), best epoch by clean validation \
         accuracy for vanilla and noisy for the others (`--select auto`); Monte Carlo \
         evaluation at sigma {} with {} runs of {} test images each (float engine, seed 1), \
         each run's BatchNorm statistics re-estimated on {} training images through its \
         perturbed weights (`--bn-recalibrate`; the clean column keeps the trained \
         statistics).\n\n\
         **Protocol.** Every model is trained once, at sigma 0.4, and evaluated at every sigma \
         (`nvcim report --match any`). The paper's Table II trains each column's models at that \
         column's own sigma from scratch and evaluates without recalibration (`--match train`, \
         `plans/fmnist-table2-cpu.toml`), so the demo's columns other than 0.4 are not the \
         paper's protocol.\n",
        p.width,
        p.max_train,
        p.vanilla_epochs,
        p.finetune_epochs,
        p.clip_weights,
        p.lr_schedule,
        p.sigmas,
        p.mc,
        p.test_subset,
        p.bn_recalibrate
    )?;
    writeln!(md, "## Accuracy under device variation\n\n{table}\n")?;
    writeln!(md, "{}", targets(out)?)?;
    writeln!(md, "Files: [report](report/report.md), ")?;
    for m in METHODS {
        writeln!(
            md,
            "[{m}: plot](eval/{m}/accuracy_vs_sigma.png), [{m}: eval.json](eval/{m}/eval.json), \
             [{m}: training metrics](train/{m}/metrics.jsonl);"
        )?;
    }
    writeln!(
        md,
        "\n![mean noisy accuracy by method and sigma](report/table2.png)\n\n\
         ![accuracy vs sigma, nft](eval/nft/accuracy_vs_sigma.png)\n"
    )?;
    writeln!(
        md,
        "## ONNX export of the nft backbone ([nft.onnx](nft.onnx))\n\n```\n{check}```\n"
    )?;
    writeln!(
        md,
        "## Firmware in QEMU ([nft.cimb](nft.cimb), mc 5, sigma 0.4)\n\n```\n{firmware}```\n"
    )?;
    writeln!(md, "## Timings\n\n| step | seconds |\n|---|---|")?;
    for (label, s) in timings {
        writeln!(md, "| {label} | {s:.1} |")?;
    }
    writeln!(
        md,
        "| **total (this invocation, including setup and build checks)** | {elapsed:.1} |"
    )?;
    let path = out.join("README.md");
    fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
}

/// One method's evaluation: clean accuracy and, per sigma, (mean, 95% low, 95% high).
struct Curve {
    clean: f64,
    points: Vec<(f64, f64, f64, f64)>,
}

fn curve(out: &Path, method: &str) -> Result<Curve> {
    let path = out.join("eval").join(method).join("eval.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let num = |x: &serde_json::Value| {
        x.as_f64()
            .with_context(|| format!("{}: a number is missing", path.display()))
    };
    let mut points = Vec::new();
    for r in v["results"].as_array().into_iter().flatten() {
        let s = &r["summary"];
        points.push((
            num(&r["sigma"])?,
            num(&s["mean"])?,
            num(&s["ci95_low"])?,
            num(&s["ci95_high"])?,
        ));
    }
    Ok(Curve {
        clean: num(&v["clean_accuracy"])?,
        points,
    })
}

/// The demo's acceptance figures (issue #15), each marked met or missed from the eval files.
fn targets(out: &Path) -> Result<String> {
    let [v, n, f] = [
        curve(out, "vanilla")?,
        curve(out, "noise")?,
        curve(out, "nft")?,
    ];
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut md = String::from("## Targets\n\n| target | measured | |\n|---|---|---|\n");
    let mut row = |what: &str, measured: String, ok: bool| {
        md.push_str(&format!("| {what} | {measured} | {} |\n", mark(ok)));
    };
    row(
        "vanilla clean test accuracy >= 88%",
        format!("{:.2}", v.clean),
        v.clean >= 88.0,
    );
    row(
        "noise and nft clean >= 85%",
        format!("{:.2} / {:.2}", n.clean, f.clean),
        n.clean >= 85.0 && f.clean >= 85.0,
    );
    // Non-increasing within the 95% interval: each sigma's interval reaches down to the mean
    // before it. The chain starts at sigma 0 when it is evaluated (the same protocol,
    // BatchNorm recalibrated), else at the clean accuracy (the checkpoint's statistics).
    let monotone = |c: &Curve| {
        let mut prev = match c.points.first() {
            Some(&(0.0, ..)) => f64::INFINITY,
            _ => c.clean,
        };
        c.points.iter().all(|&(_, mean, lo, _)| {
            let ok = lo <= prev;
            prev = mean;
            ok
        })
    };
    row(
        "every mean non-increasing in sigma (within its 95% interval)",
        format!(
            "vanilla {}, noise {}, nft {}",
            monotone(&v),
            monotone(&n),
            monotone(&f)
        ),
        monotone(&v) && monotone(&n) && monotone(&f),
    );
    let high: Vec<usize> = (0..f.points.len())
        .filter(|&i| f.points[i].0 >= 0.4 - 1e-6)
        .collect();
    let order = high
        .iter()
        .all(|&i| f.points[i].1 >= n.points[i].1 && n.points[i].1 >= v.points[i].1);
    row(
        "nft >= noise >= vanilla at every sigma >= 0.4",
        high.iter()
            .map(|&i| {
                format!(
                    "σ {}: {:.1} / {:.1} / {:.1}",
                    f.points[i].0, f.points[i].1, n.points[i].1, v.points[i].1
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        order,
    );
    let disjoint = high.iter().all(|&i| f.points[i].2 > v.points[i].3);
    row(
        "nft's and vanilla's 95% intervals disjoint there",
        high.iter()
            .map(|&i| {
                format!(
                    "σ {}: {:.1} > {:.1}",
                    f.points[i].0, f.points[i].2, v.points[i].3
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        disjoint,
    );
    let at04 = f
        .points
        .iter()
        .find(|p| (p.0 - 0.4).abs() < 1e-6)
        .map(|p| p.1);
    row(
        "nft >= 70% at sigma 0.4",
        at04.map_or("not evaluated".into(), |a| format!("{a:.2}")),
        at04.is_some_and(|a| a >= 70.0),
    );
    Ok(md)
}
