//! The ONNX importer: a CNN file (as PyTorch's `torch.onnx.export` or nvcim's exporter writes
//! it) becomes an [`ir::Network`], so that the float engine, the integer CiM engine, `pack` and
//! the firmware run it like nvcim's own models.
//!
//! The graph is read node by node in the file's order (ONNX requires a topological order).
//! Every tensor is one of three things:
//! - an **activation**: a value of the IR graph, `[batch, C, H, W]` or `[batch, F]`;
//! - a **constant**: an initializer or a `Constant` node's value (weights, biases, bounds);
//! - a **shape**: integers computed from activations' shapes by `Shape`, `Gather`,
//!   `Unsqueeze`, `Concat`, `Cast`, in which the batch dimension stays symbolic.
//!
//! Shape arithmetic is folded away: `x.view(x.size(0), -1)`, which PyTorch's exporter writes as
//! `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`, becomes a `Flatten`. The nodes that
//! compute become IR nodes, in the file's order:
//!
//! | ONNX | IR |
//! |---|---|
//! | `Conv` (any kernel, strides, pads, `group`; dilation 1) | `Conv2d` |
//! | `BatchNormalization` (inference) | `BatchNorm` |
//! | `Relu`; `Clip` (bounds as inputs or attributes) | `Relu`; `Clip` (`Relu` when `[0, inf)`) |
//! | `MaxPool`, `AveragePool` (pads, `count_include_pad`; floor mode) | `MaxPool`, `AvgPool` |
//! | `GlobalAveragePool`; `ReduceMean` over H and W | `GlobalAvgPool` |
//! | `Add` of two activations | `Add` |
//! | `Add` of a stored bias to a `Gemm`/`MatMul`/`Conv` without one | the layer's bias |
//! | `Concat` of activations over channels | `Concat` (a chain, for more than two) |
//! | `Flatten` (axis 1), `Reshape` to `[batch, -1]`, `Squeeze` of a `1 x 1` map | `Flatten` |
//! | `Gemm`, `MatMul` with a stored 2-D weight | `Linear` (weight transposed to `[out][in]`) |
//! | `Dropout`, `Identity` | removed |
//! | a trailing `Softmax` / `LogSoftmax` | removed, and said so ([`Imported::notes`]) |
//!
//! **Weight layers** are the `Conv`, `Gemm` and `MatMul` nodes in file order: the contract's
//! layer index `l` is the same as [`crate::engine::onnx`]'s, so the float engine and the tract
//! engine perturb the same weights from the same streams.
//!
//! Anything else is refused with the node's name and op and the supported list. A weight that
//! is computed rather than stored, a dynamic channel or spatial dimension, a tensor read before
//! any node produced it (a cyclic or unsorted graph), an initializer whose declared size does not
//! match its data (checked before anything is allocated) are errors naming the node or tensor.

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, tensor_proto::DataType,
};

use super::ModelInfo;
use crate::ir::{
    self, BatchNorm, Conv2d, Linear, Network, Node, Normalization, Op, Pool, Provenance, Value,
};

/// The ops the importer turns into the IR (the shape-arithmetic ops included).
pub const SUPPORTED: &str = "Conv, BatchNormalization, Relu, Clip, MaxPool, AveragePool, \
     GlobalAveragePool, ReduceMean (over H and W), Add, Concat, Flatten, Reshape, Squeeze, Gemm, \
     MatMul, Dropout, Identity, a trailing Softmax/LogSoftmax, and for shape arithmetic Constant, \
     Shape, Gather, Unsqueeze, Cast";

/// Largest number of elements a constant may declare (2^28 `f32`, 1 GiB).
const MAX_ELEMENTS: u64 = 1 << 28;

/// An imported model.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The network; its normalization is the file's `nvcim.normalization.*` metadata, or the
    /// identity when [`Imported::has_normalization`] is false.
    pub network: Network,
    /// Whether the file records its input normalization (nvcim's metadata).
    pub has_normalization: bool,
    /// What the importer changed that a user should know (a dropped `Softmax`, ...).
    pub notes: Vec<String>,
    /// The trailing `Softmax` or `LogSoftmax` dropped from the file's output, if any: the
    /// file's outputs are that function of the network's logits.
    pub dropped_output: Option<String>,
}

/// A tensor of the ONNX graph as the importer sees it.
#[derive(Debug, Clone)]
enum Val {
    /// An IR value with its per-image shape and its ONNX rank (4, or 2 after a flatten).
    Act {
        v: Value,
        shape: ir::Shape,
        rank: usize,
    },
    /// A stored or constant float tensor.
    Float { dims: Vec<usize>, data: Vec<f32> },
    /// Integers; `None` is the symbolic batch size. `scalar` for a 0-D tensor.
    Ints { v: Vec<Option<i64>>, scalar: bool },
    /// Computed from constants only by an op the importer does not evaluate (e.g. a weight
    /// scaled by a `Mul`): an error wherever it is read, naming the node.
    Computed { node: String },
}

