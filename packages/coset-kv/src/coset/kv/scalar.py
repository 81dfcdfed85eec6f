"""KIVI-style asymmetric integer quantization (Liu et al. 2024), the scalar baseline of the KV cache.

Keys per channel over a group of tokens, values per token over the head dimension: ``x = scale * code +
zero`` with ``code`` in ``[0, 2^bits)``, ``scale = (max - min) / (2^bits - 1)`` and ``zero = min`` stored in
float16 (the quantization uses the float16-rounded values, so decoding is exact to the stored numbers).
Codes are bit-packed per head vector (``D bits / 8`` bytes; D a multiple of 8).
"""

from __future__ import annotations

import torch

from coset.quant import pack_labels, unpack_labels

__all__ = ["quantize_tokens", "quantize_channels", "dequantize_tokens", "dequantize_channels"]


def _minmax_code(x: torch.Tensor, bits: int, dim: int):
    levels = 2**bits - 1
    mn = x.amin(dim=dim, keepdim=True).to(torch.float16)
    mx = x.amax(dim=dim, keepdim=True)
    scale = ((mx - mn.to(torch.float32)) / levels).to(torch.float16)
    s = scale.to(torch.float32)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    code = torch.round((x - mn.to(torch.float32)) / safe).clamp_(0, levels).to(torch.uint8)
    return code, scale, mn


def _pack(code: torch.Tensor, bits: int) -> torch.Tensor:
    B, H, L, D = code.shape
    return pack_labels(code, 2**bits).view(B, H, L, D * bits // 8)


def _unpack(packed: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    B, H, L, _ = packed.shape
    return unpack_labels(packed.reshape(-1), 2**bits, (B, H, L, D))


def _check(x, bits: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("states must be a floating torch.Tensor")
    if x.ndim != 4 or x.shape[-1] % 8:
        raise ValueError(f"states must have shape (B, H, L, D) with D a multiple of 8, got {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("states contain NaN or Inf")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def quantize_tokens(x: torch.Tensor, bits: int):
    """Per-token quantization of ``(B, H, L, D)``: returns ``(packed (B,H,L,D bits/8) uint8, scale (B,H,L)
    float16, zero (B,H,L) float16)``."""
    _check(x, bits)
    code, scale, zero = _minmax_code(x.to(torch.float32), bits, dim=-1)
    return _pack(code, bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_tokens(packed, scale, zero, bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`quantize_tokens`: ``(B, H, L, D)`` float32."""
    code = _unpack(packed, bits, D).to(torch.float32)
    return code * scale.to(torch.float32).unsqueeze(-1) + zero.to(torch.float32).unsqueeze(-1)


def quantize_channels(x: torch.Tensor, bits: int):
    """Per-channel quantization of one token group ``(B, H, G, D)`` (min/max over the G tokens): returns
    ``(packed (B,H,G,D bits/8) uint8, scale (B,H,1,D) float16, zero (B,H,1,D) float16)``."""
    _check(x, bits)
    code, scale, zero = _minmax_code(x.to(torch.float32), bits, dim=-2)
    return _pack(code, bits), scale, zero


def dequantize_channels(packed, scale, zero, bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`quantize_channels` for groups laid end to end: ``packed (B,H,nG*G,D bits/8)``,
    ``scale, zero (B,H,nG,D)`` -> ``(B, H, nG*G, D)`` float32."""
    code = _unpack(packed, bits, D).to(torch.float32)
    B, H, L, _ = code.shape
    nG = scale.shape[2]
    if nG == 0:
        return code
    G = L // nG
    code = code.view(B, H, nG, G, D)
    out = code * scale.to(torch.float32).unsqueeze(3) + zero.to(torch.float32).unsqueeze(3)
    return out.view(B, H, L, D)
