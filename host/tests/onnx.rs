//! ONNX export, tract and ONNX Runtime against the IR's reference forward pass, the format's own
//! checker, external-model Monte Carlo, and error paths.
//!
//! Needs the `.venv` made by `cargo xtask setup` (Python `onnx` for the checker, the
//! `onnxruntime` wheel's library for `ort`); without it these tests fail and say so.

use std::{path::Path, process::Command};

mod common;

use common::{check_with_onnx_checker, max_diff, run_checker};

use nvcim::{
    engine::onnx::{accuracy, onnx_mc, perturbed_model, weight_layers},
    ir::{Network, RandomArch},
    onnx::{
        export::{ExportOptions, NoisyInstance, export, to_model_proto},
        read_model,
        run::{OrtRunner, TractRunner},
        write_model,
    },
};
use nvcim_shared::{
    quant::{QuantConfig, Quantized, quantize_layer},
    rng::{Purpose, standard_normal, stream_for},
    variation::VariationConfig,
};
use tract_onnx::pb::ModelProto;

const TOL: f32 = 1e-4;

fn vgg() -> Network {
    Network::vgg8(&RandomArch::new(1, 0.125)).unwrap()
}

fn resnet() -> Network {
    Network::resnet18(&RandomArch::new(3, 0.0625)).unwrap()
}

fn inputs(net: &Network, batch: usize, seed: u32) -> Vec<f32> {
    let mut rng = stream_for(Purpose::Host, 11, 2, seed);
    (0..batch * net.input.iter().product::<usize>())
        .map(|_| standard_normal(&mut rng))
        .collect()
}

#[test]
fn the_checker_rejects_a_broken_graph() {
    // A Gemm whose weight does not match its input: full_check's shape inference must object.
    let dir = tempfile::tempdir().unwrap();
    let mut model = to_model_proto(&vgg(), &ExportOptions::default()).unwrap();
    let g = model.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name == "classifier.2.weight")
        .unwrap();
    t.dims[1] += 1;
    t.raw_data.extend(vec![0u8; 4 * t.dims[0] as usize]);
    let path = dir.path().join("broken.onnx");
    write_model(&model, &path).unwrap();
    assert!(!run_checker(&[path]).status.success());
}

/// Exports `net`, runs it in tract and ONNX Runtime at batch 1 and 7, and checks both against
/// `reference` (the IR whose forward pass the file must reproduce).
fn round_trip(net: &Network, opts: &ExportOptions, reference: &Network, path: &Path) {
    export(net, opts, path).unwrap();
    let mut tract = TractRunner::load(path).unwrap();
    let mut ort = OrtRunner::load(path, 1)
        .unwrap_or_else(|e| panic!("{e:#} (ONNX Runtime is required: run `cargo xtask setup`)"));
    for (batch, seed) in [(1, 0), (7, 1)] {
        let x = inputs(net, batch, seed);
        let want = reference.forward(&x, batch).unwrap();
        let t = tract.run(&x, batch).unwrap();
        let o = ort.run(&x, batch).unwrap();
        assert_eq!(t.len(), batch * net.num_classes);
        let (dt, dort) = (max_diff(&t, &want), max_diff(&o, &want));
        assert!(
            dt < TOL && dort < TOL,
            "{}: batch {batch}: tract {dt:.2e}, onnxruntime {dort:.2e} from the reference \
             (max |logit| {:.2})",
            path.display(),
            want.iter().fold(0.0f32, |m, v| m.max(v.abs()))
        );
    }
}

fn names(model: &ModelProto) -> Vec<String> {
    let g = model.graph.as_ref().unwrap();
    g.node
        .iter()
        .map(|n| n.name.clone())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .chain(g.node.iter().flat_map(|n| n.output.clone()))
        .collect()
}

#[test]
fn vgg8_and_resnet18_round_trip_kept_and_folded() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (label, net) in [("vgg8", vgg()), ("resnet18", resnet())] {
        for fold in [false, true] {
            let path = dir.path().join(format!("{label}-fold{fold}.onnx"));
            let opts = ExportOptions {
                fold_batchnorm: fold,
                ..ExportOptions::default()
            };
            round_trip(&net, &opts, &net, &path);
            let model = read_model(&path).unwrap();
            let g = model.graph.as_ref().unwrap();
            let bns = g
                .node
                .iter()
                .filter(|n| n.op_type == "BatchNormalization")
                .count();
            assert_eq!(bns == 0, fold, "{label} fold={fold}: {bns} BatchNorm nodes");
            assert_eq!(g.input[0].name, "input");
            assert_eq!(g.output[0].name, "logits");
            assert!(model.opset_import[0].version >= 13);
            files.push(path);
        }
    }
    check_with_onnx_checker(&files);
}

