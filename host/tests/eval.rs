//! `nvcim eval` end to end: a tiny VGG-8 trained by the real `nvcim train` on a tiny IDX set,
//! evaluated with both engines; output files, engine agreement, `--jobs` invariance, bad input.

use std::path::Path;
use std::process::Output;

mod common;

use common::{nvcim, write_idx};
use nvcim::eval::results::{EvalReport, histogram_name};

fn ok(o: &Output) -> &Output {
    assert!(
        o.status.success(),
        "nvcim failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Trains a tiny VGG-8 (1 epoch) on a fresh toy set; returns (data dir, run dir).
fn trained(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = root.join("data");
    let run = root.join("run");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, 400, 200);
    let (d, r) = (data.to_str().unwrap(), run.to_str().unwrap());
    ok(&nvcim(&[
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        d,
        "--out",
        r,
        "--width",
        "0.125",
        "--batch-size",
        "16",
        "--lr",
        "0.002",
        "--mc-val",
        "1",
        "--sigma",
        "0.2",
        "--epochs",
        "1",
        "--quiet",
        "--json",
    ]));
    (data, run)
}

fn eval(run: &Path, out: &Path, extra: &[&str]) -> Output {
    mc_eval(&[run.to_str().unwrap()], out, extra)
}

/// `nvcim eval TARGET...` (a run directory, or `--onnx FILE --data-dir DIR`) with the tests'
/// Monte Carlo flags.
fn mc_eval(target: &[&str], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["eval"];
    args.extend_from_slice(target);
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--sigma",
        "0,0.3,0.6",
        "--mc",
        "5",
        "--seed",
        "3",
        "--quiet",
        "--json",
    ]);
    args.extend_from_slice(extra);
    nvcim(&args)
}

fn report(out: &Path) -> EvalReport {
    serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap()
}

fn check_files(out: &Path, r: &EvalReport) {
    for f in ["eval.json", "eval.csv", "runs.csv", "accuracy_vs_sigma.png"] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    assert_eq!(r.results.len(), 3);
    let runs = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1 + 3 * 5,
        "runs.csv: a header and 15 runs"
    );
    for s in &r.results {
        assert!(out.join(histogram_name(s.sigma)).is_file());
        assert_eq!(s.accuracies.len(), 5);
        for (a, c) in s.accuracies.iter().zip(&s.correct) {
            assert!((a - 100.0 * *c as f64 / r.test_examples as f64).abs() < 1e-9);
        }
        let mean = s.accuracies.iter().sum::<f64>() / 5.0;
        assert!((mean - s.summary.mean).abs() < 1e-9);
        assert!(s.summary.min <= s.summary.mean && s.summary.mean <= s.summary.max);
    }
    let csv = std::fs::read_to_string(out.join("eval.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 3,
        "eval.csv: a header and one row per sigma"
    );
}

