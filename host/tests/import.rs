//! Any CNN through the importer, the engines, the packed format and the firmware.
//!
//! The test models are written by `tests/models/make_models.py` (the `.venv` Python's `onnx`
//! package, laid out as PyTorch's exporter writes them): a ResNet-8 (MLPerf Tiny IC), a DS-CNN
//! (10x4 stride-2 asymmetric-padded first conv, depthwise separable blocks, BatchNorm kept), a
//! MobileNetV1-style net (ReLU6 as `Clip`, stride-2 depthwise, padded average pool, the `view`
//! flatten), a fire-module net (`Concat`, padded max pool) and a net with PyTorch's shape
//! arithmetic, a grouped conv, `MatMul` + bias `Add` and a trailing `Softmax`.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{make_models as python, max_diff, onnx_fixtures as fixtures, text};

use nvcim::{
    engine::float::layers::{Isa, Prepared},
    ir::{self, Network},
    onnx::{import::import, read_model, run::OrtRunner},
};
use nvcim_shared::rng::{Purpose, standard_normal, stream_for};

/// The five models: file stem, and the flags their images need from the 28x28 gray test data.
const MODELS: [(&str, &[&str]); 5] = [
    ("resnet8", &["--gray-to-rgb"]),
    ("dscnn", &[]),
    ("mobilenet", &["--gray-to-rgb"]),
    ("fire", &[]),
    ("viewnet", &[]),
];

fn model(name: &str) -> PathBuf {
    fixtures().join(format!("{name}.onnx"))
}

fn nvcim(args: &[&str]) -> Output {
    common::nvcim(args)
}

fn inputs(net: &Network, batch: usize, seed: u32) -> Vec<f32> {
    let mut rng = stream_for(Purpose::Host, 17, 3, seed);
    (0..batch * net.input.iter().product::<usize>())
        .map(|_| standard_normal(&mut rng))
        .collect()
}

fn softmax(logits: &mut [f32], classes: usize) {
    for row in logits.chunks_mut(classes) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        row.iter_mut().for_each(|v| *v = (*v - max).exp() / sum);
    }
}

#[test]
fn imported_graphs_have_the_expected_ops_and_layers() {
    let count =
        |net: &Network, kind: &str| net.nodes.iter().filter(|n| n.op.kind() == kind).count();
    for (name, _) in MODELS {
        let path = model(name);
        let m = import(&read_model(&path).unwrap(), name).unwrap();
        let net = &m.network;
        assert!(
            !m.has_normalization,
            "{name}: a PyTorch export has no nvcim metadata"
        );
        assert_eq!(net.num_classes, 10, "{name}");
        // Weight layers in file order: the contract's layer index.
        let proto = read_model(&path).unwrap();
        let file_layers: Vec<&str> = proto
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul"))
            .map(|n| n.name.as_str())
            .collect();
        let ir_layers: Vec<String> = net.weight_layers().into_iter().map(|l| l.name).collect();
        assert_eq!(ir_layers, file_layers, "{name}");
        match name {
            "dscnn" => {
                let first = net.nodes.iter().find_map(|n| match &n.op {
                    ir::Op::Conv2d(c) => Some(c.clone()),
                    _ => None,
                });
                let c = first.unwrap();
                assert_eq!(
                    (c.kernel, c.stride, c.padding),
                    ([10, 4], [2, 2], [4, 1, 5, 2])
                );
                assert_eq!(count(net, "BatchNorm"), 7);
                assert!(net.nodes.iter().any(|n| matches!(&n.op,
                    ir::Op::Conv2d(c) if c.groups == c.in_channels && c.groups > 1)));
            }
            "mobilenet" => {
                assert_eq!(count(net, "Clip"), 9);
                // The `view` flatten of a 1 x 1 map folds away: no Flatten node.
                assert_eq!((count(net, "GlobalAvgPool"), count(net, "Flatten")), (1, 0));
                assert!(net.nodes.iter().any(|n| matches!(&n.op,
                    ir::Op::AvgPool(p) if !p.count_include_pad && p.padding == [1; 4])));
            }
            "fire" => {
                assert_eq!(count(net, "Concat"), 2);
                assert!(net.nodes.iter().any(|n| matches!(&n.op,
                    ir::Op::MaxPool(p) if p.padding == [1; 4])));
            }
            "viewnet" => {
                assert_eq!(m.dropped_output.as_deref(), Some("Softmax"));
                assert!(m.notes.iter().any(|n| n.contains("Softmax")));
                assert_eq!(count(net, "Flatten"), 1);
                // MatMul + Add became one Linear with a bias.
                assert!(net.nodes.iter().any(|n| matches!(&n.op,
                    ir::Op::Linear(l) if l.bias.is_some() && l.out_features == 32)));
                assert!(net.nodes.iter().any(|n| matches!(&n.op,
                    ir::Op::Conv2d(c) if c.groups == 2)));
            }
            _ => assert_eq!(count(net, "Add"), 3),
        }
    }
}