#[test]
fn graph_holds_the_backbone_only_with_provenance() {
    let mut net = resnet();
    net.provenance.dataset = Some("cifar10".into());
    net.provenance.alpha = Some(0.001);
    let model = to_model_proto(&net, &ExportOptions::default()).unwrap();
    let layer_names: Vec<String> = net.nodes.iter().map(|n| n.name.clone()).collect();
    for name in names(&model) {
        assert!(
            !name.to_lowercase().contains("exit"),
            "`{name}` in the graph"
        );
        assert!(
            name == "logits" || layer_names.iter().any(|l| name.starts_with(l.as_str())),
            "`{name}` belongs to no backbone node"
        );
    }
    let g = model.graph.as_ref().unwrap();
    let convs_and_gemms = g
        .node
        .iter()
        .filter(|n| n.op_type == "Conv" || n.op_type == "Gemm")
        .count();
    assert_eq!(convs_and_gemms, net.weight_layers().len());
    let meta = |k: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    assert_eq!(
        meta("nvcim.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(meta("nvcim.dataset").as_deref(), Some("cifar10"));
    assert_eq!(meta("nvcim.alpha").as_deref(), Some("0.001"));
    assert_eq!(meta("nvcim.batchnorm").as_deref(), Some("kept"));
    assert!(meta("nvcim.normalization.mean").is_some());
}

/// The IR with every weight layer replaced by shared's dequantized weights.
fn dequantized(net: &Network, cfg: QuantConfig) -> Network {
    let weights = net
        .weights()
        .iter()
        .map(|w| {
            let mut q = vec![Quantized::default(); w.len()];
            let s = quantize_layer(w, None, cfg, &mut q).unwrap();
            q.iter().map(|c| c.dequantize(s, cfg)).collect()
        })
        .collect();
    let mut out = net.clone();
    out.set_weights(weights).unwrap();
    out
}

#[test]
fn qdq_graph_runs_the_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (label, net) in [("vgg8", vgg()), ("resnet18", resnet())] {
        for (fold, m_bits) in [(false, 8), (true, 8), (false, 4)] {
            let cfg = QuantConfig::new(m_bits, 2).unwrap();
            let path = dir
                .path()
                .join(format!("{label}-qdq{m_bits}-fold{fold}.onnx"));
            let opts = ExportOptions {
                fold_batchnorm: fold,
                qdq: Some(cfg),
                noisy: None,
            };
            let reference = dequantized(&net, cfg);
            assert_ne!(reference, net);
            round_trip(&net, &opts, &reference, &path);
            let model = read_model(&path).unwrap();
            let q = model
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .filter(|n| n.op_type == "QuantizeLinear")
                .count();
            assert_eq!(q, 2 * net.weight_layers().len());
            files.push(path);
        }
    }
    check_with_onnx_checker(&files);
}

#[test]
fn noisy_instance_is_the_float_engine_run() {
    let dir = tempfile::tempdir().unwrap();
    // A small sigma keeps the noisy logits near unit scale, where 1e-4 is a fair f32 bound.
    let cfg = VariationConfig::paper(0.05).unwrap();
    let mut files = Vec::new();
    for (label, net) in [("vgg8", vgg()), ("resnet18", resnet())] {
        for fold in [false, true] {
            let path = dir.path().join(format!("{label}-noisy-fold{fold}.onnx"));
            let opts = ExportOptions {
                fold_batchnorm: fold,
                qdq: None,
                noisy: Some(NoisyInstance {
                    variation: cfg,
                    seed: 9,
                    run: 3,
                }),
            };
            let reference = net.noisy_instance(&cfg, 9, 3).unwrap();
            let x = inputs(&net, 2, 5);
            assert!(
                max_diff(
                    &reference.forward(&x, 2).unwrap(),
                    &net.forward(&x, 2).unwrap()
                ) > 1e-2,
                "sigma 0.05 must move the logits"
            );
            round_trip(&net, &opts, &reference, &path);
            files.push(path);
        }
    }
    check_with_onnx_checker(&files);
}

#[test]
fn qdq_and_noisy_instance_do_not_combine() {
    let opts = ExportOptions {
        fold_batchnorm: false,
        qdq: Some(QuantConfig::DEFAULT),
        noisy: Some(NoisyInstance {
            variation: VariationConfig::paper(0.1).unwrap(),
            seed: 0,
            run: 0,
        }),
    };
    assert!(to_model_proto(&vgg(), &opts).is_err());
}

#[test]
fn corrupt_truncated_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.onnx");
    export(&vgg(), &ExportOptions::default(), &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf \xff\xff\xff\xff").unwrap();
    let missing = dir.path().join("missing.onnx");
    for p in [&truncated, &garbage, &missing] {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let t = TractRunner::load(p).err().expect("tract must fail");
        assert!(format!("{t:#}").contains(&name), "tract: {t:#}");
        let o = OrtRunner::load(p, 1).err().expect("onnxruntime must fail");
        assert!(format!("{o:#}").contains(&name), "onnxruntime: {o:#}");
    }
    // No temporary file is left behind by the atomic write.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn external_mc_matches_the_ir_noisy_instances() {
    let dir = tempfile::tempdir().unwrap();
    let net = vgg();
    let path = dir.path().join("vgg8.onnx");
    export(&net, &ExportOptions::default(), &path).unwrap();
    let n = 24;
    let x = inputs(&net, n, 3);
    // Labels: the clean network's predictions, so noise can only lower the accuracy.
    let clean = net.forward(&x, n).unwrap();
    let labels: Vec<u32> = clean
        .chunks(net.num_classes)
        .map(|r| nvcim::engine::onnx::argmax(r) as u32)
        .collect();
    let cfg = VariationConfig::paper(0.5).unwrap();
    let acc = onnx_mc(&path, &x, &labels, &cfg, 4, 3).unwrap();
    assert_eq!(acc.len(), 3);
    for (run, a) in acc.iter().enumerate() {
        let noisy = net.noisy_instance(&cfg, 4, run as u32).unwrap();
        let want = accuracy(&noisy.forward(&x, n).unwrap(), &labels);
        assert_eq!(*a, want, "run {run}");
    }
    assert!(
        acc.iter().any(|&a| a < 1.0),
        "sigma 0.5 should cost accuracy: {acc:?}"
    );
    let zero = onnx_mc(
        &path,
        &x,
        &labels,
        &VariationConfig::paper(0.0).unwrap(),
        4,
        1,
    )
    .unwrap();
    assert_eq!(zero, vec![1.0]);
}

#[test]
fn external_mc_visits_transposed_weights_canonically() {
    let net = vgg();
    let model = to_model_proto(&net, &ExportOptions::default()).unwrap();
    // The same model with the last Gemm stored [in][out] (transB = 0).
    let mut alt = model.clone();
    let g = alt.graph.as_mut().unwrap();
    let gemm = g
        .node
        .iter_mut()
        .rev()
        .find(|n| n.op_type == "Gemm")
        .unwrap();
    gemm.attribute.retain(|a| a.name != "transB");
    let wname = gemm.input[1].clone();
    let t = g.initializer.iter_mut().find(|t| t.name == wname).unwrap();
    let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
    let w: Vec<f32> = t
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let mut tw = vec![0.0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            tw[c * rows + r] = w[r * cols + c];
        }
    }
    t.raw_data = tw.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.dims = vec![cols as i64, rows as i64];

    let cfg = VariationConfig::paper(0.3).unwrap();
    let layers = weight_layers(&model, "a").unwrap();
    let alt_layers = weight_layers(&alt, "b").unwrap();
    assert!(alt_layers.last().unwrap().transposed);
    let p = perturbed_model(&model, &layers, &cfg, 1, 0, "a").unwrap();
    let q = perturbed_model(&alt, &alt_layers, &cfg, 1, 0, "b").unwrap();
    // Both runtimes of the two perturbed models give the same logits.
    let x = inputs(&net, 2, 8);
    let mut a = TractRunner::from_proto(&p, "a").unwrap();
    let mut b = TractRunner::from_proto(&q, "b").unwrap();
    let (la, lb) = (a.run(&x, 2).unwrap(), b.run(&x, 2).unwrap());
    assert!(max_diff(&la, &lb) < TOL);
    let want = net
        .noisy_instance(&cfg, 1, 0)
        .unwrap()
        .forward(&x, 2)
        .unwrap();
    assert!(max_diff(&la, &want) < TOL);
}

