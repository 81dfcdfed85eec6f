"""The integer lattice Z^n (Conway & Sloane 1982, §2): Q rounds every coordinate."""

from __future__ import annotations

import numpy as np
import torch

from .base import Lattice, _check_dim

__all__ = ["ZnLattice", "Z2Lattice"]


class ZnLattice(Lattice):
    """Z^n with ``G = I``. Rounding is ``floor(x + 1/2)`` (Z-translation-equivariant at ties)."""

    nsm = 1.0 / 12.0

    def __init__(self, n: int) -> None:
        n = _check_dim(n, 1, "ZnLattice")
        super().__init__(f"Z{n}", np.eye(n))

    @property
    def covering_radius(self) -> float:
        return float(np.sqrt(self.dim)) / 2.0

    def minimal_vectors(self) -> np.ndarray:
        e = np.eye(self.dim)
        return np.concatenate([e, -e])

    def _closest_point_raw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x + 0.5)

    def coords64(self, p: torch.Tensor) -> torch.Tensor:
        return torch.round(p)

    def points64(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(torch.float64)


class Z2Lattice(ZnLattice):
    """Z^2."""

    def __init__(self) -> None:
        super().__init__(2)
