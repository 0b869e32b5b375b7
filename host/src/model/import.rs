//! Import of PyTorch state dicts (`.pt` / `.pth`) and safetensors files into a [`Backbone`].
//!
//! Accepted names are the authors' (`YifanQin-ND/NF_Training`: VGG-8 `conv1..conv6`,
//! `bn1..bn6`, `fc1`, `fc2`; ResNet-18 `conv1`/`bn1` stem, `layerS.B.{conv1,bn1,conv2,bn2}`,
//! `layerS.B.unit_conv`/`bn3` shortcut, `fc1`) and nvcim's own. A `module.` prefix
//! (`DataParallel`) is stripped; exit (`irs_block*`) and unused tensors are ignored. PyTorch's
//! layouts are converted by burn-store's `PyTorchToBurnAdapter` (linear weights transposed,
//! BN `weight`/`bias` -> `gamma`/`beta`). Every backbone tensor must be present.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore};
use burn::tensor::Device;

use super::{Arch, Backbone, ModelSpec};

/// The name rewrites from the authors' PyTorch modules to nvcim's, applied in order.
pub fn key_patterns(arch: Arch) -> Vec<(String, String)> {
    let mut p = vec![(r"^module\.".to_string(), String::new())];
    match arch {
        Arch::Vgg8 => {
            for i in 1..=6 {
                p.push((format!(r"^conv{i}\."), format!("blocks.{}.conv.", i - 1)));
                p.push((format!(r"^bn{i}\."), format!("blocks.{}.bn.", i - 1)));
            }
        }
        Arch::Resnet18 => {
            p.push((r"^conv1\.".into(), "stem.conv.".into()));
            p.push((r"^bn1\.".into(), "stem.bn.".into()));
            for s in 1..=4 {
                p.push((format!(r"^layer{s}\."), format!("stages.{}.", s - 1)));
            }
            for (from, to) in [
                ("conv1", "conv1.conv"),
                ("bn1", "conv1.bn"),
                ("conv2", "conv2.conv"),
                ("bn2", "conv2.bn"),
                ("unit_conv", "shortcut.conv"),
                ("bn3", "shortcut.bn"),
            ] {
                p.push((format!(r"^(stages\.\d\.\d)\.{from}\."), format!("$1.{to}.")));
            }
            p.push((r"^fc1\.".into(), "fc.".into()));
        }
        // A graph model's state dict carries its own names; `train --onnx` reads ONNX instead.
        Arch::Graph => {}
    }
    p
}

