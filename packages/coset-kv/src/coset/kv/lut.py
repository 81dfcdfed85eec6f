"""Attention scores straight from key codes, and attention outputs from value codes (paper.md §6).

For a query ``y`` (rotated, one KV head) and a coded key with blocks ``k``, layers ``m`` and block factors
``w_k = rho * beta 2^(alpha T_k)``::

    <k_hat, y> = sum_k w_k ( sum_m 2^m <a(b_km), y_k> - <c, y_k> )
               = sum_k w_k ( sum_m 2^m tab[k, idx_km] - cy[k] )

with the one-sided table ``tab[k, j] = <a_j, y_k>`` (``K x 256`` per query, built once) and ``cy[k] = <c, y_k>``.
Every cached token then costs ``K M`` lookups instead of a D-dim dot product with a decoded vector.
Values are accumulated the same way: ``sum_t p_t v_hat_t`` with ``v_hat_t`` decoded block by block.

Paths (all equal up to float32 rounding, tested):

* :func:`scores_reference` — decode-then-dot, the oracle;
* :func:`scores_lut_torch` — the LUT through ``embedding_bag`` (:func:`coset.lut.kernels.torch_one_sided`);
* the native CPU kernel ``kv_scores`` (``cuda/csrc/kv_cpu.cpp``) when the extension exports it
  (:mod:`coset.kv.native`).
"""

from __future__ import annotations

import torch

from coset.lut.kernels import torch_one_sided

from . import native
from .codes import KVCodes, block_scales, check_codes, code_tables, decode_rotated, head_dim_of, step_table
from .config import BLOCK, KVQuantConfig
from .trellis import TrellisCode, schedule_tensor

__all__ = ["query_tables", "scores_lut", "scores_lut_torch", "scores_reference", "values_from_codes"]


def _check_query(qr: torch.Tensor, codes: KVCodes, config: KVQuantConfig | TrellisCode) -> None:
    check_codes(codes, config)
    if not isinstance(qr, torch.Tensor) or not qr.dtype.is_floating_point:
        raise TypeError("queries must be a floating torch.Tensor")
    B, H = codes.idx.shape[:2]
    D = head_dim_of(codes, config)
    if qr.ndim != 4 or qr.shape[0] != B or qr.shape[1] != H or qr.shape[-1] != D:
        raise ValueError(f"queries must have shape (batch={B}, kv_heads={H}, n, head_dim={D}), got {tuple(qr.shape)}")


def _trellis_tables(codes: KVCodes, config: TrellisCode) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ks, cb)`` the trellis kernels take: the bits per element of the codes' head dim and the decode table."""
    return schedule_tensor(config.block_bits, head_dim_of(codes, config)), config.decode_table()


