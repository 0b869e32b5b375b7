//! From a trained Burn [`Backbone`] to the Burn-free [`Network`], and from a network to the
//! integer engine's float description ([`build::ModelDesc`]).
//!
//! [`to_network`] emits the backbone's graph ([`crate::model::graph`]) in its order (the
//! contract's weight-layer order, equal to [`Backbone::weight_layers`]): VGG-8 `conv, bn,
//! relu[, pool]` six times, `flatten, fc1, relu, fc2`; ResNet-18 `stem conv, bn, relu`, then per
//! basic block `conv1, bn1, relu, conv2, bn2[, shortcut conv, shortcut bn], add, relu`, then
//! `gap, flatten, fc`; an imported CNN in its file's order. BatchNorm stays a node of its own;
//! the conv weights are the trained weights themselves.
//!
//! [`desc_nodes`] maps every network node to one description node (same indices), BatchNorm
//! included: the packer folds it into the requantization multiplier and bias, never into the
//! conductance-coded weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::Device;
use nvcim_shared::format::build::{self, InputSpec, Layer, ModelDesc};
use nvcim_shared::variation::SigmaUnit;

use crate::data::{self, Dataset, DatasetKind, Preprocess};
use crate::fsx::read_json;

use crate::ir::{Network, Normalization, Op, Provenance};
use crate::model::{Backbone, ModelSpec, load_backbone};

/// Builds the network of `backbone` (of `spec`), with the input `normalization` and the
/// weights' `provenance`.
pub fn to_network(
    backbone: &Backbone,
    spec: &ModelSpec,
    normalization: Normalization,
    provenance: Provenance,
) -> Result<Network> {
    ensure!(
        backbone.spec().nodes == spec.graph().nodes,
        "the backbone is not the {:?} of width {} that its model description says",
        spec.arch,
        spec.width
    );
    let mut net = backbone.to_network(provenance)?;
    net.normalization = normalization;
    net.shapes()
        .context("the converted network is inconsistent")?;
    Ok(net)
}

/// The description nodes of `net`, one per network node (same indices), `act_max` 1 (calibrate
/// them with [`build::calibrate_with`] on [`model_desc`]).
pub fn desc_nodes(net: &Network) -> Result<Vec<build::Node<'_>>> {
    net.shapes()?;
    let mut out = Vec::with_capacity(net.nodes.len());
    for (i, node) in net.nodes.iter().enumerate() {
        let ctx = || format!("node {i} `{}`", node.name);
        let input = match node.inputs[0].producer() {
            None if i == 0 => None,
            None => bail!("{}: only the first node may read the image", ctx()),
            Some(p) if p + 1 == i => None,
            Some(p) => Some(p),
        };
        let layer = match &node.op {
            Op::Conv2d(c) => Layer::Conv2d {
                weight: &c.weight,
                bias: c.bias.as_deref(),
                out_channels: c.out_channels,
                kernel: c.kernel,
                stride: c.stride,
                padding: c.padding,
                groups: c.groups,
            },
            Op::Linear(l) => Layer::Linear {
                weight: &l.weight,
                bias: l.bias.as_deref(),
                out_features: l.out_features,
            },
            Op::BatchNorm(bn) => Layer::BatchNorm {
                gamma: &bn.gamma,
                beta: &bn.beta,
                mean: &bn.mean,
                var: &bn.var,
                eps: bn.eps,
            },
            Op::Relu => Layer::Relu,
            // The packer takes finite bounds; an open side saturates at the output type's end.
            Op::Clip { min, max } => Layer::Clip {
                min: min.max(f32::MIN),
                max: max.min(f32::MAX),
            },
            Op::MaxPool(p) => Layer::MaxPool {
                kernel: p.kernel,
                stride: p.stride,
                padding: p.padding,
            },
            Op::AvgPool(p) => Layer::AvgPool {
                kernel: p.kernel,
                stride: p.stride,
                padding: p.padding,
                count_include_pad: p.count_include_pad,
            },
            Op::GlobalAvgPool => Layer::GlobalAvgPool,
            Op::Flatten => Layer::Flatten,
            Op::Add => Layer::Add {
                other: node.inputs[1]
                    .producer()
                    .with_context(|| format!("{}: cannot add the image", ctx()))?,
            },
            Op::Concat => Layer::Concat {
                other: node.inputs[1]
                    .producer()
                    .with_context(|| format!("{}: cannot concatenate the image", ctx()))?,
            },
        };
        out.push(build::Node {
            layer,
            input,
            act_max: 1.0,
        });
    }
    Ok(out)
}