/// The IR's reference forward pass and the float engine (every ISA path) equal ONNX Runtime
/// within 1e-4 of the logits' scale, on every model.
#[test]
fn ir_forward_equals_onnx_runtime() {
    for (name, _) in MODELS {
        let path = model(name);
        let m = import(&read_model(&path).unwrap(), name).unwrap();
        let net = &m.network;
        let x = inputs(net, 5, 1);
        let mut ort = OrtRunner::load(&path, 1).unwrap_or_else(|e| {
            panic!("{e:#} (ONNX Runtime is required: run `cargo xtask setup`)")
        });
        let want = ort.run(&x, 5).unwrap();
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let mut outs = vec![("reference", net.forward(&x, 5).unwrap())];
        for isa in Isa::available() {
            outs.push((
                "float",
                Prepared::new(net, isa).unwrap().logits(&x, 5).unwrap(),
            ));
        }
        for (what, mut got) in outs {
            if m.dropped_output.is_some() {
                softmax(&mut got, net.num_classes);
            }
            let d = max_diff(&want, &got);
            assert!(
                d <= 1e-4 * scale,
                "{name} {what}: max diff {d} (scale {scale})"
            );
        }
    }
}

/// `check-onnx` runs the imported IR beside tract and ONNX Runtime and passes at 1e-4.
#[test]
fn check_onnx_compares_the_ir_with_both_runtimes() {
    for (name, _) in MODELS {
        let path = model(name);
        let o = nvcim(&["check-onnx", path.to_str().unwrap(), "--random", "4"]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains("nvcim-ir"), "{name}: {}", text(&o));
    }
}

fn eval(name: &str, engine: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let flags = MODELS.iter().find(|m| m.0 == name).unwrap().1;
    let path = model(name);
    let data = fixtures().join("data");
    let mut args = vec![
        "eval",
        "--onnx",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--mean",
        "0.3",
        "--std",
        "0.3",
        "--engine",
        engine,
        "--sigma",
        "0.2,0.5",
        "--mc",
        "3",
        "--seed",
        "5",
        "--calibration-images",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--json",
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(extra);
    let o = nvcim(&args);
    assert!(o.status.success(), "{name} {engine}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn corrects(report: &serde_json::Value) -> Vec<Vec<u64>> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["correct"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_u64().unwrap())
                .collect()
        })
        .collect()
}

/// `eval --onnx` on every engine: the float engine classifies exactly as tract does run by run
/// (same layers, same streams), the integer engine within the float/int agreement bound, and
/// every result file records the preprocessing.
#[test]
fn eval_runs_every_model_on_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in MODELS {
        let float = eval(name, "float", &dir.path().join(format!("{name}-f")), &[]);
        let tract = eval(name, "tract", &dir.path().join(format!("{name}-t")), &[]);
        let int = eval(name, "int", &dir.path().join(format!("{name}-i")), &[]);
        assert_eq!(corrects(&float), corrects(&tract), "{name}: float vs tract");
        assert_eq!(float["clean_accuracy"], tract["clean_accuracy"], "{name}");
        let pre = float["config"]["preprocess"].as_str().unwrap();
        assert!(pre.contains("--mean/--std") && pre.contains("0.3"), "{pre}");
        let layers = read_model(&model(name))
            .unwrap()
            .graph
            .unwrap()
            .node
            .iter()
            .filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul"))
            .count();
        // As in `eval_both_engines_agree_and_files_are_consistent`: an image changes class only
        // when its margin is below the accumulated 8-bit rounding, L * 2^-7 of the range, plus
        // one image of granularity.
        let n = float["test_examples"].as_f64().unwrap();
        let bound = 100.0 * layers as f64 / 128.0 + 100.0 / n;
        for (f, i) in float["results"]
            .as_array()
            .unwrap()
            .iter()
            .zip(int["results"].as_array().unwrap())
        {
            let (a, b) = (
                f["summary"]["mean"].as_f64().unwrap(),
                i["summary"]["mean"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= bound,
                "{name}: float {a} vs int {b} (bound {bound})"
            );
        }
    }
}

