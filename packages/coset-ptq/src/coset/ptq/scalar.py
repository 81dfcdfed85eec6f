"""Scalar baselines: round-to-nearest (per channel / per group, symmetric / asymmetric) and GPTQ.

Level maps (b bits, ``maxq = 2^b - 1``, per row and group):

* symmetric (GPTQ's): ``s = 2 max|w| / maxq``, ``ŵ = s (i - 2^(b-1))``, i in [0, maxq];
* asymmetric (GGUF Q4_1's): ``s = (max w - min w) / maxq``, ``z = min w``, ``ŵ = s i + z``.

Scales and offsets are stored in fp16 and the reconstruction uses exactly the fp16 values, so what is
reported is what a saved model computes. ``gptq_scalar`` is classic GPTQ (Frantar et al. 2022): Cholesky of
H⁻¹, forward sweep over columns, lazy batch updates of ``blocksize`` columns, group parameters recomputed at
each group boundary from the *updated* weights, optional act-order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coset.quant import packed_nbytes

from .ldlq import _check_h, cholesky_with_retry
from .ldlq import damp as damp_hessian

__all__ = ["ScalarCodes", "group_params", "rtn_scalar", "gptq_scalar"]


@dataclass
class ScalarCodes:
    """Scalar code of one (m, n) linear.

    Attributes
    ----------
    ints : (m, n) uint8 levels in [0, 2^bits), original column order
    scales : (m, G) float16
    zeros : (m, G) float16 offsets (asymmetric) or None (symmetric)
    bits : int in [1, 8]
    group_size : columns per group (n for per-channel), G = ceil(n / group_size)
    perm : (n,) int64 or None — act-order: column ``perm[j]`` belongs to group ``j // group_size``
    """

    ints: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in [1, 8], got {self.bits!r}")
        if self.ints.ndim != 2:
            raise ValueError("ints must be (m, n)")
        m, n = self.ints.shape
        G = -(-n // self.group_size)
        if tuple(self.scales.shape) != (m, G):
            raise ValueError(f"scales must have shape {(m, G)}, got {tuple(self.scales.shape)}")
        if self.zeros is not None and tuple(self.zeros.shape) != (m, G):
            raise ValueError(f"zeros must have shape {(m, G)}, got {tuple(self.zeros.shape)}")
        if self.perm is not None and tuple(self.perm.shape) != (n,):
            raise ValueError(f"perm must have shape ({n},)")

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.ints.shape  # (m, n), checked in __post_init__
        return m, n

    def group_index(self) -> torch.Tensor:
        """(n,) int64 group of each original column."""
        n = self.ints.shape[1]
        pos = torch.arange(n)
        if self.perm is None:
            return pos // self.group_size
        g = torch.empty(n, dtype=torch.int64)
        g[self.perm.long()] = pos // self.group_size
        return g

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """(m, n) reconstruction (computed in float32 from the fp16 scales, like a GGUF dequantizer)."""
        g = self.group_index()
        s = self.scales.to(torch.float32)[:, g]
        i = self.ints.to(torch.float32)
        if self.zeros is None:
            w = s * (i - float(1 << (self.bits - 1)))
        else:
            w = s * i
            w = w + self.zeros.to(torch.float32)[:, g]
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes of the packed levels (coset.quant.pack_labels) + fp16 scales/offsets + act-order perm
        (int16 when n < 2^15, else int32)."""
        m, n = self.ints.shape
        total = packed_nbytes(m * n, 1 << self.bits) + 2 * self.scales.numel()
        if self.zeros is not None:
            total += 2 * self.zeros.numel()
        if self.perm is not None:
            total += (2 if n < 2**15 else 4) * n
        return total


def _check_bits(bits, group_size, n):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size >= 1):
        raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")
    return n if group_size == -1 else min(group_size, n)


#: clipping factors tried by ``clip_search`` (GPTQ's ``mse`` option searches shrinks down to 0.8 likewise)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _zero(z: torch.Tensor | None) -> torch.Tensor:
    """The zero point of an asymmetric code (:func:`group_params` returns one whenever ``sym`` is False)."""
    if z is None:
        raise RuntimeError("group_params returned no zero point for an asymmetric code")
    return z


