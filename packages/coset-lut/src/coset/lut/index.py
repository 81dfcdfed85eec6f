"""Label <-> table index: the base-q digits of a d-dim label, little-endian (paper.md §6)."""

from __future__ import annotations

import torch

from coset.lattice.validate import check_int, check_int_tensor

__all__ = ["label_index", "index_labels"]


def _check_q_d(q, d: int) -> None:
    check_int("q", q, 2)
    check_int("d", d, 1)
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
    check_int_tensor("b", b)
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
    check_int_tensor("idx", idx)
    _check_q_d(q, d)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= q**d):
        raise ValueError(f"idx must lie in [0, q**d = {q**d})")
    w = q ** torch.arange(d, dtype=torch.int64, device=idx.device)
    out = torch.div(idx.to(torch.int64).unsqueeze(-1), w, rounding_mode="floor") % q
    return out.to(torch.uint8) if q <= 256 else out