/// Imports `model` (read from `what`, named in errors).
pub fn import(model: &ModelProto, what: &str) -> Result<Imported> {
    let graph = model
        .graph
        .as_ref()
        .with_context(|| format!("{what} has no graph"))?;
    let info = ModelInfo::of(model, what).with_context(|| {
        format!(
            "{what}: nvcim needs one image input [batch, C, H, W] with C, H and W fixed (a \
             dynamic spatial dimension cannot be planned onto tiles; re-export with a fixed \
             input size)"
        )
    })?;
    let mut b = Builder {
        graph,
        vals: HashMap::new(),
        nodes: Vec::new(),
        readers: HashMap::new(),
        notes: Vec::new(),
        dropped_output: None,
    };
    for node in &graph.node {
        for i in &node.input {
            *b.readers.entry(i.as_str()).or_insert(0) += 1;
        }
    }
    for out in &graph.output {
        *b.readers.entry(out.name.as_str()).or_insert(0) += 1;
    }
    b.vals.insert(
        info.input.clone(),
        Val::Act {
            v: Value::INPUT,
            shape: info.image,
            rank: 4,
        },
    );
    for (i, node) in graph.node.iter().enumerate() {
        b.node(i, node)
            .with_context(|| format!("{what}: node {}", label(i, node)))?;
    }
    ensure!(
        graph.output.len() == 1,
        "{what}: the graph has {} outputs; nvcim needs one (the logits)",
        graph.output.len()
    );
    let out = &graph.output[0].name;
    let Some(Val::Act { v, shape, .. }) = b.vals.get(out.as_str()).cloned() else {
        bail!("{what}: the graph output `{out}` is not computed from the input image");
    };
    ensure!(
        shape[1] == 1 && shape[2] == 1,
        "{what}: the output `{out}` is {shape:?} per image; nvcim needs class logits [batch, K]"
    );
    ensure!(
        v.producer().map(|p| p + 1) == Some(b.nodes.len()),
        "{what}: nodes after the one computing the output `{out}` (dead branches) are not \
         supported"
    );
    let channels = info.image[0];
    let (normalization, has_normalization) = match file_normalization(model, channels)? {
        Some(n) => (n, true),
        None => (Normalization::identity(channels), false),
    };
    let meta = |k: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    let provenance = Provenance {
        architecture: meta("nvcim.architecture").or_else(|| Some("onnx".into())),
        dataset: meta("nvcim.dataset"),
        method: meta("nvcim.method"),
        alpha: meta("nvcim.alpha").and_then(|a| a.parse().ok()),
        ..Provenance::default()
    };
    let network = Network {
        input: info.image,
        num_classes: shape[0],
        normalization,
        provenance,
        nodes: b.nodes,
    };
    network
        .shapes()
        .with_context(|| format!("{what}: the imported graph"))?;
    Ok(Imported {
        network,
        has_normalization,
        notes: b.notes,
        dropped_output: b.dropped_output,
    })
}

/// The file's `nvcim.normalization.mean` / `.std` metadata, `None` when it has neither (a key
/// that is missing beside the other one is mean 0 or std 1 per channel).
pub fn file_normalization(model: &ModelProto, channels: usize) -> Result<Option<Normalization>> {
    let get = |key: &str| -> Result<Option<Vec<f32>>> {
        let Some(p) = model.metadata_props.iter().find(|p| p.key == key) else {
            return Ok(None);
        };
        let v: Vec<f32> = p
            .value
            .split(',')
            .map(|s| s.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("metadata {key} = `{}` is not a number list", p.value))?;
        ensure!(
            v.len() == channels,
            "metadata {key} has {} values for {channels} channels",
            v.len()
        );
        Ok(Some(v))
    };
    match (
        get("nvcim.normalization.mean")?,
        get("nvcim.normalization.std")?,
    ) {
        (None, None) => Ok(None),
        (mean, std) => Ok(Some(Normalization {
            mean: mean.unwrap_or_else(|| vec![0.0; channels]),
            std: std.unwrap_or_else(|| vec![1.0; channels]),
        })),
    }
}

fn label(i: usize, node: &NodeProto) -> String {
    if node.name.is_empty() {
        format!("#{i} ({})", node.op_type)
    } else {
        format!("`{}` ({})", node.name, node.op_type)
    }
}

struct Builder<'g> {
    graph: &'g GraphProto,
    vals: HashMap<String, Val>,
    nodes: Vec<Node>,
    /// How many nodes (and graph outputs) read each tensor.
    readers: HashMap<&'g str, usize>,
    notes: Vec<String>,
    dropped_output: Option<String>,
}

impl<'g> Builder<'g> {
    /// The tensor `name`: a value computed before, or an initializer.
    fn get(&self, name: &str) -> Result<Val> {
        if let Some(v) = self.vals.get(name) {
            return Ok(v.clone());
        }
        if let Some(t) = self.graph.initializer.iter().find(|t| t.name == name) {
            return constant(t);
        }
        bail!(
            "reads `{name}`, which no node before it produces and no initializer holds (the \
             graph is cyclic, not in topological order, or truncated)"
        )
    }

