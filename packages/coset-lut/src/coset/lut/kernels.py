"""The two LUT scoring ops, dispatched to a native backend (coset-cuda) or run by the PyTorch fallback.

Interface agreed with coset-cuda (the backend object is found with
``coset.quant.backend.select_backend(backend, op, ix, None, None)``)::

    lut_one_sided(ix, sx, tables, q) -> (n, m) float32
        ix (n, K, M) int32, sx (n, K) float32, tables (m, K, Q) float32
        scores[r, j] = sum_k sx[r,k] * sum_mm q^mm * tables[j, k, ix[r,k,mm]]
    lut_two_sided(ix, sx, iy, sy, lut, q) -> (n, m) float32
        iy (m, K, M) int32, sy (m, K) float32, lut (Q, Q) int8/int16/int32
        out[r, j] = sum_k sx[r,k] sy[j,k] sum_{mm,ll} q^(mm+ll) lut[ix[r,k,mm], iy[j,k,ll]]

The fallback never materializes ``(n, m, K, M)``: both ops become ``embedding_bag`` sums over rows of a
``(K*Q, m)`` table (one bag of K*M weighted lookups per encoded row), chunked so that no temporary
exceeds ~64 MiB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coset.quant.backend import select_backend

__all__ = ["one_sided_scores", "two_sided_scores", "torch_one_sided", "torch_two_sided"]

_CHUNK_BYTES = 64 * 2**20


def _layer_weights(q: int, M: int, device) -> torch.Tensor:
    return torch.tensor([float(q**m) for m in range(M)], dtype=torch.float32, device=device)


def _check_one_sided(ix, sx, tables) -> None:
    """Shapes of the ``lut_one_sided`` interface (a mismatch would surface as a raw reshape error inside)."""
    for name, t, nd in (("ix", ix, 3), ("sx", sx, 2), ("tables", tables, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != nd:
            raise ValueError(f"{name} must be {nd}-d, got shape {tuple(t.shape)}")
    if tuple(sx.shape) != tuple(ix.shape[:2]) or tables.shape[1] != ix.shape[1]:
        raise ValueError(
            f"shapes do not match: ix (n, K, M) {tuple(ix.shape)}, sx (n, K) {tuple(sx.shape)}, tables (m, K, Q) "
            f"{tuple(tables.shape)}"
        )


def torch_one_sided(ix: torch.Tensor, sx: torch.Tensor, tables: torch.Tensor, q: int) -> torch.Tensor:
    """PyTorch reference of ``lut_one_sided`` (same arguments and result).

    Raises
    ------
    TypeError / ValueError for arguments whose shapes do not match the interface.
    """
    _check_one_sided(ix, sx, tables)
    n, K, M = ix.shape
    m, _, Q = tables.shape
    out = torch.empty((n, m), dtype=torch.float32, device=ix.device)
    if n == 0 or m == 0:
        return out.zero_()
    # Row (k*Q + i) holds the m query scores of label index i in block k: one lookup reads all queries.
    weight = tables.permute(1, 2, 0).contiguous().view(K * Q, m)  # row-major: one lookup = one contiguous row
    if m == 1:  # embedding_bag has no fast kernel for 1-wide rows (~15x slower); a zero column costs ~nothing
        weight = torch.nn.functional.pad(weight, (0, 1))
    # int32 offsets: embedding_bag takes int32 indices, and the int32 add is ~10x faster than widening first
    it = torch.int32 if K * Q < 2**31 else torch.int64
    offs = (torch.arange(K, device=ix.device, dtype=it) * Q).view(1, K, 1)
    lw = _layer_weights(q, M, ix.device).view(1, 1, M)
    rows = max(1, _CHUNK_BYTES // (K * M * 12 + m * 4))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        flat = (ix[r0:r1].to(it) + offs).reshape(r1 - r0, K * M)
        psw = (sx[r0:r1].unsqueeze(-1) * lw).reshape(r1 - r0, K * M)
        out[r0:r1] = F.embedding_bag(flat, weight, mode="sum", per_sample_weights=psw)[:, :m]
    return out


def _half_tables(iy: torch.Tensor, sy: torch.Tensor, lut_f: torch.Tensor, q: int) -> torch.Tensor:
    """``u[j, k, :] = sy[j,k] sum_ll q^ll lut[iy[j,k,ll], :]`` = one-sided tables of the decoded rows."""
    m, K, M = iy.shape
    lw = _layer_weights(q, M, iy.device).view(1, 1, M)
    psw = (sy.unsqueeze(-1) * lw).reshape(m * K, M)
    u = F.embedding_bag(iy.to(torch.int32).reshape(m * K, M), lut_f, mode="sum", per_sample_weights=psw)
    return u.view(m, K, lut_f.shape[1])


def torch_two_sided(
    ix: torch.Tensor, sx: torch.Tensor, iy: torch.Tensor, sy: torch.Tensor, lut: torch.Tensor, q: int
) -> torch.Tensor:
    """PyTorch reference of ``lut_two_sided`` (same arguments and result).

    ``<x̂, ŷ>`` per block is the one-sided score of x̂ against the tables ``u = sy * sum q^l lut[iy_l, :]``
    of ŷ; the tables are built for the side with fewer rows, in chunks, then one-sided scoring runs.
    """
    n, m = ix.shape[0], iy.shape[0]
    if n < m:  # symmetric: build tables for the smaller side
        return torch_two_sided(iy, sy, ix, sx, lut, q).T.contiguous()
    out = torch.empty((n, m), dtype=torch.float32, device=ix.device)
    if n == 0 or m == 0:
        return out.zero_()
    K, Q = iy.shape[1], lut.shape[0]
    lut_f = lut.to(torch.float32)
    cols = max(1, _CHUNK_BYTES // (K * Q * 4))
    for c0 in range(0, m, cols):
        c1 = min(m, c0 + cols)
        u = _half_tables(iy[c0:c1], sy[c0:c1], lut_f, q)
        out[:, c0:c1] = torch_one_sided(ix, sx, u, q)
    return out


def one_sided_scores(ix, sx, tables, q: int, backend: str = "auto") -> torch.Tensor:
    """Dispatch ``lut_one_sided`` (arguments already in the interface's dtypes and layout)."""
    _check_one_sided(ix, sx, tables)
    be = select_backend(backend, "lut_one_sided", ix, None, None)
    if be is None:
        return torch_one_sided(ix, sx, tables, q)
    return be.lut_one_sided(ix, sx, tables, q)


def two_sided_scores(ix, sx, iy, sy, lut, q: int, backend: str = "auto") -> torch.Tensor:
    """Dispatch ``lut_two_sided`` (arguments already in the interface's dtypes and layout)."""
    be = select_backend(backend, "lut_two_sided", ix, None, None)
    if be is None:
        return torch_two_sided(ix, sx, iy, sy, lut, q)
    return be.lut_two_sided(ix, sx, iy, sy, lut, q)
