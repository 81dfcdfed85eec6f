"""Centring offset of the HNLQ constellation (``QuantizationConfig.center``).

With the fixed tie offset the Voronoi cell V is half-open, so ``A_q = L ∩ qV`` is lopsided whenever points
of ``L/q`` lie on the boundary of V (always for even q; for D_n and E8 also for odd q): it holds only one of
``+-v`` for such v. The constellation ``C = sum_m q^m A_q`` (M layers) is then not centred at 0; for q = 2 on
Z^n it is ``{0 .. 2^M - 1}`` (up to sign) per coordinate, which wastes about half the code on symmetric data.

``center=True`` shifts the code by ``c = constellation_offset(lattice, q, M)``, the centroid of C with
uniform labels (computed in :mod:`coset.quant._core`): a vector is encoded as ``g = x / s_t + c (+ z)`` and
decoded as ``x_hat = s_T (point - c - z)``, so the reconstructions ``C - c`` are centred at 0. This is exactly
the backend's ``dither`` argument with ``dither = z + c`` (:func:`effective_dither`), so every backend supports it.
"""

from __future__ import annotations

from typing import Optional

import torch

from coset.lattice import Lattice

from ._core import ENUMERATE_LIMIT, SAMPLE_LABELS, SAMPLE_SEED, constellation_offset
from .config import QuantizationConfig

__all__ = ["constellation_offset", "effective_dither", "ENUMERATE_LIMIT", "SAMPLE_LABELS", "SAMPLE_SEED"]


def effective_dither(
    n: int, lattice: Lattice, config: QuantizationConfig, z: Optional[torch.Tensor], device
) -> Optional[torch.Tensor]:
    """The ``dither`` a backend receives: ``z`` (random dither or None) plus the centring offset if any.

    Returns
    -------
    None (no dither, no centring) or a contiguous float64 ``(n, d)`` tensor on ``device``:
    ``z + c`` with ``center=True``, else ``z``.
    """
    if not config.center:
        return z
    c = constellation_offset(lattice, config.q, config.M, config.with_tie_dither).to(device)
    if z is None:
        return c.expand(n, lattice.dim).contiguous()
    return (z + c).contiguous()
