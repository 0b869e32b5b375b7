//! Negative feedback training of any CNN: `nvcim train --onnx` on the importer's test models
//! (`tests/models/make_models.py`), then export, eval, pack and the firmware; `--exits` and
//! `--show-exits`; the refusals.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{make_models as python, max_diff, onnx_fixtures as fixtures, text};

use nvcim::onnx::{import::import, read_model};

fn model(name: &str) -> PathBuf {
    fixtures().join(format!("{name}.onnx"))
}

fn data() -> PathBuf {
    fixtures().join("data")
}

fn ok(args: &[&str]) -> Output {
    let o = common::nvcim(args);
    assert!(o.status.success(), "nvcim {}: {}", args.join(" "), text(&o));
    o
}

/// `nvcim train --onnx FILE` on the test data with `extra` flags.
fn train(file: &Path, out: &Path, extra: &[&str]) -> Output {
    on_test_data("train", file, out, extra)
}

/// `nvcim VERB --onnx FILE` (a training verb) on the test data with `extra` flags.
fn on_test_data(verb: &str, file: &Path, out: &Path, extra: &[&str]) -> Output {
    let data = data();
    let mut args = vec![
        verb,
        "--onnx",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--mean",
        "0.3",
        "--std",
        "0.3",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--json",
    ];
    args.extend_from_slice(extra);
    common::nvcim(&args)
}

fn corrects(report: &serde_json::Value) -> Vec<serde_json::Value> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["correct"].clone())
        .collect()
}

fn weights(path: &Path) -> Vec<Vec<f32>> {
    let net = import(&read_model(path).unwrap(), "test").unwrap().network;
    net.nodes
        .iter()
        .filter_map(|n| match &n.op {
            nvcim::ir::Op::Conv2d(c) => Some(c.weight.clone()),
            nvcim::ir::Op::Linear(l) => Some(l.weight.clone()),
            _ => None,
        })
        .collect()
}