/// The description of `net` over `nodes` (from [`desc_nodes`], possibly calibrated).
pub fn model_desc<'a>(net: &'a Network, nodes: &'a [build::Node<'a>]) -> ModelDesc<'a> {
    ModelDesc {
        input: InputSpec {
            channels: net.input[0],
            height: net.input[1],
            width: net.input[2],
            mean: &net.normalization.mean,
            std: &net.normalization.std,
        },
        classes: net.num_classes,
        nodes,
    }
}

/// A trained checkpoint with what its run directory says about it.
pub struct Loaded {
    /// The backbone file that was read.
    pub path: PathBuf,
    /// The backbone (inference mode).
    pub backbone: Backbone,
    /// Its architecture and shape (`model.json`).
    pub spec: ModelSpec,
    /// The run's `config.json`.
    pub config: serde_json::Value,
    /// The training data set.
    pub dataset: DatasetKind,
    /// Where training read it.
    pub data_dir: PathBuf,
    /// Whether 28x28 images were brought to 32x32.
    pub pad32: bool,
    /// How (`config.json`'s `preprocess`; `pad` in runs written before it existed).
    pub preprocess: Preprocess,
}

fn read_spec(path: &Path) -> Result<ModelSpec> {
    let spec: ModelSpec = serde_json::from_value(read_json(path)?)
        .with_context(|| format!("{} is not an nvcim model description", path.display()))?;
    spec.validate()
        .with_context(|| format!("invalid model in {}", path.display()))?;
    Ok(spec)
}

/// Loads a checkpoint: a run directory written by `nvcim train` (its `best/backbone.bpk`), a
/// `best/` directory, or a backbone file inside one. The run's `config.json` (dataset,
/// normalization, method) must be beside `best/`, and its model must be the checkpoint's.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Loaded> {
    ensure!(
        path.exists(),
        "checkpoint {} does not exist",
        path.display()
    );
    let file = if path.is_dir() {
        let candidates = [path.join("best/backbone.bpk"), path.join("backbone.bpk")];
        candidates
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{} holds no best/backbone.bpk or backbone.bpk: not an nvcim run directory",
                    path.display()
                )
            })?
    } else {
        path.to_path_buf()
    };
    let best = file.parent().unwrap_or(Path::new("."));
    let run = best.parent().unwrap_or(Path::new("."));
    let spec_path = [best.join("model.json"), run.join("model.json")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no model.json beside {}", file.display()))?;
    let spec = read_spec(&spec_path)?;
    let config_path = run.join("config.json");
    let config = read_json(&config_path)
        .with_context(|| format!("checkpoint {}: its run's config.json", file.display()))?;
    let cfg_model: ModelSpec = serde_json::from_value(config["model"].clone())
        .with_context(|| format!("{} has no valid `model`", config_path.display()))?;
    ensure!(
        cfg_model == spec,
        "checkpoint {}: {} describes {:?} but {} describes {:?}: the files come from different runs",
        file.display(),
        spec_path.display(),
        spec,
        config_path.display(),
        cfg_model
    );
    let dataset: DatasetKind = serde_json::from_value(config["dataset"].clone())
        .with_context(|| format!("{} has no valid `dataset`", config_path.display()))?;
    let data_dir = config["data_dir"]
        .as_str()
        .map_or_else(|| dataset.default_dir(), PathBuf::from);
    let pad32 = config["pad32"].as_bool().unwrap_or(false);
    let preprocess = match config.get("preprocess") {
        None => Preprocess::Pad,
        Some(v) => serde_json::from_value(v.clone()).with_context(|| {
            format!(
                "{}: `preprocess` is {v}, expected \"pad\" or \"resize\"",
                config_path.display()
            )
        })?,
    };
    let backbone = load_backbone(&file, &spec, device)?;
    Ok(Loaded {
        path: file,
        backbone,
        spec,
        config,
        dataset,
        data_dir,
        pad32,
        preprocess,
    })
}