    /// Input `k` of `node` as an activation.
    fn act(&self, node: &NodeProto, k: usize) -> Result<(Value, ir::Shape, usize)> {
        let name = node
            .input
            .get(k)
            .filter(|n| !n.is_empty())
            .with_context(|| format!("has no input {k}"))?;
        match self.get(name)? {
            Val::Act { v, shape, rank } => Ok((v, shape, rank)),
            Val::Computed { node } => bail!(
                "input `{name}` is computed by node {node}, which is not supported (supported: \
                 {SUPPORTED})"
            ),
            _ => bail!("input `{name}` is a constant where nvcim expects an activation"),
        }
    }

    /// Input `k` of `node` as a stored float tensor (`what` says which, for messages).
    fn weight(&self, node: &NodeProto, k: usize, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let name = node
            .input
            .get(k)
            .filter(|n| !n.is_empty())
            .with_context(|| format!("has no {what} input"))?;
        match self.get(name)? {
            Val::Float { dims, data } => Ok((dims, data)),
            Val::Ints { .. } => bail!("the {what} `{name}` is an integer tensor"),
            Val::Computed { node } => bail!(
                "the {what} `{name}` is computed by node {node}, not stored: nvcim programs \
                 stored weights onto the tiles; export the model with its weights as \
                 initializers (fold the computation into them)"
            ),
            Val::Act { .. } => bail!(
                "the {what} `{name}` is computed by the graph, not stored (e.g. a \
                 DequantizeLinear or a Mul of an initializer): nvcim programs stored weights \
                 onto the tiles; export the model with its weights as initializers"
            ),
        }
    }

    /// Optional input `k` as a stored float tensor.
    fn opt_weight(&self, node: &NodeProto, k: usize, what: &str) -> Result<Option<Vec<f32>>> {
        match node.input.get(k) {
            Some(n) if !n.is_empty() => Ok(Some(self.weight(node, k, what)?.1)),
            _ => Ok(None),
        }
    }

    /// Input `k` as integers (a constant or folded shape arithmetic).
    fn ints(&self, node: &NodeProto, k: usize) -> Result<(Vec<Option<i64>>, bool)> {
        let name = node
            .input
            .get(k)
            .filter(|n| !n.is_empty())
            .with_context(|| format!("has no input {k}"))?;
        match self.get(name)? {
            Val::Ints { v, scalar } => Ok((v, scalar)),
            Val::Float { data, dims } => Ok((
                data.iter().map(|&f| Some(f as i64)).collect(),
                dims.is_empty(),
            )),
            Val::Act { .. } => bail!(
                "input `{name}` depends on the image's values, not only on shapes; nvcim folds \
                 shape arithmetic only"
            ),
            Val::Computed { node } => {
                bail!("input `{name}` is computed by node {node}, which nvcim does not evaluate")
            }
        }
    }

    fn push(&mut self, node: &NodeProto, i: usize, op: Op, inputs: Vec<Value>) -> Value {
        let name = if node.name.is_empty() {
            format!("{}_{i}", node.op_type)
        } else {
            node.name.clone()
        };
        let name = if self.nodes.iter().any(|n| n.name == name) {
            format!("{name}#{i}")
        } else {
            name
        };
        self.nodes.push(Node { name, op, inputs });
        Value::node(self.nodes.len() - 1)
    }

    fn set(&mut self, node: &NodeProto, val: Val) -> Result<()> {
        let out = node.output.first().context("has no output")?;
        for extra in node.output.iter().skip(1) {
            ensure!(
                extra.is_empty() || self.readers.get(extra.as_str()).copied().unwrap_or(0) == 0,
                "its second output `{extra}` is used, which nvcim does not support"
            );
        }
        ensure!(
            !self.vals.contains_key(out.as_str()),
            "writes `{out}`, which another node already produced"
        );
        self.vals.insert(out.clone(), val);
        Ok(())
    }

    fn set_act(&mut self, node: &NodeProto, v: Value, shape: ir::Shape, rank: usize) -> Result<()> {
        self.set(node, Val::Act { v, shape, rank })
    }