/// Pack, then the firmware's loop (simulated in process; one model also in QEMU) equals the host
/// integer engine run by run, on every model.
#[test]
fn pack_and_firmware_run_every_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures().join("data");
    for (name, flags) in MODELS {
        let path = model(name);
        let cimb = dir.path().join(format!("{name}.cimb"));
        let mut args = vec![
            "pack",
            "--onnx",
            path.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--mean",
            "0.3",
            "--std",
            "0.3",
            "--test-images",
            "8",
            "--calibration-images",
            "32",
            "-o",
            cimb.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let o = nvcim(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains("memory plan"), "{name}: {}", text(&o));
        let mut modes = vec!["--simulated"];
        if name == "dscnn" && nvcim::firmware::find_qemu().is_ok() {
            modes.push("--emulated");
        }
        for mode in modes {
            let o = nvcim(&[
                "firmware",
                "run",
                cimb.to_str().unwrap(),
                "--mc",
                "2",
                "--sigma",
                "0.4",
                "--seed",
                "9",
                mode,
            ]);
            assert!(o.status.success(), "{name} {mode}: {}", text(&o));
            assert!(
                text(&o).contains("2 of 2 runs identical, summary identical"),
                "{name} {mode}: {}",
                text(&o)
            );
        }
    }
}

