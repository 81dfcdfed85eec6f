"""Damping, block LDL and the block LDLQ sweep (QuIP/QuIP#; rebuilt from the maths, research/ptq.md §3).

Proxy loss ``ℓ(Ŵ) = tr((W - Ŵ) H (W - Ŵ)ᵀ)``. With ``H = L D Lᵀ`` (L block unit-lower-triangular, D block
diagonal with b×b blocks) and ``E = W - Ŵ``, ``(E L)_k = E_k + Σ_{j>k} E_j L_jk``, so sweeping the block
columns in *reverse* order and quantizing the target ``t_k = W_k + Σ_{j>k} E_j L_jk`` makes the loss
exactly ``Σ_k tr(e_k D_k e_kᵀ)`` with ``e_k = t_k - Ŵ_k`` the quantizer's own error on its target.
b = 1 is GPTQ (on the reversed column order). Everything in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["damp", "cholesky_with_retry", "block_ldl", "ldlq", "proxy_loss", "LDLQResult"]

log = logging.getLogger(__name__)

#: extra relative damping tried, in order, when a factorization fails (on top of the base damping)
RETRY_LADDER = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


def _check_h(H: torch.Tensor, argname: str = "H") -> None:
    if not isinstance(H, torch.Tensor) or H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{argname} must be a square 2-D tensor, got {getattr(H, 'shape', type(H))}")
    if not H.dtype.is_floating_point:
        raise TypeError(f"{argname} must be floating, got {H.dtype}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{argname} contains NaN or Inf")


def damp(H: torch.Tensor, rel: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead-column fix and relative damping, applied once (GPTQ's recipe).

    Parameters
    ----------
    H : (n, n) symmetric PSD Hessian
    rel : damping ``rel · mean(diag H)`` added to the diagonal, > 0

    Returns
    -------
    H_damped : (n, n) float64, with ``H_ii = 1`` on dead columns (``H_ii == 0``) before damping
    dead : (n,) bool mask of dead columns (the caller zeroes those columns of W, as GPTQ does)
    """
    _check_h(H)
    if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not rel > 0:
        raise ValueError(f"damping rel must be a number > 0, got {rel!r}")
    H = H.to(torch.float64).clone()
    H = 0.5 * (H + H.t())
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.any()):
        H[dead, :] = 0.0
        H[:, dead] = 0.0
        diag[dead] = 1.0
    mean = float(diag.mean())
    diag += rel * mean
    return H, dead


def cholesky_with_retry(H: torch.Tensor, *, upper: bool = False) -> tuple[torch.Tensor, float]:
    """Cholesky of an already damped H; on failure adds ``r · mean(diag H)`` for r in ``RETRY_LADDER``
    (logged at WARNING) and finally the identity scaled by the mean diagonal.

    Returns
    -------
    C : (n, n) float64 Cholesky factor (lower, or upper with ``upper=True``)
    extra : the extra relative damping that was needed (0.0 normally)
    """
    _check_h(H)
    H = H.to(torch.float64)
    mean = float(torch.diagonal(H).mean())
    if not mean > 0:
        raise ValueError("H has a non-positive mean diagonal; call damp() first")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for r in RETRY_LADDER:
        C, info = torch.linalg.cholesky_ex(H + (r * mean) * eye if r else H, upper=upper)
        if int(info) == 0:
            if r:
                log.warning("Cholesky needed extra damping %.3g x mean(diag H)", r)
            return C, r
        log.warning("Cholesky failed (minor %d) with extra damping %.3g; retrying", int(info), r)
    log.warning("Cholesky failed at every damping; falling back to mean(diag H) * I")
    C = torch.sqrt(torch.tensor(mean, dtype=H.dtype)) * eye
    return C, float("inf")