#[test]
fn eval_both_engines_agree_and_files_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = trained(dir.path());

    let f1 = dir.path().join("float1");
    ok(&eval(&run, &f1, &["--engine", "float", "--jobs", "1"]));
    let float = report(&f1);
    check_files(&f1, &float);
    assert_eq!(float.test_examples, 200);
    assert_eq!(float.config.engine, "float");

    // The same per-run draws whatever the thread count.
    let f2 = dir.path().join("float2");
    ok(&eval(&run, &f2, &["--engine", "float", "--jobs", "2"]));
    let float2 = report(&f2);
    for (a, b) in float.results.iter().zip(&float2.results) {
        assert_eq!(a.correct, b.correct, "sigma {}: --jobs 1 vs 2", a.sigma);
    }

    let i1 = dir.path().join("int");
    ok(&eval(
        &run,
        &i1,
        &[
            "--engine",
            "int",
            "--jobs",
            "2",
            "--calibration-images",
            "64",
        ],
    ));
    let int = report(&i1);
    check_files(&i1, &int);
    assert_eq!(int.test_examples, 200);
    assert_eq!(int.config.engine, "int");

    // Agreement bound: both engines program the same quantized, perturbed weights (same
    // streams); the integer engine additionally rounds every layer's activations to 8 bits
    // (relative error at most 2^-7 of the layer's calibrated range) and reads the devices in
    // 16-bit fixed point. An image can change class only when its logit margin is below the
    // accumulated relative error, bounded by L * 2^-7 over the L = 8 weight layers of VGG-8;
    // we take that fraction of the test set (6.25 points) plus one image of granularity as the
    // bound on the difference of the Monte Carlo means.
    let bound = 100.0 * 8.0 / 128.0 + 100.0 / 200.0;
    for (f, i) in float.results.iter().zip(&int.results) {
        let d = (f.summary.mean - i.summary.mean).abs();
        assert!(
            d <= bound,
            "sigma {}: float mean {} vs int mean {} (bound {bound})",
            f.sigma,
            f.summary.mean,
            i.summary.mean
        );
    }
    assert!(
        (float.clean_accuracy - int.clean_accuracy).abs() <= bound,
        "clean: float {} int {}",
        float.clean_accuracy,
        int.clean_accuracy
    );

    // The packed model: integer accuracy at sigma 0 within 1 point of Burn's float accuracy,
    // and the firmware's simulated run accepts the file.
    let cimb = dir.path().join("model.cimb");
    ok(&nvcim(&[
        "pack",
        run.to_str().unwrap(),
        "-o",
        cimb.to_str().unwrap(),
        "--test-images",
        "200",
        "--calibration-images",
        "64",
    ]));
    assert!(cimb.is_file());
    let blob = std::fs::read(&cimb).unwrap();
    let model = nvcim_shared::format::Model::parse(&blob).unwrap();
    assert_eq!(model.test_len(), 200);
    assert_eq!(model.layer_count(), 8);
    assert!(
        (int.clean_accuracy - float.clean_accuracy).abs() <= 1.0,
        "packed int clean {} vs Burn float {}",
        int.clean_accuracy,
        float.clean_accuracy
    );
    ok(&nvcim(&[
        "firmware",
        "run",
        cimb.to_str().unwrap(),
        "--mc",
        "2",
        "--sigma",
        "0.1",
        "--simulated",
    ]));

    // ONNX export: tract and ONNX Runtime logits equal Burn's within 1e-4 at batch 1 and 7.
    let onnx = dir.path().join("model.onnx");
    let (r, d, o) = (
        run.to_str().unwrap(),
        data.to_str().unwrap(),
        onnx.to_str().unwrap(),
    );
    ok(&nvcim(&["export", r, "-o", o]));
    // The trained export holds the backbone only: the checkpoint trained exits (nft), the graph
    // names none of them and has one Conv/Gemm per backbone weight layer (VGG-8: 6 + 2); the
    // format's own checker accepts it.
    let ckpt = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(
        ckpt.contains("\"nft\""),
        "the run trained with exits: {ckpt}"
    );
    let model = nvcim::onnx::read_model(&onnx).unwrap();
    common::assert_backbone_only(&model, 8); // VGG-8: 6 conv + 2 linear
    common::check_with_onnx_checker(std::slice::from_ref(&onnx));
    for batch in ["1", "7"] {
        let out = ok(&nvcim(&[
            "check-onnx",
            o,
            "--data-dir",
            d,
            "--limit",
            "7",
            "--batch",
            batch,
            "--checkpoint",
            r,
            "--max-diff",
            "1e-4",
            "--json",
        ]))
        .stdout
        .clone();
        let rep: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> = rep["runtimes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"burn"), "{names:?}");
        for pair in rep["max_abs_diff"].as_array().unwrap() {
            assert!(pair[2].as_f64().unwrap() <= 1e-4, "batch {batch}: {pair}");
        }
    }

    // --noisy-instance --seed K --run R classifies like run R of `eval --engine float --seed K`.
    let noisy = dir.path().join("noisy.onnx");
    let n = noisy.to_str().unwrap();
    ok(&nvcim(&[
        "export",
        r,
        "-o",
        n,
        "--noisy-instance",
        "--sigma",
        "0.6",
        "--seed",
        "3",
        "--run",
        "2",
    ]));
    common::check_with_onnx_checker(std::slice::from_ref(&noisy));
    let out = ok(&nvcim(&[
        "check-onnx",
        n,
        "--data-dir",
        d,
        "--limit",
        "200",
        "--json",
        "--max-diff",
        "1",
    ]))
    .stdout
    .clone();
    let rep: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let tract = rep["runtimes"][0]["accuracy"].as_f64().unwrap();
    let want = float.results[2].correct[2];
    assert_eq!((tract * 200.0).round() as usize, want, "run 2 at sigma 0.6");

    // `eval --onnx` on the (BatchNorm-kept) export: same layers and streams as the float engine,
    // so every run classifies the same images (allowing one near-tie per run).
    let ox = dir.path().join("onnx-eval");
    ok(&mc_eval(
        &["--onnx", o, "--data-dir", d],
        &ox,
        &["--jobs", "2"],
    ));
    let ext = report(&ox);
    check_files(&ox, &ext);
    for (f, e) in float.results.iter().zip(&ext.results) {
        for (a, b) in f.correct.iter().zip(&e.correct) {
            assert!(
                a.abs_diff(*b) <= 1,
                "sigma {}: float {a} vs onnx {b}",
                f.sigma
            );
        }
    }

    // Bad input.
    let bad = dir.path().join("bad");
    for (extra, needle) in [
        (&["--mc", "0"][..], "--mc"),
        (&["--sigma", ""][..], "sigma"),
    ] {
        let o = eval(&run, &bad, extra);
        assert!(!o.status.success(), "{extra:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let o = eval(&run, &file.join("sub"), &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out"));

    // A checkpoint whose model.json describes another model.
    let json = std::fs::read_to_string(run.join("best/model.json")).unwrap();
    let mut spec: serde_json::Value = serde_json::from_str(&json).unwrap();
    spec["width"] = serde_json::json!(0.25);
    std::fs::write(run.join("best/model.json"), spec.to_string()).unwrap();
    let o = eval(&run, &bad, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("model.json"), "{err}");
}