    fn node(&mut self, i: usize, node: &NodeProto) -> Result<()> {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            bail!(
                "op {}::{} is not supported (supported: {SUPPORTED})",
                node.domain,
                node.op_type
            );
        }
        let a = Attrs(&node.attribute);
        match node.op_type.as_str() {
            "Constant" => {
                let val = if let Some(t) = a.get("value").and_then(|a| a.t.as_ref()) {
                    constant(t)?
                } else if let Some(x) = a.get("value_float") {
                    Val::Float {
                        dims: vec![],
                        data: vec![x.f],
                    }
                } else if let Some(x) = a.get("value_floats") {
                    Val::Float {
                        dims: vec![x.floats.len()],
                        data: x.floats.clone(),
                    }
                } else if let Some(x) = a.get("value_int") {
                    Val::Ints {
                        v: vec![Some(x.i)],
                        scalar: true,
                    }
                } else if let Some(x) = a.get("value_ints") {
                    Val::Ints {
                        v: x.ints.iter().map(|&v| Some(v)).collect(),
                        scalar: false,
                    }
                } else {
                    bail!("a Constant without a value, value_float(s) or value_int(s)")
                };
                self.set(node, val)
            }
            "Identity" | "Dropout" => {
                let name = node.input.first().context("has no input")?;
                let val = self.get(name)?;
                self.set(node, val)
            }
            "Conv" => self.conv(i, node, &a),
            "BatchNormalization" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(
                    a.int("training_mode", 0) == 0,
                    "training_mode = 1 (export the model in eval mode)"
                );
                let c = shape[0];
                let mut p = Vec::new();
                for (k, what) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "var")] {
                    let (_, v) = self.weight(node, k, what)?;
                    ensure!(
                        v.len() == c,
                        "its {what} has {} values for {c} channels",
                        v.len()
                    );
                    p.push(v);
                }
                let var = p.pop().expect("four");
                let mean = p.pop().expect("three");
                let beta = p.pop().expect("two");
                let gamma = p.pop().expect("one");
                let bn = BatchNorm {
                    gamma,
                    beta,
                    mean,
                    var,
                    eps: a.float("epsilon", 1e-5),
                };
                let y = self.push(node, i, Op::BatchNorm(bn), vec![x]);
                self.set_act(node, y, shape, rank)
            }
            "Relu" => {
                let (x, shape, rank) = self.act(node, 0)?;
                let y = self.push(node, i, Op::Relu, vec![x]);
                self.set_act(node, y, shape, rank)
            }
            "Clip" => {
                let (x, shape, rank) = self.act(node, 0)?;
                let bound = |k: usize, attr: &str, default: f32| -> Result<f32> {
                    match node.input.get(k).filter(|n| !n.is_empty()) {
                        Some(_) => {
                            let (_, v) = self.weight(node, k, "bound")?;
                            ensure!(v.len() == 1, "a Clip bound must be a scalar");
                            Ok(v[0])
                        }
                        None => Ok(a.float(attr, default)),
                    }
                };
                let (min, max) = (
                    bound(1, "min", f32::NEG_INFINITY)?,
                    bound(2, "max", f32::INFINITY)?,
                );
                ensure!(
                    !min.is_nan() && !max.is_nan() && min <= max,
                    "Clip bounds [{min}, {max}] are not an interval"
                );
                let op = if min == 0.0 && max == f32::INFINITY {
                    Op::Relu
                } else {
                    Op::Clip { min, max }
                };
                let y = self.push(node, i, op, vec![x]);
                self.set_act(node, y, shape, rank)
            }
            "MaxPool" | "AveragePool" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(rank == 4, "pooling a [batch, features] tensor");
                let kernel = pair(&a.ints("kernel_shape"), "kernel_shape")?;
                let stride = a.pair_or("strides", [1, 1])?;
                ensure!(
                    a.ints("dilations").iter().all(|&d| d == 1),
                    "dilations {:?} (only 1 is supported)",
                    a.ints("dilations")
                );
                let padding = pads(&a, kernel, stride, [shape[1], shape[2]])?;
                let pool = Pool {
                    kernel,
                    stride,
                    padding,
                    count_include_pad: a.int("count_include_pad", 0) != 0,
                };
                let (oh, ow) = pool
                    .out_hw(shape[1], shape[2])
                    .context("the window does not fit its input")?;
                if a.int("ceil_mode", 0) != 0 {
                    let ceil = |n: usize, k: usize, s: usize, p: usize| (n + p - k).div_ceil(s) + 1;
                    ensure!(
                        ceil(shape[1], kernel[0], stride[0], padding[0] + padding[2]) == oh
                            && ceil(shape[2], kernel[1], stride[1], padding[1] + padding[3]) == ow,
                        "ceil_mode = 1 changes the output size here; only floor mode is \
                         supported (re-export with ceil_mode=False)"
                    );
                }
                let op = if node.op_type == "MaxPool" {
                    Op::MaxPool(pool)
                } else {
                    Op::AvgPool(pool)
                };
                let y = self.push(node, i, op, vec![x]);
                self.set_act(node, y, [shape[0], oh, ow], 4)
            }
            "GlobalAveragePool" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(rank == 4, "pooling a [batch, features] tensor");
                let y = self.push(node, i, Op::GlobalAvgPool, vec![x]);
                self.set_act(node, y, [shape[0], 1, 1], 4)
            }
            "ReduceMean" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(rank == 4, "ReduceMean of a [batch, features] tensor");
                let axes: Vec<i64> = match node.input.get(1).filter(|n| !n.is_empty()) {
                    Some(_) => self
                        .ints(node, 1)?
                        .0
                        .into_iter()
                        .map(|v| v.context("symbolic axes"))
                        .collect::<Result<_>>()?,
                    None => a.ints("axes"),
                };
                let mut axes: Vec<i64> = axes
                    .iter()
                    .map(|&v| if v < 0 { v + 4 } else { v })
                    .collect();
                axes.sort_unstable();
                ensure!(
                    axes == [2, 3],
                    "ReduceMean over axes {axes:?}; only the mean over H and W (axes 2, 3) is \
                     supported"
                );
                let y = self.push(node, i, Op::GlobalAvgPool, vec![x]);
                let rank = if a.int("keepdims", 1) != 0 { 4 } else { 2 };
                self.set_act(node, y, [shape[0], 1, 1], rank)
            }
            "Add" => self.add(i, node),
            "Concat" => self.concat(i, node, &a),
            "Flatten" => {
                let (x, shape, rank) = self.act(node, 0)?;
                let axis = a.int("axis", 1);
                ensure!(
                    axis == 1 || axis == -(rank as i64) + 1,
                    "Flatten with axis {axis}; only axis 1 (keep the batch) is supported"
                );
                self.flatten(i, node, x, shape, rank)
            }
            "Squeeze" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(
                    rank == 4 && shape[1] == 1 && shape[2] == 1,
                    "Squeeze of a {shape:?} map; only a 1 x 1 map is squeezed to [batch, C]"
                );
                self.set_act(node, x, shape, 2)
            }
            "Reshape" => {
                let (x, shape, rank) = self.act(node, 0)?;
                let (target, _) = self.ints(node, 1)?;
                let per: i64 = shape.iter().product::<usize>() as i64;
                let dims: Vec<Option<i64>> = target;
                let batch_ok = matches!(dims.first(), Some(None) | Some(Some(0)) | Some(Some(-1)));
                let rest: Vec<Option<i64>> = dims.iter().skip(1).copied().collect();
                let flat = dims.len() == 2
                    && batch_ok
                    && match rest[0] {
                        Some(-1) => dims[0] != Some(-1),
                        Some(v) => v == per,
                        None => false,
                    };
                if flat {
                    return self.flatten(i, node, x, shape, rank);
                }
                let same = dims.len() == 4
                    && batch_ok
                    && rest.iter().zip(shape).all(|(d, s)| *d == Some(s as i64));
                ensure!(
                    same,
                    "Reshape of a {shape:?} map to {dims:?} (None: the batch); only a flatten to \
                     [batch, {per}] is supported"
                );
                self.set_act(node, x, shape, rank)
            }
            "Gemm" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(a.int("transA", 0) == 0, "transA = 1");
                ensure!(
                    rank == 2 || (shape[1] == 1 && shape[2] == 1),
                    "Gemm on a {shape:?} map; flatten it first"
                );
                let (dims, w) = self.weight(node, 1, "weight")?;
                ensure!(dims.len() == 2, "the weight has shape {dims:?}");
                let trans_b = a.int("transB", 0) != 0;
                let (out, inn) = if trans_b {
                    (dims[0], dims[1])
                } else {
                    (dims[1], dims[0])
                };
                let alpha = a.float("alpha", 1.0);
                let beta = a.float("beta", 1.0);
                let mut weight = if trans_b {
                    w
                } else {
                    transpose(&w, dims[0], dims[1])
                };
                if alpha != 1.0 {
                    weight.iter_mut().for_each(|v| *v *= alpha);
                }
                let bias = match self.opt_weight(node, 2, "bias")? {
                    None => None,
                    Some(c) if c.len() == out => Some(c.iter().map(|v| v * beta).collect()),
                    Some(c) if c.len() == 1 => Some(vec![c[0] * beta; out]),
                    Some(c) => bail!("its bias has {} values for {out} outputs", c.len()),
                };
                self.linear(i, node, x, shape, inn, out, weight, bias)
            }
            "MatMul" => {
                let (x, shape, rank) = self.act(node, 0)?;
                ensure!(
                    rank == 2 || (shape[1] == 1 && shape[2] == 1),
                    "MatMul on a {shape:?} map; flatten it first"
                );
                let (dims, w) = self.weight(node, 1, "weight")?;
                ensure!(
                    dims.len() == 2,
                    "the weight has shape {dims:?}; only 2-D weights are supported"
                );
                let weight = transpose(&w, dims[0], dims[1]);
                self.linear(i, node, x, shape, dims[0], dims[1], weight, None)
            }
            "Softmax" | "LogSoftmax" => {
                let (x, shape, rank) = self.act(node, 0)?;
                let out = node.output.first().context("has no output")?;
                let is_output = self.graph.output.iter().any(|o| &o.name == out)
                    && self.readers.get(out.as_str()).copied().unwrap_or(0) == 1;
                ensure!(
                    is_output,
                    "a {} inside the network is not supported (only a trailing one, which \
                     classification drops)",
                    node.op_type
                );
                self.notes.push(format!(
                    "the trailing {} `{}` was dropped: accuracy takes the arg-max of the logits, \
                     which it does not change",
                    node.op_type, node.name
                ));
                self.dropped_output = Some(node.op_type.clone());
                self.set_act(node, x, shape, rank)
            }
            "Shape" => {
                let name = node.input.first().context("has no input")?;
                let dims: Vec<Option<i64>> = match self.get(name)? {
                    Val::Act { shape, rank, .. } => {
                        let mut d = vec![None];
                        if rank == 4 {
                            d.extend(shape.iter().map(|&s| Some(s as i64)));
                        } else {
                            d.push(Some(shape.iter().product::<usize>() as i64));
                        }
                        d
                    }
                    Val::Float { dims, .. } => dims.iter().map(|&d| Some(d as i64)).collect(),
                    Val::Ints { v, scalar } => {
                        if scalar {
                            vec![]
                        } else {
                            vec![Some(v.len() as i64)]
                        }
                    }
                    Val::Computed { node } => {
                        bail!(
                            "the shape of a tensor computed by node {node}, which is not supported"
                        )
                    }
                };
                let n = dims.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + n } else { v }).clamp(0, n) as usize;
                let start = clamp(a.int("start", 0));
                let end = clamp(a.int("end", n));
                let v = dims.get(start..end.max(start)).unwrap_or(&[]).to_vec();
                self.set(node, Val::Ints { v, scalar: false })
            }
            "Gather" => {
                let (data, _) = self.ints(node, 0)?;
                let (idx, scalar) = self.ints(node, 1)?;
                ensure!(a.int("axis", 0) == 0, "Gather of a shape along axis != 0");
                let n = data.len() as i64;
                let v = idx
                    .iter()
                    .map(|i| {
                        let i = i.context("a symbolic index")?;
                        let i = if i < 0 { i + n } else { i };
                        data.get(usize::try_from(i).unwrap_or(usize::MAX))
                            .copied()
                            .with_context(|| format!("index {i} out of {n}"))
                    })
                    .collect::<Result<_>>()?;
                self.set(node, Val::Ints { v, scalar })
            }
            "Unsqueeze" => {
                let (v, scalar) = self.ints(node, 0)?;
                ensure!(scalar, "Unsqueeze of a shape vector (only of a scalar)");
                self.set(node, Val::Ints { v, scalar: false })
            }
            "Cast" => {
                let name = node.input.first().context("has no input")?;
                let val = match self.get(name)? {
                    v @ Val::Ints { .. } => v,
                    _ => bail!("Cast of a tensor that is not shape arithmetic"),
                };
                self.set(node, val)
            }
            other => {
                // An op of constants only may compute a weight: say so where it is read.
                let on_constants = !node.input.is_empty()
                    && node.input.iter().filter(|n| !n.is_empty()).all(|n| {
                        self.get(n)
                            .is_ok_and(|v| matches!(v, Val::Float { .. } | Val::Ints { .. }))
                    });
                ensure!(
                    on_constants,
                    "op {other} is not supported (supported: {SUPPORTED})"
                );
                let what = label(i, node);
                for out in &node.output {
                    self.vals
                        .insert(out.clone(), Val::Computed { node: what.clone() });
                }
                Ok(())
            }
        }
    }

    fn conv(&mut self, i: usize, node: &NodeProto, a: &Attrs<'_>) -> Result<()> {
        let (x, shape, rank) = self.act(node, 0)?;
        ensure!(rank == 4, "a Conv of a [batch, features] tensor");
        let (dims, weight) = self.weight(node, 1, "weight")?;
        ensure!(
            dims.len() == 4,
            "the weight has shape {dims:?}; only 2-D convolutions ([out, in/group, kh, kw]) are \
             supported"
        );
        let groups = usize::try_from(a.int("group", 1)).unwrap_or(0);
        let kernel = [dims[2], dims[3]];
        if let Some(k) = a.get("kernel_shape") {
            ensure!(
                k.ints.iter().map(|&v| v as usize).eq(kernel),
                "kernel_shape {:?} differs from the weight's {kernel:?}",
                k.ints
            );
        }
        ensure!(
            a.ints("dilations").iter().all(|&d| d == 1),
            "dilations {:?} (only 1 is supported)",
            a.ints("dilations")
        );
        ensure!(
            groups > 0 && shape[0] % groups == 0 && dims[0] % groups == 0,
            "group {groups} does not divide {} input and {} output channels",
            shape[0],
            dims[0]
        );
        ensure!(
            dims[1] * groups == shape[0],
            "the weight takes {} channels per group x {groups} groups; the input has {}",
            dims[1],
            shape[0]
        );
        let stride = a.pair_or("strides", [1, 1])?;
        let padding = pads(a, kernel, stride, [shape[1], shape[2]])?;
        let bias = self.opt_weight(node, 2, "bias")?;
        if let Some(b) = &bias {
            ensure!(
                b.len() == dims[0],
                "its bias has {} values for {} outputs",
                b.len(),
                dims[0]
            );
        }
        let conv = Conv2d {
            out_channels: dims[0],
            in_channels: shape[0],
            kernel,
            stride,
            padding,
            groups,
            weight,
            bias,
        };
        let (oh, ow) = ir::window_out(shape[1], shape[2], kernel, stride, padding)
            .context("the kernel does not fit its padded input")?;
        let out = [dims[0], oh, ow];
        let y = self.push(node, i, Op::Conv2d(conv), vec![x]);
        self.set_act(node, y, out, 4)
    }

    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        i: usize,
        node: &NodeProto,
        x: Value,
        shape: ir::Shape,
        inn: usize,
        out: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<()> {
        ensure!(
            shape[0] == inn,
            "the weight takes {inn} features; the input has {}",
            shape[0]
        );
        let lin = Linear {
            out_features: out,
            in_features: inn,
            weight,
            bias,
        };
        let y = self.push(node, i, Op::Linear(lin), vec![x]);
        self.set_act(node, y, [out, 1, 1], 2)
    }

    fn flatten(
        &mut self,
        i: usize,
        node: &NodeProto,
        x: Value,
        shape: ir::Shape,
        rank: usize,
    ) -> Result<()> {
        let flat = [shape.iter().product(), 1, 1];
        if rank == 2 || (shape[1] == 1 && shape[2] == 1) {
            // Already one value per channel: the IR's `[C, 1, 1]` is `[C]`.
            return self.set_act(node, x, flat, 2);
        }
        let y = self.push(node, i, Op::Flatten, vec![x]);
        self.set_act(node, y, flat, 2)
    }

    fn add(&mut self, i: usize, node: &NodeProto) -> Result<()> {
        ensure!(
            node.input.len() == 2,
            "Add with {} inputs",
            node.input.len()
        );
        let vals = [self.get(&node.input[0])?, self.get(&node.input[1])?];
        match vals {
            [
                Val::Act { v: x, shape, rank },
                Val::Act {
                    v: y, shape: s2, ..
                },
            ] => {
                ensure!(shape == s2, "adds {shape:?} and {s2:?}");
                let z = self.push(node, i, Op::Add, vec![x, y]);
                self.set_act(node, z, shape, rank)
            }
            [Val::Act { v, shape, rank }, Val::Float { data, .. }]
            | [Val::Float { data, .. }, Val::Act { v, shape, rank }] => {
                // A bias: the only reader of a weight layer without one.
                let p = v.producer();
                let src = p.map(|p| &self.nodes[p]);
                let sole = p.is_some_and(|p| {
                    p + 1 == self.nodes.len()
                        && self.readers_of_value(v) == 1
                        && src.is_some_and(|n| {
                            matches!(&n.op, Op::Linear(l) if l.bias.is_none())
                                || matches!(&n.op, Op::Conv2d(c) if c.bias.is_none())
                        })
                });
                let c = shape[0];
                ensure!(
                    sole && (data.len() == c || data.len() == 1),
                    "an Add of a constant to `{}` that is not the bias of the Gemm, MatMul or \
                     Conv right before it (nvcim folds only such biases)",
                    node.input[0]
                );
                let bias = if data.len() == 1 {
                    vec![data[0]; c]
                } else {
                    data
                };
                let p = p.expect("checked");
                match &mut self.nodes[p].op {
                    Op::Linear(l) => l.bias = Some(bias),
                    Op::Conv2d(cv) => cv.bias = Some(bias),
                    _ => unreachable!("checked above"),
                }
                self.set_act(node, v, shape, rank)
            }
            [Val::Computed { node: n }, _] | [_, Val::Computed { node: n }] => {
                bail!("adds a tensor computed by node {n}, which is not supported")
            }
            _ => bail!("an Add of two constants or of shape arithmetic is not supported"),
        }
    }

    /// How many nodes read IR value `v` through any ONNX tensor that holds it.
    fn readers_of_value(&self, v: Value) -> usize {
        self.vals
            .iter()
            .filter(|(_, val)| matches!(val, Val::Act { v: w, .. } if *w == v))
            .map(|(name, _)| self.readers.get(name.as_str()).copied().unwrap_or(0))
            .sum()
    }

    fn concat(&mut self, i: usize, node: &NodeProto, a: &Attrs<'_>) -> Result<()> {
        let vals: Vec<Val> = node
            .input
            .iter()
            .map(|n| self.get(n))
            .collect::<Result<_>>()?;
        if vals.iter().all(|v| !matches!(v, Val::Act { .. })) {
            // Shape arithmetic: concatenate integer vectors.
            let mut v = Vec::new();
            for k in 0..node.input.len() {
                v.extend(self.ints(node, k)?.0);
            }
            return self.set(node, Val::Ints { v, scalar: false });
        }
        let mut acts = Vec::new();
        for (k, val) in vals.into_iter().enumerate() {
            let Val::Act { v, shape, rank } = val else {
                bail!(
                    "concatenates the constant `{}` with activations",
                    node.input[k]
                );
            };
            acts.push((v, shape, rank));
        }
        let rank = acts[0].2;
        let axis = a.int("axis", 1);
        ensure!(
            acts.iter().all(|x| x.2 == rank) && (axis == 1 || axis == 1 - rank as i64),
            "Concat along axis {axis}; only channels (axis 1) are supported"
        );
        let (mut x, mut shape) = (acts[0].0, acts[0].1);
        for &(y, s2, _) in &acts[1..] {
            ensure!(
                (shape[1], shape[2]) == (s2[1], s2[2]),
                "concatenates {shape:?} and {s2:?} (heights and widths differ)"
            );
            x = self.push(node, i, Op::Concat, vec![x, y]);
            shape = [shape[0] + s2[0], shape[1], shape[2]];
        }
        self.set_act(node, x, shape, rank)
    }
}

