"""A CNN trained by PyTorch, not by nvcim: the starting point of `nvcim train --onnx`.

Trains a small MobileNet-flavoured CNN (conv-BN-ReLU stem, two depthwise-separable blocks with
stride 2, a plain 3x3 conv block, global average pooling, linear) on Fashion-MNIST from Debian's
IDX files (zero-padded to 32x32, normalized with mean 0.2860 / std 0.3530), with Adam and
PyTorch's defaults, seeded, on the CPU. Exports it twice to ONNX (opset 17, dynamic batch):

- ``OUT/pytorch-cnn.onnx``: eval mode, as most users export; BatchNorm folded into the convs;
- ``OUT/pytorch-cnn-bn.onnx``: BatchNorm kept (eval mode, ``training=TrainingMode.PRESERVE``,
  ``do_constant_folding=False``), the form nvcim trains best.

Usage: ``python train_pytorch.py OUT [--epochs N] [--data DIR]``. Needs torch, numpy and onnx
(``.venv-bench``, which ``cargo xtask bench`` creates). Prints the test accuracy PyTorch measures.
"""

import argparse
import gzip
import os
import struct

import numpy as np
import torch
import torch.nn as nn


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        dims = [struct.unpack(">I", f.read(4))[0] for _ in range(magic & 0xFF)]
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def load(data, split):
    prefix = "train" if split == "train" else "t10k"
    find = lambda stem: next(
        os.path.join(data, stem + ext)
        for ext in ("", ".gz")
        if os.path.exists(os.path.join(data, stem + ext))
    )
    x = read_idx(find(f"{prefix}-images-idx3-ubyte")).astype(np.float32) / 255.0
    y = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32, centered, as nvcim's `pad`
    x = (x - 0.2860) / 0.3530
    return torch.from_numpy(x[:, None]), torch.from_numpy(y)


def block(cin, cout, stride, depthwise):
    if depthwise:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        )
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            block(1, 32, 1, False),
            block(32, 64, 2, True),
            block(64, 128, 2, True),
            block(128, 128, 1, False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    xs, ys = load(args.data, "train")
    xt, yt = load(args.data, "test")
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xs))
        for i in range(0, len(xs), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = sum((model(xt[i : i + 1000]).argmax(1) == yt[i : i + 1000]).sum().item()
                      for i in range(0, len(xt), 1000)) / len(xt)
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {100 * acc:.2f}%", flush=True)
    os.makedirs(args.out, exist_ok=True)
    x = torch.zeros(1, 1, 32, 32)
    dyn = {"input": {0: "batch"}, "logits": {0: "batch"}}
    kw = dict(input_names=["input"], output_names=["logits"], dynamic_axes=dyn, opset_version=17,
              dynamo=False)
    torch.onnx.export(model.eval(), x, os.path.join(args.out, "pytorch-cnn.onnx"), **kw)
    torch.onnx.export(model.eval(), x, os.path.join(args.out, "pytorch-cnn-bn.onnx"),
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, **kw)
    print(f"exported {args.out}/pytorch-cnn.onnx and pytorch-cnn-bn.onnx")


if __name__ == "__main__":
    main()
