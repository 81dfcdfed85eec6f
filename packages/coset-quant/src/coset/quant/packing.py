"""Bit-packing of labels: ``ceil(log2 q)`` bits per label, little-endian, so storage equals the rate.

Byte layout (all paths): label i occupies bits ``[i k, (i+1) k)`` of a little-endian bit stream,
``k = ceil(log2 q)``, the last byte zero-padded. Bit widths dividing 8 (k = 1, 2, 4) use a vectorized
shift-and-sum of ``8 // k`` labels per byte; k = 8 is a plain cast; the other widths (3, 5, 6, 7), whose
labels straddle byte boundaries, go through a bit expansion.
"""

from __future__ import annotations

import math
import operator

import torch

from coset.lattice.validate import check_q

__all__ = ["pack_labels", "unpack_labels", "packed_nbytes", "pack_uint", "unpack_uint"]


def _bits(q) -> int:
    return (check_q(q, 256) - 1).bit_length()


def packed_nbytes(numel: int, q: int) -> int:
    """Bytes used by :func:`pack_labels` for ``numel`` labels."""
    return math.ceil(numel * _bits(q) / 8)


def _pack_bits(flat: torch.Tensor, k: int) -> torch.Tensor:
    """General path: int64 ``(n,)`` labels -> bytes through an ``(n k,)`` bit expansion (any k)."""
    shifts = torch.arange(k, device=flat.device)
    bits = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (bits.reshape(-1, 8) * weights).sum(-1, dtype=torch.int64).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: bytes -> int64 ``(n,)`` values."""
    shifts = torch.arange(8, device=packed.device)
    bits = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(-1)[: n * k]
    w = 1 << torch.arange(k, device=packed.device, dtype=torch.int64)
    return (bits.reshape(n, k) * w).sum(-1)


def pack_uint(values: torch.Tensor, k: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2^k`` (any k in [0, 62]) into ``ceil(n k / 8)`` bytes, same bit layout
    as :func:`pack_labels`; k = 0 gives no bytes (every value is 0). No checks: callers validate."""
    flat = values.reshape(-1).to(torch.int64)
    if k == 0 or flat.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=values.device)
    if k == 8:
        return flat.to(torch.uint8)
    if 8 % k == 0:
        return _pack_shift(flat, k)
    return _pack_bits(flat, k)


def unpack_uint(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``ceil(n k / 8)`` bytes -> int64 ``(n,)`` (no checks)."""
    if k == 0 or n == 0:
        return torch.zeros(n, dtype=torch.int64, device=packed.device)
    if k == 8:
        return packed[:n].to(torch.int64)
    if 8 % k == 0:
        return _unpack_shift(packed, k, n).to(torch.int64)
    return _unpack_bits(packed, k, n)


def _pack_shift(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Fast path for k in {1, 2, 4}: byte j = sum_i label[j per + i] << (i k), ``per = 8 // k``."""
    per = 8 // k
    flat = flat.to(torch.int32)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, device=flat.device, dtype=torch.int32) * k
    return (flat.reshape(-1, per) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def _unpack_shift(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_shift`."""
    per = 8 // k
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * k
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << k) - 1)
    return vals.reshape(-1)[:n].to(torch.uint8)


def _check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}") from None
    out = []
    for s in dims:
        try:
            v = operator.index(s)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise TypeError(f"shape must hold ints, got {dims!r}") from None
        if isinstance(s, bool) or v < 0:
            raise ValueError(f"shape must hold non-negative ints, got {dims!r}")
        out.append(v)
    return tuple(out)


def pack_labels(b: torch.Tensor, q: int) -> torch.Tensor:
    """Pack a label tensor into a flat uint8 tensor of ``packed_nbytes(b.numel(), q)`` bytes.

    Parameters
    ----------
    b : (...) integer tensor, values in [0, q)
    q : int in [2, 256]

    Returns
    -------
    (ceil(b.numel() k / 8),) uint8, ``k = ceil(log2 q)``: label i (row-major) at bits ``[i k, (i+1) k)`` of
    the little-endian bit stream. The shape is not stored: keep it beside the bytes and pass it to
    :func:`unpack_labels`.

    Raises
    ------
    TypeError if ``b`` is not an integer tensor; ValueError for a bad ``q`` or labels outside [0, q).
    """
    k = _bits(q)
    if not isinstance(b, torch.Tensor) or b.dtype.is_floating_point or b.dtype.is_complex or b.dtype == torch.bool:
        raise TypeError("b must be an integer tensor of labels")
    flat = b.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= q):
        raise ValueError(f"labels must lie in [0, q={q})")
    if k == 8:
        return flat.to(torch.uint8)
    if 8 % k == 0:
        return _pack_shift(flat, k)
    return _pack_bits(flat.to(torch.int64), k)


def unpack_labels(packed: torch.Tensor, q: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_labels`.

    Parameters
    ----------
    packed : (packed_nbytes(prod(shape), q),) uint8
    q : int in [2, 256]
    shape : the label tensor's shape

    Returns
    -------
    uint8 tensor of ``shape``

    Raises
    ------
    TypeError if ``packed`` is not a uint8 tensor or ``shape`` not a sequence of ints; ValueError for a bad
    ``q``, a negative dimension, a byte count that does not match ``shape``, or bytes that decode to a label
    ``>= q`` (possible when q is not a power of two: corrupted data).
    """
    k = _bits(q)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor")
    shape = _check_shape(shape)
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n, q):
        raise ValueError(f"packed has {packed.numel()} bytes, expected {packed_nbytes(n, q)} for shape {shape}")
    out = unpack_uint(packed.reshape(-1), k, n).reshape(shape)
    if n and q != 1 << k and int(out.max()) >= q:
        raise ValueError(f"packed holds labels >= q={q}: the bytes are corrupted or were packed with another q")
    return out.to(torch.uint8)
