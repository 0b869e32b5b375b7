//! `nvcim train` end to end on a tiny IDX dataset the test writes: every method, ResNet-18,
//! interrupt-and-resume, corrupt data.

use std::path::Path;
use std::process::Output;

mod common;

use common::{nvcim, write_idx};
use nvcim::data::idx;

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    train_cmd(data, out, extra)
        .output()
        .expect("runs nvcim train")
}

/// The `nvcim train` command of [`train`], to run with extra environment or in the background.
fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_nvcim"));
    c.args(train_args(data, out, extra));
    c
}

/// The arguments of [`train`] (after the binary).
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--json",
    ];
    // Defaults of these tests, unless the test gives the flag itself.
    for (flag, value) in [
        ("--width", "0.125"),
        ("--batch-size", "16"),
        ("--lr", "0.002"),
        ("--mc-val", "2"),
        ("--sigma", "0.2"),
        ("--epochs", "1"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

fn summary(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "nvcim failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(o.stdout.trim_ascii()).expect("JSON summary on stdout")
}

/// Asserts that `o` failed with a message containing `needle`.
fn assert_refused(o: &Output, what: &str, needle: &str) {
    assert!(!o.status.success(), "{what} was accepted");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "{what}: {err}");
}

fn check_run(out: &Path, s: &serde_json::Value, epochs: usize) {
    for f in [
        "config.json",
        "model.json",
        "metrics.jsonl",
        "checkpoint/model.bpk",
        "checkpoint/optimizer.bpk",
        "checkpoint/state.json",
        "best/backbone.bpk",
        "best/model.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), epochs);
    let m: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    for k in [
        "train_loss",
        "train_acc",
        "val_clean_acc",
        "val_noisy_acc",
        "images_per_s",
    ] {
        assert!(m[k].is_number(), "metrics lack {k}: {m}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["variation"]["sigma_unit"], "range");
    assert_eq!(cfg["preprocess"], "pad", "nvcim's default preprocessing");
    let acc = s["best_val_clean_acc"].as_f64().unwrap();
    // Chance is 0.1; on 51 validation images 0.25 is 3.6 binomial standard deviations above it.
    assert!(
        acc > 0.25,
        "clean validation accuracy {acc} is not better than chance (0.1)"
    );
}

#[test]
fn every_method_trains_tiny_vgg8() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 512, 128);
    for method in ["vanilla", "noise", "nft", "nft-ovf"] {
        let out = tempfile::tempdir().unwrap();
        let o = train(data.path(), out.path(), &["--method", method, "--no-pad"]);
        let s = summary(&o);
        check_run(out.path(), &s, 1);
        assert!(s["test_clean_acc"].as_f64().unwrap() > 0.3, "{method}: {s}");
    }
}

#[test]
fn tiny_resnet18_with_nft() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 512, 64);
    let out = tempfile::tempdir().unwrap();
    let o = train(
        data.path(),
        out.path(),
        &[
            "--model", "resnet18", "--method", "nft", "--no-pad", "--epochs", "2",
        ],
    );
    let s = summary(&o);
    check_run(out.path(), &s, 2);

    // The trained ResNet-18 backbone exported to ONNX: tract and ONNX Runtime give Burn's
    // logits within 1e-4 at batch 1 and 7, the graph has no exit, the checker accepts it.
    let onnx = out.path().join("resnet18.onnx");
    let run = out.path().to_str().unwrap();
    let exported = common::nvcim(&["export", run, "-o", onnx.to_str().unwrap()]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let model = nvcim::onnx::read_model(&onnx).unwrap();
    common::assert_backbone_only(&model, 21); // ResNet-18: 20 conv (3 shortcuts) + 1 linear
    common::check_with_onnx_checker(std::slice::from_ref(&onnx));
    for batch in ["1", "7"] {
        let o = common::nvcim(&[
            "check-onnx",
            onnx.to_str().unwrap(),
            "--data-dir",
            data.path().to_str().unwrap(),
            "--limit",
            "7",
            "--batch",
            batch,
            "--checkpoint",
            run,
            "--max-diff",
            "1e-4",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let pairs = rep["max_abs_diff"].as_array().unwrap();
        assert_eq!(
            pairs.len(),
            6,
            "tract, onnxruntime, the imported IR and burn compared pairwise: {rep}"
        );
        for pair in pairs {
            assert!(pair[2].as_f64().unwrap() <= 1e-4, "batch {batch}: {pair}");
        }
    }
}

/// Every parameter, BN statistic and exit weight of the checkpoint in `out`.
fn final_weights(out: &Path) -> Vec<Vec<f32>> {
    use burn::module::Module;
    let spec: nvcim::model::ModelSpec =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    let device = burn::tensor::Device::flex();
    let record = burn::store::ModuleRecord::load(out.join("checkpoint/model.bpk")).unwrap();
    let m = nvcim::model::TrainModel {
        backbone: spec.init_backbone(&device),
        exits: spec.init_exits(&device),
    }
    .try_load_record(record)
    .unwrap();
    let mut v = Vec::new();
    for l in m.backbone.weight_layers() {
        v.push(l.weights);
        v.extend(l.bias);
        if let Some(bn) = l.bn {
            v.extend([bn.gamma, bn.beta, bn.mean, bn.var]);
        }
    }
    for e in &m.exits {
        v.push(e.fc1.weight.val().into_data().try_to_vec::<f32>().unwrap());
        v.push(
            e.fc2
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
    }
    v
}

#[test]
fn interrupt_and_resume_gives_the_same_weights() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 32);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let flags = ["--method", "nft", "--epochs", "3", "--max-train", "160"];
    summary(&train(data.path(), a.path(), &flags));
    let mut stop = flags.to_vec();
    stop.extend(["--stop-after-epochs", "1"]);
    let s = summary(&train(data.path(), b.path(), &stop));
    assert_eq!(s["epochs_done"], 1);
    assert_eq!(s["interrupted"], true);
    let mut resume = flags.to_vec();
    resume.push("--resume");
    let s = summary(&train(data.path(), b.path(), &resume));
    assert_eq!(s["epochs_done"], 3);
    let (wa, wb) = (final_weights(a.path()), final_weights(b.path()));
    assert!(wa.len() > 10 && wa == wb, "final weights differ");
    let losses = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses(a.path()), losses(b.path()));
    // A resume with other flags is refused.
    let mut other = flags.to_vec();
    other.extend(["--resume", "--alpha", "0.5"]);
    let o = train(data.path(), b.path(), &other);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("alpha"));
}

