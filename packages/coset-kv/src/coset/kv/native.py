"""Optional native kernels ``kv_scores`` / ``kv_values`` (``cuda/csrc/kv_cpu.cpp``, ``kv_cuda.cu``).

They are looked up in the coset-cuda extension ``coset.cuda._C`` without importing ``coset.cuda`` itself
(whose import registers the quantization backends); when the extension or the functions are missing, the
PyTorch paths of :mod:`coset.kv.lut` are used. Arguments are validated here; the kernels see contiguous
buffers of checked shapes only.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

__all__ = ["available", "kv_scores", "kv_values"]


@lru_cache(maxsize=1)
def _module():
    try:
        m = importlib.import_module("coset.cuda._C")
    except ImportError:
        return None
    return m if hasattr(m, "kv_scores_cpu") and hasattr(m, "kv_values_cpu") else None


def available() -> bool:
    """Whether the native CPU kernels are present."""
    return _module() is not None


def _c(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError("the native kv kernels run on CPU tensors only (the CUDA twin is not bound)")
    return t.to(dtype).contiguous()


def kv_scores(idx: torch.Tensor, w: torch.Tensor, tab: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Native LUT scores.

    idx (B, H, L, K, M) uint8, w (B, H, L, K) float32, tab (B, H, K, 256, n) float32, cy (B, H, K, n) float32
    -> (B, H, n, L) float32, ``out[.., i, t] = sum_k w[t,k] (sum_m 2^m tab[k, idx[t,k,m], i] - cy[k, i])``.
    """
    m = _module()
    B, H, L, K, M = idx.shape
    n = tab.shape[-1]
    if w.shape != (B, H, L, K) or tab.shape != (B, H, K, 256, n) or cy.shape != (B, H, K, n):
        raise ValueError("kv_scores: inconsistent shapes")
    idx, w, tab, cy = _c(idx, torch.uint8), _c(w, torch.float32), _c(tab, torch.float32), _c(cy, torch.float32)
    out = torch.empty((B, H, n, L), dtype=torch.float32)
    m.kv_scores_cpu(idx.data_ptr(), w.data_ptr(), tab.data_ptr(), cy.data_ptr(), out.data_ptr(), B * H, L, K, M, n)
    return out


def kv_values(idx: torch.Tensor, w: torch.Tensor, p: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Native value accumulation.

    idx (B, H, L, K, M) uint8, w (B, H, L, K) float32, p (B, H, n, L) float32, a (256, 8), c (8,) float32
    -> (B, H, n, K*8) float32, ``out[.., i, 8k:8k+8] = sum_t p[i,t] w[t,k] (sum_m 2^m a[idx[t,k,m]] - c)``.
    """
    m = _module()
    B, H, L, K, M = idx.shape
    n = p.shape[2]
    if w.shape != (B, H, L, K) or p.shape != (B, H, n, L) or a.shape != (256, 8) or c.shape != (8,):
        raise ValueError("kv_values: inconsistent shapes")
    idx, w, p = _c(idx, torch.uint8), _c(w, torch.float32), _c(p, torch.float32)
    a, c = _c(a, torch.float32), _c(c, torch.float32)
    out = torch.empty((B, H, n, K * 8), dtype=torch.float32)
    m.kv_values_cpu(idx.data_ptr(), w.data_ptr(), p.data_ptr(), a.data_ptr(), c.data_ptr(), out.data_ptr(), B * H, L, K, M, n)
    return out