def _fp16(t: torch.Tensor, what: str, nonzero: bool = False) -> torch.Tensor:
    """``t`` in float16; ``ValueError`` when a value overflows it, or (``nonzero``) when a positive value rounds to 0
    (W's range is beyond what the fp16 scales hold: the group would be silently lost)."""
    h = t.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(
            f"W is too large for the scalar code's fp16 {what} (needs {float(t.double().abs().max()):.3g}, "
            f"fp16 holds at most {torch.finfo(torch.float16).max:.0f}); rescale the layer"
        )
    if nonzero and bool(((h == 0) & (t > 0)).any()):
        raise ValueError(
            f"W is too small for the scalar code's fp16 {what} (needs {float(t[t > 0].min()):.3g}, fp16 holds "
            "at least 6e-08): its values would all round to 0; rescale the layer"
        )
    return h


def _params(w32: torch.Tensor, bits: int, sym: bool, shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    maxq = (1 << bits) - 1
    if sym:
        amax = w32.abs().amax(dim=1) * shrink
        s = _fp16(2.0 * amax / maxq, "scales", nonzero=True)
        return torch.where(s > 0, s, torch.ones_like(s)), None
    lo, hi = w32.amin(dim=1) * shrink, w32.amax(dim=1) * shrink
    s = _fp16((hi - lo) / maxq, "scales", nonzero=True)
    return torch.where(s > 0, s, torch.ones_like(s)), _fp16(lo, "offsets")


def group_params(
    w: torch.Tensor, bits: int, sym: bool, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 ``(scale, zero)`` of each row of ``w`` (m, g) for the level maps in the module docstring.

    With ``clip_search`` the range is shrunk by the factor of :data:`CLIP_GRID` that gives each row the
    smallest squared rounding error (clipping the tails buys finer steps).

    Returns
    -------
    scale : (m,) float16 (never 0); zero : (m,) float16 or None when ``sym``
    """
    w32 = w.to(torch.float32)
    if not clip_search:
        return _params(w32, bits, sym, 1.0)
    best_s, best_z = _params(w32, bits, sym, CLIP_GRID[0])
    best_e = (_quant(w32, best_s, best_z, bits)[1] - w32).pow(2).sum(dim=1)
    for p in CLIP_GRID[1:]:
        s, z = _params(w32, bits, sym, p)
        e = (_quant(w32, s, z, bits)[1] - w32).pow(2).sum(dim=1)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, _zero(best_z))
        best_e = torch.where(better, e, best_e)
    return best_s, best_z


def _quant(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int):
    """Levels and reconstruction of ``w`` (m, k) with per-row fp16 (s, z): ((m, k) int, (m, k) float)."""
    maxq = (1 << bits) - 1
    s32 = s.to(torch.float32)[:, None]
    if z is None:
        off = float(1 << (bits - 1))
        i = torch.clamp(torch.round(w.to(torch.float32) / s32) + off, 0, maxq)
        return i, (s32 * (i - off)).to(w.dtype)
    z32 = z.to(torch.float32)[:, None]
    i = torch.clamp(torch.round((w.to(torch.float32) - z32) / s32), 0, maxq)
    return i, (s32 * i + z32).to(w.dtype)


def rtn_scalar(
    W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True, clip_search: bool = False
) -> tuple[torch.Tensor, ScalarCodes]:
    """Round-to-nearest, per channel (``group_size=-1``) or per group of columns (``clip_search``: see
    :func:`group_params`).

    Returns
    -------
    W_hat : (m, n) float32; codes : ScalarCodes
    """
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.dtype.is_floating_point:
        raise ValueError("W must be a floating 2-D tensor (out_features, in_features)")
    m, n = W.shape
    g = _check_bits(bits, group_size, n)
    G = -(-n // g)
    W32 = W.to(torch.float32)
    ints = torch.empty((m, n), dtype=torch.uint8)
    W_hat = torch.empty((m, n), dtype=torch.float32)
    scales = torch.empty((m, G), dtype=torch.float16)
    zeros = None if sym else torch.empty((m, G), dtype=torch.float16)
    for j in range(G):  # G is small; each step is vectorized over rows and the group's columns
        c0, c1 = j * g, min((j + 1) * g, n)
        s, z = group_params(W32[:, c0:c1], bits, sym, clip_search)
        i, wq = _quant(W32[:, c0:c1], s, z, bits)
        ints[:, c0:c1] = i.to(torch.uint8)
        W_hat[:, c0:c1] = wq
        scales[:, j] = s
        if zeros is not None:
            zeros[:, j] = _zero(z)
    return W_hat, ScalarCodes(ints, scales, zeros, bits, g)


def gptq_scalar(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    act_order: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    *,
    damped: bool = False,
    clip_search: bool = False,
) -> tuple[torch.Tensor, ScalarCodes]:
    """Classic GPTQ with lazy batch updates (float64 throughout).

    Parameters
    ----------
    W : (m, n) weight; H : (n, n) Hessian ``E[x xᵀ]`` (raw unless ``damped=True``)
    bits, group_size, sym : the scalar code (group_size -1 = per channel, parameters from the original W)
    act_order : quantize columns by decreasing ``diag H``; the permutation is stored in the codes
    blocksize : lazy-batch width (rounded up to a multiple of the group size so groups never straddle a
        batch, so group parameters always see the fully updated weights)
    damp : relative damping (dead columns: ``W[:, i] = 0``, ``H_ii = 1``), unless ``damped``
    clip_search : choose each group's clipping by rounding error (GPTQ's ``mse`` quantizer option)

    Returns
    -------
    W_hat : (m, n) float32 in the original column order; codes : ScalarCodes
    """
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.dtype.is_floating_point:
        raise ValueError("W must be a floating 2-D tensor (out_features, in_features)")
    _check_h(H)
    m, n = W.shape
    if H.shape[0] != n:
        raise ValueError(f"H is {tuple(H.shape)} but W has {n} columns")
    g = _check_bits(bits, group_size, n)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    W = W.to(torch.float64).clone()
    if damped:
        H = H.to(torch.float64)
    else:
        H, dead = damp_hessian(H, damp)
        W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    C, _ = cholesky_with_retry(H)
    Hinv = torch.cholesky_inverse(C)
    U, _ = cholesky_with_retry(Hinv, upper=True)  # H⁻¹ = Uᵀ U
    G = -(-n // g)
    per_channel = group_size == -1
    scales = torch.empty((m, G), dtype=torch.float16)
    zeros = None if sym else torch.empty((m, G), dtype=torch.float16)
    if per_channel:
        s, z = group_params(W, bits, sym, clip_search)
        scales[:, 0] = s
        if zeros is not None:
            zeros[:, 0] = _zero(z)
    bs = blocksize if per_channel else -(-blocksize // g) * g
    # column-major work copy: column i of W is the contiguous row i of Wc
    Wc = W.t().contiguous()
    Qc = torch.empty_like(Wc)
    ints_c = torch.empty((n, m), dtype=torch.uint8)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = Wc[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % g == 0:
                s, z = group_params(W1[i : i + g].t(), bits, sym, clip_search)
                scales[:, col // g] = s
                if zeros is not None:
                    zeros[:, col // g] = _zero(z)
            w = W1[i]
            lv, qv = _quant(w[:, None], s, z, bits)
            qv = qv[:, 0]
            Qc[col] = qv
            ints_c[col] = lv[:, 0].to(torch.uint8)
            e = (w - qv) / U1[i, i]
            W1[i:] -= U1[i, i:, None] * e[None, :]
            Err1[i] = e
        Wc[i2:] -= U[i1:i2, i2:].t() @ Err1
    Q = Qc.t()
    ints = ints_c.t().contiguous()
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        ints = ints[:, inv]
    return Q.to(torch.float32), ScalarCodes(ints, scales, zeros, bits, g, perm)
