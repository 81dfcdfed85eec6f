"""Matrix products from labels: two-sided ``X̂ Ŷ^T``, one-sided ``X̂ Y^T`` and ``lut_linear`` (``x Ŵ^T``).

Rows are split into K d-blocks (``EncodedMatrix``); each block carries its own scale. The scoring itself
runs in :mod:`coset.lut.kernels` (native backend when registered, else the PyTorch fallback). Centred codes
(``config.center``) add the small (n, K) x (K, m) corrections of :mod:`coset.lut.center` in float64.
"""

from __future__ import annotations

from typing import Optional

import torch

from coset.quant import to_blocks
from coset.quant.backend import select_backend

from .center import code_offset, layer_dot, offset_dots
from .checks import block_scales, check_same_code
from .encoded import EncodedMatrix
from .kernels import one_sided_scores, two_sided_scores
from .tables import DEFAULT_MAX_ENTRIES, build_one_sided_lut, build_two_sided_lut, representative_table

__all__ = ["lut_matmul", "lut_matmul_one_sided", "lut_linear"]

# Float tables of one chunk of queries stay below this many bytes (E8 q=4 has 2^16 entries per block).
_TABLE_BYTES = 64 * 2**20


def _check_encoded(X, name: str) -> EncodedMatrix:
    if not isinstance(X, EncodedMatrix):
        raise TypeError(f"{name} must be an EncodedMatrix (see EncodedMatrix.from_dense), got {type(X).__name__}")
    return X


