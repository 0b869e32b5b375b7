"""nvcim: the NVCiM device model and Monte Carlo robustness evaluation of the nvcim toolkit.

The functions here are the Rust core of the ``nvcim`` command line, not a re-implementation:

- :class:`VariationConfig` is the device model of ``--m/--n/--sigma-unit/--device-profile/
  --stuck-low/--stuck-high`` (M-bit weight magnitudes sliced into M/N devices of N bits, each
  with Gaussian conductance variation), with the CLI's checks;
- :func:`perturb` perturbs one weight layer exactly as ``nvcim eval --engine float`` does for
  Monte Carlo run ``run`` under ``seed``: the same weights, bit for bit;
- :func:`evaluate_onnx` is ``nvcim eval --onnx`` on images you hold, returning ``eval.json``'s
  fields (per-run accuracies included) as a dict; it releases the GIL while it runs;
- :func:`onnx_dataset` reads an IDX split prepared as an ONNX model expects it;
- :mod:`nvcim.torch` (imported on demand, needs torch) perturbs a ``torch.nn.Module`` in place
  and implements noise-injection training (the paper's Algorithm 1) for your own loop.

Errors are ``ValueError`` (a bad value), ``TypeError`` (a wrong type or dtype),
``FileNotFoundError`` or ``RuntimeError`` (a file nvcim cannot use), with nvcim's messages.
"""

from __future__ import annotations

import json
from os import PathLike
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from . import _nvcim
from ._nvcim import VariationConfig, __version__

__all__ = [
    "VariationConfig",
    "perturb",
    "evaluate_onnx",
    "onnx_dataset",
    "__version__",
]

_Path = Union[str, "PathLike[str]"]


def perturb(
    weights: np.ndarray,
    config: VariationConfig,
    seed: int,
    run: int,
    layer: int,
    threads: Optional[int] = None,
) -> np.ndarray:
    """The weights of one layer as Monte Carlo run ``run`` of ``nvcim eval`` reads them back.

    ``weights`` (float32, any shape) is quantized to ``config.m`` bits against its own
    ``max|W|``, each magnitude is sliced into ``config.m // config.n`` devices, and every
    device's conductance gets a draw from nvcim's stream ``(seed, run, layer)``, visiting the
    weights in C order. That is nvcim's canonical order (``[out][in][kh][kw]`` for a
    convolution, ``[out][in]`` for a linear layer, as PyTorch stores them), so for layer index
    ``layer`` of a network the result equals the float engine's weights bit for bit.

    A layer of 131,072 weights or more is split over ``threads`` threads (default: every core
    this process may use); the result does not depend on it (each thread starts where the
    stream stands after the weights before its piece).

    A C-contiguous float32 array is read in place (no copy); other layouts are copied first.
    Returns a new float32 array of the same shape. Raises ``TypeError`` for another dtype (the
    draws are defined on float32 weights: convert with ``.astype(np.float32)``) and
    ``ValueError`` for NaN or infinite weights, an empty or all-zero layer, or a negative seed,
    run or layer.
    """
    for name, v in (("seed", seed), ("run", run), ("layer", layer)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name}={v}: it must be >= 0")
    if not isinstance(config, VariationConfig):
        raise TypeError(
            f"config must be an nvcim.VariationConfig, not {type(config).__name__}"
        )
    if threads is not None:
        if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool):
            raise TypeError(f"threads must be an int or None, not {type(threads).__name__}")
        if threads < 1:
            raise ValueError(f"threads={threads}: it must be >= 1 (or None for every core)")
        threads = int(threads)
    return _nvcim.perturb(weights, config, int(seed), int(run), int(layer), threads)


def _labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class index per image); got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (class indices), not {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def evaluate_onnx(
    path: _Path,
    images: np.ndarray,
    labels: Union[np.ndarray, Sequence[int]],
    sigmas: Union[float, Iterable[float]],
    mc: int,
    seed: int,
    jobs: Optional[int] = None,
    config: Optional[VariationConfig] = None,
) -> Dict[str, Any]:
    """Monte Carlo evaluation of an ONNX CNN under device variation: ``nvcim eval --onnx``.

    ``images``: float32 ``(N, C, H, W)``, already prepared as the model expects (see
    :func:`onnx_dataset`); ``labels``: ``N`` integer class indices. For every sigma in
    ``sigmas``, ``mc`` runs each perturb the model's Conv/Gemm/MatMul weights (layer ``l`` from
    stream ``(seed, run, l)``, as :func:`perturb`) and classify all images. ``config`` sets the
    device model (bits, unit, profile, faults; its own sigma is ignored, ``sigmas`` replaces
    it); the paper's M = 8, N = 2, ``range`` by default. ``jobs`` threads (default: every core)
    share the runs; the results never depend on it.

    Returns ``eval.json``'s fields: ``config`` (everything that made the result),
    ``clean_accuracy``, and per sigma in ``results`` the mean, std, 95% interval, min, max and
    every run's accuracy and correct count. The GIL is released while it runs.
    """
    if isinstance(sigmas, (int, float, np.floating)):
        sigmas = [float(sigmas)]
    sigmas = [float(s) for s in sigmas]
    for name, v in (("mc", mc), ("seed", seed)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if seed < 0:
        raise ValueError(f"seed={seed}: it must be >= 0")
    if jobs is not None and (not isinstance(jobs, (int, np.integer)) or isinstance(jobs, bool)):
        raise TypeError(f"jobs must be an int or None, not {type(jobs).__name__}")
    if not isinstance(images, np.ndarray):
        raise TypeError(
            f"images must be a numpy.ndarray of float32 (N, C, H, W), not {type(images).__name__}"
        )
    text = _nvcim.evaluate_onnx_json(
        str(path),
        images,
        _labels(labels),
        sigmas,
        int(mc),
        int(seed),
        None if jobs is None else int(jobs),
        config,
    )
    return json.loads(text)


def onnx_dataset(
    path: _Path, data_dir: _Path, split: str = "test", limit: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """The IDX split ``split`` (``"test"`` or ``"train"``, plain or ``.gz``) of an MNIST-style
    data directory, prepared as the ONNX model at ``path`` expects (image size and the
    normalization recorded by ``nvcim export``), exactly as ``nvcim eval --onnx --data-dir``
    reads it: ``(images float32 (N, C, H, W), labels int64 (N,))``, the first ``limit`` images.
    """
    return _nvcim.onnx_dataset(str(path), str(data_dir), split, limit)
