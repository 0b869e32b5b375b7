"""nvcim's device model inside a PyTorch program (needs ``torch``; nvcim itself does not).

- :func:`perturbed` is a context manager that perturbs every ``Conv1d/2d/3d`` and ``Linear``
  weight of a model in place, as Monte Carlo run ``run`` of ``nvcim eval`` would program it,
  and restores the clean weights on exit (also on an exception);
- :class:`NoiseInjection` is noise-injection training (the paper's Algorithm 1) for your own
  loop: each step the forward and backward passes see freshly perturbed weights, and the
  optimizer updates the clean ones.

Layer ``l`` is the ``l``-th weight layer in ``model.modules()`` order (registration order), which
is the forward order for sequential networks such as VGG and for an ONNX export of them; pass
``layers=[...]`` to give the order explicitly (e.g. the forward order of a network that
registers modules out of order). Exits of an NFT model should be left out, as nvcim's backbone
export leaves them out.

Example::

    import nvcim, nvcim.torch
    cfg = nvcim.VariationConfig(sigma=0.4)
    with nvcim.torch.perturbed(model, cfg, seed=0, run=3):
        accuracy = evaluate(model)          # the noisy instance of run 3

    ni = nvcim.torch.NoiseInjection(cfg, seed=1)
    for x, y in loader:
        optimizer.zero_grad()
        with ni.step(model):
            loss_fn(model(x), y).backward() # gradient at the perturbed weights
        optimizer.step()                    # applied to the clean ones
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from . import VariationConfig, perturb

__all__ = ["weight_layers", "perturbed", "NoiseInjection"]

_WEIGHT_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def weight_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules whose weights nvcim perturbs, in nvcim's layer order (see the module docs)."""
    return [m for m in model.modules() if isinstance(m, _WEIGHT_TYPES)]


def _layers(model: torch.nn.Module, layers: Optional[Sequence[torch.nn.Module]]):
    mods = list(layers) if layers is not None else weight_layers(model)
    if not mods:
        raise ValueError(
            "the model has no Conv1d/Conv2d/Conv3d/Linear layer: there are no weights to perturb"
        )
    for m in mods:
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise TypeError(f"{type(m).__name__} has no weight tensor to perturb")
    return mods


def _noisy(weight: torch.Tensor, config: VariationConfig, seed: int, run: int, layer: int):
    w = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    noisy = perturb(w, config, seed, run, layer)
    return torch.from_numpy(np.asarray(noisy)).to(weight.device, weight.dtype)


@contextlib.contextmanager
def perturbed(
    model: torch.nn.Module,
    config: VariationConfig,
    seed: int,
    run: int,
    layers: Optional[Sequence[torch.nn.Module]] = None,
) -> Iterator[torch.nn.Module]:
    """Perturbs ``model``'s weight layers in place for the ``with`` block, then restores them.

    Layer ``l`` gets :func:`nvcim.perturb` with stream ``(seed, run, l)``; biases are not
    perturbed (nvcim's device model maps weights to devices; biases live in the digital
    periphery). Yields the model.
    """
    mods = _layers(model, layers)
    saved = [m.weight.detach().clone() for m in mods]
    try:
        with torch.no_grad():
            for l, m in enumerate(mods):
                m.weight.copy_(_noisy(m.weight, config, seed, run, l))
        yield model
    finally:
        with torch.no_grad():
            for m, w in zip(mods, saved):
                m.weight.copy_(w)


class NoiseInjection:
    """Noise-injection training (Algorithm 1) for a user's own loop.

    Each :meth:`step` perturbs every weight layer with a fresh draw (run index = the step
    counter, stream ``(seed, step, l)``), lets the block compute the loss and its gradient at
    the perturbed weights, and restores the clean weights on exit, keeping the gradients, so
    that ``optimizer.step()`` afterwards updates the clean weights. Use a seed other than your
    evaluation's so that training never sees an evaluation's draws.
    """

    def __init__(self, config: VariationConfig, seed: int = 0, start_step: int = 0):
        if not isinstance(config, VariationConfig):
            raise TypeError(f"config must be an nvcim.VariationConfig, not {type(config).__name__}")
        if start_step < 0 or seed < 0:
            raise ValueError("seed and start_step must be >= 0")
        self.config = config
        self.seed = int(seed)
        self.steps = int(start_step)

    @contextlib.contextmanager
    def step(
        self, model: torch.nn.Module, layers: Optional[Sequence[torch.nn.Module]] = None
    ) -> Iterator[torch.nn.Module]:
        """One training step's perturbation (see the class docs); the counter advances on exit."""
        try:
            with perturbed(model, self.config, self.seed, self.steps, layers) as m:
                yield m
        finally:
            self.steps += 1
