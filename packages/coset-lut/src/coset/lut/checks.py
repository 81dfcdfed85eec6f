"""Argument validation shared by the LUT entry points (clear TypeError/ValueError naming the argument)."""

from __future__ import annotations

from typing import Optional

import torch

from coset.quant import QuantizationConfig

__all__ = ["check_config", "check_codes", "block_scales"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{bname} must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype not in _INT_DTYPES:
        raise TypeError(f"{bname} must be an integer tensor of labels, got dtype {b.dtype}")
    d = config.dim
    if b.ndim < 2 or b.shape[-1] != d or b.shape[-2] != config.M:
        raise ValueError(f"{bname} must have shape (..., M={config.M}, d={d}), got {tuple(b.shape)}")
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= config.q):
        raise ValueError(f"labels in {bname} must lie in [0, q={config.q})")
    if T is None:
        return
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"{tname} must be a torch.Tensor or None, got {type(T).__name__}")
    if T.dtype not in _INT_DTYPES:
        raise TypeError(f"{tname} must be an integer tensor, got dtype {T.dtype}")
    if T.shape != b.shape[:-2]:
        raise ValueError(f"{tname} must have shape {tuple(b.shape[:-2])} (that of {bname} without M, d), got {tuple(T.shape)}")
    cap = config.max_scaling_iterations
    if T.numel() and (int(T.min()) < 0 or int(T.max()) > cap):
        raise ValueError(f"{tname} must lie in [0, max_scaling_iterations={cap}]")


def block_scales(T: Optional[torch.Tensor], shape, config: QuantizationConfig, dtype=torch.float32, device=None):
    """``s = config.scales[T]`` (``beta 2^(alpha T)``), shape ``shape``; T None means all zero."""
    scales = torch.tensor(config.scales, dtype=torch.float64, device=device)
    if T is None:
        return scales[0].to(dtype).expand(shape)
    return scales[T.to(device=scales.device, dtype=torch.int64)].to(dtype)
