//! Checkpoints of VGG-8 and ResNet-18 written before the generic network: their parameters are
//! named after the hand-written modules (`Vgg8.blocks.0.conv.weight`,
//! `Resnet18.stages.1.0.shortcut.bn.gamma`); [`load`] maps those names onto the graph network's
//! (`layers.0.Conv.weight`) and loads the file as it is. The values, their order and their
//! layouts are the same: the graph builders emit the old modules' layers in their order.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::Device;

use super::graph::GraphOp;
use super::{Arch, Backbone, ModelSpec, TrainModel};

/// Each parameterized node of `spec`'s graph as (its old module path without the variant, its
/// layer index, the graph layer's variant name), in layer order.
pub fn layer_names(spec: &ModelSpec) -> Vec<(String, usize, &'static str)> {
    let graph = spec.graph();
    let mut out = Vec::new();
    let params = graph.nodes.iter().filter_map(|n| {
        let variant = match n.op {
            GraphOp::Conv { .. } => "Conv",
            GraphOp::BatchNorm { .. } => "Bn",
            GraphOp::Linear { .. } => "Linear",
            _ => return None,
        };
        Some((n.name.as_str(), variant))
    });
    for (k, (name, variant)) in params.enumerate() {
        let old = match spec.arch {
            Arch::Vgg8 => name.replacen("features.", "blocks.", 1),
            Arch::Resnet18 => match name.strip_prefix("layer") {
                Some(rest) => {
                    let (stage, tail) = rest.split_once('.').unwrap_or((rest, ""));
                    let s: usize = stage.parse().unwrap_or(1);
                    format!("stages.{}.{tail}", s.saturating_sub(1))
                }
                None => name.to_string(),
            },
            Arch::Graph => name.to_string(),
        };
        out.push((old, k, variant));
    }
    out
}

/// The old modules' enum variant in a saved backbone's paths.
fn variant(arch: Arch) -> &'static str {
    match arch {
        Arch::Vgg8 => "Vgg8",
        Arch::Resnet18 => "Resnet18",
        Arch::Graph => "Graph",
    }
}

/// Whether the backbone (or training checkpoint) file at `path` was written by the
/// hand-written modules.
pub fn is_legacy(path: &Path) -> bool {
    let Ok(reader) = burn::store::burn_pack::Reader::from_file(path) else {
        return false;
    };
    let Ok(tensors) = reader.into_tensors() else {
        return false;
    };
    tensors.iter().any(|t| {
        let name = t.name.strip_prefix("backbone.").unwrap_or(&t.name);
        name.starts_with("Vgg8.") || name.starts_with("Resnet18.")
    })
}

/// Loads an old VGG-8 / ResNet-18 backbone file into the graph network of `spec`.
pub fn load(path: &Path, spec: &ModelSpec, device: &Device) -> Result<Backbone> {
    let mut backbone = apply(spec.init_backbone(device), path, spec, "")?;
    backbone.sync_running_stats();
    Ok(backbone)
}

/// Loads an old training checkpoint (`checkpoint/model.bpk`: backbone and exits, parameter ids
/// kept, so the optimizer's state, keyed by them, still applies) into `model`.
pub fn load_train_model(path: &Path, spec: &ModelSpec, model: TrainModel) -> Result<TrainModel> {
    let mut model = apply(model, path, spec, "backbone.")?;
    model.backbone.sync_running_stats();
    Ok(model)
}

/// `module` with the tensors of the old file at `path`, whose backbone paths start with
/// `prefix` + the old variant.
fn apply<M: ModuleSnapshot>(
    mut module: M,
    path: &Path,
    spec: &ModelSpec,
    prefix: &str,
) -> Result<M> {
    let mut store = BurnpackStore::from_file(path);
    let v = variant(spec.arch);
    let p = regex_escape(prefix);
    for (old, k, layer) in layer_names(spec) {
        let from = format!("^{p}{v}\\.{}\\.", regex_escape(&old));
        store = store.with_remap_pattern(from, format!("{prefix}layers.{k}.{layer}."));
    }
    let result = module
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("reading {} (an earlier nvcim's checkpoint)", path.display()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() || !result.unused.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
        bail!(
            "{} was written by an earlier nvcim for another network: missing {missing:?}, \
             unused {:?}, errors {:?}",
            path.display(),
            result.unused,
            result.errors
        );
    }
    Ok(module)
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}
