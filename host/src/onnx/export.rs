//! [`Network`] -> ONNX `ModelProto`, built from ONNX's generated protobuf types
//! (`tract_onnx::pb`, prost) and encoded by prost — never by hand.
//!
//! The graph: opset [`OPSET`] (IR version [`IR_VERSION`]), one input `input` of shape
//! `[batch, C, H, W]` (normalized pixels, see `nvcim.normalization.*` in the metadata) with the
//! named dynamic dimension `batch`, one output `logits` of shape `[batch, K]`. Nodes and
//! initializers are named after the IR nodes (`features.0.conv`, `features.0.conv.weight`), so
//! the backbone's layers are recognisable and exits cannot hide in it.
//!
//! Options ([`ExportOptions`]):
//! - **BatchNorm** kept as `BatchNormalization` nodes or folded into the conv weights and bias.
//! - **Noisy instance**: weights replaced by run `run` of seed `seed` of the variation model
//!   ([`Network::noisy_instance`]: `perturb_f32` from `stream(seed, run, l)` against the
//!   layer's own `max|W|`), before any folding — the logits of Monte Carlo run `run` of the
//!   float engine under `--seed seed`.
//! - **QDQ**: the M-bit weight quantization of `nvcim_shared::quant` as
//!   `QuantizeLinear`/`DequantizeLinear` pairs. A magnitude needs M bits *plus* a sign, which does
//!   not fit ONNX's int8 for M = 8; the exporter therefore writes what the hardware holds, a
//!   differential pair: the positive and the negative crossbar, each a non-negative `float`
//!   initializer quantized to `uint8` with scale `max|W| / (2^M - 1)` and zero point 0, and the
//!   weight is `DQ(Q(pos)) - DQ(Q(neg))`. The float initializers already hold shared's rounded
//!   magnitudes times the scale (rounding half away from zero, as `quant::quantize`), so ONNX's
//!   round-half-to-even never meets a tie and the dequantized weights equal
//!   `Quantized::dequantize` bit for bit. With BatchNorm folded, the dequantized weight is then
//!   multiplied by the per-output-channel BatchNorm factor (a `Mul` node).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use nvcim_shared::{
    quant::{QuantConfig, Quantized, quantize_layer},
    variation::VariationConfig,
};
use tract_onnx::pb::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
};

use crate::ir::{Network, Op, Value};

/// The ONNX operator set the exporter targets.
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;
/// Name of the graph input.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output.
pub const OUTPUT_NAME: &str = "logits";
/// Name of the dynamic batch dimension.
pub const BATCH_DIM: &str = "batch";

/// One sampled device instance: Monte Carlo run `run` under `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoisyInstance {
    /// The device model.
    pub variation: VariationConfig,
    /// The Monte Carlo seed (`nvcim eval --seed`).
    pub seed: u64,
    /// The Monte Carlo run index.
    pub run: u32,
}

/// How to export.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ExportOptions {
    /// Fold BatchNorm into the preceding conv instead of keeping `BatchNormalization` nodes.
    pub fold_batchnorm: bool,
    /// Express the weight quantization as QuantizeLinear/DequantizeLinear pairs.
    pub qdq: Option<QuantConfig>,
    /// Export one sampled perturbation instead of the trained weights.
    pub noisy: Option<NoisyInstance>,
}

/// Per weight layer: the quantized codes and the layer scale `max|W|`.
struct LayerQuant {
    codes: Vec<Quantized>,
    scale: f32,
}

