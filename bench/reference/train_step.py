#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench train`: one NFT training step of VGG-8 or ResNet-18
with their exits.

Same networks as nvcim (VGG-8: conv-BN-ReLU blocks 64,128,pool,256,256,pool,512,512,pool, FC 1024,
FC K, three exits; ResNet-18: CIFAR stem, basic blocks 64/128/256/512 with 1x1 shortcuts where the
shape changes, global average pool, FC K, four exits after the stem and stages 1-3; each exit
AdaptiveAvgPool(s) -> FC 512 -> ReLU -> FC K as Table I, every width times --width), the same
loss (eq. 1, alpha 0.1, decay 0.1) and noise injection (every conv/linear weight of backbone and
exits perturbed by N(0, 0.7776 * sigma * max|W|) each step, sigma 0.4 in the `range` unit; the
gradient is taken at the perturbed weights and applied to the clean ones), Adam lr 1e-3.
Input: 1 x 32 x 32 (Fashion-MNIST padded), batch --batch, CPU, --threads threads.
Prints one JSON line: {"ms_per_step": median, ...}. torch is installed by the bench harness.
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_STD = 0.7776 * 0.4  # M=8, N=2, range unit, sigma 0.4, uniform profile


def ch(base, width):
    return max(1, round(base * width))


def noisy(w):
    return w + (torch.randn_like(w) * (WEIGHT_STD * w.detach().abs().max())).detach()


class Exit(nn.Module):
    def __init__(self, c, s, hidden, k):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(s)
        self.fc1 = nn.Linear(c * s * s, hidden)
        self.fc2 = nn.Linear(hidden, k)

    def forward(self, x):
        x = torch.flatten(self.pool(x), 1)
        x = F.relu(F.linear(x, noisy(self.fc1.weight), self.fc1.bias))
        return F.linear(x, noisy(self.fc2.weight), self.fc2.bias)


class Vgg8Exits(nn.Module):
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
        h = ch(512, width)
        self.exits = nn.ModuleList([Exit(chans[0], 6, h, k), Exit(chans[1], 4, h, k), Exit(chans[3], 3, h, k)])

    def forward(self, x):
        taps = []
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(F.conv2d(x, noisy(conv.weight), padding=1)))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
            if i in (0, 1, 3):
                taps.append(x)
        x = torch.flatten(x, 1)
        x = F.relu(F.linear(x, noisy(self.fc1.weight), self.fc1.bias))
        out = F.linear(x, noisy(self.fc2.weight), self.fc2.bias)
        return out, [e(t) for e, t in zip(self.exits, taps)]


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.bs = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = F.relu(self.b1(F.conv2d(x, noisy(self.c1.weight), stride=self.stride, padding=1)))
        y = self.b2(F.conv2d(y, noisy(self.c2.weight), padding=1))
        s = x if self.short is None else self.bs(F.conv2d(x, noisy(self.short.weight), stride=self.stride))
        return F.relu(y + s)


class ResNet18Exits(nn.Module):
    def __init__(self, width, cin=1, k=10):
        super().__init__()
        c0 = ch(64, width)
        self.stem = nn.Conv2d(cin, c0, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c0)
        self.stages = nn.ModuleList()
        c = c0
        for base, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            cout = ch(base, width)
            self.stages.append(nn.Sequential(Block(c, cout, stride), Block(cout, cout, 1)))
            c = cout
        self.fc = nn.Linear(c, k)
        h = ch(512, width)
        taps = (ch(64, width), ch(64, width), ch(128, width), ch(256, width))
        self.exits = nn.ModuleList([Exit(t, s, h, k) for t, s in zip(taps, (6, 6, 4, 3))])

    def forward(self, x):
        x = F.relu(self.bn(F.conv2d(x, noisy(self.stem.weight), padding=1)))
        taps = []
        for i, stage in enumerate(self.stages):
            if i < 4:
                taps.append(x)
            x = stage(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        out = F.linear(x, noisy(self.fc.weight), self.fc.bias)
        return out, [e(t) for e, t in zip(self.exits, taps)]


def nf_loss(out, outs, labels, alpha=0.1):
    nf = out - alpha * sum((0.1 ** i) * o for i, o in enumerate(outs))
    return F.cross_entropy(nf / (len(outs) + 1), labels)


def arguments(warmup):
    """The step's command line (this script's and `train_profile.py`'s)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["vgg8", "resnet18"], default="vgg8")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def setup(a):
    """The seeded model in training mode, its Adam, and one batch `(x, y)`."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Vgg8Exits(a.width) if a.model == "vgg8" else ResNet18Exits(a.width)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(a.batch, 1, 32, 32)
    y = torch.randint(0, 10, (a.batch,))
    return model, opt, x, y


def main():
    a = arguments(warmup=2).parse_args()
    model, opt, x, y = setup(a)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out, outs = model(x)
        loss = nf_loss(out, outs, y)
        loss.backward()
        opt.step()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    print(json.dumps({"ms_per_step": statistics.median(times), "model": a.model, "width": a.width, "batch": a.batch,
                      "threads": a.threads, "torch": torch.__version__, "steps": a.steps,
                      # Peak resident set of this process (Linux reports KiB).
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))


if __name__ == "__main__":
    main()