/// A stored tensor as a [`Val`]: float data or integers, its declared size checked against its
/// data before anything is allocated.
fn constant(t: &TensorProto) -> Result<Val> {
    let name = &t.name;
    ensure!(
        t.external_data.is_empty(),
        "tensor `{name}` is stored as external data, which is not supported (save the model \
         with its weights inside the file)"
    );
    let mut n: u64 = 1;
    for &d in &t.dims {
        ensure!(d >= 0, "tensor `{name}` declares a negative dimension {d}");
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= MAX_ELEMENTS)
            .with_context(|| {
                format!(
                    "tensor `{name}` declares dimensions {:?}, more than {MAX_ELEMENTS} elements \
                     (a corrupt file?)",
                    t.dims
                )
            })?;
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n = n as usize;
    let scalar = t.dims.is_empty();
    let check = |have: usize, what: &str| {
        ensure!(
            have == n,
            "tensor `{name}` declares {n} elements ({:?}) but holds {have} ({what}): the file \
             is truncated or corrupt",
            t.dims
        );
        Ok(())
    };
    let dt = t.data_type;
    if dt == DataType::Float as i32 {
        let data = if t.raw_data.is_empty() {
            check(t.float_data.len(), "float_data")?;
            t.float_data.clone()
        } else {
            ensure!(
                t.raw_data.len().is_multiple_of(4),
                "tensor `{name}` has {} raw bytes, not a whole number of floats",
                t.raw_data.len()
            );
            check(t.raw_data.len() / 4, "raw_data")?;
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        return Ok(Val::Float { dims, data });
    }
    let ints: Vec<i64> = if dt == DataType::Int64 as i32 {
        if t.raw_data.is_empty() {
            check(t.int64_data.len(), "int64_data")?;
            t.int64_data.clone()
        } else {
            check(t.raw_data.len() / 8, "raw_data")?;
            t.raw_data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        }
    } else if dt == DataType::Int32 as i32 {
        if t.raw_data.is_empty() {
            check(t.int32_data.len(), "int32_data")?;
            t.int32_data.iter().map(|&v| i64::from(v)).collect()
        } else {
            check(t.raw_data.len() / 4, "raw_data")?;
            t.raw_data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))))
                .collect()
        }
    } else {
        bail!(
            "tensor `{name}` has data type {dt}; nvcim reads float32 weights and int32/int64 \
             shapes"
        );
    };
    Ok(Val::Ints {
        v: ints.into_iter().map(Some).collect(),
        scalar,
    })
}