#[test]
fn bad_data_gives_errors_that_name_the_file() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = train(data.path(), out.path(), &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("no MNIST found") && err.contains("--data-dir"),
        "{err}"
    );

    write_idx(data.path(), 20, 10);
    let p = data.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let o = train(data.path(), out.path(), &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("truncated"),
        "{err}"
    );

    write_idx(data.path(), 20, 10);
    std::fs::write(
        data.path().join("t10k-labels-idx1-ubyte"),
        idx::encode(&[9], &[0; 9]),
    )
    .unwrap();
    let o = train(data.path(), out.path(), &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("10 images") && err.contains("9 labels") && err.contains("t10k-labels"),
        "{err}"
    );

    let cifar = tempfile::tempdir().unwrap();
    std::fs::write(cifar.path().join("data_batch_1.bin"), [0u8; 100]).unwrap();
    let o = nvcim(&[
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("truncated"),
        "{err}"
    );
}

/// Tables IV and V from real runs: nft trained at sigma 0 (without noise injection) and at
/// 0.2 (with), and nft at 0.2 with exit 2 dropped, each evaluated, then `nvcim report`. Before
/// issue #19 `eval` recorded every nft run as "with noise injection", so Table IV never
/// appeared, and `train` had no `--drop-exit`, so Table V could not be made.
#[test]
fn report_renders_tables_four_and_five_from_real_runs() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 64);
    let root = tempfile::tempdir().unwrap();
    let mut evals = Vec::new();
    for (name, extra) in [
        ("without", &["--sigma", "0"][..]),
        ("with", &[][..]),
        ("drop2", &["--drop-exit", "2"][..]),
    ] {
        let out = root.path().join(name).join("train");
        // Unclipped: the tables' rows are about noise injection and exits.
        let mut args = vec![
            "--method",
            "nft",
            "--no-pad",
            "--max-train",
            "128",
            "--clip-weights",
            "0",
        ];
        args.extend_from_slice(extra);
        let s = summary(&train(data.path(), &out, &args));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["select"], "auto", "{cfg}");
        assert_eq!(cfg["bn_stats"], "clean", "{cfg}");
        assert_eq!(s["select"], "noisy", "{s}");
        if name == "drop2" {
            assert_eq!(cfg["drop_exit"], 2, "{cfg}");
        } else {
            assert!(cfg.get("drop_exit").is_none(), "{cfg}");
        }
        let eval = root.path().join(name).join("eval");
        let o = nvcim(&[
            "eval",
            out.to_str().unwrap(),
            "--sigma",
            "0.2",
            "--mc",
            "2",
            "--quiet",
            "--out",
            eval.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(eval.join("eval.json")).unwrap())
                .unwrap();
        let ni = json["config"]["noise_injection"].as_bool();
        assert_eq!(ni, Some(name != "without"), "{name}: {}", json["config"]);
        evals.push(eval);
    }
    let report = root.path().join("report");
    let mut args = vec![
        "report",
        "--match",
        "any",
        "--out",
        report.to_str().unwrap(),
    ];
    args.extend(evals.iter().map(|e| e.to_str().unwrap()));
    let o = nvcim(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("## Table IV"), "{md}");
    assert!(md.contains("nft with noise injection |"), "{md}");
    assert!(md.contains("nft without noise injection |"), "{md}");
    assert!(md.contains("## Table V"), "{md}");
    assert!(md.contains("without exit 2 |"), "{md}");
    assert!(md.contains("all exits |"), "{md}");
    for f in ["table4.csv", "table5.csv", "table4.png", "table5.png"] {
        assert!(report.join(f).is_file(), "missing {f}");
    }
}

