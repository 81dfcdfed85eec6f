"""The coset.kv attention kernels (``csrc/kv_cpu.cpp``) on torch tensors, served through :class:`NativeBackend`.

coset.kv finds them through the coset.quant backend registry (``select_backend(..., "kv_scores", ...)``), never
by importing this package. Shapes (BH = batch * kv heads, L tokens, K = D / 8 blocks, M layers, n queries per
KV head): ``idx (BH, L, K, M)`` uint8, ``t (BH, L, ceil(K t_bits / 8))`` uint8, ``rho (BH, L)`` float32,
``steps (2^t_bits,)`` float32; scores: ``tab (BH, K, 256, n)``, ``cy (BH, K, n)`` -> ``(BH, n, L)``; values:
``p (BH, n, L)``, ``a (256, 8)``, ``c (8,)`` -> ``(BH, n, 8 K)``.
"""

from __future__ import annotations

import torch

from . import _C  # type: ignore[attr-defined]  # compiled extension

__all__ = ["kv_scores", "kv_values"]


def _f32(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU torch.Tensor (the CUDA twin kv_cuda.cu is not bound yet)")
    if t.dtype.is_complex:  # .to(float32) would drop the imaginary part silently
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.to(torch.float32).contiguous()


def _codes(idx, t, rho, steps, t_bits: int):
    if not isinstance(idx, torch.Tensor) or idx.ndim != 4 or idx.dtype != torch.uint8 or idx.device.type != "cpu":
        raise ValueError("idx must be a CPU uint8 tensor (BH, L, K, M)")
    if isinstance(t_bits, bool) or not isinstance(t_bits, int) or t_bits not in (0, 1, 2, 4):
        raise ValueError(f"t_bits must be 0, 1, 2 or 4 (an int), got {t_bits!r}")
    BH, L, K, M = idx.shape
    if not 1 <= M <= 4 or K < 1:
        raise ValueError(f"idx must have 1 <= M <= 4 layers and K >= 1 blocks, got {tuple(idx.shape)}")
    tb = -(-K * t_bits // 8)
    if (
        not isinstance(t, torch.Tensor)
        or t.dtype != torch.uint8
        or tuple(t.shape) != (BH, L, tb)
        or t.device.type != "cpu"
    ):
        raise ValueError(f"t must be a CPU uint8 tensor of shape {(BH, L, tb)}")
    return idx.contiguous(), t.contiguous(), _f32("rho", rho, (BH, L)), _f32("steps", steps, (2**t_bits,))


def kv_scores(idx, t, rho, steps, t_bits: int, tab, cy) -> torch.Tensor:
    """``out[bh, i, l] = sum_k w[l,k] (sum_m 2^m tab[bh, k, idx[bh,l,k,m], i] - cy[bh, k, i])`` (see module doc)."""
    idx, t, rho, steps = _codes(idx, t, rho, steps, t_bits)
    BH, L, K, M = idx.shape
    n = tab.shape[-1] if isinstance(tab, torch.Tensor) and tab.ndim == 4 else -1
    tab, cy = _f32("tab", tab, (BH, K, 256, n)), _f32("cy", cy, (BH, K, n))
    out = torch.empty((BH, n, L), dtype=torch.float32)
    if out.numel():
        rc = _C.kv_scores_cpu(idx.data_ptr(), t.data_ptr(), rho.data_ptr(), steps.data_ptr(), t_bits,
                              tab.data_ptr(), cy.data_ptr(), out.data_ptr(), BH, L, K, M, n,
                              int(_C.get_num_threads()))  # fmt: skip
        if rc:
            raise ValueError(f"kv_scores_cpu rejected its arguments (code {rc})")
    return out


def kv_values(idx, t, rho, steps, t_bits: int, p, a, c) -> torch.Tensor:
    """``out[bh, i, 8k:8k+8] = sum_l p[bh,i,l] w[l,k] (sum_m 2^m a[idx[bh,l,k,m]] - c)`` (see module doc)."""
    idx, t, rho, steps = _codes(idx, t, rho, steps, t_bits)
    BH, L, K, M = idx.shape
    n = p.shape[1] if isinstance(p, torch.Tensor) and p.ndim == 3 else -1
    p, a, c = _f32("p", p, (BH, n, L)), _f32("a", a, (256, 8)), _f32("c", c, (8,))
    out = torch.zeros((BH, n, K * 8), dtype=torch.float32)
    if out.numel() and L:
        rc = _C.kv_values_cpu(idx.data_ptr(), t.data_ptr(), rho.data_ptr(), steps.data_ptr(), t_bits,
                              p.data_ptr(), a.data_ptr(), c.data_ptr(), out.data_ptr(), BH, L, K, M, n,
                              int(_C.get_num_threads()))  # fmt: skip
        if rc:
            raise ValueError(f"kv_values_cpu rejected its arguments (code {rc})")
    return out
