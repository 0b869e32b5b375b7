#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench eval`: Monte Carlo evaluation (Algorithm 2).

The backbone of VGG-8 as in nvcim and `train_step.py` (conv-BN-ReLU blocks 64,128,pool,256,256,
pool,512,512,pool, FC 1024, FC K, every width times --width; no exits), in eval mode. For each of
--mc runs every conv/linear weight is resampled from the device model, vectorized in torch:
|w| quantized to M = 8 bits against max|W| of its layer, sliced into four 2-bit devices, each
device plus N(0, sigma * (2^N - 1)) levels (the `range` convention, sigma 0.4 by default), read
back, rescaled, sign restored. Then the first --images Fashion-MNIST test images (the IDX file
read with gzip + numpy, padded 28 -> 32 with zeros and normalized with nvcim's mean 0.2860 and
std 0.3530) are classified in batches of --batch under `torch.no_grad()`.

The weights are random (seeded): throughput does not depend on their values, and the figure is
throughput only, so no trained checkpoint is needed. CPU, --threads threads.
Prints one JSON line: {"runs_x_images_per_s": ..., settings...}.
"""
import argparse
import gzip
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

M_BITS, N_BITS = 8, 2
MEAN, STD = 0.2860, 0.3530
TEST_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def ch(base, width):
    return max(1, round(base * width))


class Vgg8(nn.Module):
    def __init__(self, width, cin=1, k=10, size=32):
        super().__init__()
        chans = [ch(c, width) for c in (64, 128, 256, 256, 512, 512)]
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for c in chans:
            self.convs.append(nn.Conv2d(cin, c, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(c))
            cin = c
        side = size // 8
        self.fc1 = nn.Linear(cin * side * side, ch(1024, width))
        self.fc2 = nn.Linear(ch(1024, width), k)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def device_readback(w, sigma, gen):
    """One noisy instance of `w` under the device model (M = 8, N = 2, `range` sigma)."""
    levels = (1 << M_BITS) - 1
    scale = w.abs().max()
    q = torch.round(w.abs() / scale * levels)
    # Four 2-bit devices: device j holds bits 2j .. 2j + 1, so it weighs 4^j.
    shifts = torch.arange(0, M_BITS, N_BITS, dtype=torch.int64)
    devices = ((q.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << N_BITS) - 1)).to(w.dtype)
    sd = sigma * ((1 << N_BITS) - 1)
    devices = devices + torch.randn(devices.shape, generator=gen, dtype=w.dtype) * sd
    weights = (1 << shifts).to(w.dtype)
    mag = (devices * weights).sum(-1)
    return torch.sign(w) * mag * (scale / levels)


def load_images(n):
    with gzip.open(TEST_IMAGES, "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)[:n]
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    x = (x.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--mc", type=int, default=10)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--sigma", type=float, default=0.4)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    model = Vgg8(a.width).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    clean = [m.weight.detach().clone() for m in layers]
    x = load_images(a.images)
    batches = list(torch.split(x, a.batch))
    with torch.no_grad():
        model(batches[0])  # warm-up: allocator and kernel selection
        t0 = time.perf_counter()
        for _ in range(a.mc):
            for m, w in zip(layers, clean):
                m.weight.copy_(device_readback(w, a.sigma, gen))
            for b in batches:
                model(b).argmax(1)
        seconds = time.perf_counter() - t0
    print(json.dumps({
        "runs_x_images_per_s": a.mc * len(x) / seconds,
        "seconds": seconds,
        "mc": a.mc,
        "images": len(x),
        "width": a.width,
        "sigma": a.sigma,
        "sigma_unit": "range",
        "batch": a.batch,
        "threads": a.threads,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