/// One epoch of `nft` on the ResNet-8 (BatchNorm folded: biased convs, residual adds) and the
/// DS-CNN (depthwise convs, BatchNorm kept, 49x10 input): the weights move from the file's,
/// the checkpoint and its ONNX export evaluate identically run by run, the export packs, and
/// the firmware's loop equals the host's integer engine.
#[test]
fn nft_on_imported_models_then_export_eval_pack_and_firmware() {
    let dir = tempfile::tempdir().unwrap();
    let data = data();
    for (name, flags) in [("resnet8", &["--gray-to-rgb"][..]), ("dscnn", &[][..])] {
        let run = dir.path().join(name);
        let mut extra = vec![
            "--method",
            "nft",
            "--sigma",
            "0.2",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--mc-val",
            "1",
        ];
        extra.extend_from_slice(flags);
        let o = train(&model(name), &run, &extra);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(s["epochs_done"], 1, "{name}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model"]["arch"], "graph", "{name}");
        assert!(
            !cfg["model"]["graph"]["exits"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_eq!(cfg["onnx"]["weights"], true, "{name}");
        let onnx = dir.path().join(format!("{name}-nft.onnx"));
        ok(&[
            "export",
            run.to_str().unwrap(),
            "-o",
            onnx.to_str().unwrap(),
        ]);
        let (before, after) = (weights(&model(name)), weights(&onnx));
        assert_eq!(before.len(), after.len(), "{name}: weight layers");
        assert!(
            before.iter().zip(&after).all(|(a, b)| a != b),
            "{name}: every weight layer trained"
        );
        let eval = |target: &[&str], out: &str| -> serde_json::Value {
            let o = dir.path().join(out);
            let mut args = vec!["eval"];
            args.extend_from_slice(target);
            args.extend_from_slice(&[
                "--data-dir",
                data.to_str().unwrap(),
                "--sigma",
                "0.2,0.5",
                "--mc",
                "2",
                "--seed",
                "3",
                "--out",
                o.to_str().unwrap(),
                "--quiet",
                "--json",
            ]);
            serde_json::from_slice(&ok(&args).stdout).unwrap()
        };
        let from_run = eval(&[run.to_str().unwrap()], &format!("{name}-run"));
        let mut target = vec!["--onnx", onnx.to_str().unwrap()];
        target.extend_from_slice(flags);
        let from_onnx = eval(&target, &format!("{name}-onnx"));
        assert_eq!(corrects(&from_run), corrects(&from_onnx), "{name}");
        assert_eq!(from_run["clean_accuracy"], from_onnx["clean_accuracy"]);
        let cimb = dir.path().join(format!("{name}.cimb"));
        let mut pack = vec![
            "pack",
            "--onnx",
            onnx.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--test-images",
            "8",
            "--calibration-images",
            "32",
            "-o",
            cimb.to_str().unwrap(),
        ];
        pack.extend_from_slice(flags);
        ok(&pack);
        let o = ok(&[
            "firmware",
            "run",
            cimb.to_str().unwrap(),
            "--mc",
            "2",
            "--sigma",
            "0.4",
            "--seed",
            "9",
            "--simulated",
        ]);
        assert!(
            text(&o).contains("2 of 2 runs identical, summary identical"),
            "{name}: {}",
            text(&o)
        );
    }
}

/// `--show-exits` lists the backbone with its exits and trains nothing; named exits replace
/// the automatic ones; `--init random` starts from other weights than the file's.
#[test]
fn show_exits_named_exits_and_random_init() {
    let dir = tempfile::tempdir().unwrap();
    let file = model("resnet8");
    // --show-exits trains nothing: its --out is never made.
    let shown = dir.path().join("shown");
    let show = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--onnx",
            file.to_str().unwrap(),
            "--mean",
            "0.3",
            "--std",
            "0.3",
            "--show-exits",
            "--out",
            shown.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        text(&ok(&args))
    };
    let auto = show(&[]);
    assert!(auto.contains("3 exit(s)"), "{auto}");
    assert!(
        auto.contains("exit 3: AdaptiveAvgPool(8) -> Linear(32*8*8 = 2048 -> 512)"),
        "{auto}"
    );
    let named = show(&["--exits", "/layer1/layer1.0/relu_1/Relu"]);
    assert!(named.contains("1 exit(s)"), "{named}");
    assert!(
        named.contains("exit 1: AdaptiveAvgPool(12) -> Linear(16*12*12 = 2304"),
        "{named}"
    );
    let builtin = text(&ok(&[
        "train",
        "--model",
        "resnet18",
        "--width",
        "1",
        "--show-exits",
    ]));
    assert!(builtin.contains("4 exit(s)"), "{builtin}");
    assert!(!shown.exists(), "--show-exits wrote {}", shown.display());

    // --init random: the trained weights are not the file's plus an epoch of updates.
    let run = dir.path().join("random");
    let o = train(
        &file,
        &run,
        &[
            "--gray-to-rgb",
            "--init",
            "random",
            "--method",
            "vanilla",
            "--epochs",
            "1",
            "--mc-val",
            "0",
            "--select",
            "clean",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["onnx"]["weights"], false);
}

/// Bad requests: a clear message naming what is wrong, a non-zero exit, never a panic.
#[test]
fn bad_exits_and_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |file: &Path, extra: &[&str], needles: &[&str]| {
        let o = train(file, &dir.path().join("never"), extra);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(!t.contains("panicked"), "{t}");
        for n in needles {
            assert!(t.contains(n), "no `{n}` in {t}");
        }
        assert!(!dir.path().join("never/checkpoint").exists());
    };
    let r8 = model("resnet8");
    refused(
        &r8,
        &["--gray-to-rgb", "--exits", "/no/such/node"],
        &["--exits", "/no/such/node", "/conv1/Conv"],
    );
    refused(
        &r8,
        &["--gray-to-rgb", "--exits", "/layer3/layer3.0/relu_1/Relu"],
        &[
            "not before the last convolution",
            "/layer3/layer3.0/downsample/downsample.0/Conv",
        ],
    );
    for (kind, needles) in [
        ("noconv", &["no convolution", "CNNs"][..]),
        ("unsupported", &["LRN", "not supported"][..]),
        ("truncated", &["truncated or corrupt"][..]),
    ] {
        let path = dir.path().join(format!("bad-{kind}.onnx"));
        let o = python(&["--bad", kind, path.to_str().unwrap()]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        refused(&path, &[], needles);
    }
    // --exits names only mean something for a graph model.
    let o = common::nvcim(&["train", "--exits", "auto", "--show-exits"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--onnx"), "{}", text(&o));
}

/// Per weight layer of the ONNX file at `path`: the sum and the sum of |w| of its weights and
/// of its BatchNorm's four vectors, as one line of numbers.
fn layer_sums(path: &Path) -> Vec<f64> {
    let net = import(&read_model(path).unwrap(), "test").unwrap().network;
    let mut out = Vec::new();
    let mut put = |v: &[f32]| {
        out.push(v.iter().map(|&x| f64::from(x)).sum::<f64>());
        out.push(v.iter().map(|&x| f64::from(x.abs())).sum::<f64>());
    };
    for n in &net.nodes {
        match &n.op {
            nvcim::ir::Op::Conv2d(c) => put(&c.weight),
            nvcim::ir::Op::Linear(l) => {
                put(&l.weight);
                put(l.bias.as_deref().unwrap_or(&[]));
            }
            nvcim::ir::Op::BatchNorm(b) => {
                for v in [&b.gamma, &b.beta, &b.mean, &b.var] {
                    put(v);
                }
            }
            _ => {}
        }
    }
    out
}

/// Run directories written by the hand-written VGG-8 and ResNet-18 modules (before the generic
/// network; `tests/fixtures/legacy/`) still load: their export equals, layer by layer, what the
/// nvcim that wrote them exported (`tests/golden/legacy_checkpoints.txt`).
#[test]
fn checkpoints_of_the_hand_written_modules_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let golden = std::fs::read_to_string(root.join("golden/legacy_checkpoints.txt")).unwrap();
    for arch in ["vgg8", "resnet18"] {
        let run = root.join("fixtures/legacy").join(arch);
        let onnx = dir.path().join(format!("{arch}.onnx"));
        ok(&[
            "export",
            run.to_str().unwrap(),
            "-o",
            onnx.to_str().unwrap(),
        ]);
        let got = layer_sums(&onnx);
        let want: Vec<f64> = golden
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{arch} | ")))
            .unwrap_or_else(|| panic!("no {arch} line in the golden file"))
            .split(' ')
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{arch}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{arch} value {i}: {a} vs {b}"
            );
        }
    }
}

