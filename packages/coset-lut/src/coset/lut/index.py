"""Label <-> table index: the base-q digits of a d-dim label, little-endian (paper.md §6)."""

from __future__ import annotations

import torch

__all__ = ["label_index", "index_labels"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_q_d(q, d: int) -> None:
    if isinstance(q, bool) or not isinstance(q, int) or q < 2:
        raise ValueError(f"q must be an int >= 2, got {q!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    if q**d > 2**62:  # indices are int64
        raise ValueError(f"q**d = {q}**{d} does not fit an int64 index")


def label_index(b: torch.Tensor, q: int) -> torch.Tensor:
    """Index of each label in ``[0, q**d)``: ``idx = sum_i b_i q**i``.

    Parameters
    ----------
    b : (..., d) integer tensor, entries in [0, q)
    q : int >= 2

    Returns
    -------
    (...) int64 tensor
    """
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype not in _INT_DTYPES:
        raise TypeError(f"b must be an integer tensor of labels, got dtype {b.dtype}")
    if b.ndim == 0:
        raise ValueError("b must have shape (..., d)")
    d = b.shape[-1]
    _check_q_d(q, d)
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= q):
        raise ValueError(f"labels in b must lie in [0, q={q})")
    w = q ** torch.arange(d, dtype=torch.int64, device=b.device)
    return (b.to(torch.int64) * w).sum(-1)


def index_labels(idx: torch.Tensor, q: int, d: int) -> torch.Tensor:
    """Inverse of :func:`label_index`: ``(...)`` indices in ``[0, q**d)`` -> ``(..., d)`` labels.

    Returns uint8 labels for ``q <= 256`` (the dtype :func:`coset.quant.encode` uses), else int64.
    """
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in _INT_DTYPES:
        raise TypeError(f"idx must be an integer tensor, got dtype {idx.dtype}")
    _check_q_d(q, d)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= q**d):
        raise ValueError(f"idx must lie in [0, q**d = {q**d})")
    w = q ** torch.arange(d, dtype=torch.int64, device=idx.device)
    out = torch.div(idx.to(torch.int64).unsqueeze(-1), w, rounding_mode="floor") % q
    return out.to(torch.uint8) if q <= 256 else out