/// Selection: `--select clean` keeps the epoch of the best clean validation accuracy and
/// says so; impossible combinations of the new flags are refused naming the flag.
#[test]
fn selection_rule_is_applied_and_recorded() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 64);
    let out = tempfile::tempdir().unwrap();
    let s = summary(&train(
        data.path(),
        out.path(),
        &[
            "--method",
            "vanilla",
            "--no-pad",
            "--max-train",
            "128",
            "--epochs",
            "3",
            "--sigma",
            "3",
        ],
    ));
    assert_eq!(s["select"], "clean", "{s}");
    let lines = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    // At sigma 3 the noisy validation of a vanilla model is near chance (0.1) in every epoch:
    // selecting by it would pick an epoch at random.
    for l in lines.lines() {
        let m: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(m["val_noisy_acc"].as_f64().unwrap() < 0.3, "{m}");
    }
    let clean: Vec<f64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["val_clean_acc"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let best = s["best_epoch"].as_u64().unwrap() as usize;
    let top = clean.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(clean[best - 1], top, "best epoch {best} of {clean:?}");
    assert_eq!(clean.iter().position(|&c| c == top), Some(best - 1));
    for (args, needle) in [
        (
            &["--method", "noise", "--drop-exit", "1"][..],
            "--drop-exit needs --method nft",
        ),
        (
            &["--method", "nft", "--drop-exit", "4"][..],
            "--drop-exit 4",
        ),
        (
            &["--select", "noisy", "--mc-val", "0"][..],
            "--select noisy",
        ),
        (&["--clip-weights=-2"][..], "--clip-weights must be"),
        (&["--clip-weights", "NaN"][..], "--clip-weights must be"),
        (&["--clip-weights", "inf"][..], "--clip-weights must be"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let o = train(data.path(), out.path(), args);
        assert_refused(&o, &format!("{args:?}"), needle);
    }
}

#[test]
fn preprocess_resize_and_weight_clipping_are_recorded_and_evaluated_the_same_way() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 100);
    let out = tempfile::tempdir().unwrap();
    let s = summary(&train(
        data.path(),
        out.path(),
        &[
            "--method",
            "vanilla",
            "--preprocess",
            "resize",
            "--sigma",
            "0",
            "--clip-weights",
            "2.5",
        ],
    ));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["preprocess"], "resize");
    // Clipping is recorded, and eval of the clipped weights agrees with training (below).
    assert_eq!(cfg["clip_weights"], 2.5);
    assert_eq!(cfg["model"]["image_size"], 32);
    // eval reads the run's preprocessing: its clean accuracy is training's clean test accuracy
    // (float engine within 1e-4 of Burn: at most one of the 100 images may flip).
    let ev = tempfile::tempdir().unwrap();
    let o = nvcim(&[
        "eval",
        out.path().to_str().unwrap(),
        "--sigma",
        "0",
        "--mc",
        "1",
        "--json",
        "--quiet",
        "--out",
        ev.path().to_str().unwrap(),
    ]);
    let r = summary(&o);
    let (got, want) = (
        r["clean_accuracy"].as_f64().unwrap() / 100.0,
        s["test_clean_acc"].as_f64().unwrap(),
    );
    assert!(
        (got - want).abs() <= 0.0101,
        "eval {got} vs training {want}"
    );
    assert!(want > 0.3, "a learnable set: {s}");
    // The ONNX export carries it too: `eval --onnx` resizes the IDX images and gets the same
    // clean accuracy as the checkpoint.
    let onnx = ev.path().join("m.onnx");
    let o = nvcim(&[
        "export",
        out.path().to_str().unwrap(),
        "--output",
        onnx.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = nvcim(&[
        "eval",
        "--onnx",
        onnx.to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--sigma",
        "0",
        "--mc",
        "1",
        "--json",
        "--quiet",
        "--out",
        ev.path().join("onnx").to_str().unwrap(),
    ]);
    let onnx_acc = summary(&o)["clean_accuracy"].as_f64().unwrap() / 100.0;
    assert!(
        (onnx_acc - got).abs() <= 0.0101,
        "onnx {onnx_acc} vs checkpoint {got}"
    );
    // Resize is refused where it means nothing.
    let o = train(
        data.path(),
        out.path(),
        &["--preprocess", "resize", "--no-pad"],
    );
    assert_refused(&o, "--no-pad with resize", "--no-pad");
    let o = nvcim(&[
        "train",
        "--dataset",
        "cifar10",
        "--preprocess",
        "resize",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_refused(&o, "resize on CIFAR", "--preprocess resize");
}

/// The conv and linear weights of a run's `best/backbone.bpk`.
fn best_weights(out: &Path) -> Vec<Vec<f32>> {
    let spec: nvcim::model::ModelSpec =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    let device = burn::tensor::Device::flex();
    let b =
        nvcim::training::checkpoint::load_backbone(&out.join("best/backbone.bpk"), &spec, &device)
            .unwrap();
    b.weight_layers().into_iter().map(|l| l.weights).collect()
}

#[test]
fn init_from_starts_the_backbone_from_a_checkpoint() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 64);
    let tiny = ["--no-pad", "--max-train", "128", "--mc-val", "1"];
    fn with<'a>(tiny: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = tiny.to_vec();
        v.extend_from_slice(extra);
        v
    }
    let a = tempfile::tempdir().unwrap();
    summary(&train(
        data.path(),
        a.path(),
        &with(&tiny, &["--method", "vanilla"]),
    ));
    let src = a.path().to_str().unwrap();
    // With a learning rate of 1e-12 the fine-tuned weights are the checkpoint's (Adam moves a
    // weight by about the learning rate per step); from random weights they are not.
    let still = ["--method", "noise", "--lr", "1e-12", "--clip-weights", "0"];
    let b = tempfile::tempdir().unwrap();
    let mut args = with(&tiny, &still);
    args.extend(["--init-from", src]);
    summary(&train(data.path(), b.path(), &args));
    let c = tempfile::tempdir().unwrap();
    summary(&train(data.path(), c.path(), &with(&tiny, &still)));
    let (wa, wb, wc) = (
        best_weights(a.path()),
        best_weights(b.path()),
        best_weights(c.path()),
    );
    let max_diff = |x: &[Vec<f32>], y: &[Vec<f32>]| {
        x.iter()
            .flatten()
            .zip(y.iter().flatten())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        max_diff(&wa, &wb) < 1e-6,
        "init-from: {}",
        max_diff(&wa, &wb)
    );
    assert!(
        max_diff(&wa, &wc) > 1e-2,
        "from scratch: {}",
        max_diff(&wa, &wc)
    );
    let config = std::fs::read_to_string(b.path().join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["init_from"], src, "recorded in config.json");

    // Another width, and a path that is not a run.
    let bad = tempfile::tempdir().unwrap();
    let mut args = with(&tiny, &["--method", "noise", "--width", "0.25"]);
    args.extend(["--init-from", src]);
    assert_refused(
        &train(data.path(), bad.path(), &args),
        "another width",
        "--init-from",
    );
    let missing = a.path().join("nope");
    let mut args = with(&tiny, &["--method", "noise"]);
    args.extend(["--init-from", missing.to_str().unwrap()]);
    assert_refused(
        &train(data.path(), bad.path(), &args),
        "a missing run",
        "does not exist",
    );
}

