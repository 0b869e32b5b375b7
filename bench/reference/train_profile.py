#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench layers`: where one NFT training step of `train_step.py`'s
networks spends its time, by torch.profiler, in the rows nvcim's per-layer table has.

Runs --warmup unprofiled steps, then --steps steps under the profiler, and appends JSON lines to
--out: the step and its phases (forward with noise and loss, backward, optimizer; wall time per
step, profiled) and, per shape, convolution forward, convolution backward (oneDNN computes the
input and weight gradients in one call), batch norm forward and backward, max pool forward and
backward, ReLU forward and backward (by element count) (CPU time of the aten op and its
children, per step). Shapes are written as nvcim
writes them: `n x c x h x w -> o, kh x kw / stride` for a convolution, `n x c x plane` for the
others.
"""
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import train_step as ts


def conv_key(x, w, stride):
    n, c, h, wd = x
    o, _, kh, kw = w
    return f"{n}x{c}x{h}x{wd} -> {o}, {kh}x{kw}/{stride}"


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def plane_key(x):
    n, c, h, w = x
    return f"{n}x{c}x{h * w}"


def main():
    ap = ts.arguments(warmup=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, opt, x, y = ts.setup(a)
    phases = defaultdict(float)

    def step(timed):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with record_function("phase forward"):
            out, outs = model(x)
            loss = ts.nf_loss(out, outs, y)
        t1 = time.perf_counter()
        with record_function("phase backward"):
            loss.backward()
        t2 = time.perf_counter()
        with record_function("phase optimizer"):
            opt.step()
        t3 = time.perf_counter()
        if timed:
            for k, (s, e) in (("phase forward", (t0, t1)), ("phase backward", (t1, t2)),
                              ("phase optimizer", (t2, t3))):
                phases[k] += (e - s) * 1e3

    for _ in range(a.warmup):
        step(False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            step(True)
        total = (time.perf_counter() - t) * 1e3

    # Convolution strides: from each forward call's output, matched to its backward by shapes.
    rows = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        shapes = e.input_shapes
        ms = e.cpu_time_total / 1e3
        if e.name == "aten::convolution" and len(shapes) >= 2:
            stride = e.concrete_inputs[3][0] if e.concrete_inputs and e.concrete_inputs[3] else 1
            key = ("conv forward", conv_key(shapes[0], shapes[1], stride))
        elif e.name == "aten::convolution_backward" and len(shapes) >= 3:
            dy, xs = shapes[0], shapes[1]
            stride = max(1, round(xs[2] / dy[2]))
            key = ("conv backward", conv_key(xs, shapes[2], stride))
        elif e.name == "aten::native_batch_norm" and shapes and len(shapes[0]) == 4:
            key = ("bn forward", plane_key(shapes[0]))
        elif e.name == "aten::native_batch_norm_backward" and len(shapes) >= 2:
            key = ("bn backward", plane_key(shapes[1]))
        elif e.name == "aten::max_pool2d_with_indices" and shapes:
            key = ("pool forward", plane_key(shapes[0]))
        elif e.name == "aten::max_pool2d_with_indices_backward" and len(shapes) >= 2:
            key = ("pool backward", plane_key(shapes[1]))
        elif e.name in ("aten::relu", "aten::relu_") and shapes:
            key = ("relu forward", str(numel(shapes[0])))
        elif e.name == "aten::threshold_backward" and shapes:
            key = ("relu backward", str(numel(shapes[0])))
        else:
            continue
        rows[key][0] += 1
        rows[key][1] += ms
    per = float(a.steps)
    with open(a.out, "a") as f:
        def row(op, shape, calls, ms):
            f.write(json.dumps({"model": a.model, "width": a.width, "op": op, "shape": shape,
                                "calls": calls, "ms": round(ms, 4), "torch": torch.__version__}) + "\n")
        row("step", "", 1, total / per)
        for k in ("phase forward", "phase backward", "phase optimizer"):
            row(k, "", 1, phases[k] / per)
        for (op, shape), (calls, ms) in sorted(rows.items()):
            row(op, shape, calls // a.steps, ms / per)


if __name__ == "__main__":
    main()
