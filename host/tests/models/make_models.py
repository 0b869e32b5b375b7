"""Write small ONNX test models shaped like what people deploy on microcontrollers.

Each graph is laid out exactly as PyTorch's legacy exporter writes it (``torch.onnx.export``,
opset 17, eval mode, ``dynamic_axes={"input": {0: "batch"}, ...}``): node names such as
``/layer1/layer1.0/conv1/Conv``, outputs ``<node name>_output_0``, attributes in sorted order,
BatchNorm folded into ``onnx::Conv_<n>`` initializers unless the model keeps it, ReLU6 as
``Clip`` fed by two ``Constant`` nodes, ``x.view(x.size(0), -1)`` as
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``. They are built with the ``onnx`` helper API
alone (no torch). Weights come from ``numpy.random.default_rng(seed)`` with a fixed seed per
model, He-scaled (BatchNorm statistics non-trivial, var > 0), so every run writes the same bytes.

Models (input ``input`` ``[batch, C, H, W]`` float32, output ``logits`` ``[batch, 10]``):

- ``resnet8.onnx``   MLPerf Tiny image-classification ResNet-8 (3x32x32): stem conv 16, three
  residual stages 16/32/64 (identity shortcut, then 1x1 stride-2 conv shortcuts), BN folded,
  AveragePool 8, Flatten, Gemm.
- ``dscnn.onnx``     MLPerf Tiny keyword-spotting DS-CNN (1x49x10): conv 64 10x4 stride 2 with
  asymmetric pads [4,1,5,2], three depthwise-separable blocks, BatchNormalization nodes kept
  (epsilon 1e-3), AveragePool over the whole 25x5 map, Flatten, Gemm.
- ``mobilenet.onnx`` MobileNetV1 x0.25-style (3x32x32): ReLU6 as Clip(Constant 0, Constant 6),
  depthwise-separable blocks with stride-2 depthwise convs, an AveragePool 3/2 pad 1 with
  count_include_pad=0, GlobalAveragePool, the view() flatten, Identity (where dropout was), Gemm.
- ``fire.onnx``      SqueezeNet-style (1x28x28): conv + MaxPool 3/2 pad 1, two fire modules
  (squeeze 1x1, expand 1x1 and 3x3, Concat on channels), a conv 1x1 classifier to 10 + Relu,
  GlobalAveragePool, Flatten: the last weight layer is a conv.
- ``viewnet.onnx``   plain CNN (1x28x28): conv 5x5, MaxPool, grouped conv (group 2), AveragePool,
  the view() flatten (Unsqueeze axes as an initializer), Linear as MatMul [in, out] + Add,
  Relu, Gemm, and a trailing Softmax; its output is named ``probs``.

``--bad KIND OUT`` writes one malformed model to the file OUT (or OUT/bad-KIND.onnx if OUT is a
directory), for error-path tests:

- ``unsupported``     a valid model with an ``LRN`` node in the middle.
- ``dynamic``         the fire model with symbolic H and W (``height``, ``width``).
- ``computed-weight`` a Conv whose weight is ``Mul(initializer, Constant 2.0)``, not an initializer.
- ``huge``            a Gemm weight declaring dims [1000000, 1000000] with 16 bytes of raw_data
                      (saved without checking: intentionally broken).
- ``cyclic``          an Add and a Relu reading each other's outputs (saved without checking).
- ``noconv``          a valid MLP (Flatten, Gemm, Relu, Gemm): nothing for the trainer's exits.
- ``truncated``       the bytes of resnet8.onnx cut in half.

The first three pass the checker and run in ONNX Runtime; the last three are not checked.

Usage: ``python make_models.py OUT_DIR`` or ``python make_models.py --bad KIND OUT``.
Every good model is reloaded, checked with ``onnx.checker.check_model(full_check=True)`` and run
in ONNX Runtime on a random batch of 2; any failure exits non-zero.
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = np.float32


class Builder:
    """Accumulates nodes and initializers, naming them the way PyTorch's exporter does."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.seen = [], [], {}
        self.next_id = 100  # torch numbers anonymous values (onnx::Conv_123) by graph value id

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def anon(self, op, arr):
        name = f"onnx::{op}_{self.next_id}"
        self.next_id += 1
        return self.init(name, arr)

    def node(self, op, inputs, scope="", out=None, **attrs):
        base = f"{scope}/{op}"
        k = self.seen.get(base, 0)
        self.seen[base] = k + 1
        name = base if k == 0 else f"{base}_{k}"
        out = out or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def const(self, value, dtype, scope=""):
        return self.node("Constant", [], scope, value=numpy_helper.from_array(np.array(value, dtype)))

    def he(self, shape, fan_in):
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(F32)

    def bn_params(self, c):
        gamma = self.rng.uniform(0.7, 1.3, c)
        beta = self.rng.normal(0.1, 0.1, c)
        mean = self.rng.normal(0.0, 0.2, c)
        var = self.rng.uniform(0.5, 1.5, c)
        return [a.astype(F32) for a in (gamma, beta, mean, var)]

    def conv(self, x, scope, cin, cout, k, stride=1, pad=0, group=1, name=None, bias=True,
             fold_bn=False):
        """Conv2d. ``name`` = module path for 'name.weight' initializers; ``fold_bn`` makes
        onnx::Conv_<n> weight and bias with a random eval-mode BatchNorm folded in."""
        kh, kw = (k, k) if isinstance(k, int) else k
        pads = [pad] * 4 if isinstance(pad, int) else list(pad)
        w = self.he((cout, cin // group, kh, kw), cin // group * kh * kw)
        if fold_bn:
            gamma, beta, mean, var = self.bn_params(cout)
            s = gamma / np.sqrt(var + 1e-5)
            ins = [x, self.anon("Conv", (w * s[:, None, None, None]).astype(F32)),
                   self.anon("Conv", (beta - mean * s).astype(F32))]
        else:
            ins = [x, self.init(f"{name}.weight", w)]
            if bias:
                ins.append(self.init(f"{name}.bias", self.rng.normal(0.0, 0.05, cout).astype(F32)))
        return self.node("Conv", ins, scope, dilations=[1, 1], group=group, kernel_shape=[kh, kw],
                         pads=pads, strides=[stride, stride])

    def bn(self, x, scope, name, c):
        ins = [self.init(f"{name}.{p}", a) for p, a in
               zip(("weight", "bias", "running_mean", "running_var"), self.bn_params(c))]
        return self.node("BatchNormalization", [x] + ins, scope, epsilon=1e-3, momentum=0.9,
                         training_mode=0)

    def relu6(self, x, scope):
        lo, hi = self.const(0.0, F32, scope), self.const(6.0, F32, scope)
        return self.node("Clip", [x, lo, hi], scope)

    def pool(self, op, x, scope, k, stride, pad=0, **extra):
        return self.node(op, [x], scope, ceil_mode=0, kernel_shape=list(k), pads=[pad] * 4,
                         strides=[stride] * 2 if isinstance(stride, int) else list(stride), **extra)

    def view_flatten(self, x, axes_init=False):
        """``x.view(x.size(0), -1)``: Shape -> Gather(0) -> Unsqueeze([0]) -> Concat([-1]) -> Reshape."""
        shape = self.node("Shape", [x])
        n = self.node("Gather", [shape, self.const(0, np.int64)], axis=0)
        axes = self.anon("Unsqueeze", np.array([0], np.int64)) if axes_init else \
            self.const([0], np.int64)
        n = self.node("Unsqueeze", [n, axes])
        target = self.node("Concat", [n, self.const([-1], np.int64)], axis=0)
        return self.node("Reshape", [x, target], allowzero=0)

    def gemm(self, x, scope, name, cin, cout, out=None):
        w = self.init(f"{name}.weight", self.he((cout, cin), cin))
        b = self.init(f"{name}.bias", self.rng.normal(0.0, 0.05, cout).astype(F32))
        return self.node("Gemm", [x, w, b], scope, out, alpha=1.0, beta=1.0, transB=1)

    def model(self, chw, out_name="logits", dims=None):
        dims = dims or ["batch", *chw]
        graph = helper.make_graph(
            self.nodes, "main_graph",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 10])],
            initializer=self.inits)
        m = helper.make_model(graph, producer_name="pytorch", producer_version="2.1.0",
                              opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8  # what torch 2.x writes with opset 17
        return m


def resnet8():
    b = Builder(seed=8)
    x = b.node("Relu", [b.conv("input", "/conv1", 3, 16, 3, pad=1, fold_bn=True)], "/relu")
    cin = 16
    for stage, cout in enumerate((16, 32, 64), start=1):
        s, stride = f"/layer{stage}/layer{stage}.0", 1 if stage == 1 else 2
        y = b.conv(x, f"{s}/conv1", cin, cout, 3, stride, 1, fold_bn=True)
        y = b.node("Relu", [y], f"{s}/relu")
        y = b.conv(y, f"{s}/conv2", cout, cout, 3, 1, 1, fold_bn=True)
        short = x if stage == 1 else \
            b.conv(x, f"{s}/downsample/downsample.0", cin, cout, 1, 2, 0, fold_bn=True)
        x = b.node("Relu", [b.node("Add", [y, short], s)], f"{s}/relu_1")  # relu reused
        cin = cout
    x = b.node("Flatten", [b.pool("AveragePool", x, "/avgpool", (8, 8), 8)], axis=1)
    b.gemm(x, "/fc", "fc", 64, 10, "logits")
    return b.model((3, 32, 32))


def conv_out(n, k, stride, pad_begin, pad_end):
    return (n + pad_begin + pad_end - k) // stride + 1


def dscnn():
    b = Builder(seed=2)
    h, w = conv_out(49, 10, 2, 4, 5), conv_out(10, 4, 2, 1, 2)  # 25 x 5
    x = b.conv("input", "/features/features.0", 1, 64, (10, 4), 2, [4, 1, 5, 2], name="features.0")
    x = b.bn(x, "/features/features.1", "features.1", 64)
    x = b.node("Relu", [x], "/features/features.2")
    i = 3
    for _ in range(3):
        for group, k, pad in ((64, 3, 1), (1, 1, 0)):  # depthwise 3x3, then pointwise 1x1
            x = b.conv(x, f"/features/features.{i}", 64, 64, k, 1, pad, group,
                       name=f"features.{i}", bias=False)
            x = b.bn(x, f"/features/features.{i + 1}", f"features.{i + 1}", 64)
            x = b.node("Relu", [x], f"/features/features.{i + 2}")
            i += 3
    x = b.node("Flatten", [b.pool("AveragePool", x, "/avgpool", (h, w), (h, w))], axis=1)
    b.gemm(x, "/fc", "fc", 64, 10, "logits")
    return b.model((1, 49, 10))


def mobilenet():
    b = Builder(seed=3)

    def conv_bn(x, i, cin, cout, k, stride, group):
        s = f"/features/features.{i}/features.{i}"
        x = b.conv(x, f"{s}.0", cin, cout, k, stride, k // 2, group, fold_bn=True)
        return b.relu6(x, f"{s}.2")

    x = conv_bn("input", 0, 3, 8, 3, 2, 1)  # 16x16
    i = 1
    for cin, cout, stride in ((8, 16, 1), (16, 32, 2), (32, 32, 1), (None, 0, 0), (32, 64, 2)):
        if cin is None:  # 8x8 -> 4x4, padded average excluding the pad from the divisor
            x = b.pool("AveragePool", x, f"/features/features.{i}", (3, 3), 2, 1, count_include_pad=0)
        else:  # depthwise-separable: dw 3x3 (group = C) + ReLU6, pw 1x1 + ReLU6
            s = f"/features/features.{i}/features.{i}"
            x = b.relu6(b.conv(x, f"{s}.0", cin, cin, 3, stride, 1, cin, fold_bn=True), f"{s}.2")
            x = b.relu6(b.conv(x, f"{s}.3", cin, cout, 1, 1, 0, fold_bn=True), f"{s}.5")
        i += 1
    x = b.view_flatten(b.node("GlobalAveragePool", [x], "/avgpool"))
    x = b.node("Identity", [x], "/classifier/classifier.0")  # Dropout(0.2), gone in eval mode
    b.gemm(x, "/classifier/classifier.1", "classifier.1", 64, 10, "logits")
    return b.model((3, 32, 32))


def fire(dims=None):
    b = Builder(seed=4)
    x = b.conv("input", "/features/features.0", 1, 16, 3, 1, 1, name="features.0")
    x = b.node("Relu", [x], "/features/features.1")
    x = b.pool("MaxPool", x, "/features/features.2", (3, 3), 2, 1)  # 14x14
    for i, (cin, sq, ex) in ((3, (16, 8, 16)), (5, (32, 12, 24))):
        s, n = f"/features/features.{i}", f"features.{i}"
        q = b.node("Relu", [b.conv(x, f"{s}/squeeze", cin, sq, 1, name=f"{n}.squeeze")],
                   f"{s}/squeeze_activation")
        e1 = b.node("Relu", [b.conv(q, f"{s}/expand1x1", sq, ex, 1, name=f"{n}.expand1x1")],
                    f"{s}/expand1x1_activation")
        e3 = b.node("Relu", [b.conv(q, f"{s}/expand3x3", sq, ex, 3, 1, 1, name=f"{n}.expand3x3")],
                    f"{s}/expand3x3_activation")
        x = b.node("Concat", [e1, e3], s, axis=1)
        if i == 3:
            x = b.pool("MaxPool", x, "/features/features.4", (2, 2), 2)  # 7x7
    # classifier: Dropout (gone), Conv 1x1 to 10, ReLU, AdaptiveAvgPool2d(1); then torch.flatten
    x = b.conv(x, "/classifier/classifier.1", 48, 10, 1, name="classifier.1")
    x = b.node("Relu", [x], "/classifier/classifier.2")
    x = b.node("GlobalAveragePool", [x], "/classifier/classifier.3")
    b.node("Flatten", [x], out="logits", axis=1)
    return b.model((1, 28, 28), dims=dims)


def viewnet():
    b = Builder(seed=5)
    x = b.node("Relu", [b.conv("input", "/conv1", 1, 8, 5, 1, 2, name="conv1")])
    x = b.pool("MaxPool", x, "", (2, 2), 2)  # 14x14
    x = b.node("Relu", [b.conv(x, "/conv2", 8, 16, 3, 1, 1, group=2, name="conv2")])
    x = b.view_flatten(b.pool("AveragePool", x, "", (2, 2), 2), axes_init=True)  # 16*7*7
    w = b.anon("MatMul", b.he((784, 32), 784))  # fc1.weight.T, folded by the exporter
    x = b.node("MatMul", [x, w], "/fc1")
    x = b.node("Add", [x, b.init("fc1.bias", b.rng.normal(0.0, 0.05, 32).astype(F32))], "/fc1")
    x = b.gemm(b.node("Relu", [x]), "/fc2", "fc2", 32, 10)
    b.node("Softmax", [x], out="probs", axis=1)
    return b.model((1, 28, 28), out_name="probs")


GOOD = {"resnet8": resnet8, "dscnn": dscnn, "mobilenet": mobilenet, "fire": fire,
        "viewnet": viewnet}


def tiny(seed, extra=None, computed_weight=False):
    """conv 8 3x3 + Relu [+ extra op] + GlobalAveragePool + Flatten + Gemm, input 1x16x16."""
    b = Builder(seed)
    if computed_weight:
        w = b.node("Mul", [b.init("conv1.weight", b.he((8, 1, 3, 3), 9)), b.const(2.0, F32)])
        x = b.node("Conv", ["input", w, b.init("conv1.bias", np.zeros(8, F32))], "/conv1",
                   dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1])
    else:
        x = b.conv("input", "/conv1", 1, 8, 3, 1, 1, name="conv1")
    x = b.node("Relu", [x])
    if extra:
        x = b.node(extra[0], [x], extra[1], **extra[2])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    b.gemm(x, "/fc", "fc", 8, 10, "logits")
    return b.model((1, 16, 16))


def bad_model(kind):
    """Returns (bytes, checkable): whether the checker and ORT should accept it."""
    if kind == "unsupported":
        lrn = ("LRN", "/lrn", dict(alpha=1e-4, beta=0.75, bias=1.0, size=5))
        return tiny(11, extra=lrn).SerializeToString(), True
    if kind == "dynamic":
        return fire(dims=["batch", 1, "height", "width"]).SerializeToString(), True
    if kind == "computed-weight":
        return tiny(12, computed_weight=True).SerializeToString(), True
    if kind == "huge":
        b = Builder(13)
        w = TensorProto(name="fc.weight", data_type=TensorProto.FLOAT, raw_data=bytes(16))
        w.dims.extend([1000000, 1000000])  # make_tensor would refuse: 4e12 bytes declared
        b.inits.append(w)
        x = b.node("Flatten", ["input"], axis=1)
        b.node("Gemm", [x, "fc.weight", b.init("fc.bias", np.zeros(10, F32))], "/fc", "logits",
               alpha=1.0, beta=1.0, transB=1)
        return b.model((1, 2, 2)).SerializeToString(), False
    if kind == "cyclic":
        b = Builder(14)
        b.nodes.append(helper.make_node("Add", ["input", "/Relu_output_0"], ["/Add_output_0"],
                                        name="/Add"))
        b.nodes.append(helper.make_node("Relu", ["/Add_output_0"], ["/Relu_output_0"],
                                        name="/Relu"))
        x = b.node("Flatten", [b.node("GlobalAveragePool", ["/Relu_output_0"])], axis=1)
        b.gemm(x, "/fc", "fc", 3, 10, "logits")
        return b.model((3, 8, 8)).SerializeToString(), False
    if kind == "noconv":
        b = Builder(15)
        x = b.node("Flatten", ["input"], axis=1)
        x = b.node("Relu", [b.gemm(x, "/fc1", "fc1", 64, 32)], "/relu")
        b.gemm(x, "/fc2", "fc2", 32, 10, "logits")
        return b.model((1, 8, 8)).SerializeToString(), True
    if kind == "truncated":
        data = resnet8().SerializeToString()
        return data[: len(data) // 2], False
    raise SystemExit(f"make_models.py: unknown --bad kind {kind!r}; one of: {', '.join(BAD)}")


BAD = ("unsupported", "dynamic", "computed-weight", "huge", "cyclic", "noconv", "truncated")


def verify(path):
    """Checker (full) and one ORT run on a random batch of 2; returns an error string or None."""
    import onnxruntime as ort

    try:
        m = onnx.load(path)
        onnx.checker.check_model(m, full_check=True)
        dims = m.graph.input[0].type.tensor_type.shape.dim
        shape = [2] + [d.dim_value or 28 for d in dims[1:]]  # symbolic H, W: run at 28
        x = np.random.default_rng(0).standard_normal(shape).astype(F32)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"input": x})
    except Exception as e:  # noqa: BLE001 - report whatever the checker or ORT raised
        return f"{type(e).__name__}: {e}"
    if y.shape != (2, 10):
        return f"output shape {y.shape}, expected (2, 10)"
    if not np.all(np.isfinite(y)):
        return "non-finite outputs"
    if np.std(y) < 1e-3:
        return f"outputs almost constant (std {np.std(y):.2e}): activations vanished"
    return None


def n_params(m):
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == TensorProto.FLOAT)


def main(argv):
    if len(argv) == 3 and argv[0] == "--bad":
        kind, out = argv[1], argv[2]
        data, checkable = bad_model(kind)
        if os.path.isdir(out):
            out = os.path.join(out, f"bad-{kind}.onnx")
        with open(out, "wb") as f:
            f.write(data)
        print(f"wrote {out} (bad: {kind}, {len(data)} bytes)")
        if checkable and (err := verify(out)):
            sys.exit(f"make_models.py: {out} should load and run but does not: {err}")
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit(f"usage: make_models.py OUT_DIR | make_models.py --bad {{{','.join(BAD)}}} OUT")
    os.makedirs(argv[0], exist_ok=True)
    failures = []
    for name, make in GOOD.items():
        m = make()
        path = os.path.join(argv[0], f"{name}.onnx")
        onnx.save(m, path)
        print(f"wrote {path} ({n_params(m)} parameters, {len(m.graph.node)} nodes)")
        if err := verify(path):
            failures.append(f"  {path}: {err}")
    if failures:
        sys.exit("make_models.py: verification failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main(sys.argv[1:])