def query_tables(qr: torch.Tensor, config: KVQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided tables of rotated queries.

    Parameters
    ----------
    qr : (B, H, n, D) float rotated queries (n queries per KV head)
    config : KVQuantConfig of the key codes

    Returns
    -------
    tab : (B, H, K, 256, n) float32, ``tab[..., k, j, i] = <a_j, qr[..., i, 8k:8k+8]>``
    cy : (B, H, K, n) float32, ``<c, qr[..., i, 8k:8k+8]>``
    """
    if not isinstance(qr, torch.Tensor) or not qr.dtype.is_floating_point:
        raise TypeError("queries must be a floating torch.Tensor")
    if not isinstance(config, KVQuantConfig):
        raise TypeError(f"config must be a KVQuantConfig, got {type(config).__name__}")
    if qr.ndim != 4 or qr.shape[-1] < BLOCK or qr.shape[-1] % BLOCK:
        raise ValueError(f"queries must have shape (B, H, n, D) with D a multiple of {BLOCK}, got {tuple(qr.shape)}")
    a, c = code_tables(config, qr.device)
    B, H, n, D = qr.shape
    y = qr.to(torch.float32).reshape(B, H, n, D // BLOCK, BLOCK)
    tab = (y @ a.T).permute(0, 1, 3, 4, 2).contiguous()  # (B,H,n,K,256) -> (B,H,K,256,n)
    cy = (y @ c).permute(0, 1, 3, 2)
    return tab, cy


def scores_reference(qr: torch.Tensor, codes: KVCodes, config: KVQuantConfig | TrellisCode) -> torch.Tensor:
    """Decode-then-dot: ``(B, H, n, L)`` float32 ``<k_hat_t, qr_i>`` (rotated domain)."""
    _check_query(qr, codes, config)
    return qr.to(torch.float32) @ decode_rotated(codes, config).transpose(-1, -2)


def scores_lut_torch(qr: torch.Tensor, codes: KVCodes, config: KVQuantConfig) -> torch.Tensor:
    """The one-sided LUT path in PyTorch (``embedding_bag``): ``(B, H, n, L)`` float32."""
    _check_query(qr, codes, config)
    B, H, L, K, M = codes.idx.shape
    n = qr.shape[2]
    tab, cy = query_tables(qr, config)
    w = block_scales(codes, config, K)  # (B,H,L,K)
    out = torch.empty((B, H, n, L), dtype=torch.float32, device=qr.device)
    for b in range(B):
        for h in range(H):
            tables = tab[b, h].permute(2, 0, 1)  # (n, K, 256)
            s = torch_one_sided(codes.idx[b, h].to(torch.int32), w[b, h].contiguous(), tables, 2)  # (L, n)
            out[b, h] = (s - w[b, h] @ cy[b, h]).T
    return out


def scores_lut(
    qr: torch.Tensor, codes: KVCodes, config: KVQuantConfig | TrellisCode, *, backend: str = "auto"
) -> torch.Tensor:
    """Scores from the key codes: ``(B, H, n, L)`` float32; E8 codes through the one-sided LUT, trellis codes
    (which have no tables) by walking each token's stream once for the ``n`` queries (decode-then-dot).

    Parameters
    ----------
    qr : (B, H, n, D) rotated queries
    codes : key codes, ``idx (B, H, L, K, M)`` (E8) or ``(B, H, L, stream_bytes)`` (trellis)
    config : their KVQuantConfig or TrellisCode
    backend : ``"auto"`` (native kernel when the extension has it), ``"native"`` (raise if it does not) or
        ``"torch"``

    Raises
    ------
    TypeError / ValueError for mismatched shapes or dtypes, an unknown backend, or ``"native"`` without the
    kernel.
    """
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    _check_query(qr, codes, config)
    if isinstance(config, TrellisCode):
        if backend == "native" or (backend == "auto" and native.trellis_available()):
            return native.trellis_scores(codes, qr.to(torch.float32), *_trellis_tables(codes, config))
        return qr.to(torch.float32) @ decode_rotated(codes, config).transpose(-1, -2)
    if backend == "torch" or (backend == "auto" and not native.available()):
        return scores_lut_torch(qr, codes, config)
    if not native.available():
        raise ValueError("backend='native' but coset.cuda._C has no kv_scores kernel (see docs/kv.md)")
    tab, cy = query_tables(qr, config)
    return native.kv_scores(codes, step_table(config), config.t_bits, tab, cy)


def values_from_codes(
    p: torch.Tensor, codes: KVCodes, config: KVQuantConfig | TrellisCode, *, backend: str = "auto"
) -> torch.Tensor:
    """``sum_t p[..., i, t] v_hat_t`` in the rotated domain, from the value codes.

    Parameters
    ----------
    p : (B, H, n, L) float attention probabilities (or any weights)
    codes : value codes, ``idx (B, H, L, K, M)``
    config : their KVQuantConfig
    backend : as for :func:`scores_lut`

    Returns
    -------
    (B, H, n, D) float32
    """
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    check_codes(codes, config)
    B, H, L = codes.idx.shape[:3]
    if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
        raise TypeError("p must be a floating torch.Tensor")
    if p.ndim != 4 or p.shape[:2] != (B, H) or p.shape[-1] != L:
        raise ValueError(f"p must have shape (batch={B}, kv_heads={H}, n, L={L}), got {tuple(p.shape)}")
    if isinstance(config, TrellisCode):
        if backend == "native" or (backend == "auto" and native.trellis_available()):
            return native.trellis_values(codes, p.to(torch.float32), *_trellis_tables(codes, config))
        return p.to(torch.float32) @ decode_rotated(codes, config)
    use_native = backend == "native" or (backend == "auto" and native.available())
    if use_native:
        if not native.available():
            raise ValueError("backend='native' but coset.cuda._C has no kv_values kernel (see docs/kv.md)")
        a, c = code_tables(config, p.device)
        return native.kv_values(codes, step_table(config), config.t_bits, p.to(torch.float32), a, c)
    return p.to(torch.float32) @ decode_rotated(codes, config)
