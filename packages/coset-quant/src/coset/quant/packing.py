"""Bit-packing of labels: ``ceil(log2 q)`` bits per label, little-endian, so storage equals the rate."""

from __future__ import annotations

import math

import torch

__all__ = ["pack_labels", "unpack_labels", "packed_nbytes"]


def _bits(q) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q <= 256:
        raise ValueError(f"q must be an int in [2, 256], got {q!r}")
    return (q - 1).bit_length()


def packed_nbytes(numel: int, q: int) -> int:
    """Bytes used by :func:`pack_labels` for ``numel`` labels."""
    return math.ceil(numel * _bits(q) / 8)


def pack_labels(b: torch.Tensor, q: int) -> torch.Tensor:
    """Pack a label tensor (any shape, values in [0, q)) into a flat uint8 tensor of ``packed_nbytes`` bytes.

    Label i occupies bits ``[i k, (i+1) k)`` of the little-endian bit stream, ``k = ceil(log2 q)``.
    The shape is not stored: keep it beside the bytes and pass it to :func:`unpack_labels`.
    """
    k = _bits(q)
    if not isinstance(b, torch.Tensor) or b.dtype.is_floating_point or b.dtype == torch.bool:
        raise TypeError("b must be an integer tensor of labels")
    flat = b.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= q):
        raise ValueError(f"labels must lie in [0, q={q})")
    if k == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(k, device=b.device)
    bits = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=b.device)).to(torch.uint8)
    return (bits.reshape(-1, 8) * weights).sum(-1, dtype=torch.int64).to(torch.uint8)


def unpack_labels(packed: torch.Tensor, q: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_labels`: bytes -> uint8 labels of ``shape``."""
    k = _bits(q)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor")
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n, q):
        raise ValueError(f"packed has {packed.numel()} bytes, expected {packed_nbytes(n, q)} for shape {shape}")
    if k == 8:
        return packed.reshape(shape).clone()
    shifts = torch.arange(8, device=packed.device)
    bits = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(-1)[: n * k]
    w = 1 << torch.arange(k, device=packed.device)
    return (bits.reshape(n, k) * w).sum(-1).to(torch.uint8).reshape(shape)
