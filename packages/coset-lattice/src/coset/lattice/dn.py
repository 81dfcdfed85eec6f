"""The checkerboard lattice D_n = {x in Z^n : sum x even} (Conway & Sloane 1982, §3; SPLAG ch. 4 §7.2).

Closest point: round every coordinate (f), and also round the worst coordinate the wrong way (g); exactly
one of f, g has an even coordinate sum, and it is the nearest point of D_n.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .base import Lattice, _check_dim

__all__ = ["DnLattice", "D4Lattice", "closest_point_dn"]


def closest_point_dn(x: torch.Tensor) -> torch.Tensor:
    """Q_{D_n} on float64 ``(..., n)``: C&S with floor(x+1/2) rounding, first worst index on ties."""
    f = torch.floor(x + 0.5)
    delta = x - f
    k = delta.abs().argmax(dim=-1, keepdim=True)  # torch returns the first maximal index
    dk = delta.gather(-1, k)
    step = torch.where(dk >= 0, 1.0, -1.0).to(x.dtype)  # round the other way; w(integer) = +1
    g = f.scatter_add(-1, k, step)
    odd = torch.remainder(f.sum(dim=-1, keepdim=True), 2.0) != 0  # sums of small integers: exact
    return torch.where(odd, g, f)


def _dn_generator(n: int) -> np.ndarray:
    """SPLAG basis of D_n as columns: (-1,-1,0..), (1,-1,0..), (0,1,-1,0..), ..., (0,..,1,-1)."""
    cols = [np.zeros(n) for _ in range(n)]
    cols[0][0], cols[0][1] = -1, -1
    cols[1][0], cols[1][1] = 1, -1
    for j in range(2, n):
        cols[j][j - 1], cols[j][j] = 1, -1
    return np.stack(cols, axis=1)


class DnLattice(Lattice):
    """D_n for n >= 3 (D_2 is a rotated, scaled Z^2 and D_3 is the fcc lattice). Volume 2."""

    def __init__(self, n: int) -> None:
        n = _check_dim(n, 3, "DnLattice")
        super().__init__(f"D{n}", _dn_generator(n))
        # sigma^2(D_n) = 1/12 + 1/(2n(n+1)) (Conway & Sloane 1982, second moments of polytopes); D4: 13/120.
        self.nsm = (1.0 / 12.0 + 1.0 / (2.0 * n * (n + 1))) / 2.0 ** (2.0 / n)

    @property
    def covering_radius(self) -> float:
        # deep holes (1/2,...,1/2) at distance sqrt(n)/2 and (1,0,...,0) at distance 1
        return float(max(1.0, np.sqrt(self.dim) / 2.0))

    def minimal_vectors(self) -> np.ndarray:
        n = self.dim
        v = []
        for i, j in itertools.combinations(range(n), 2):
            for si, sj in itertools.product((1.0, -1.0), repeat=2):
                e = np.zeros(n)
                e[i], e[j] = si, sj
                v.append(e)
        return np.array(v)

    def _closest_point_raw(self, x: torch.Tensor) -> torch.Tensor:
        return closest_point_dn(x)


class D4Lattice(DnLattice):
    """D4, the densest 4-dimensional lattice (24 minimal vectors); NSM 13/(120 sqrt 2) = 0.0766032."""

    def __init__(self) -> None:
        super().__init__(4)
        self.nsm = 13.0 / (120.0 * np.sqrt(2.0))
