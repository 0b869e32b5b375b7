//! Monte Carlo evaluation of an external ONNX CNN under the variation model, through tract.
//!
//! The weight layers of a foreign model are its `Conv`, `Gemm` and `MatMul` nodes whose weight
//! is an initializer, indexed `l = 0, 1, ...` in the file's node order (for a model exported by
//! nvcim that is the contract's forward order). Run `r` under `seed` perturbs layer `l` with
//! `VariationConfig::perturb_f32` from `rng::stream(seed, r, l)`, visiting the weights in
//! canonical `[out][in]...` order and quantizing against the layer's own `max|W|`:
//! - `Conv` weight (input 1): `[out][in/group][kh][kw]`, already canonical;
//! - `Gemm` weight (input 1): `[out][in]` when `transB = 1`, else `[in][out]` and visited
//!   transposed;
//! - `MatMul` weight (input 1, 2-D): `[in][out]`, visited transposed.
//!
//! On a file exported by nvcim with BatchNorm *kept*, these layers and streams are exactly the
//! float engine's; with BatchNorm folded, the perturbed weights are the folded ones (another
//! `max|W|` per layer), which is what a deployment stack holding that file would program.
//!
//! Ops whose weights the model cannot perturb (`ConvTranspose`, quantized or integer convs and
//! matmuls, recurrent layers, `Einsum`, control flow) are rejected by name, as is a weight that
//! is computed rather than stored (e.g. the output of a `DequantizeLinear`).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use nvcim_shared::{quant::layer_scale, rng::stream, variation::VariationConfig};
use tract_onnx::pb::{ModelProto, TensorProto, tensor_proto::DataType};

use crate::onnx::{ModelInfo, import::transpose, read_model, run::TractRunner};

use super::NoisyClassifier;
pub use super::argmax;
pub use crate::onnx::check::accuracy;

/// Ops that carry weights this evaluator cannot perturb.
const UNSUPPORTED: &[&str] = &[
    "ConvTranspose",
    "ConvInteger",
    "QLinearConv",
    "MatMulInteger",
    "QLinearMatMul",
    "LSTM",
    "GRU",
    "RNN",
    "Einsum",
    "If",
    "Loop",
    "Scan",
];

/// Images evaluated per tract call.
const BATCH: usize = 64;

/// How a layer's stored weights map to canonical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignLayer {
    /// The node's name (or `op #index` when unnamed).
    pub node: String,
    /// `Conv`, `Gemm` or `MatMul`.
    pub op: String,
    /// The initializer holding the weight.
    pub initializer: String,
    /// The stored shape.
    pub dims: Vec<usize>,
    /// True when stored `[in][out]` (visited transposed).
    pub transposed: bool,
}

