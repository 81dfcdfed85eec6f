"""Argument validation shared by the LUT entry points (clear TypeError/ValueError naming the argument)."""

from __future__ import annotations

from typing import Optional

import torch

from coset.lattice.validate import check_int_tensor
from coset.quant import QuantizationConfig

__all__ = ["check_config", "check_codes", "check_same_code", "broadcast_lead", "block_scales"]


def check_config(config, argname: str = "config") -> QuantizationConfig:
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"{argname} must be a QuantizationConfig, got {type(config).__name__}")
    if config.with_dither:
        # The LUT identity <x̂,ŷ> = s_x s_y sum q^(m+l) <a,a'> holds for x̂ = s * sum q^m a_m, i.e. z = 0;
        # a random subtractive dither adds -<z_x,ŷ> - <x̂,z_y> + <z_x,z_y> with a different z per block, which
        # no table holds. (The fixed centring offset of config.center is one vector: see coset.lut.center.)
        raise ValueError(
            f"{argname}.with_dither=True is not supported by the LUT paths: they assume dither z = 0 "
            "(x̂ = s * sum_m q^m a(b_m)); encode with with_dither=False"
        )
    return config


def check_codes(b, T: Optional[torch.Tensor], config: QuantizationConfig, bname: str, tname: str) -> None:
    """``b``: (..., M, d) integer labels in [0, q); ``T``: None or (...) integer in [0, cap]."""
    check_int_tensor(bname, b)
    d = config.dim
    if b.ndim < 2 or b.shape[-1] != d or b.shape[-2] != config.M:
        raise ValueError(f"{bname} must have shape (..., M={config.M}, d={d}), got {tuple(b.shape)}")
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= config.q):
        raise ValueError(f"labels in {bname} must lie in [0, q={config.q})")
    if T is None:
        return
    check_int_tensor(tname, T)
    if T.shape != b.shape[:-2]:
        raise ValueError(f"{tname} must have shape {tuple(b.shape[:-2])} (that of {bname} without M, d), got {tuple(T.shape)}")
    cap = config.max_scaling_iterations
    if T.numel() and (int(T.min()) < 0 or int(T.max()) > cap):
        raise ValueError(f"{tname} must lie in [0, max_scaling_iterations={cap}]")


def check_same_code(cx: QuantizationConfig, cy: QuantizationConfig, xname: str, yname: str) -> None:
    """The two operands of a LUT product must share lattice (by name, case-insensitively), q and tie rule."""
    kx = (cx.lattice.name, cx.q, cx.with_tie_dither)
    ky = (cy.lattice.name, cy.q, cy.with_tie_dither)
    if kx != ky:
        raise ValueError(
            f"{xname} and {yname} must share lattice_type, q and with_tie_dither; got ({cx.lattice_type}, {cx.q}, "
            f"{cx.with_tie_dither}) and ({cy.lattice_type}, {cy.q}, {cy.with_tie_dither})"
        )


def broadcast_lead(a, b, aname: str, bname: str) -> tuple:
    """``torch.broadcast_shapes(a, b)`` or a ValueError naming the two arguments."""
    try:
        return tuple(torch.broadcast_shapes(tuple(a), tuple(b)))
    except RuntimeError:
        raise ValueError(
            f"the leading dims of {aname} {tuple(a)} and {bname} {tuple(b)} do not broadcast"
        ) from None


def block_scales(T: Optional[torch.Tensor], shape, config: QuantizationConfig, dtype=torch.float32, device=None):
    """``s = config.scales[T]`` (``beta 2^(alpha T)``), shape ``shape``; T None means all zero."""
    scales = torch.tensor(config.scales, dtype=torch.float64, device=device)
    if T is None:
        return scales[0].to(dtype).expand(shape)
    return scales[T.to(device=scales.device, dtype=torch.int64)].to(dtype)