impl Loaded {
    /// Where a graph model came from (`config.json`'s `onnx`), `None` for VGG-8 / ResNet-18.
    pub fn onnx_source(&self) -> Option<crate::training::OnnxSource> {
        serde_json::from_value(self.config.get("onnx")?.clone()).ok()
    }

    /// The input normalization of the training data, one entry per input channel.
    pub fn normalization(&self) -> Normalization {
        if let Some(g) = &self.spec.graph {
            return Normalization {
                mean: g.mean.clone(),
                std: g.std.clone(),
            };
        }
        let (mean, std) = self.preprocess.normalization(self.dataset);
        let c = self.spec.in_channels;
        Normalization {
            mean: (0..c).map(|i| mean[i % mean.len()]).collect(),
            std: (0..c).map(|i| std[i % std.len()]).collect(),
        }
    }

    /// The training method, alpha, sigma (with its unit) and seed from `config.json`.
    pub fn provenance(&self) -> Provenance {
        let c = &self.config;
        let mut extra = BTreeMap::new();
        if let Some(s) = c["seed"].as_u64() {
            extra.insert("train_seed".into(), s.to_string());
        }
        if let Some(e) = c["epochs"].as_u64() {
            extra.insert("epochs".into(), e.to_string());
        }
        extra.insert("width".into(), self.spec.width.to_string());
        if self.pad32 {
            extra.insert("preprocess".into(), self.preprocess.name().to_string());
        }
        if let Some(src) = self.onnx_source() {
            if src.fit == crate::onnx::data::Fit::Resize {
                extra.insert("preprocess".into(), "resize".into());
            }
            if let Some(name) = src.file.file_name() {
                extra.insert("source".into(), name.to_string_lossy().into_owned());
            }
        }
        let unit = match c["variation"]["sigma_unit"].as_str() {
            Some("level") => Some(SigmaUnit::Level),
            Some("range") => Some(SigmaUnit::Range),
            _ => None,
        };
        let sigma = c["variation"]["sigma"].as_f64().map(|s| s as f32);
        Provenance {
            architecture: Some(format!("{:?}", self.spec.arch).to_lowercase()),
            dataset: Some(self.dataset.display_name().to_string()),
            method: c["method"].as_str().map(str::to_string),
            alpha: c["alpha"].as_f64().map(|a| a as f32),
            train_sigma: sigma.zip(unit),
            extra,
        }
    }

    /// The Burn-free network of the checkpoint.
    pub fn network(&self) -> Result<Network> {
        to_network(
            &self.backbone,
            &self.spec,
            self.normalization(),
            self.provenance(),
        )
    }

