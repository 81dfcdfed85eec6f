"""Blockwise inner products straight from labels, batched over leading dims (paper.md §6).

For one d-block: ``<x̂, ŷ> = s_x s_y sum_{m,l} q^(m+l) LUT[idx(bx_m), idx(by_l)]`` and
``<x̂, y> = s_x sum_m q^m <a(bx_m), y>``, with ``s = beta 2^(alpha T)``. For vectors split into K blocks
pass ``(..., K, M, d)`` labels and sum the result over the K axis (or use :mod:`coset.lut.matmul`).
Codes with ``config.center=True`` (x̂ = s (P - c)) get the corrections of :mod:`coset.lut.center`.
"""

from __future__ import annotations

from typing import Optional

import torch

from coset.quant import QuantizationConfig

from .center import code_offset, layer_dot, offset_dots
from .checks import block_scales, broadcast_lead, check_codes, check_config, check_same_code
from .index import label_index
from .tables import TwoSidedLUT, build_one_sided_lut, build_two_sided_lut

__all__ = ["lut_inner_product", "lut_inner_product_one_sided"]


def _torch_only(backend) -> None:
    # Elementwise pairs are memory-bound gathers; the agreed native ops cover the (n, m) products only.
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend {backend!r} has no elementwise LUT kernel; use 'auto' or 'torch'")


def _check_lut(lut, config: QuantizationConfig) -> TwoSidedLUT:
    if lut is None:
        return build_two_sided_lut(config.lattice, config.q, tie_dither=config.with_tie_dither)
    if not isinstance(lut, TwoSidedLUT):
        raise TypeError(f"lut must be a TwoSidedLUT (from build_two_sided_lut) or None, got {type(lut).__name__}")
    lat = config.lattice
    if (lut.lattice_name, lut.q, lut.dim, lut.tie_dither) != (lat.name, config.q, lat.dim, config.with_tie_dither):
        raise ValueError(
            f"lut was built for ({lut.lattice_name}, q={lut.q}, tie_dither={lut.tie_dither}) but the codes are "
            f"({lat.name}, q={config.q}, tie_dither={config.with_tie_dither})"
        )
    return lut


def lut_inner_product(
    bx: torch.Tensor,
    by: torch.Tensor,
    config: QuantizationConfig,
    Tx: Optional[torch.Tensor] = None,
    Ty: Optional[torch.Tensor] = None,
    *,
    config_y: Optional[QuantizationConfig] = None,
    lut: Optional[TwoSidedLUT] = None,
    dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> torch.Tensor:
    """Two-sided ``<x̂, ŷ>`` of d-blocks from their labels, without decoding.

    Parameters
    ----------
    bx : (..., M, d) integer labels of x (from :func:`coset.quant.encode` with ``config``)
    by : (..., M', d) integer labels of y; leading dims broadcast with ``bx``
    config : QuantizationConfig of x (``with_dither`` must be False)
    Tx, Ty : (...) integer scale steps, or None (all zero)
    config_y : config of y if it differs (same lattice and q required; beta, alpha, M, center may differ)
    lut : a :class:`TwoSidedLUT` for (lattice, q); built and cached when None
    dtype : result dtype (the integer part is exact; only the scaling rounds)
    backend : "auto" or "torch" (there is no native elementwise kernel)

    Returns
    -------
    (broadcast of ...) tensor of ``dtype``
    """
    _torch_only(backend)
    cx = check_config(config)
    cy = cx if config_y is None else check_config(config_y, "config_y")
    check_same_code(cx, cy, "config", "config_y")
    check_codes(bx, Tx, cx, "bx", "Tx")
    check_codes(by, Ty, cy, "by", "Ty")
    broadcast_lead(bx.shape[:-2], by.shape[:-2], "bx", "by")
    lut = _check_lut(lut, cx)
    q = cx.q
    ix = label_index(bx, q)  # (..., M)
    iy = label_index(by, q)  # (..., M')
    tab = lut.table.to(ix.device)
    g = tab[ix.unsqueeze(-1), iy.unsqueeze(-2)].to(torch.int64 if not tab.dtype.is_floating_point else torch.float64)
    wx = torch.tensor([q**m for m in range(cx.M)], device=ix.device, dtype=g.dtype)
    wy = torch.tensor([q**m for m in range(cy.M)], device=ix.device, dtype=g.dtype)
    s = ((g * wy).sum(-1) * wx).sum(-1)  # exact integer sum of the M x M' table entries
    sx = block_scales(Tx, bx.shape[:-2], cx, torch.float64, ix.device)
    sy = block_scales(Ty, by.shape[:-2], cy, torch.float64, ix.device)
    s = s.to(torch.float64)
    ox, oy = code_offset(cx, ix.device), code_offset(cy, ix.device)
    if oy is not None:
        s = s - layer_dot(ix, offset_dots(cx, oy), q)  # <P_x, c_y>
    if ox is not None:
        s = s - layer_dot(iy, offset_dots(cy, ox), q)  # <c_x, P_y>
    if ox is not None and oy is not None:
        s = s + float(ox @ oy)
    return (s * sx * sy).to(dtype)


def lut_inner_product_one_sided(
    bx: torch.Tensor,
    y: torch.Tensor,
    config: QuantizationConfig,
    Tx: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One-sided ``<x̂, y>`` of an encoded d-block and an unquantized one: ``s_x sum_m q^m <a(bx_m), y>``
    (minus ``s_x <c, y>`` for centred codes).

    This builds a ``q^d`` table per ``y`` block, so it pays off only when each table is reused over many
    encoded rows (:func:`coset.lut.lut_matmul_one_sided`); it is the definition, batched.

    Parameters
    ----------
    bx : (..., M, d) integer labels
    y : (..., d) float tensor; leading dims broadcast with ``bx``'s
    config : QuantizationConfig of x (``with_dither`` must be False)
    Tx : (...) integer scale steps or None
    backend : "auto" or "torch"

    Returns
    -------
    (broadcast of ...) tensor, float64 for float64 ``y``, else float32
    """
    _torch_only(backend)
    cx = check_config(config)
    check_codes(bx, Tx, cx, "bx", "Tx")
    tables = build_one_sided_lut(y, cx.lattice, cx.q, cx.with_tie_dither)  # (..., Q)
    broadcast_lead(bx.shape[:-2], y.shape[:-1], "bx", "y")
    ix = label_index(bx, cx.q)  # (..., M)
    lead = torch.broadcast_shapes(ix.shape[:-1], tables.shape[:-1])
    tables = tables.expand(*lead, tables.shape[-1])
    ix = ix.expand(*lead, ix.shape[-1]).to(tables.device)
    vals = torch.gather(tables, -1, ix)  # (..., M)
    w = torch.tensor([float(cx.q**m) for m in range(cx.M)], dtype=tables.dtype, device=tables.device)
    sx = block_scales(Tx, bx.shape[:-2], cx, tables.dtype, tables.device)
    acc = (vals * w).sum(-1)
    c = code_offset(cx, tables.device)
    if c is not None:
        acc = acc - (y.to(tables.dtype) @ c.to(tables.dtype)).expand(*lead)
    return acc * sx
