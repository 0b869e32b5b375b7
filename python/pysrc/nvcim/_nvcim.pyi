"""Type stubs of nvcim's compiled module (see nvcim/__init__.py for the documented API)."""

from typing import Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

class VariationConfig:
    """The device model: M-bit weights sliced into M/N devices of N bits with Gaussian
    conductance variation sigma (in `unit`), a state-dependent profile and stuck-at faults."""

    def __init__(
        self,
        m: int = 8,
        n: int = 2,
        sigma: float = 0.4,
        unit: str = "range",
        profile: str = "uniform",
        stuck_low: float = 0.0,
        stuck_high: float = 0.0,
    ) -> None: ...
    @property
    def m(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def sigma(self) -> float: ...
    @property
    def unit(self) -> str: ...
    @property
    def profile(self) -> str: ...
    @property
    def stuck_low(self) -> float: ...
    @property
    def stuck_high(self) -> float: ...
    @property
    def devices_per_weight(self) -> int: ...
    def with_sigma(self, sigma: float) -> "VariationConfig": ...
    def weight_std(self, max_abs: float, magnitude: int = 0) -> float:
        """Closed-form std of a read-back weight of a layer with this max|W| (no faults)."""
        ...
    def __eq__(self, other: object) -> bool: ...

def perturb(
    weights: npt.NDArray[np.float32],
    config: VariationConfig,
    seed: int,
    run: int,
    layer: int,
    threads: Optional[int] = None,
) -> npt.NDArray[np.float32]: ...
def evaluate_onnx_json(
    path: str,
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    sigmas: Sequence[float],
    mc: int,
    seed: int,
    jobs: Optional[int] = None,
    config: Optional[VariationConfig] = None,
) -> str: ...
def onnx_dataset(
    path: str, data_dir: str, split: str = "test", limit: Optional[int] = None
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