/// `metrics.jsonl` without the wall-clock fields (`seconds`, `images_per_s`).
fn metrics_without_timing(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("images_per_s");
            v
        })
        .collect()
}

/// `nvcim train` killed with SIGKILL at six points of a run (mid-epoch, inside a checkpoint
/// write, between the two renames of the checkpoint swap and of the best backbone's, after the
/// best backbone and before the checkpoint, before `metrics.jsonl`) and once from outside at an arbitrary moment, then
/// restarted with `--resume`, ends with bit-identical weights, best backbone and metrics.
#[test]
fn killed_at_any_point_then_resumed_gives_bit_identical_results() {
    use std::os::unix::process::ExitStatusExt as _;
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 32);
    let flags = ["--method", "nft", "--epochs", "3", "--max-train", "160"];
    let reference = tempfile::tempdir().unwrap();
    let s_ref = summary(&train(data.path(), reference.path(), &flags));
    assert_eq!(s_ref["epochs_done"], 3);
    let (w_ref, best_ref) = (
        final_weights(reference.path()),
        best_weights(reference.path()),
    );
    let m_ref = metrics_without_timing(reference.path());
    let mut resume = flags.to_vec();
    resume.push("--resume");
    let check = |out: &Path, what: &str| {
        let s = summary(&train(data.path(), out, &resume));
        assert_eq!(s["epochs_done"], 3, "{what}");
        assert!(final_weights(out) == w_ref, "{what}: final weights differ");
        assert!(
            best_weights(out) == best_ref,
            "{what}: best backbone differs"
        );
        assert_eq!(metrics_without_timing(out), m_ref, "{what}: metrics differ");
        assert_eq!(s["best_epoch"], s_ref["best_epoch"], "{what}");
        assert_eq!(s["test_clean_acc"], s_ref["test_clean_acc"], "{what}");
    };
    // (point, hit): the hit is counted over the run, so these land in epochs 2 and 3.
    for (point, hit, left) in [
        ("train-step", 14, "checkpoint"),
        ("checkpoint-files", 2, "checkpoint.tmp"),
        ("checkpoint-swap", 2, "checkpoint.old"),
        ("best-swap", 1, "best.tmp"),
        ("after-best", 1, "best"),
        ("before-metrics", 3, "checkpoint"),
    ] {
        assert!(nvcim::fsx::CRASH_POINTS.contains(&point));
        let out = tempfile::tempdir().unwrap();
        let o = train_cmd(data.path(), out.path(), &flags)
            .env(nvcim::fsx::CRASH_ENV, format!("{point}@{hit}"))
            .output()
            .unwrap();
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{point}@{hit} was not reached: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.path().join(left).exists(), "{point}: no {left}");
        if point == "checkpoint-swap" {
            assert!(
                !out.path().join("checkpoint").exists(),
                "{point}: the swap was not cut"
            );
        }
        check(out.path(), point);
    }
    // From outside, as a scheduler or the OOM killer would: SIGKILL once the first
    // checkpoint is there.
    let out = tempfile::tempdir().unwrap();
    let mut child = train_cmd(data.path(), out.path(), &flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = out.path().join("checkpoint/state.json");
    let t0 = std::time::Instant::now();
    while !state.is_file() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(state.is_file(), "no checkpoint within 2 minutes");
    if status.signal() == Some(9) {
        check(out.path(), "external SIGKILL");
    } else {
        // It finished before the kill landed; resuming a finished run changes nothing.
        check(out.path(), "external SIGKILL after the end");
    }
}