/// Builds the `ModelProto` of `net` under `opts`.
pub fn to_model_proto(net: &Network, opts: &ExportOptions) -> Result<ModelProto> {
    net.shapes().context("invalid network")?;
    ensure!(
        !(opts.qdq.is_some() && opts.noisy.is_some()),
        "a noisy instance has no quantized weights: choose either QDQ or a noisy instance"
    );
    let mut net = match &opts.noisy {
        Some(n) => net
            .noisy_instance(&n.variation, n.seed, n.run)
            .context("sampling the noisy instance")?,
        None => net.clone(),
    };
    let quant = match opts.qdq {
        Some(cfg) => {
            let mut layers = Vec::new();
            let mut dequantized = Vec::new();
            for (l, w) in net.weights().iter().enumerate() {
                let mut codes = vec![Quantized::default(); w.len()];
                let scale = quantize_layer(w, None, cfg, &mut codes)
                    .with_context(|| format!("quantizing weight layer {l}"))?;
                dequantized.push(codes.iter().map(|q| q.dequantize(scale, cfg)).collect());
                layers.push(LayerQuant { codes, scale });
            }
            net.set_weights(dequantized)?;
            Some((cfg, layers))
        }
        None => None,
    };
    let (net, factors) = if opts.fold_batchnorm {
        net.fold_batchnorm_with_factors()?
    } else {
        let n = net.weight_layers().len();
        (net, vec![None; n])
    };

    let mut g = GraphBuilder::default();
    let [c, h, w] = net.input;
    g.graph.input.push(value_info(
        INPUT_NAME,
        &[Dim::Batch, Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)],
    ));
    g.graph.output.push(value_info(
        OUTPUT_NAME,
        &[Dim::Batch, Dim::Fixed(net.num_classes)],
    ));
    // Tensor name and rank of every IR value.
    let mut names: Vec<(String, usize)> = Vec::with_capacity(net.nodes.len());
    let last = net.nodes.len() - 1;
    let mut layer = 0usize;
    for (i, node) in net.nodes.iter().enumerate() {
        let input = |v: Value| -> (String, usize) {
            match v.producer() {
                None => (INPUT_NAME.to_string(), 4),
                Some(p) => names[p].clone(),
            }
        };
        let out = if i == last {
            OUTPUT_NAME.to_string()
        } else {
            node.name.clone()
        };
        let (x, rank) = input(node.inputs[0]);
        let name = &node.name;
        let out_rank = match &node.op {
            Op::Conv2d(conv) => {
                let shape = [
                    conv.out_channels,
                    conv.in_channels / conv.groups.max(1),
                    conv.kernel[0],
                    conv.kernel[1],
                ];
                let weight = g.weight(
                    name,
                    &shape,
                    &conv.weight,
                    quant.as_ref().map(|(cfg, q)| (*cfg, &q[layer])),
                    factors[layer].as_deref(),
                );
                layer += 1;
                let mut inputs = vec![x, weight];
                if let Some(b) = &conv.bias {
                    inputs.push(g.init_f32(&format!("{name}.bias"), &[b.len()], b));
                }
                g.node(
                    "Conv",
                    name,
                    inputs,
                    &out,
                    vec![
                        ints("kernel_shape", &conv.kernel.map(|k| k as i64)),
                        ints("strides", &conv.stride.map(|s| s as i64)),
                        ints("pads", &conv.padding.map(|p| p as i64)),
                        ints("dilations", &[1, 1]),
                        int("group", conv.groups as i64),
                    ],
                );
                4
            }
            Op::BatchNorm(bn) => {
                let n = bn.gamma.len();
                let mut inputs = vec![x];
                for (part, v) in [
                    ("scale", &bn.gamma),
                    ("bias", &bn.beta),
                    ("mean", &bn.mean),
                    ("var", &bn.var),
                ] {
                    inputs.push(g.init_f32(&format!("{name}.{part}"), &[n], v));
                }
                g.node(
                    "BatchNormalization",
                    name,
                    inputs,
                    &out,
                    vec![float("epsilon", bn.eps)],
                );
                rank
            }
            Op::Relu => {
                g.node("Relu", name, vec![x], &out, vec![]);
                rank
            }
            Op::Clip { min, max } => {
                let lo = g.init_f32(&format!("{name}.min"), &[], &[*min]);
                let hi = g.init_f32(&format!("{name}.max"), &[], &[*max]);
                g.node("Clip", name, vec![x, lo, hi], &out, vec![]);
                rank
            }
            Op::MaxPool(p) | Op::AvgPool(p) => {
                let mut attrs = vec![
                    ints("kernel_shape", &p.kernel.map(|k| k as i64)),
                    ints("strides", &p.stride.map(|s| s as i64)),
                    ints("pads", &p.padding.map(|v| v as i64)),
                ];
                let op = if matches!(node.op, Op::MaxPool(_)) {
                    "MaxPool"
                } else {
                    attrs.push(int("count_include_pad", i64::from(p.count_include_pad)));
                    "AveragePool"
                };
                g.node(op, name, vec![x], &out, attrs);
                4
            }
            Op::GlobalAvgPool => {
                g.node("GlobalAveragePool", name, vec![x], &out, vec![]);
                4
            }
            Op::Flatten => {
                g.node("Flatten", name, vec![x], &out, vec![int("axis", 1)]);
                2
            }
            Op::Linear(lin) => {
                // Gemm needs a matrix: flatten a [N, C, 1, 1] input first.
                let x = if rank == 4 {
                    let flat = format!("{name}.flatten");
                    g.node("Flatten", &flat, vec![x], &flat, vec![int("axis", 1)]);
                    flat
                } else {
                    x
                };
                let weight = g.weight(
                    name,
                    &[lin.out_features, lin.in_features],
                    &lin.weight,
                    quant.as_ref().map(|(cfg, q)| (*cfg, &q[layer])),
                    None,
                );
                layer += 1;
                let mut inputs = vec![x, weight];
                if let Some(b) = &lin.bias {
                    inputs.push(g.init_f32(&format!("{name}.bias"), &[b.len()], b));
                }
                g.node("Gemm", name, inputs, &out, vec![int("transB", 1)]);
                2
            }
            Op::Add => {
                let (y, _) = input(node.inputs[1]);
                g.node("Add", name, vec![x, y], &out, vec![]);
                rank
            }
            Op::Concat => {
                let (y, _) = input(node.inputs[1]);
                g.node("Concat", name, vec![x, y], &out, vec![int("axis", 1)]);
                rank
            }
        };
        names.push((out, out_rank));
    }
    g.graph.name = net
        .provenance
        .architecture
        .clone()
        .unwrap_or_else(|| "nvcim".to_string());

    let mut meta = net.provenance.pairs();
    let list = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
    meta.push(("nvcim.input_layout".into(), "NCHW".into()));
    meta.push((
        "nvcim.normalization.mean".into(),
        list(&net.normalization.mean),
    ));
    meta.push((
        "nvcim.normalization.std".into(),
        list(&net.normalization.std),
    ));
    meta.push((
        "nvcim.batchnorm".into(),
        if opts.fold_batchnorm {
            "folded"
        } else {
            "kept"
        }
        .into(),
    ));
    meta.push(("nvcim.weights".into(), weights_note(opts)));
    if let Some(n) = &opts.noisy {
        let v = &n.variation;
        meta.push(("nvcim.noise.sigma".into(), v.sigma().to_string()));
        meta.push(("nvcim.noise.sigma_unit".into(), v.unit().name().into()));
        meta.push(("nvcim.noise.seed".into(), n.seed.to_string()));
        meta.push(("nvcim.noise.run".into(), n.run.to_string()));
        meta.push(("nvcim.noise.profile".into(), format!("{:?}", v.profile())));
    }

    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "nvcim".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "nvcim backbone (training exits are not part of the graph)".into(),
        graph: Some(g.graph),
        metadata_props: meta
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect(),
        ..ModelProto::default()
    })
}