/// Finds the weight layers of a model (see the module docs).
pub fn weight_layers(model: &ModelProto, what: &str) -> Result<Vec<ForeignLayer>> {
    let graph = model
        .graph
        .as_ref()
        .with_context(|| format!("{what} has no graph"))?;
    let mut layers = Vec::new();
    for (i, node) in graph.node.iter().enumerate() {
        let label = if node.name.is_empty() {
            format!("{} #{i}", node.op_type)
        } else {
            format!("`{}`", node.name)
        };
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            bail!(
                "{what}: node {label} uses op {}::{}, which nvcim cannot evaluate",
                node.domain,
                node.op_type
            );
        }
        if UNSUPPORTED.contains(&node.op_type.as_str()) {
            bail!(
                "{what}: node {label} is a {}, which nvcim cannot perturb (supported weight ops: \
                 Conv, Gemm, MatMul)",
                node.op_type
            );
        }
        if !matches!(node.op_type.as_str(), "Conv" | "Gemm" | "MatMul") {
            continue;
        }
        let wname = node.input.get(1).with_context(|| {
            format!("{what}: {} node {label} has no weight input", node.op_type)
        })?;
        let Some(init) = graph.initializer.iter().find(|t| &t.name == wname) else {
            bail!(
                "{what}: the weight `{wname}` of {} node {label} is not an initializer (computed \
                 weights, e.g. from DequantizeLinear, cannot be perturbed)",
                node.op_type
            );
        };
        if let Some(other) = layers
            .iter()
            .find(|l: &&ForeignLayer| l.initializer == *wname)
        {
            bail!(
                "{what}: the weight `{wname}` is shared by {} and {label}; shared weights cannot \
                 be perturbed per layer",
                other.node
            );
        }
        let dims: Vec<usize> = init.dims.iter().map(|&d| d.max(0) as usize).collect();
        let transposed = match node.op_type.as_str() {
            "Conv" => {
                ensure!(
                    dims.len() >= 3,
                    "{what}: Conv {label} weight has shape {dims:?}"
                );
                false
            }
            "Gemm" => {
                ensure!(
                    dims.len() == 2,
                    "{what}: Gemm {label} weight has shape {dims:?}"
                );
                let trans_b = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "transB")
                    .map_or(0, |a| a.i);
                trans_b == 0
            }
            _ => {
                ensure!(
                    dims.len() == 2,
                    "{what}: MatMul {label} has a {}-D weight; only 2-D weights are supported",
                    dims.len()
                );
                true
            }
        };
        layers.push(ForeignLayer {
            node: label,
            op: node.op_type.clone(),
            initializer: wname.clone(),
            dims,
            transposed,
        });
    }
    ensure!(
        !layers.is_empty(),
        "{what}: no Conv, Gemm or MatMul node with an initializer weight"
    );
    Ok(layers)
}

/// The float data of an initializer (raw little-endian or `float_data`).
fn read_f32(t: &TensorProto, what: &str) -> Result<Vec<f32>> {
    ensure!(
        t.data_type == DataType::Float as i32,
        "{what}: weight `{}` is not float32 (data type {})",
        t.name,
        t.data_type
    );
    ensure!(
        t.external_data.is_empty(),
        "{what}: weight `{}` is stored as external data, which is not supported",
        t.name
    );
    let n: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
    let data: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    ensure!(
        data.len() == n,
        "{what}: weight `{}` has {} values for shape {:?}",
        t.name,
        data.len(),
        t.dims
    );
    Ok(data)
}

/// The model of Monte Carlo run `run`: every weight layer perturbed per the contract.
pub fn perturbed_model(
    model: &ModelProto,
    layers: &[ForeignLayer],
    cfg: &VariationConfig,
    seed: u64,
    run: u32,
    what: &str,
) -> Result<ModelProto> {
    let mut noisy = model.clone();
    let graph = noisy.graph.as_mut().expect("checked by weight_layers");
    for (l, layer) in layers.iter().enumerate() {
        let t = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == layer.initializer)
            .expect("found by weight_layers");
        let stored = read_f32(t, what)?;
        let (rows, cols) = (layer.dims[0], layer.dims[1]);
        // Canonical [out][in] order: stored [in][out] (rows = in) is transposed.
        let canonical = if layer.transposed {
            transpose(&stored, rows, cols)
        } else {
            stored
        };
        let scale = layer_scale(&canonical)
            .with_context(|| format!("{what}: scale of layer {l} ({})", layer.node))?;
        let mut out = vec![0.0; canonical.len()];
        cfg.perturb_f32(
            &canonical,
            scale,
            &mut stream(seed, run, l as u32),
            &mut out,
        )
        .with_context(|| format!("{what}: perturbing layer {l} ({})", layer.node))?;
        let back = if layer.transposed {
            transpose(&out, cols, rows)
        } else {
            out
        };
        t.float_data.clear();
        t.raw_data = back.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    Ok(noisy)
}