/// Loads the backbone `spec` describes from `path` (`.pt`, `.pth`, `.safetensors`).
pub fn import_backbone(path: &Path, spec: &ModelSpec, device: &Device) -> Result<Backbone> {
    spec.validate()?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    ensure_file(path)?;
    let mut backbone = spec.init_backbone(device);
    let mut patterns = key_patterns(spec.arch);
    // nvcim's module names -> the graph network's layers (enum variants skipped).
    for (old, k, _) in super::legacy::layer_names(spec) {
        patterns.push((
            format!("^{}\\.", old.replace('.', "\\.")),
            format!("layers.{k}."),
        ));
    }
    let result = match ext.as_str() {
        "safetensors" => {
            let mut store = SafetensorsStore::from_file(path)
                .with_from_adapter(PyTorchToBurnAdapter)
                .skip_enum_variants(true)
                .allow_partial(true);
            for (f, t) in &patterns {
                store = store.with_key_remapping(f, t.clone());
            }
            backbone
                .load_from(&mut store)
                .map_err(|e| anyhow::anyhow!("{e}"))
        }
        "pt" | "pth" => {
            let mut store = PytorchStore::from_file(path)
                .skip_enum_variants(true)
                .allow_partial(true);
            for (f, t) in &patterns {
                store = store.with_key_remapping(f, t.clone());
            }
            backbone
                .load_from(&mut store)
                .map_err(|e| anyhow::anyhow!("{e}"))
        }
        _ => bail!(
            "{}: unknown weight format `.{ext}`; expected .pt, .pth or .safetensors",
            path.display()
        ),
    }
    .with_context(|| format!("reading weights from {}", path.display()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
        bail!(
            "{} does not fit a {:?} of width {} ({} input channels, {} classes): missing {:?}, errors {:?}",
            path.display(),
            spec.arch,
            spec.width,
            spec.in_channels,
            spec.num_classes,
            missing,
            result.errors
        );
    }
    Ok(backbone)
}

fn ensure_file(path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("{} does not exist or is not a file", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// Writes the authors' VGG-8 state dict (PyTorch layouts) with known values; returns the
    /// canonical weights it holds.
    fn write_authors_vgg8(path: &Path, spec: &ModelSpec) -> Vec<Vec<f32>> {
        let chans: Vec<usize> = [64, 128, 256, 256, 512, 512]
            .iter()
            .map(|&c| spec.ch(c))
            .collect();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut weights = Vec::new();
        let mut cin = spec.in_channels;
        let val = |layer: usize, i: usize| (layer as f32 + 1.0) * 0.01 + (i % 97) as f32 * 1e-4;
        for (i, &c) in chans.iter().enumerate() {
            let n = c * cin * 9;
            let w: Vec<f32> = (0..n).map(|k| val(i, k)).collect();
            tensors.push((
                format!("conv{}.weight", i + 1),
                vec![c, cin, 3, 3],
                w.clone(),
            ));
            weights.push(w);
            for (name, v) in [
                ("weight", 1.5f32),
                ("bias", 0.25),
                ("running_mean", 0.125),
                ("running_var", 2.0),
            ] {
                tensors.push((format!("bn{}.{name}", i + 1), vec![c], vec![v; c]));
            }
            tensors.push((
                format!("bn{}.num_batches_tracked", i + 1),
                vec![],
                vec![0.0],
            ));
            cin = c;
        }
        let side = spec.image_size / 8;
        let dims = [
            (cin * side * side, spec.ch(1024)),
            (spec.ch(1024), spec.num_classes),
        ];
        for (j, (din, dout)) in dims.into_iter().enumerate() {
            let w: Vec<f32> = (0..din * dout).map(|k| val(6 + j, k)).collect();
            tensors.push((format!("fc{}.weight", j + 1), vec![dout, din], w.clone()));
            tensors.push((format!("fc{}.bias", j + 1), vec![dout], vec![0.5; dout]));
            weights.push(w);
        }
        tensors.push(("irs_block1.fc1.weight".into(), vec![2, 2], vec![9.0; 4]));
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(n, s, v)| {
                (
                    format!("module.{n}"),
                    s,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
        weights
    }

    #[test]
    fn authors_safetensors_load_into_vgg8() {
        let _rng = crate::burn_rng_guard();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vgg8.safetensors");
        let spec = ModelSpec {
            arch: Arch::Vgg8,
            width: 0.125,
            in_channels: 1,
            image_size: 32,
            num_classes: 10,
            graph: None,
        };
        let expect = write_authors_vgg8(&p, &spec);
        let b = import_backbone(&p, &spec, &Device::flex()).unwrap();
        let layers = b.weight_layers();
        for (l, e) in layers.iter().zip(&expect) {
            assert_eq!(&l.weights, e, "layer {}", l.name);
        }
        let bn = layers[2].bn.as_ref().unwrap();
        assert!(bn.gamma.iter().all(|&g| g == 1.5) && bn.beta.iter().all(|&x| x == 0.25));
        assert!(bn.mean.iter().all(|&x| x == 0.125) && bn.var.iter().all(|&x| x == 2.0));
        assert!(layers[7].bias.as_ref().unwrap().iter().all(|&x| x == 0.5));

        let wrong = ModelSpec {
            width: 0.25,
            ..spec.clone()
        };
        let err = format!(
            "{:#}",
            import_backbone(&p, &wrong, &Device::flex()).unwrap_err()
        );
        assert!(err.contains("vgg8.safetensors"), "{err}");
        let err = format!(
            "{:#}",
            import_backbone(&dir.path().join("x.onnx"), &spec, &Device::flex()).unwrap_err()
        );
        assert!(err.contains("x.onnx"), "{err}");
    }

    #[test]
    fn imported_run_is_evaluated_with_the_authors_preprocessing() {
        let _rng = crate::burn_rng_guard();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vgg8.safetensors");
        let spec = ModelSpec {
            arch: Arch::Vgg8,
            width: 0.125,
            in_channels: 1,
            image_size: 32,
            num_classes: 10,
            graph: None,
        };
        write_authors_vgg8(&p, &spec);
        let out = dir.path().join("run");
        crate::commands::import::run(&crate::commands::import::ImportArgs {
            weights: p,
            model: Arch::Vgg8,
            width: 0.125,
            dataset: crate::data::DatasetKind::Mnist,
            image_size: 32,
            preprocess: crate::data::Preprocess::Resize,
            data_dir: None,
            out: out.clone(),
        })
        .unwrap();
        let loaded = crate::ir::convert::load_checkpoint(&out, &Device::flex()).unwrap();
        assert_eq!(loaded.preprocess, crate::data::Preprocess::Resize);
        assert!(loaded.pad32);
        let net = loaded.network().unwrap();
        assert_eq!(
            (net.normalization.mean[0], net.normalization.std[0]),
            (0.5, 0.5)
        );
        assert_eq!(loaded.config["method"], "imported");
    }
}
