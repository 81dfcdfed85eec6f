"""Centring corrections of the LUT products for codes with ``config.center=True`` (coset.quant.offset).

A centred block decodes to ``x̂ = s (P - c)`` with ``P = sum_m q^m a(b_m)`` and the constellation offset
``c`` (float64, lattice units). The LUT products keep their exact-integer main term ``<P_x, P_y>`` (or
``<P_x, y>``) and add small corrections:

* one-sided: ``<x̂, y> = s_x (<P_x, y> - <c_x, y>)``;
* two-sided: ``<x̂, ŷ> = s_x s_y (<P_x, P_y> - <P_x, c_y> - <c_x, P_y> + <c_x, c_y>)``, where
  ``<P, c> = sum_m q^m v[idx(b_m)]`` with the ``(Q,)`` table ``v[i] = <a_i, c>``.
"""

from __future__ import annotations

import torch

from coset.quant import QuantizationConfig, constellation_offset

from .tables import representative_table

__all__ = ["code_offset", "offset_dots", "layer_dot"]


def code_offset(config: QuantizationConfig, device=None) -> torch.Tensor | None:
    """The offset ``c`` of the codes, float64 ``(d,)`` on ``device``, or None when ``config.center`` is False."""
    if not config.center:
        return None
    return constellation_offset(config.lattice, config.q, config.M, config.with_tie_dither).to(device)


def offset_dots(config: QuantizationConfig, c: torch.Tensor) -> torch.Tensor:
    """``v[i] = <a_i, c>`` over the representatives of ``config``'s (lattice, q, tie rule): float64 ``(Q,)``."""
    a = representative_table(config.lattice, config.q, config.with_tie_dither).to(c.device)
    return a @ c.to(torch.float64)


def layer_dot(ix: torch.Tensor, v: torch.Tensor, q: int) -> torch.Tensor:
    """``<P, c> = sum_m q^m v[ix[..., m]]`` for label indices ``ix`` of shape ``(..., M)``: float64 ``(...)``."""
    M = ix.shape[-1]
    w = torch.tensor([float(q**m) for m in range(M)], dtype=torch.float64, device=v.device)
    return (v[ix.to(device=v.device, dtype=torch.int64)] * w).sum(-1)