/// Runs `runner` over all images in batches of `BATCH`.
pub fn logits_of(runner: &mut TractRunner, images: &[f32], n: usize) -> Result<Vec<f32>> {
    let per = images.len() / n.max(1);
    let mut out = Vec::new();
    for start in (0..n).step_by(BATCH) {
        let b = BATCH.min(n - start);
        out.extend(runner.run(&images[start * per..(start + b) * per], b)?);
    }
    Ok(out)
}

/// Monte Carlo evaluation of the ONNX CNN at `path`: for runs `0..runs`, the accuracy on
/// `images` (flat NCHW `f32`, already normalized as the model expects, shape taken from the
/// model's input) against `labels`, with the model's Conv/Gemm/MatMul weights perturbed by
/// `cfg` from the streams of `seed` (see the module docs).
pub fn onnx_mc(
    path: &Path,
    images: &[f32],
    labels: &[u32],
    cfg: &VariationConfig,
    seed: u64,
    runs: u32,
) -> Result<Vec<f32>> {
    let what = path.display().to_string();
    let model = crate::onnx::read_model(path)?;
    let info = ModelInfo::of(&model, &what)?;
    let per: usize = info.image.iter().product();
    ensure!(
        !labels.is_empty() && images.len() == labels.len() * per,
        "{what}: {} labels and {} image values; the model takes images of {:?}",
        labels.len(),
        images.len(),
        info.image
    );
    let layers = weight_layers(&model, &what)?;
    let mut accuracies = Vec::with_capacity(runs as usize);
    for run in 0..runs {
        let noisy = perturbed_model(&model, &layers, cfg, seed, run, &what)?;
        let mut runner = TractRunner::from_proto(&noisy, &what)?;
        let logits = logits_of(&mut runner, images, labels.len())?;
        accuracies.push(accuracy(&logits, labels));
    }
    Ok(accuracies)
}

/// An external ONNX model whose Conv/Gemm/MatMul weights are perturbed per run.
pub struct OnnxEngine {
    model: ModelProto,
    layers: Vec<ForeignLayer>,
    what: String,
    recal: Option<OnnxRecal>,
}

/// BatchNorm recalibration of an ONNX model (`--bn-recalibrate`): its `BatchNormalization`
/// nodes in file order and the normalized recalibration images.
struct OnnxRecal {
    nodes: Vec<OnnxBn>,
    images: Vec<f32>,
    n: usize,
}

/// A `BatchNormalization` node: the tensor it normalizes and its statistics' initializers.
struct OnnxBn {
    input: String,
    mean: String,
    var: String,
}