/// The checked-in reference model's `eval --onnx` per-run numbers on Fashion-MNIST: the golden
/// file holds what tract gave before the importer existed; the float engine (the new default)
/// and tract both give them.
#[test]
fn reference_model_eval_onnx_is_unchanged() {
    let data = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(
        data.join("t10k-images-idx3-ubyte.gz").is_file(),
        "no Fashion-MNIST in {}: run `cargo xtask setup`",
        data.display()
    );
    let reference =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/vgg8-w0.25-fmnist-nft.onnx");
    // The images are the ones the tract path read before the importer existed (`idx_images`:
    // pad 28 -> 32, the file's normalization), value for value.
    let proto = read_model(&reference).unwrap();
    let info = nvcim::onnx::ModelInfo::of(&proto, "reference").unwrap();
    let (old, old_labels) = nvcim::onnx::idx_images(data, &proto, &info, 300).unwrap();
    let m = nvcim::onnx::data::open(&reference, data, &[], &[], Default::default(), false, true)
        .unwrap();
    let test = nvcim::data::subset(&m.test, Some(300));
    assert_eq!(
        nvcim::onnx::data::normalized(&test, &m.prepared.normalization.0),
        old
    );
    assert_eq!(
        test.labels
            .iter()
            .map(|&l| u32::from(l))
            .collect::<Vec<_>>(),
        old_labels
    );
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for engine in ["float", "tract"] {
        let out = dir.path().join(engine);
        let o = nvcim(&[
            "eval",
            "--onnx",
            reference.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--engine",
            engine,
            "--sigma",
            "0.2,0.6",
            "--mc",
            "4",
            "--seed",
            "11",
            "--test-subset",
            "300",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--json",
        ]);
        assert!(o.status.success(), "{engine}: {}", text(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut t = format!("clean {}\n", r["clean_accuracy"]);
        for (s, c) in ["0.2", "0.6"].iter().zip(corrects(&r)) {
            t.push_str(&format!("sigma {s}: {c:?}\n"));
        }
        if lines.is_empty() {
            lines = t;
        } else {
            assert_eq!(t, lines, "tract vs float");
        }
    }
    common::golden(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/reference_eval_onnx.txt"),
        &lines,
    );
}

/// A foreign model is never fed a preprocessing nobody chose; channel counts are checked.
#[test]
fn preprocessing_is_required_and_checked() {
    refused(&model("fire"), &[], &["--mean", "--std"]);
    refused(
        &model("resnet8"),
        &["--mean", "0.5", "--std", "0.5"],
        &["3 input channel", "have 1", "--gray-to-rgb"],
    );
}

/// `eval --onnx FILE` with `extra` flags fails, without a panic, saying every one of `needles`.
fn refused(path: &Path, extra: &[&str], needles: &[&str]) {
    let data = fixtures().join("data");
    let mut args = vec![
        "eval",
        "--onnx",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--mc",
        "1",
        "--sigma",
        "0.1",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = nvcim(&args);
    let t = text(&o);
    assert!(!o.status.success(), "{}: {t}", path.display());
    assert!(!t.contains("panicked"), "{t}");
    for n in needles {
        assert!(t.contains(n), "{}: no `{n}` in {t}", path.display());
    }
}

/// Bad models: a clear message naming the node or tensor, a non-zero exit, never a panic.
#[test]
fn bad_models_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, needles) in [
        (
            "unsupported",
            &["LRN", "not supported", "Conv, BatchNormalization"][..],
        ),
        ("dynamic", &["fixed C, H, W"][..]),
        ("computed-weight", &["computed", "not stored"][..]),
        ("huge", &["elements"][..]),
        ("cyclic", &["no node before it produces"][..]),
        ("truncated", &["truncated or corrupt"][..]),
    ] {
        let path = dir.path().join(format!("bad-{kind}.onnx"));
        let o = python(&["--bad", kind, path.to_str().unwrap()]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        refused(&path, &["--mean", "0", "--std", "1"], needles);
    }
}

/// A model whose activations do not fit the board's RAM fails at pack time with the sizes.
#[test]
fn a_model_that_does_not_fit_the_board_fails_at_pack_time() {
    use nvcim::ir::{Conv2d, Linear, Node, Normalization, Op, Provenance, Value};
    use nvcim::onnx::export::{ExportOptions, export};
    // A 400 x 400 input, 8 channels out: a 1.28 MB activation, over the 1 MiB arena.
    let net = Network {
        input: [1, 400, 400],
        num_classes: 10,
        normalization: Normalization::identity(1),
        provenance: Provenance::default(),
        nodes: vec![
            Node {
                name: "conv".into(),
                op: Op::Conv2d(Conv2d::square(1, 8, 3, 1, 1, vec![0.1; 72], None)),
                inputs: vec![Value::INPUT],
            },
            Node {
                name: "relu".into(),
                op: Op::Relu,
                inputs: vec![Value::node(0)],
            },
            Node {
                name: "pool".into(),
                op: Op::MaxPool(nvcim::ir::Pool::square(4, 4)),
                inputs: vec![Value::node(1)],
            },
            Node {
                name: "gap".into(),
                op: Op::GlobalAvgPool,
                inputs: vec![Value::node(2)],
            },
            Node {
                name: "flat".into(),
                op: Op::Flatten,
                inputs: vec![Value::node(3)],
            },
            Node {
                name: "fc".into(),
                op: Op::Linear(Linear {
                    out_features: 10,
                    in_features: 8,
                    weight: (0..80).map(|i| (i as f32 - 40.0) / 80.0).collect(),
                    bias: None,
                }),
                inputs: vec![Value::node(4)],
            },
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.onnx");
    export(&net, &ExportOptions::default(), &path).unwrap();
    let data = fixtures().join("data");
    let o = nvcim(&[
        "pack",
        "--onnx",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--calibration-images",
        "4",
        "--test-images",
        "2",
        "-o",
        dir.path().join("big.cimb").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("does not fit") && t.contains("activation arena"),
        "{t}"
    );
    assert!(!dir.path().join("big.cimb").exists());
}

/// A bounded fuzz of the importer: byte flips and structural mutations of the five models never
/// panic (an error or an import, nothing else).
#[test]
fn importer_fuzz_never_panics() {
    use prost::Message;
    let mut rng = stream_for(Purpose::Host, 99, 0, 0);
    let mut next = move |n: usize| (rand_core::RngCore::next_u32(&mut rng) as usize) % n.max(1);
    let ops = [
        "Conv", "Relu", "Add", "Concat", "Flatten", "Reshape", "Gemm", "MaxPool", "Clip",
        "Softmax", "Shape", "Gather",
    ];
    let mut imported = 0;
    for (name, _) in MODELS {
        let bytes = std::fs::read(model(name)).unwrap();
        for case in 0..60 {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if case % 2 == 0 {
                    let mut b = bytes.clone();
                    for _ in 0..1 + case % 5 {
                        let at = next(b.len());
                        b[at] ^= 1 << next(8);
                    }
                    nvcim::onnx::decode_model(&b, name).and_then(|m| import(&m, name).map(|_| ()))
                } else {
                    let mut m = read_model(&model(name)).unwrap();
                    let g = m.graph.as_mut().unwrap();
                    let i = next(g.node.len());
                    match case % 6 {
                        1 => g.node[i].op_type = ops[next(ops.len())].into(),
                        3 => {
                            let n = &mut g.node[i];
                            if !n.input.is_empty() {
                                let k = next(n.input.len());
                                n.input.remove(k);
                            }
                        }
                        _ => {
                            for a in &mut g.node[i].attribute {
                                a.i = next(7) as i64 - 2;
                                a.ints.iter_mut().for_each(|v| *v = next(7) as i64 - 2);
                            }
                        }
                    }
                    let b = m.encode_to_vec();
                    nvcim::onnx::decode_model(&b, name).and_then(|m| import(&m, name).map(|_| ()))
                }
            }));
            match result {
                Ok(Ok(())) => imported += 1,
                Ok(Err(_)) => {}
                Err(_) => panic!("{name} case {case}: the importer panicked"),
            }
        }
    }
    // Some mutations leave a valid model (a flipped weight bit): the fuzz reaches the end.
    assert!(imported > 0);
}