def _check_dense(Y, k: int, name: str) -> None:
    if not isinstance(Y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(Y).__name__}")
    if not Y.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {Y.dtype}")
    if Y.ndim == 0 or Y.shape[-1] != k:
        raise ValueError(f"{name} must have last dimension k={k} (the encoded matrix's columns), got {tuple(Y.shape)}")
    if Y.numel() and not bool(torch.isfinite(Y).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _last_block(X: EncodedMatrix) -> torch.Tensor:
    """Decoded last d-block of every row, float64 (n, d), including the coordinates that are padding."""
    c = X.config
    a = representative_table(c.lattice, c.q, c.with_tie_dither).to(X.labels.device)
    ix = X.indices[:, -1].long()  # (n, M)
    w = torch.tensor([float(c.q**m) for m in range(c.M)], dtype=torch.float64, device=a.device)
    pts = (a[ix] * w.view(1, -1, 1)).sum(1)
    off = code_offset(c, a.device)
    if off is not None:
        pts = pts - off
    return pts * X.block_scales[:, -1].to(torch.float64).unsqueeze(-1)


def _scales64(X: EncodedMatrix) -> torch.Tensor:
    return block_scales(X.T, X.T.shape, X.config, torch.float64, X.labels.device)


def lut_matmul(
    X: EncodedMatrix,
    Y: EncodedMatrix,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    backend: str = "auto",
) -> torch.Tensor:
    """Two-sided ``X̂ @ Ŷ.T`` from labels only, through the ``q^d x q^d`` table of ``<a_i, a_j>``.

    Parameters
    ----------
    X : EncodedMatrix (n, k)
    Y : EncodedMatrix (m, k), same lattice, q and tie rule as X (beta, alpha and M may differ)
    max_entries : budget for the two-sided table (``ValueError`` names the size when exceeded)
    backend : "auto", "torch" or a registered backend name (op "lut_two_sided")

    Returns
    -------
    (n, m) float32

    Notes
    -----
    A padded last block (k not a multiple of d) decodes to values in the padding coordinates on *both*
    sides, so their product is subtracted exactly (an (n, pad) x (pad, m) correction).
    """
    _check_encoded(X, "X")
    _check_encoded(Y, "Y")
    cx, cy = X.config, Y.config
    check_same_code(cx, cy, "X", "Y")
    if X.k != Y.k:
        raise ValueError(f"X and Y must have the same number of columns k, got {X.k} and {Y.k}")
    lut = build_two_sided_lut(cx.lattice, cx.q, max_entries=max_entries, tie_dither=cx.with_tie_dither)
    ix, sx, iy, sy = X.indices, X.block_scales, Y.indices, Y.block_scales
    native_ok = cx.M == cy.M and not lut.table.dtype.is_floating_point
    if not native_ok and backend not in ("auto", "torch"):
        raise ValueError(f"backend {backend!r}: the native lut_two_sided op needs equal M and an integer table")
    out = two_sided_scores(ix, sx, iy, sy, lut.table if native_ok else lut.table_f32, cx.q,
                           backend if native_ok else "torch")
    ox, oy = code_offset(cx, ix.device), code_offset(cy, ix.device)
    if X.pad or ox is not None or oy is not None:
        out = out.to(torch.float64)
    if ox is not None or oy is not None:
        # <x̂, ŷ> = s_x s_y (<P_x,P_y> - <P_x,c_y> - <c_x,P_y> + <c_x,c_y>), per block: (n,K) x (K,m) matmuls
        sx64, sy64 = _scales64(X), _scales64(Y)
        if oy is not None:
            out = out - (sx64 * layer_dot(ix, offset_dots(cx, oy), cx.q)) @ sy64.T
        if ox is not None:
            out = out - sx64 @ (sy64 * layer_dot(iy, offset_dots(cy, ox), cy.q)).T
        if ox is not None and oy is not None:
            out = out + float(ox @ oy) * (sx64 @ sy64.T)
    if X.pad:
        d = cx.dim
        px, py = _last_block(X)[:, d - X.pad :], _last_block(Y)[:, d - Y.pad :]
        out = out - px @ py.T
    return out.to(torch.float32)


def lut_matmul_one_sided(X: EncodedMatrix, Y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """One-sided ``X̂ @ Y.T``: score encoded rows against unquantized queries (retrieval, ``W x``).

    Each query's d-blocks get a ``q^d`` table ``<a_i, y_k>``; each encoded row then costs ``K*M`` lookups
    per query. Zero padding of the queries makes the padding coordinates contribute nothing.

    Parameters
    ----------
    X : EncodedMatrix (n, k), the encoded database / weight
    Y : (m, k) float tensor, finite (or (k,) for a single query)
    backend : "auto", "torch" or a registered backend name (op "lut_one_sided"). When ``Y`` requires grad,
        "auto" uses the PyTorch fallback, which is differentiable in ``Y``.

    Returns
    -------
    (n, m) float32 (``(n,)`` for a 1-D ``Y``)
    """
    _check_encoded(X, "X")
    _check_dense(Y, X.k, "Y")
    if Y.ndim > 2:
        raise ValueError(f"Y must be (m, k) or (k,), got shape {tuple(Y.shape)}")
    if Y.ndim == 1:
        return lut_matmul_one_sided(X, Y.unsqueeze(0), backend=backend)[:, 0]
    if Y.requires_grad and torch.is_grad_enabled():
        # Native kernels are not differentiable; silently dropping the gradient would lose data.
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r} has no autograd support; Y requires grad, use 'auto' or 'torch'")
        backend = "torch"
    c = X.config
    lat, K, Q = c.lattice, X.num_blocks, c.q**c.dim
    blocks, _ = to_blocks(Y.to(torch.float32), c.dim)  # (m, K, d)
    ix, sx = X.indices, X.block_scales
    m = Y.shape[0]
    step = max(1, _TABLE_BYTES // (K * Q * 4))
    if step >= m:
        tables = build_one_sided_lut(blocks, lat, c.q, c.with_tie_dither).contiguous()
        out = one_sided_scores(ix, sx, tables, c.q, backend)
    else:
        cols = []
        for j0 in range(0, m, step):  # bound the (m, K, Q) tables
            tables = build_one_sided_lut(blocks[j0 : j0 + step], lat, c.q, c.with_tie_dither).contiguous()
            cols.append(one_sided_scores(ix, sx, tables, c.q, backend))
        out = torch.cat(cols, dim=1)
    off = code_offset(c, blocks.device)
    if off is not None:
        # <x̂, y> = s_x (<P_x, y> - <c, y>) per block: subtract sx (n,K) @ <c, y_jk> (K,m), zero padding included
        cy = blocks.to(torch.float64) @ off  # (m, K)
        out = (out.to(torch.float64) - _scales64(X) @ cy.T).to(torch.float32)
    return out


def lut_linear(
    x: torch.Tensor, W: EncodedMatrix, bias: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ Ŵ.T (+ bias)`` with an encoded weight, by the one-sided LUT path (no dequantized weight).

    Parameters
    ----------
    x : (..., k) float tensor
    W : EncodedMatrix (out_features, k)
    bias : (out_features,) float tensor or None
    backend : "auto", "torch" or a registered backend name; differentiable in ``x`` on the PyTorch path
        (chosen by "auto" when ``x`` requires grad)

    Returns
    -------
    (..., out_features) tensor of x's dtype (accumulated in float32)
    """
    _check_encoded(W, "W")
    _check_dense(x, W.k, "x")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (W.n,):
            raise ValueError(f"bias must be a tensor of shape ({W.n},), got {getattr(bias, 'shape', type(bias))}")
    lead = x.shape[:-1]
    scores = lut_matmul_one_sided(W, x.reshape(-1, W.k), backend=backend)  # (out, B)
    y = scores.T.reshape(*lead, W.n).to(x.dtype)
    return y + bias.to(y.dtype) if bias is not None else y