/// `[rows][cols]` -> `[cols][rows]`.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn pair(v: &[i64], what: &str) -> Result<[usize; 2]> {
    match v {
        [a, b] if *a > 0 && *b > 0 => Ok([*a as usize, *b as usize]),
        _ => bail!("{what} = {v:?}; expected two positive values"),
    }
}

/// The padding `[top, left, bottom, right]` of a window op (`pads`, or `auto_pad`).
fn pads(
    a: &Attrs<'_>,
    kernel: [usize; 2],
    stride: [usize; 2],
    hw: [usize; 2],
) -> Result<[usize; 4]> {
    let auto = a
        .get("auto_pad")
        .map(|x| String::from_utf8_lossy(&x.s).into_owned())
        .unwrap_or_default();
    match auto.as_str() {
        "" | "NOTSET" => {
            let p = a.ints("pads");
            match p.as_slice() {
                [] => Ok([0; 4]),
                [t, l, b, r] if p.iter().all(|&v| v >= 0) => {
                    Ok([*t as usize, *l as usize, *b as usize, *r as usize])
                }
                _ => bail!("pads = {p:?}; expected four non-negative values"),
            }
        }
        "VALID" => Ok([0; 4]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut out = [0; 4];
            for d in 0..2 {
                let o = hw[d].div_ceil(stride[d]);
                let total = ((o - 1) * stride[d] + kernel[d]).saturating_sub(hw[d]);
                let (small, big) = (total / 2, total - total / 2);
                let (begin, end) = if auto == "SAME_UPPER" {
                    (small, big)
                } else {
                    (big, small)
                };
                out[d] = begin;
                out[d + 2] = end;
            }
            Ok(out)
        }
        other => bail!("auto_pad = {other}"),
    }
}