#[test]
fn bn_recalibration_is_seeded_jobs_invariant_and_engines_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = trained(dir.path());
    let weights = std::fs::read(run.join("best/backbone.bpk")).unwrap();
    let recal = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["--bn-recalibrate", "64"];
        args.extend_from_slice(extra);
        ok(&eval(&run, &out, &args));
        report(&out)
    };
    let f1 = recal("f1", &["--engine", "float", "--jobs", "1"]);
    let f2 = recal("f2", &["--engine", "float", "--jobs", "2"]);
    assert_eq!(f1.config.bn_recalibrate, Some(64), "recorded in eval.json");
    for (a, b) in f1.results.iter().zip(&f2.results) {
        assert_eq!(a.correct, b.correct, "sigma {}: --jobs 1 vs 2", a.sigma);
    }
    // The same flags again give the same numbers (the images are a seeded choice).
    let again = recal("f3", &["--engine", "float", "--jobs", "2"]);
    assert_eq!(f1.results, again.results);
    // Recalibration is not a no-op: without it some run at sigma 0.6 classifies differently.
    let plain_out = dir.path().join("plain");
    ok(&eval(
        &run,
        &plain_out,
        &["--engine", "float", "--jobs", "2"],
    ));
    let plain = report(&plain_out);
    assert_eq!(plain.config.bn_recalibrate, None);
    assert_ne!(plain.results[2].correct, f1.results[2].correct);
    // The clean accuracy keeps the checkpoint's statistics; the checkpoint is not touched.
    assert_eq!(plain.clean_accuracy, f1.clean_accuracy);
    assert_eq!(
        std::fs::read(run.join("best/backbone.bpk")).unwrap(),
        weights
    );

    // The integer engine folds each run's recalibrated statistics into its requantization:
    // within the float/int agreement bound of `eval_both_engines_agree_and_files_are_consistent`.
    let int = recal(
        "int",
        &[
            "--engine",
            "int",
            "--jobs",
            "2",
            "--calibration-images",
            "64",
        ],
    );
    let bound = 100.0 * 8.0 / 128.0 + 100.0 / 200.0;
    for (f, i) in f1.results.iter().zip(&int.results) {
        let d = (f.summary.mean - i.summary.mean).abs();
        assert!(
            d <= bound,
            "sigma {}: recalibrated float mean {} vs int mean {} (bound {bound})",
            f.sigma,
            f.summary.mean,
            i.summary.mean
        );
    }

    // Bad input: 0 images, more images than the training set has (400), the firmware, and an
    // ONNX model without BatchNorm.
    let bad = dir.path().join("bad");
    for (n, needle) in [("0", "at least 1"), ("401", "400 training images")] {
        let o = eval(&run, &bad, &["--bn-recalibrate", n]);
        assert!(!o.status.success(), "--bn-recalibrate {n} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--bn-recalibrate") && err.contains(needle),
            "{n}: {err}"
        );
    }
    let cimb = dir.path().join("model.cimb");
    let (r, d) = (run.to_str().unwrap(), data.to_str().unwrap());
    ok(&nvcim(&[
        "pack",
        r,
        "-o",
        cimb.to_str().unwrap(),
        "--test-images",
        "20",
        "--calibration-images",
        "16",
    ]));
    let o = nvcim(&[
        "firmware",
        "run",
        cimb.to_str().unwrap(),
        "--simulated",
        "--bn-recalibrate",
        "64",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("firmware cannot recalibrate"), "{err}");
    // `eval --onnx` of the (BatchNorm-kept) export recalibrates the same way from --data-dir's
    // training files: the same images for the same seed, so every run classifies like the
    // float engine's (allowing one near-tie per run).
    let kept = dir.path().join("kept.onnx");
    ok(&nvcim(&["export", r, "-o", kept.to_str().unwrap()]));
    let ox = dir.path().join("onnx-recal");
    let target = ["--onnx", kept.to_str().unwrap(), "--data-dir", d];
    let onnx_eval =
        |out: &Path, n: &str| mc_eval(&target, out, &["--bn-recalibrate", n, "--jobs", "2"]);
    ok(&onnx_eval(&ox, "64"));
    let ext = report(&ox);
    assert_eq!(ext.config.bn_recalibrate, Some(64));
    for (f, e) in f1.results.iter().zip(&ext.results) {
        for (a, b) in f.correct.iter().zip(&e.correct) {
            assert!(
                a.abs_diff(*b) <= 1,
                "sigma {}: float {a} vs onnx {b}",
                f.sigma
            );
        }
    }
    let o = onnx_eval(&bad, "401");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("400 training images"), "{err}");
    let folded = dir.path().join("folded.onnx");
    ok(&nvcim(&[
        "export",
        r,
        "-o",
        folded.to_str().unwrap(),
        "--fold-bn",
    ]));
    let o = nvcim(&[
        "eval",
        "--onnx",
        folded.to_str().unwrap(),
        "--data-dir",
        d,
        "--bn-recalibrate",
        "64",
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no BatchNormalization node"), "{err}");
}