/// A second `nvcim train` on an `--out` that a live training holds is refused, naming the
/// holder; once that one is killed, `--resume` takes the stale lock over and finishes.
#[test]
fn one_training_per_output_directory() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 32);
    let out = tempfile::tempdir().unwrap();
    let flags = ["--method", "noise", "--epochs", "3", "--max-train", "160"];
    let mut first = train_cmd(data.path(), out.path(), &flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.path().join(nvcim::fsx::LOCK_FILE);
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .is_empty()
        && t0.elapsed().as_secs() < 60
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let second = train(data.path(), out.path(), &flags);
    let finished_first = first.try_wait().unwrap().is_some();
    first.kill().unwrap();
    first.wait().unwrap();
    if !finished_first {
        assert_refused(
            &second,
            "a second training on a held --out",
            &format!("in use by another nvcim process (pid {}", first.id()),
        );
    }
    let mut resume = flags.to_vec();
    resume.push("--resume");
    let o = train(data.path(), out.path(), &resume);
    let s = summary(&o);
    assert_eq!(s["epochs_done"], 3);
    if !finished_first {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("taking it over"), "{err}");
    }
}

/// Runs `script` as root of a new user and mount namespace (`unshare -rm`), where it may mount
/// a small tmpfs; `None` when this machine does not allow unprivileged namespaces.
fn in_mount_namespace(script: &str) -> Option<Output> {
    let ok = std::process::Command::new("unshare")
        .args(["-rm", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: `unshare -rm` is not available here (no user namespaces)");
        return None;
    }
    Some(
        std::process::Command::new("unshare")
            .args(["-rm", "sh", "-c", script])
            .output()
            .unwrap(),
    )
}

/// An output directory that fills up, then becomes read-only: `nvcim train --resume` and
/// `nvcim eval` fail with a message naming the file and the cause, exit non-zero without a
/// panic, and every file of the last good save is byte for byte as it was.
#[test]
fn a_full_or_read_only_output_directory_fails_clearly_and_keeps_the_good_files() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 256, 32);
    let work = tempfile::tempdir().unwrap();
    let (mnt, saved) = (work.path().join("mnt"), work.path().join("saved"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&saved).unwrap();
    let run = mnt.join("run");
    let flags = ["--method", "noise", "--epochs", "3", "--max-train", "160"];
    let q = |a: &[String]| {
        a.iter()
            .map(|x| format!("'{x}'"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let bin = env!("CARGO_BIN_EXE_nvcim");
    let mut first = flags.to_vec();
    first.extend(["--stop-after-epochs", "1"]);
    let mut resume = flags.to_vec();
    resume.push("--resume");
    let (m, s, r) = (mnt.display(), saved.display(), run.display());
    let train_first = q(&train_args(data.path(), &run, &first));
    let train_resume = q(&train_args(data.path(), &run, &resume));
    let eval = format!("'{bin}' eval '{r}' --sigma 0.2 --mc 2 --quiet --out '{m}/eval'");
    let script = format!(
        r#"set -e
mount -t tmpfs -o size=4m nvcim-test '{m}'
'{bin}' {train_first} > '{s}/first.out'
{eval} > /dev/null
cp -a '{m}/.' '{s}/before'
# Fill the disk, leaving 16 KiB: enough for the small JSON files, not for a checkpoint.
dd if=/dev/zero of='{m}/spare' bs=4k count=4 2>/dev/null
dd if=/dev/zero of='{m}/fill' bs=4k 2>/dev/null || true
rm '{m}/spare'
set +e
'{bin}' {train_resume} > /dev/null 2> '{s}/full-train.err'; echo $? > '{s}/full-train.rc'
dd if=/dev/zero of='{m}/fill2' bs=1k 2>/dev/null
{eval} > /dev/null 2> '{s}/full-eval.err'; echo $? > '{s}/full-eval.rc'
rm -rf '{s}/after-full'; mkdir '{s}/after-full'; cp -a '{m}/run' '{m}/eval' '{s}/after-full/'
mount -o remount,ro '{m}'
'{bin}' {train_resume} > /dev/null 2> '{s}/ro-train.err'; echo $? > '{s}/ro-train.rc'
{eval} > /dev/null 2> '{s}/ro-eval.err'; echo $? > '{s}/ro-eval.rc'
mkdir '{s}/after-ro'; cp -a '{m}/run' '{m}/eval' '{s}/after-ro/'
"#
    );
    let Some(o) = in_mount_namespace(&script) else {
        return;
    };
    assert!(
        o.status.success(),
        "setup script failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(saved.join(f)).unwrap();
    for (case, cause) in [
        ("full-train", "the file system is full"),
        ("full-eval", "the file system is full"),
        ("ro-train", "the file system is read-only"),
        ("ro-eval", "the file system is read-only"),
    ] {
        let (rc, err) = (read(&format!("{case}.rc")), read(&format!("{case}.err")));
        eprintln!("{case}: {err}");
        assert_eq!(rc.trim(), "1", "{case}: exit {rc}: {err}");
        assert!(
            err.contains(cause) && err.contains(&m.to_string()) && !err.contains("panicked"),
            "{case}: {err}"
        );
    }
    assert!(
        read("full-train.err").contains("checkpoint") || read("full-train.err").contains("best")
    );
    // The files of the last good save, byte for byte.
    for after in ["after-full", "after-ro"] {
        for f in [
            "run/checkpoint/model.bpk",
            "run/checkpoint/optimizer.bpk",
            "run/checkpoint/state.json",
            "run/best/backbone.bpk",
            "run/metrics.jsonl",
            "run/config.json",
            "eval/eval.json",
            "eval/runs.csv",
        ] {
            let (a, b) = (
                std::fs::read(saved.join("before").join(f)).unwrap(),
                std::fs::read(saved.join(after).join(f))
                    .unwrap_or_else(|e| panic!("{after}/{f}: {e}")),
            );
            assert!(a == b, "{after}: {f} changed");
        }
        // No partial file or directory was left beside them.
        let left: Vec<String> = std::fs::read_dir(saved.join(after).join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(left.is_empty(), "{after}: {left:?}");
    }
    // The kept checkpoint still resumes (outside the full disk) to a complete run.
    let copy = work.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    let o = std::process::Command::new("cp")
        .args(["-a"])
        .arg(saved.join("after-ro/run"))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = summary(&train(data.path(), &copy.join("run"), &resume));
    assert_eq!(s["epochs_done"], 3);
}

/// Every save writes `checksums.json`; one flipped byte in the best backbone is refused by
/// `nvcim eval` (naming the file, never a silent 10%), and one in the checkpoint by `--resume`.
#[test]
fn a_flipped_byte_in_a_checkpoint_is_refused() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 128, 32);
    let out = tempfile::tempdir().unwrap();
    let flags = [
        "--epochs",
        "2",
        "--max-train",
        "96",
        "--stop-after-epochs",
        "1",
    ];
    summary(&train(data.path(), out.path(), &flags));
    for dir in ["best", "checkpoint"] {
        let sums: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(dir).join("checksums.json")).unwrap(),
        )
        .unwrap();
        assert!(sums["files"].get("state.json").is_some(), "{dir}: {sums}");
    }
    let flip = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x10;
        std::fs::write(p, &b).unwrap();
        at
    };
    // The best backbone: eval refuses it; with the byte restored it evaluates.
    let backbone = out.path().join("best/backbone.bpk");
    let original = std::fs::read(&backbone).unwrap();
    flip(&backbone);
    let eval = |o: &Path| {
        nvcim(&[
            "eval",
            out.path().to_str().unwrap(),
            "--data-dir",
            data.path().to_str().unwrap(),
            "--sigma",
            "0.2",
            "--mc",
            "1",
            "--out",
            o.to_str().unwrap(),
            "--quiet",
        ])
    };
    let ev = tempfile::tempdir().unwrap();
    let o = eval(ev.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("backbone.bpk") && err.contains("changed since it was saved"),
        "{err}"
    );
    assert!(!ev.path().join("eval.json").exists());
    std::fs::write(&backbone, &original).unwrap();
    let o = eval(ev.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The training checkpoint: --resume refuses it and names the file.
    flip(&out.path().join("checkpoint/optimizer.bpk"));
    let mut resume = flags[..4].to_vec();
    resume.push("--resume");
    let o = train(data.path(), out.path(), &resume);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("optimizer.bpk") && err.contains("changed since it was saved"),
        "{err}"
    );
}