fn weights_note(opts: &ExportOptions) -> String {
    match (&opts.qdq, &opts.noisy) {
        (Some(q), _) => format!(
            "qdq: {}-bit magnitude per layer (max|W|), differential uint8 pair, {} devices of {} bits",
            q.m_bits(),
            q.slices(),
            q.n_bits()
        ),
        (None, Some(n)) => format!(
            "noisy instance: seed {} run {}, sigma {} ({})",
            n.seed,
            n.run,
            n.variation.sigma(),
            n.variation.unit().name()
        ),
        (None, None) => "trained".into(),
    }
}

/// Encodes `net` and writes it to `path` atomically (a temporary file in the same directory,
/// then a rename).
pub fn export(net: &Network, opts: &ExportOptions, path: &Path) -> Result<()> {
    let model = to_model_proto(net, opts)?;
    super::write_model(&model, path)
}

enum Dim {
    Batch,
    Fixed(usize),
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Batch => dimension::Value::DimParam(BATCH_DIM.into()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..AttributeProto::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..AttributeProto::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..AttributeProto::default()
    }
}

/// A float tensor stored little-endian in `raw_data`.
pub(crate) fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

#[derive(Default)]
struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        output: &str,
        attribute: Vec<AttributeProto>,
    ) {
        self.graph.node.push(NodeProto {
            input: inputs,
            output: vec![output.into()],
            name: name.into(),
            op_type: op.into(),
            attribute,
            ..NodeProto::default()
        });
    }

    fn init(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        self.graph.initializer.push(t);
        name
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.init(tensor_f32(name, dims, data))
    }

    /// The tensor holding layer `name`'s weight: a plain initializer, or the QDQ subgraph
    /// (times the folded BatchNorm factors, if any).
    fn weight(
        &mut self,
        name: &str,
        shape: &[usize],
        weight: &[f32],
        quant: Option<(QuantConfig, &LayerQuant)>,
        fold: Option<&[f64]>,
    ) -> String {
        let w = format!("{name}.weight");
        let Some((cfg, lq)) = quant else {
            return self.init_f32(&w, shape, weight);
        };
        let step = lq.scale / f32::from(cfg.max_magnitude());
        let scale = self.init_f32(&format!("{w}.scale"), &[], &[step]);
        let zero = self.init(TensorProto {
            name: format!("{w}.zero_point"),
            data_type: DataType::Uint8 as i32,
            raw_data: vec![0],
            ..TensorProto::default()
        });
        let mut sides = Vec::new();
        for (side, negative) in [("pos", false), ("neg", true)] {
            let data: Vec<f32> = lq
                .codes
                .iter()
                .map(|q| {
                    if q.negative == negative {
                        f32::from(q.magnitude) * step
                    } else {
                        0.0
                    }
                })
                .collect();
            let base = format!("{w}.{side}");
            let src = self.init_f32(&base, shape, &data);
            let q = format!("{base}.quantized");
            let dq = format!("{base}.dequantized");
            self.node(
                "QuantizeLinear",
                &q,
                vec![src, scale.clone(), zero.clone()],
                &q,
                vec![],
            );
            self.node(
                "DequantizeLinear",
                &dq,
                vec![q, scale.clone(), zero.clone()],
                &dq,
                vec![],
            );
            sides.push(dq);
        }
        let Some(factors) = fold else {
            self.node("Sub", &w, sides, &w, vec![]);
            return w;
        };
        let diff = format!("{w}.unfolded");
        self.node("Sub", &diff, sides, &diff, vec![]);
        let f: Vec<f32> = factors.iter().map(|&m| m as f32).collect();
        let mut dims = vec![f.len()];
        dims.extend(std::iter::repeat_n(1, shape.len() - 1));
        let factor = self.init_f32(&format!("{w}.bn_factor"), &dims, &f);
        self.node("Mul", &w, vec![diff, factor], &w, vec![]);
        w
    }
}