def block_ldl(H: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDL: ``H = L · blkdiag(D) · Lᵀ``.

    From the Cholesky factor ``H = C Cᵀ`` and its diagonal blocks ``C_kk``: ``D_k = C_kk C_kkᵀ`` and
    ``L_{:,k} = C_{:,k} C_kk⁻¹`` (so ``L_kk = I``).

    Parameters
    ----------
    H : (n, n) symmetric positive definite (damped), n a multiple of b
    b : block size (the lattice dimension)

    Returns
    -------
    L : (n, n) float64, block unit-lower-triangular
    D : (n/b, b, b) float64, symmetric positive definite blocks
    """
    _check_h(H)
    n = H.shape[0]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1 or n % b:
        raise ValueError(f"block size b must be a positive int dividing n={n}, got {b!r}")
    C, _ = cholesky_with_retry(H)
    nb = n // b
    Cb = C.reshape(nb, b, nb, b)
    Ckk = torch.diagonal(Cb, dim1=0, dim2=2).permute(2, 0, 1)  # (nb, b, b), lower
    D = Ckk @ Ckk.transpose(-1, -2)
    # L[:, k] = C[:, k] C_kk^{-1}: solve X C_kk = C[:, k] for all k at once
    Ck = C.reshape(n, nb, b).permute(1, 0, 2)  # (nb, n, b)
    Lk = torch.linalg.solve_triangular(Ckk, Ck, upper=False, left=False)
    L = Lk.permute(1, 0, 2).reshape(n, n)
    # exact structure (the solve leaves rounding noise in L_kk and above it)
    mask = torch.ones(nb, nb, dtype=torch.bool, device=H.device).tril(-1)
    L = L.reshape(n, nb, b) * mask.repeat_interleave(b, 0)[:, :, None]
    L = L.reshape(n, n) + torch.eye(n, dtype=L.dtype, device=L.device)
    return L, D


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` in float64."""
    E = W.to(torch.float64) - W_hat.to(torch.float64)
    return float(((E @ H.to(torch.float64)) * E).sum())


@dataclass
class LDLQResult:
    """Result of :func:`ldlq`.

    Attributes
    ----------
    W_hat : (m, n) float64 quantized weight
    codes : list of the callback's codes, one per block column
    proxy : final ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``
    proxy_trace : the proxy after the sweep, then after each refinement pass
    """

    W_hat: torch.Tensor
    codes: list
    proxy: float
    proxy_trace: list


def _select_rows(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """Row-wise choice between two codes (tensors with leading dim m, tuples of them, or None)."""
    if new is None or old is None:
        return new
    if isinstance(new, torch.Tensor):
        mk = mask.reshape((-1,) + (1,) * (new.ndim - 1))
        return torch.where(mk, new, old)
    if isinstance(new, (tuple, list)):
        return type(new)(_select_rows(mask, a, b) for a, b in zip(new, old, strict=True))
    raise TypeError("codes returned by quantize_block must be tensors with leading dim m, tuples of them, or None")


def ldlq(
    W: torch.Tensor,
    H: torch.Tensor,
    quantize_block: Callable[[torch.Tensor, int], tuple[torch.Tensor, Any]],
    b: int,
    *,
    buffer_cols: int = 128,
    tune_iters: int = 0,
    L: torch.Tensor | None = None,
) -> LDLQResult:
    """Block LDLQ: reverse sweep over block columns with error feedback, then optional refinement.

    Parameters
    ----------
    W : (m, n) weight (any float dtype; computed in float64)
    H : (n, n) damped SPD Hessian (see :func:`damp`)
    quantize_block : ``f(target (m, b) float64, k) -> (W_hat_k (m, b), code_k)``; the quantizer of block
        column k, vectorized over rows. ``code_k`` is a tensor (or tuple of tensors) with leading dim m, or None.
    b : block size, divides n
    buffer_cols : feedback from finished columns is applied to the rest in one GEMM every ``buffer_cols``
        columns (rounded up to a multiple of b); inside a buffer it is applied per block
    tune_iters : refinement passes of block coordinate descent on the proxy: each block is re-quantized at
        its unconstrained optimum ``Ŵ_k + (W - Ŵ) H_{:,k} H_kk⁻¹`` and the new value is kept, per row, only
        where it lowers ``ℓ`` (so the proxy never increases)
    L : optional precomputed ``block_ldl(H, b)[0]`` (reused across calls on the same H)

    Returns
    -------
    LDLQResult
    """
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError("W must be a 2-D tensor (out_features, in_features)")
    _check_h(H)
    m, n = W.shape
    if H.shape[0] != n:
        raise ValueError(f"H is {tuple(H.shape)} but W has {n} columns")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1 or n % b:
        raise ValueError(f"block size b must be a positive int dividing n={n}, got {b!r}")
    if isinstance(buffer_cols, bool) or not isinstance(buffer_cols, int) or buffer_cols < 1:
        raise ValueError(f"buffer_cols must be a positive int, got {buffer_cols!r}")
    if isinstance(tune_iters, bool) or not isinstance(tune_iters, int) or tune_iters < 0:
        raise ValueError(f"tune_iters must be a non-negative int, got {tune_iters!r}")
    W = W.to(torch.float64)
    H = H.to(torch.float64)
    if L is None:
        L, _ = block_ldl(H, b)
    elif tuple(L.shape) != (n, n):
        raise ValueError(f"L must be ({n}, {n}), got {tuple(L.shape)}")
    L = L.to(torch.float64)
    nb = n // b
    buf = max(b, -(-buffer_cols // b) * b)
    W_hat = torch.zeros_like(W)
    E = torch.zeros_like(W)
    acc = torch.zeros_like(W)  # feedback from finished buffers
    codes: list[Any] = [None] * nb
    end = n
    while end > 0:
        start = max(0, end - buf)
        for k in range((end // b) - 1, (start // b) - 1, -1):
            c0, c1 = k * b, (k + 1) * b
            t = W[:, c0:c1] + acc[:, c0:c1]
            if c1 < end:
                t = t + E[:, c1:end] @ L[c1:end, c0:c1]
            qk, code = quantize_block(t, k)
            qk = qk.to(torch.float64)
            W_hat[:, c0:c1] = qk
            E[:, c0:c1] = W[:, c0:c1] - qk
            codes[k] = code
        if start > 0:
            acc[:, :start] += E[:, start:end] @ L[start:end, :start]
        end = start
    trace = [proxy_loss(W, W_hat, H)]
    if tune_iters:
        R = (W - W_hat) @ H  # (m, n), kept current
        Hb = H.reshape(nb, b, nb, b)
        Hkk_inv = torch.linalg.inv(torch.diagonal(Hb, dim1=0, dim2=2).permute(2, 0, 1))  # (nb, b, b)
        for _ in range(tune_iters):
            for k in range(nb - 1, -1, -1):
                c0, c1 = k * b, (k + 1) * b
                old = W_hat[:, c0:c1]
                target = old + R[:, c0:c1] @ Hkk_inv[k]
                qk, code = quantize_block(target, k)
                qk = qk.to(torch.float64)
                Hkk = H[c0:c1, c0:c1]
                # ℓ as a function of block k alone is ||Ŵ_k - target||²_{H_kk} + const
                dn, do = qk - target, old - target
                better = ((dn @ Hkk) * dn).sum(-1) < ((do @ Hkk) * do).sum(-1)
                if not bool(better.any()):
                    continue
                new = torch.where(better[:, None], qk, old)
                R -= (new - old) @ H[c0:c1, :]
                W_hat[:, c0:c1] = new
                codes[k] = _select_rows(better, code, codes[k])
            trace.append(proxy_loss(W, W_hat, H))
    return LDLQResult(W_hat, codes, trace[-1], trace)
