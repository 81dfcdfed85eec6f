"""Arithmetic on labels modulo q, and the flat (single-modulus) code used for sums of codes.

Labels of a Voronoi code are elements of ``L / qL ≅ (Z/qZ)^d``, so adding labels mod q adds the lattice
points modulo qL. For a single layer (M = 1) the decoded sum equals the real sum exactly when the sum does
not overload. Adding the M digit layers separately loses the carries between layers; the *flat code*
``c = G^{-1} x_hat mod q^M`` (a Voronoi code with modulus q^M) is linear and keeps them.
:func:`modq_sum_report` tells, vector by vector, when a decoded sum differs from the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from coset.lattice import Lattice

from coset.lattice.validate import check_int_tensor, check_q

from ._core import coset_representative, decode_lattice_units, resolve
from .config import QuantizationConfig

__all__ = ["add_modq", "mac_modq", "to_flat_code", "from_flat_code", "ModqSumReport", "modq_sum_report"]


def _check_q(q) -> int:
    return check_q(q, 2**16)


def _as_int(name: str, t) -> torch.Tensor:
    return check_int_tensor(name, t).to(torch.int64)


def add_modq(a: torch.Tensor, b: torch.Tensor, q: int) -> torch.Tensor:
    """``(a + b) mod q`` elementwise on label tensors (broadcasting); result uint8 for q <= 256."""
    q = _check_q(q)
    out = torch.remainder(_as_int("a", a) + _as_int("b", b), q)
    return out.to(torch.uint8) if q <= 256 else out


def mac_modq(acc: torch.Tensor, b: torch.Tensor, w, q: int) -> torch.Tensor:
    """Multiply-accumulate ``(acc + w * b) mod q``; ``w`` an int or integer tensor (broadcasting)."""
    q = _check_q(q)
    wt = torch.as_tensor(w) if not isinstance(w, torch.Tensor) else w
    out = torch.remainder(_as_int("acc", acc) + _as_int("w", wt) * _as_int("b", b), q)
    return out.to(torch.uint8) if q <= 256 else out


def to_flat_code(points: torch.Tensor, lattice: Lattice, modulus: int) -> torch.Tensor:
    """Flat code ``G^{-1} p mod modulus`` (int64, ``(..., d)``) of lattice points ``p`` (float, lattice units)."""
    return torch.remainder(lattice.coords64(points.to(torch.float64)), modulus).to(torch.int64)


def from_flat_code(c: torch.Tensor, lattice: Lattice, modulus: int, tie_dither: bool = True) -> torch.Tensor:
    """Decode a flat code: the point of ``L ∩ modulus·V`` congruent to ``G c`` (float64 ``(..., d)``)."""
    return coset_representative(_as_int("c", c), lattice, modulus, tie_dither)  # a(c) with q = modulus


@dataclass(frozen=True)
class ModqSumReport:
    """Result of :func:`modq_sum_report`: all tensors have the leading shape of one operand."""

    decoded_sum: torch.Tensor  # (..., d) float64, decode of the label-domain sum
    real_sum: torch.Tensor  # (..., d) float64, sum of the individual decodes
    mismatch: torch.Tensor  # (...) bool
    mismatch_rate: float


def modq_sum_report(
    labels: Sequence[torch.Tensor],
    config: Optional[QuantizationConfig] = None,
    *,
    lattice: Optional[Lattice] = None,
) -> ModqSumReport:
    """Add several label tensors in the code domain and compare with the real-domain sum.

    ``labels`` are ``(..., M, d)`` label tensors (unscaled lattice codes, i.e. one common scale). Each is
    turned into its flat code mod q^M, the codes are added mod q^M, and the result is decoded; for M = 1 this
    is exactly :func:`add_modq` on the labels. The sum is exact unless it leaves ``q^M V``; those vectors
    are reported in ``mismatch``.
    """
    lattice, config = resolve(config, lattice)
    if len(labels) == 0:
        raise ValueError("labels must contain at least one label tensor")
    modulus = config.q**config.M
    pts = [decode_lattice_units(_as_int("labels[i]", b), lattice, config.q, config.with_tie_dither) for b in labels]
    real = torch.stack(pts).sum(0)
    code = torch.zeros_like(real, dtype=torch.int64)
    for p in pts:
        code = torch.remainder(code + to_flat_code(p, lattice, modulus), modulus)
    dec = from_flat_code(code, lattice, modulus, config.with_tie_dither)
    mismatch = (dec != real).any(dim=-1)
    rate = float(mismatch.float().mean()) if mismatch.numel() else 0.0
    return ModqSumReport(dec, real, mismatch, rate)
