"""Automatic scales from the data: ``beta = float32(scale * rms)`` per row of a matrix, or one for all of it.

A QAT layer re-derives its weight's per-channel betas (and its input's per-tensor beta) at every training step.
To let a kernel compute them in the call that quantizes the rows (no torch reductions and conversions around
it), the sum of squares has one fixed order, which this module defines and every backend follows bit for bit:

* the squares are taken in float64 (exact for float32 data);
* element ``i`` of the sequence goes to lane ``i mod 16``; each lane accumulates in index order, the missing
  elements of the last group counting as zeros;
* the 16 lanes combine as ``s = (l[0:4] + l[4:8]) + (l[8:12] + l[12:16])`` and ``(s0 + s2) + (s1 + s3)``.

Then ``rms = sqrt(S) / sqrt(n)`` and ``beta = float32(scale * rms)`` (float64 arithmetic, one rounding to float32),
or 1 for an all-zero sequence. Per row the sequence is the row (``n = k``); for one beta for the whole matrix it
is the matrix read row after row (``n = R k``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coset.lattice.validate import check_bool, check_pos

__all__ = ["RmsBetas", "rms_betas", "row_sumsq", "check_rms_betas"]

_LANES = 16
_CHUNK = 4096  # lane steps per cumsum call (bounds the float64 temporary)


@dataclass(frozen=True)
class RmsBetas:
    """Ask :func:`coset.quant.quantize_rows` to derive the betas from the rows themselves.

    Parameters
    ----------
    scale : finite float > 0; ``beta = float32(scale * rms)``
    per_row : True: one beta per row (rms of the row); False: one beta for the whole matrix, repeated per row
    """

    scale: float
    per_row: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_pos("scale", self.scale))
        check_bool("per_row", self.per_row)


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """Float64 sums of squares of the rows of ``x: (R, n)`` in the module's fixed order: ``(R,)`` float64.

    The per-lane sums run through ``torch.cumsum`` (a sequential scan on the CPU), chunk by chunk with the running
    sums prepended, so the additions happen in index order whatever the length.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise TypeError("x must be a floating (R, n) torch.Tensor")
    R, n = x.shape
    out = torch.empty((R,), dtype=torch.float64, device=x.device)
    rows = max(1, (1 << 16) // max(n, 1))  # ~0.5 MB of float64 per block of rows: no page faults, cache-resident
    for r0 in range(0, R, rows):
        out[r0 : r0 + rows] = _sumsq_block(x[r0 : r0 + rows])
    return out


def _sumsq_block(x: torch.Tensor) -> torch.Tensor:
    R, n = x.shape
    pad = (-n) % _LANES
    x64 = x.detach().to(torch.float64, copy=True)  # a new tensor: squared in place
    if pad:
        x64 = torch.cat([x64, x64.new_zeros((R, pad))], dim=1)
    sq = x64.mul_(x64).reshape(R, -1, _LANES)  # (R, steps, 16)
    if sq.shape[1] == 0:
        return torch.zeros((R,), dtype=torch.float64, device=x.device)
    acc = sq[:, :_CHUNK].cumsum(dim=1)[:, -1:]  # (a running sum starts at the first element: 0 + a = a)
    for j in range(_CHUNK, sq.shape[1], _CHUNK):
        acc = torch.cat([acc, sq[:, j : j + _CHUNK]], dim=1).cumsum(dim=1)[:, -1:]
    lanes = acc[:, 0]
    s = (lanes[:, 0:4] + lanes[:, 4:8]) + (lanes[:, 8:12] + lanes[:, 12:16])
    return (s[:, 0] + s[:, 2]) + (s[:, 1] + s[:, 3])


def _scaled_rms(x64: torch.Tensor) -> torch.Tensor:
    """rms of each row when the float64 squares overflow (float64 data only): scaled by the largest magnitude."""
    m = x64.abs().amax(dim=1, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return m.squeeze(1) * (x64 / m).pow(2).mean(dim=1).sqrt()


def check_rms_betas(b: torch.Tensor, x: torch.Tensor) -> None:
    """ValueError when rms betas ``b`` (> 0 where finite) derived from ``x`` are not all finite: NaN/Inf in ``x``,
    or a beta past the float32 range."""
    if b.numel() and not math.isfinite(float(b.max())):  # betas are > 0: the max is finite iff all are (NaN too)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf")
        raise ValueError("x: the rms beta overflows float32 (entries near the float32 limit); rescale the input")


def rms_betas(x: torch.Tensor, spec: RmsBetas) -> torch.Tensor:
    """The betas :class:`RmsBetas` asks for, for ``x: (R, k)``: ``(R,)`` float64 holding float32 values.

    Raises
    ------
    TypeError for a non-tensor / non-float / non-2-D ``x`` or a spec that is not an :class:`RmsBetas`;
    ValueError when ``x`` holds NaN or Inf, or when a beta overflows float32 (entries near the float32 limit).
    """
    if not isinstance(spec, RmsBetas):
        raise TypeError(f"spec must be an RmsBetas, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise TypeError("x must be a floating (R, k) torch.Tensor")
    R, k = x.shape
    seq = x if spec.per_row else x.reshape(1, R * k)
    n = seq.shape[1]
    s = row_sumsq(seq)
    if not bool(torch.isfinite(s).all()):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf")
        rms = _scaled_rms(seq.detach().to(torch.float64))  # float64 squares overflowed
    else:
        rms = s.sqrt() / math.sqrt(max(n, 1))
    b = torch.where(s == 0, torch.ones_like(rms), rms * spec.scale).to(torch.float32)
    check_rms_betas(b, x)
    b = b.to(torch.float64)
    return b if spec.per_row else b.expand(R)
