"""Optional native kernels ``kv_scores`` / ``kv_values`` (``cuda/csrc/kv_cpu.cpp``, CUDA twin ``kv_cuda.cu``).

Two ways to get them, tried in this order:

1. a library loaded with :func:`load_library` (``kv_cpu.cpp`` built on its own:
   ``g++ -O3 -shared -fPIC -Icuda/csrc cuda/csrc/kv_cpu.cpp -o libcosetkv.so``), called through ctypes;
2. the coset-cuda extension ``coset.cuda._C`` once it binds ``kv_scores_cpu`` / ``kv_values_cpu`` (looked up
   without importing ``coset.cuda`` itself).

Without either, :mod:`coset.kv.lut` uses its PyTorch paths. Arguments are validated here; the kernels see
contiguous buffers of checked shapes only.
"""

from __future__ import annotations

import ctypes
import importlib
import os

import torch

__all__ = ["available", "load_library", "unload_library", "kv_scores", "kv_values"]

_lib = None  # ctypes library from load_library
_ext_checked = False
_ext = None


def load_library(path) -> None:
    """Use the kernels of a shared library built from ``cuda/csrc/kv_cpu.cpp``.

    Raises
    ------
    TypeError for a non-path; ValueError if the file does not exist or lacks the two functions.
    """
    global _lib
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    lib = ctypes.CDLL(os.fspath(path))
    for name in ("kv_scores_cpu", "kv_values_cpu"):
        if not hasattr(lib, name):
            raise ValueError(f"{path} does not export {name}")
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.kv_scores_cpu.argtypes = [p, p, p, p, i32, p, p, p, i64, i64, i32, i32, i32, i32]
    lib.kv_values_cpu.argtypes = [p, p, p, p, i32, p, p, p, p, i64, i64, i32, i32, i32, i32]
    lib.kv_scores_cpu.restype = lib.kv_values_cpu.restype = i32
    _lib = lib


def unload_library() -> None:
    """Forget the library of :func:`load_library` (the extension, if it has the kernels, stays in use)."""
    global _lib
    _lib = None


def _extension():
    global _ext_checked, _ext
    if not _ext_checked:
        _ext_checked = True
        try:
            m = importlib.import_module("coset.cuda._C")
        except ImportError:
            m = None
        _ext = m if m is not None and hasattr(m, "kv_scores_cpu") and hasattr(m, "kv_values_cpu") else None
    return _ext


def _impl():
    return _lib if _lib is not None else _extension()


def available() -> bool:
    """Whether native CPU kernels are present."""
    return _impl() is not None


def _c(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError("the native kv kernels take CPU tensors (the CUDA twin is not bound yet)")
    return t.to(dtype).contiguous()


def _call(fn, *args) -> None:
    rc = fn(*args)
    if rc:
        raise ValueError(f"native kv kernel rejected its arguments (code {rc})")


def _code_args(codes, steps: torch.Tensor, t_bits: int):
    B, H, L, K, M = codes.idx.shape
    tb = -(-K * t_bits // 8)
    if codes.t.shape != (B, H, L, tb) or codes.scale.shape != (B, H, L):
        raise ValueError("codes: inconsistent shapes of idx, t, scale")
    if steps.numel() != 2**t_bits:
        raise ValueError(f"steps must have 2**t_bits = {2**t_bits} entries, got {steps.numel()}")
    return (
        _c(codes.idx, torch.uint8),
        _c(codes.t, torch.uint8),
        _c(codes.scale, torch.float32),
        _c(steps, torch.float32),
    )


def kv_scores(codes, steps: torch.Tensor, t_bits: int, tab: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Native LUT scores of key codes.

    codes : KVCodes, idx (B, H, L, K, M) uint8, t (B, H, L, ceil(K t_bits / 8)) uint8, scale (B, H, L)
    steps : (2^t_bits,) float32, ``beta 2^(alpha t)``
    tab (B, H, K, 256, n), cy (B, H, K, n) float32: the query tables (:func:`coset.kv.lut.query_tables`)

    Returns (B, H, n, L) float32, ``out[.., i, t] = sum_k w[t,k] (sum_m 2^m tab[k, idx[t,k,m], i] - cy[k, i])``
    with ``w[t,k] = scale[t] steps[T[t,k]]``.

    Raises
    ------
    ValueError for inconsistent shapes, non-CPU tensors, or no native kernel.
    """
    impl = _impl()
    if impl is None:
        raise ValueError("no native kv kernel: build cuda/csrc/kv_cpu.cpp and call load_library (docs/kv.md)")
    B, H, L, K, M = codes.idx.shape
    n = tab.shape[-1]
    if tab.shape != (B, H, K, 256, n) or cy.shape != (B, H, K, n):
        raise ValueError("kv_scores: tab and cy do not match the codes")
    idx, t, rho, st = _code_args(codes, steps, t_bits)
    tab, cy = _c(tab, torch.float32), _c(cy, torch.float32)
    out = torch.empty((B, H, n, L), dtype=torch.float32)
    _call(
        impl.kv_scores_cpu,
        idx.data_ptr(),
        t.data_ptr(),
        rho.data_ptr(),
        st.data_ptr(),
        t_bits,
        tab.data_ptr(),
        cy.data_ptr(),
        out.data_ptr(),
        B * H,
        L,
        K,
        M,
        n,
        torch.get_num_threads(),
    )
    return out


def kv_values(
    codes, steps: torch.Tensor, t_bits: int, p: torch.Tensor, a: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Native value accumulation from value codes.

    codes, steps, t_bits : as for :func:`kv_scores`; p (B, H, n, L) float32 weights; a (256, 8), c (8,) the
    code's representatives and centring offset (:func:`coset.kv.code_tables`)

    Returns (B, H, n, K*8) float32, ``out[.., i, 8k:8k+8] = sum_t p[i,t] w[t,k] (sum_m 2^m a[idx[t,k,m]] - c)``.
    """
    impl = _impl()
    if impl is None:
        raise ValueError("no native kv kernel: build cuda/csrc/kv_cpu.cpp and call load_library (docs/kv.md)")
    B, H, L, K, M = codes.idx.shape
    n = p.shape[2]
    if p.shape != (B, H, n, L) or a.shape != (256, 8) or c.shape != (8,):
        raise ValueError("kv_values: p, a or c do not match the codes")
    idx, t, rho, st = _code_args(codes, steps, t_bits)
    p, a, c = _c(p, torch.float32), _c(a, torch.float32), _c(c, torch.float32)
    out = torch.empty((B, H, n, K * 8), dtype=torch.float32)
    _call(
        impl.kv_values_cpu,
        idx.data_ptr(),
        t.data_ptr(),
        rho.data_ptr(),
        st.data_ptr(),
        t_bits,
        p.data_ptr(),
        a.data_ptr(),
        c.data_ptr(),
        out.data_ptr(),
        B * H,
        L,
        K,
        M,
        n,
        torch.get_num_threads(),
    )
    return out
