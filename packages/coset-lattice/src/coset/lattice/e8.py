"""The Gosset lattice E8 = D8 u (D8 + 1/2) (Conway & Sloane 1982, §4; SPLAG ch. 4 eq. (99))."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .base import Lattice, _seq_sqnorm
from .dn import closest_point_dn

__all__ = ["E8Lattice", "closest_point_e8"]


def closest_point_e8(x: torch.Tensor) -> torch.Tensor:
    """Q_{E8} on float64 ``(..., 8)``: the nearer of Q_{D8}(x) and Q_{D8}(x - 1/2) + 1/2 (D8 wins ties)."""
    y0 = closest_point_dn(x)
    y1 = closest_point_dn(x - 0.5) + 0.5
    d0 = _seq_sqnorm(x - y0)
    d1 = _seq_sqnorm(x - y1)
    return torch.where((d0 <= d1).unsqueeze(-1), y0, y1)


def _e8_generator() -> np.ndarray:
    cols = [np.zeros(8) for _ in range(8)]
    cols[0][0] = 2.0
    for j in range(1, 7):
        cols[j][j - 1], cols[j][j] = -1.0, 1.0
    cols[7][:] = 0.5
    return np.stack(cols, axis=1)


class E8Lattice(Lattice):
    """E8 with the SPLAG generator (det 1); NSM 929/12960 = 0.0716821, 240 minimal vectors."""

    nsm = 929.0 / 12960.0

    def __init__(self) -> None:
        super().__init__("E8", _e8_generator())

    @property
    def covering_radius(self) -> float:
        return 1.0

    def minimal_vectors(self) -> np.ndarray:
        v = []
        for i, j in itertools.combinations(range(8), 2):
            for si, sj in itertools.product((1.0, -1.0), repeat=2):
                e = np.zeros(8)
                e[i], e[j] = si, sj
                v.append(e)
        for s in itertools.product((0.5, -0.5), repeat=8):
            if sum(1 for t in s if t < 0) % 2 == 0:
                v.append(np.array(s))
        return np.array(v)

    def _closest_point_raw(self, x: torch.Tensor) -> torch.Tensor:
        return closest_point_e8(x)