#[test]
fn external_mc_names_what_it_cannot_handle() {
    let net = vgg();
    let mut model = to_model_proto(&net, &ExportOptions::default()).unwrap();
    model.graph.as_mut().unwrap().node[0].op_type = "ConvTranspose".into();
    let err = weight_layers(&model, "m.onnx").unwrap_err().to_string();
    assert!(
        err.contains("ConvTranspose") && err.contains("features.0.conv"),
        "{err}"
    );

    let qdq = ExportOptions {
        qdq: Some(QuantConfig::DEFAULT),
        ..ExportOptions::default()
    };
    let model = to_model_proto(&net, &qdq).unwrap();
    let err = weight_layers(&model, "q.onnx").unwrap_err().to_string();
    assert!(
        err.contains("not an initializer") && err.contains("features.0.conv"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    write_model(
        &to_model_proto(&net, &ExportOptions::default()).unwrap(),
        &path,
    )
    .unwrap();
    let err = onnx_mc(
        &path,
        &[0.0; 10],
        &[0],
        &VariationConfig::paper(0.1).unwrap(),
        0,
        1,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("m.onnx"));
}

fn nvcim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nvcim"))
}

#[test]
fn check_onnx_cli_random_and_idx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vgg8.onnx");
    let mut net = vgg();
    net.normalization.mean = vec![0.5];
    net.normalization.std = vec![0.25];
    export(&net, &ExportOptions::default(), &path).unwrap();

    let out = nvcim()
        .args(["check-onnx", "--random", "9", "--batch", "4"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("max |tract - onnxruntime|"), "{stdout}");
    assert!(stdout.contains("images       9 (batch 4)"), "{stdout}");

    // A tiny MNIST-style test set: 28x28 images padded to the model's 32x32.
    let n = 5u32;
    let mut images = vec![0, 0, 8, 3];
    for d in [n, 28, 28] {
        images.extend(d.to_be_bytes());
    }
    images.extend((0..n * 28 * 28).map(|i| (i * 7 % 256) as u8));
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(n.to_be_bytes());
    labels.extend([3u8, 1, 4, 1, 5]);
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &labels).unwrap();
    let out = nvcim()
        .args(["check-onnx", "--json", "--data-dir"])
        .arg(dir.path())
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["images"], 5);
    let accs: Vec<f64> = report["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["accuracy"].as_f64().unwrap())
        .collect();
    // tract, ONNX Runtime and the imported IR on the float engine.
    assert_eq!(accs.len(), 3);
    assert_eq!(accs[0], accs[1]);
    assert_eq!(accs[0], accs[2]);

    // A truncated file fails with its name.
    let bad = dir.path().join("bad.onnx");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&bad, &bytes[..100]).unwrap();
    let out = nvcim()
        .args(["check-onnx", "--random", "1"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.onnx"));
}

#[test]
fn external_mc_rejects_shared_weights() {
    let mut model = to_model_proto(&vgg(), &ExportOptions::default()).unwrap();
    let g = model.graph.as_mut().unwrap();
    let first = g.node[0].input[1].clone();
    let second = g
        .node
        .iter_mut()
        .filter(|n| n.op_type == "Conv")
        .nth(1)
        .unwrap();
    second.input[1] = first;
    let err = weight_layers(&model, "s.onnx").unwrap_err().to_string();
    assert!(err.contains("shared"), "{err}");
}

/// The checked-in reference model (`models/`): at most 5 MB together, the ONNX file passes the
/// format's checker, holds the backbone only with its provenance, and tract and ONNX Runtime
/// agree on it; the packed file parses and carries a test batch.
#[test]
fn reference_model_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let onnx = dir.join("vgg8-w0.25-fmnist-nft.onnx");
    let cimb = dir.join("vgg8-w0.25-fmnist-nft.cimb");
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= 5_000_000, "models/ holds {total} bytes");
    check_with_onnx_checker(std::slice::from_ref(&onnx));
    let model = read_model(&onnx).unwrap();
    common::assert_backbone_only(&model, 8); // VGG-8: 6 conv + 2 linear
    let meta = |k: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    assert_eq!(meta("nvcim.method").as_deref(), Some("nft"));
    assert_eq!(meta("nvcim.sigma_unit").as_deref(), Some("range"));
    let x: Vec<f32> = {
        let mut rng = stream_for(Purpose::Host, 5, 0, 0);
        // Three 1 x 32 x 32 images.
        (0..3 * 32 * 32)
            .map(|_| standard_normal(&mut rng))
            .collect()
    };
    let t = TractRunner::load(&onnx).unwrap().run(&x, 3).unwrap();
    let o = OrtRunner::load(&onnx, 0).unwrap().run(&x, 3).unwrap();
    assert!(max_diff(&t, &o) < TOL, "{}", max_diff(&t, &o));
    let blob = std::fs::read(&cimb).unwrap();
    let packed = nvcim_shared::format::Model::parse(&blob).expect("the packed model parses");
    assert_eq!(packed.layer_count(), 8);
    assert!(packed.test_len() >= 16);
}