/// The trained values of the ONNX file at `path` (conv and linear weights and biases, BatchNorm
/// parameters and statistics, in node order), in two groups: those the loss determines, and
/// those it does not. A conv's bias that a BatchNorm in training mode reads has a gradient of
/// zero but for rounding; Adam scales that rounding to steps of about `lr` whose sign is the
/// rounding's, so such a bias, and the running mean of its BatchNorm, walk differently on two
/// backends that round differently.
fn trained_values(path: &Path) -> (Vec<f32>, Vec<f32>) {
    use nvcim::ir::{Op, Value};
    let net = import(&read_model(path).unwrap(), "test").unwrap().network;
    let feeds_bn = |i: usize| {
        net.nodes
            .iter()
            .any(|n| matches!(n.op, Op::BatchNorm(_)) && n.inputs == [Value::node(i)])
    };
    let (mut determined, mut free) = (Vec::new(), Vec::new());
    for (i, n) in net.nodes.iter().enumerate() {
        match &n.op {
            Op::Conv2d(c) => {
                determined.extend_from_slice(&c.weight);
                let bias = c.bias.as_deref().unwrap_or(&[]);
                if feeds_bn(i) {
                    &mut free
                } else {
                    &mut determined
                }
                .extend_from_slice(bias);
            }
            Op::Linear(l) => {
                determined.extend_from_slice(&l.weight);
                determined.extend_from_slice(l.bias.as_deref().unwrap_or(&[]));
            }
            Op::BatchNorm(b) => {
                for v in [&b.gamma, &b.beta, &b.var] {
                    determined.extend_from_slice(v);
                }
                let after_bias = n.inputs.first().is_some_and(|v| {
                    net.nodes.iter().enumerate().any(|(j, m)| {
                        Value::node(j) == *v && matches!(&m.op, Op::Conv2d(c) if c.bias.is_some())
                    })
                });
                if after_bias {
                    &mut free
                } else {
                    &mut determined
                }
                .extend_from_slice(&b.mean);
            }
            _ => {}
        }
    }
    (determined, free)
}