    /// The training and test sets (from `data_dir`, or the run's), padded as in training, checked
    /// against the model's input shape.
    pub fn data(&self, data_dir: Option<&Path>) -> Result<(Dataset, Dataset)> {
        let dir = data_dir.unwrap_or(&self.data_dir);
        let (train, test) = data::load_from(self.dataset, Some(dir))?;
        if let Some(src) = self.onnx_source() {
            return src.prepare(&self.spec, train, test, dir);
        }
        let pad = |d: Dataset| {
            if self.pad32 {
                self.preprocess.apply(d, 32)
            } else {
                Ok(d)
            }
        };
        let (train, test) = (pad(train)?, pad(test)?);
        ensure!(
            test.channels == self.spec.in_channels
                && test.height == self.spec.image_size
                && test.width == self.spec.image_size,
            "checkpoint {} expects {}x{}x{} images but {} in {} has {}x{}x{}",
            self.path.display(),
            self.spec.in_channels,
            self.spec.image_size,
            self.spec.image_size,
            self.dataset.display_name(),
            dir.display(),
            test.channels,
            test.height,
            test.width
        );
        Ok((train, test))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;
    use burn::module::Module;
    use burn::tensor::{Device, Distribution, Tensor};

    fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// A backbone whose BatchNorms hold non-trivial running statistics.
    fn trained_bn(arch: Arch, width: f64) -> (Backbone, ModelSpec) {
        let spec = ModelSpec {
            arch,
            width,
            in_channels: 3,
            image_size: 16,
            num_classes: 10,
            graph: None,
        };
        let ad = Device::flex().autodiff();
        ad.seed(5);
        let mut b = spec.init_backbone(&ad);
        for _ in 0..3 {
            let x = Tensor::<4>::random([8, 3, 16, 16], Distribution::Normal(0.5, 1.5), &ad);
            let _ = b.forward(x);
        }
        b.sync_running_stats();
        (b.valid(), spec)
    }

    #[test]
    fn burn_forward_equals_network_forward() {
        let _rng = crate::burn_rng_guard();
        for (arch, width) in [(Arch::Vgg8, 0.125), (Arch::Resnet18, 0.0625)] {
            let (b, spec) = trained_bn(arch, width);
            let net =
                to_network(&b, &spec, Normalization::identity(3), Provenance::default()).unwrap();
            let layers = b.weight_layers();
            let ir_layers = net.weight_layers();
            assert_eq!(ir_layers.len(), layers.len(), "{arch:?} layer count");
            for (a, l) in ir_layers.iter().zip(&layers) {
                assert_eq!(a.shape, l.shape, "{arch:?} {}", l.name);
            }
            assert_eq!(
                net.weights(),
                b.weights().iter().map(Vec::as_slice).collect::<Vec<_>>()
            );
            let dev = Device::flex();
            for batch in [1, 7] {
                let x = Tensor::<4>::random([batch, 3, 16, 16], Distribution::Default, &dev);
                let input = to_vec(x.clone());
                let want = to_vec(b.forward(x));
                let got = net.forward(&input, batch).unwrap();
                assert_eq!(want.len(), got.len());
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-4, "{arch:?} batch {batch}: max diff {diff}");
            }
        }
    }

    #[test]
    fn description_has_one_node_per_network_node() {
        let _rng = crate::burn_rng_guard();
        let (b, spec) = trained_bn(Arch::Resnet18, 0.0625);
        let net = to_network(&b, &spec, Normalization::identity(3), Provenance::default()).unwrap();
        let nodes = desc_nodes(&net).unwrap();
        assert_eq!(nodes.len(), net.nodes.len());
        let adds = nodes
            .iter()
            .filter(|n| matches!(n.layer, Layer::Add { .. }))
            .count();
        assert_eq!(adds, 8);
        let desc = model_desc(&net, &nodes);
        let img = vec![128u8; 3 * 16 * 16];
        let act = build::calibrate(&desc, &img).unwrap();
        assert_eq!(act.len(), nodes.len());
    }

    #[test]
    fn wrong_architecture_is_an_error() {
        let _rng = crate::burn_rng_guard();
        let (b, spec) = trained_bn(Arch::Vgg8, 0.125);
        let other = ModelSpec {
            arch: Arch::Resnet18,
            ..spec
        };
        let e = to_network(
            &b,
            &other,
            Normalization::identity(3),
            Provenance::default(),
        );
        assert!(e.is_err());
    }
}