/// `--recipe paper` sets every authors' setting at once, an explicit flag wins over it, and
/// nvcim's recipe clips the methods that inject noise (`--clip-weights 0` turns it off);
/// `config.json` records the recipe and the resolved values.
#[test]
fn recipes_set_the_defaults_and_flags_win() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), 64, 16);
    let config = |extra: &[&str]| -> serde_json::Value {
        let out = tempfile::tempdir().unwrap();
        let mut args = vec!["--max-train", "32"];
        args.extend_from_slice(extra);
        summary(&train(data.path(), out.path(), &args));
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap()
    };
    // Not --lr or --epochs: train_args gives those.
    let paper = config(&["--recipe", "paper", "--model", "resnet18", "--alpha", "0.5"]);
    assert_eq!(paper["recipe"], "paper");
    assert_eq!(paper["bn_stats"], "noisy");
    assert_eq!(paper["select"], "noisy");
    assert_eq!(paper["init"], "authors");
    assert_eq!(paper["preprocess"], "resize");
    assert_eq!(paper["exit_profile"], "uniform");
    assert_eq!(paper["alpha"], 0.5, "an explicit flag wins");
    assert!(paper.get("clip_weights").is_none(), "{paper}");
    let paper_alpha = config(&["--recipe", "paper", "--model", "resnet18"]);
    assert_eq!(
        paper_alpha["alpha"], 0.1,
        "the authors' ResNet-18 MNIST alpha"
    );
    let nvcim = config(&[]);
    assert_eq!(nvcim["recipe"], "nvcim");
    assert_eq!(nvcim["bn_stats"], "clean");
    assert_eq!(nvcim["preprocess"], "pad");
    assert_eq!(nvcim["clip_weights"], 1.5, "nft clips by default");
    let vanilla = config(&["--method", "vanilla"]);
    assert!(vanilla.get("clip_weights").is_none(), "{vanilla}");
    let off = config(&["--clip-weights", "0"]);
    assert!(off.get("clip_weights").is_none(), "{off}");
}