fn set_f32(model: &mut ModelProto, name: &str, values: &[f32]) {
    let graph = model.graph.as_mut().expect("checked by weight_layers");
    if let Some(t) = graph.initializer.iter_mut().find(|t| t.name == name) {
        t.float_data.clear();
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
}

/// Normalized test images (flat NCHW) and their labels.
pub struct OnnxData {
    /// Normalized images, flat NCHW.
    pub images: Vec<f32>,
    /// Their labels.
    pub labels: Vec<u32>,
}

impl OnnxEngine {
    /// Reads `path` and finds its weight layers (an op it cannot perturb is named in the error).
    pub fn new(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let model = read_model(path)?;
        let layers = weight_layers(&model, &what)?;
        Ok(OnnxEngine {
            model,
            layers,
            what,
            recal: None,
        })
    }

    /// The engine with every run's BatchNorm statistics re-estimated on `n` normalized
    /// recalibration images (flat NCHW) through its perturbed weights, node by node in file
    /// order (the file's order is topological): each node's input is computed by tract with
    /// the statistics of the nodes before it already replaced. Mean and biased variance per
    /// channel over the images and pixels, as the float engine's recalibration.
    pub fn with_recalibration(mut self, images: Vec<f32>, n: usize) -> Result<Self> {
        let graph = self.model.graph.as_ref().expect("checked by weight_layers");
        let mut nodes = Vec::new();
        for node in graph
            .node
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
        {
            ensure!(
                node.input.len() == 5,
                "{}: BatchNormalization `{}` has {} inputs, expected 5",
                self.what,
                node.name,
                node.input.len()
            );
            for init in &node.input[3..5] {
                let t = graph
                    .initializer
                    .iter()
                    .find(|t| &t.name == init)
                    .with_context(|| {
                        format!(
                            "{}: BatchNormalization `{}`'s statistic `{init}` is computed, not \
                             stored: it cannot be recalibrated",
                            self.what, node.name
                        )
                    })?;
                read_f32(t, &self.what)?;
            }
            nodes.push(OnnxBn {
                input: node.input[0].clone(),
                mean: node.input[3].clone(),
                var: node.input[4].clone(),
            });
        }
        ensure!(
            !nodes.is_empty(),
            "--bn-recalibrate: {} has no BatchNormalization node (exported with BatchNorm \
             folded, or a network without it): there are no statistics to recalibrate; leave \
             the flag out",
            self.what
        );
        ensure!(n > 0, "--bn-recalibrate must be at least 1 image");
        self.recal = Some(OnnxRecal { nodes, images, n });
        Ok(self)
    }

    /// `model` with its BatchNorm statistics recalibrated (see [`Self::with_recalibration`]).
    fn recalibrate(&self, mut model: ModelProto, r: &OnnxRecal) -> Result<ModelProto> {
        for bn in &r.nodes {
            let mut probe = model.clone();
            let graph = probe.graph.as_mut().expect("checked by weight_layers");
            graph.output = vec![tract_onnx::pb::ValueInfoProto {
                name: bn.input.clone(),
                ..Default::default()
            }];
            let what = format!(
                "{} (the input of BatchNorm statistic `{}`)",
                self.what, bn.mean
            );
            let mut runner = TractRunner::from_proto(&probe, &what)?;
            let x = logits_of(&mut runner, &r.images, r.n)?;
            let graph = model.graph.as_ref().expect("checked by weight_layers");
            let channels = graph
                .initializer
                .iter()
                .find(|t| t.name == bn.mean)
                .map_or(0, |t| t.dims.iter().map(|&d| d.max(0) as usize).product());
            ensure!(
                channels > 0 && x.len() % (r.n * channels) == 0,
                "{what}: {} values for {} images of {channels} channels",
                x.len(),
                r.n
            );
            let (mean, var) = super::channel_stats(&x, channels, x.len() / (r.n * channels));
            set_f32(&mut model, &bn.mean, &mean);
            set_f32(&mut model, &bn.var, &var);
        }
        Ok(model)
    }

    /// The model as read.
    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    /// The file the model was read from, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    fn count(&self, model: &ModelProto, data: &OnnxData) -> Result<usize> {
        let mut runner = TractRunner::from_proto(model, &self.what)?;
        let logits = logits_of(&mut runner, &data.images, data.labels.len())?;
        let classes = logits.len() / data.labels.len().max(1);
        ensure!(classes > 0, "{}: no logits", self.what);
        Ok(logits
            .chunks(classes)
            .zip(&data.labels)
            .filter(|&(row, &y)| argmax(row) == y as usize)
            .count())
    }
}

impl NoisyClassifier for OnnxEngine {
    type Data = OnnxData;

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn num_examples(&self, data: &OnnxData) -> usize {
        data.labels.len()
    }

    fn clean(&self, data: &OnnxData) -> Result<usize> {
        self.count(&self.model, data)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, data: &OnnxData) -> Result<usize> {
        let mut noisy = perturbed_model(&self.model, &self.layers, var, seed, run, &self.what)?;
        if let Some(r) = &self.recal {
            noisy = self
                .recalibrate(noisy, r)
                .context("recalibrating BatchNorm")?;
        }
        self.count(&noisy, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_round_trips() {
        let a: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t = transpose(&a, 2, 3);
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&t, 3, 2), a);
    }
}