/// The largest |a - b| over the largest |a|.
fn relative_max_diff(a: &[f32], b: &[f32]) -> f32 {
    max_diff(a, b) / a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// `--backend wgpu` trains the generic network as flex does: the same steps from the same
/// weights (the file's; `--method vanilla`, so no noise is drawn) on Mesa's lavapipe where the
/// machine has no GPU (`cargo xtask setup` installs it). ResNet-8 (biased convs, residual adds)
/// and DS-CNN (depthwise convs, biased convs before BatchNorm in training mode): two epochs of
/// three steps.
///
/// Tolerance: the backends sum in other orders. The training losses agree to 1e-4 relative,
/// the values the loss determines to 1e-3 of the largest (measured 2026-12-06 on lavapipe: 5e-6
/// on ResNet-8, 1e-4 on DS-CNN, whose first layer has gradients near rounding). The values it
/// does not determine ([`trained_values`]) are bounded by Adam's step: at most
/// `lr (1 - beta1) / sqrt(1 - beta2)` = 3.2 `lr` per step and backend, 6 steps at `lr` <= 1e-3,
/// so 0.04 apart (measured: 3e-3).
#[test]
fn wgpu_trains_as_flex_does() {
    let dir = tempfile::tempdir().unwrap();
    for (name, flags) in [("resnet8", &["--gray-to-rgb"][..]), ("dscnn", &[][..])] {
        let mut losses = Vec::new();
        let mut trained = Vec::new();
        for backend in ["flex", "wgpu"] {
            let run = dir.path().join(format!("{name}-{backend}"));
            let mut extra = vec![
                "--method",
                "vanilla",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--seed",
                "5",
                "--mc-val",
                "1",
                "--backend",
                backend,
            ];
            extra.extend_from_slice(flags);
            let o = train(&model(name), &run, &extra);
            assert!(o.status.success(), "{name} on {backend}: {}", text(&o));
            let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
            losses.push(
                metrics
                    .lines()
                    .map(|l| {
                        let m: serde_json::Value = serde_json::from_str(l).unwrap();
                        m["train_loss"].as_f64().unwrap()
                    })
                    .collect::<Vec<f64>>(),
            );
            let onnx = dir.path().join(format!("{name}-{backend}.onnx"));
            ok(&[
                "export",
                run.to_str().unwrap(),
                "-o",
                onnx.to_str().unwrap(),
            ]);
            trained.push(trained_values(&onnx));
        }
        assert_eq!(losses[0].len(), 2, "{name}: two epochs of metrics");
        for (f, w) in losses[0].iter().zip(&losses[1]) {
            assert!(
                ((f - w) / f).abs() < 1e-4,
                "{name}: training loss flex {f} against wgpu {w}"
            );
        }
        let (start, _) = trained_values(&model(name));
        let (flex, wgpu) = (&trained[0], &trained[1]);
        let moved = relative_max_diff(&start, &flex.0);
        let apart = relative_max_diff(&flex.0, &wgpu.0);
        let free = max_diff(&flex.1, &wgpu.1);
        eprintln!(
            "{name}: losses flex {:?} wgpu {:?}; weights moved {moved:.2e}, flex and wgpu apart \
             {apart:.2e}; the {} values the loss does not determine {free:.2e}",
            losses[0],
            losses[1],
            flex.1.len()
        );
        assert!(moved > 1e-3, "{name}: training moved the weights ({moved})");
        assert!(apart < 1e-3, "{name}: flex and wgpu weights {apart} apart");
        assert!(free < 0.04, "{name}: undetermined values {free} apart");
    }
    // Several trainings in one process (alpha-search) start the wgpu device once.
    let o = on_test_data(
        "alpha-search",
        &model("dscnn"),
        &dir.path().join("alpha-search"),
        &[
            "--method",
            "nft",
            "--sigma",
            "0.2",
            "--alphas",
            "0.1,0.01",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--mc-val",
            "1",
            "--backend",
            "wgpu",
        ],
    );
    assert!(o.status.success(), "alpha-search on wgpu: {}", text(&o));
    // A wgpu device that cannot be started (here: a fifth discrete GPU, through cubecl's
    // override) is a clear error, not a panic.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args(["train", "--model", "vgg8", "--backend", "wgpu", "--out"])
        .arg(dir.path().join("no-device"))
        .env("CUBECL_WGPU_DEFAULT_DEVICE", "DiscreteGpu(4)")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success() && !t.contains("panicked"), "{t}");
    assert!(
        t.contains("--backend wgpu: no wgpu device") && t.contains("mesa-vulkan-drivers"),
        "{t}"
    );
}

/// A sweep plan trains and evaluates a model given as an ONNX file (`onnx_models`), with the
/// flags that file needs (`train_args_by_model`).
#[test]
fn sweep_plan_on_an_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"name = "onnx-sweep"
datasets = ["mnist"]
data_dir = "{data}"
models = ["dscnn"]
onnx_models = {{ dscnn = "{file}" }}
train_args_by_model = {{ dscnn = ["--mean", "0.3", "--std", "0.3"] }}
methods = ["vanilla", "nft"]
train_sigmas = [0.2]
alphas = [0.01]
seeds = [0]
epochs = 1
train_args = ["--batch-size", "32", "--mc-val", "1"]
[eval]
sigmas = [0.2]
mc = 2
"#,
            data = data().display(),
            file = model("dscnn").display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = ok(&[
        "sweep",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    for cell in [
        "mnist_dscnn_vanilla_seed0",
        "mnist_dscnn_nft_s0.2_a0.01_seed0",
    ] {
        let c = out.join(cell);
        assert!(
            c.join("eval/eval.json").is_file(),
            "{cell} not finished: {}",
            text(&o)
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c.join("train/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model"]["arch"], "graph", "{cell}");
        assert!(
            cfg["onnx"]["file"]
                .as_str()
                .unwrap()
                .ends_with("dscnn.onnx"),
            "{cell}: {cfg}"
        );
    }
}