/// A node's attributes.
struct Attrs<'a>(&'a [AttributeProto]);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }

    fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        self.get(name).map(|a| a.ints.clone()).unwrap_or_default()
    }

    fn pair_or(&self, name: &str, default: [usize; 2]) -> Result<[usize; 2]> {
        match self.get(name) {
            None => Ok(default),
            Some(a) => pair(&a.ints, name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_splits_like_onnx() {
        let attrs = [AttributeProto {
            name: "auto_pad".into(),
            s: b"SAME_UPPER".to_vec(),
            ..AttributeProto::default()
        }];
        // 5 wide, kernel 4, stride 2: output 3, total padding (3-1)*2+4-5 = 3: 1 before, 2 after.
        assert_eq!(
            pads(&Attrs(&attrs), [4, 4], [2, 2], [5, 5]).unwrap(),
            [1, 1, 2, 2]
        );
    }

    #[test]
    fn huge_declared_tensors_are_refused_before_allocating() {
        let t = TensorProto {
            name: "w".into(),
            dims: vec![1_000_000, 1_000_000],
            data_type: DataType::Float as i32,
            raw_data: vec![0; 16],
            ..TensorProto::default()
        };
        let err = format!("{:#}", constant(&t).unwrap_err());
        assert!(err.contains("`w`") && err.contains("elements"), "{err}");
        let t = TensorProto {
            dims: vec![3],
            raw_data: vec![0; 8],
            ..t
        };
        let err = format!("{:#}", constant(&t).unwrap_err());
        assert!(err.contains("truncated"), "{err}");
    }
}
