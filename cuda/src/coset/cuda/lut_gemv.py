"""GEMV on HNLQ codes: ``y = x @ Ŵ.T`` with ``Ŵ`` stored as labels, never dequantized (CPU kernel).

``CodedWeight`` holds a weight ``(n, k)`` as compact codes: per row and d-block, M label indices
``idx = sum_i b_i q^i`` (uint8 when ``q^d <= 256``, int16 holding uint16 values when ``q^d <= 65536``) and one
uint8 scale step ``T`` (scale ``config.scales[T]``). :func:`lut_gemv` computes ``x @ Ŵ.T`` for 1..8
queries at a time:

* codebook (the default whenever ``h * a_i`` fits int8, which covers D4/E8 with q <= 16): the
  representatives ``h * a_i`` as int8 (1 KiB for D4 q=4, 2 KiB for E8 q=2, 512 KiB for E8 q=4; shared by all
  blocks and queries), ``v = sum_m q^m A[idx_m]`` exact in int32 lanes (one pmovsx per lookup), then one
  vertical FMA per query with ``x_k`` (D4: two blocks per 8-lane vector); threads over rows. Measured faster
  than the tables below on every benchmark shape (benchmarks/results/kernels.md).
* one-sided tables ``tab[k, i, j] = <a_i, x_j,k>`` (paper.md §6, ``q^d <= 256``; ``method="tables"``) built
  once per call (``K * q^d * B`` floats), then M lookups per block and row.

Both accumulate in float32 (the dense ``F.linear`` does too); the result equals ``x @ Ŵ.T`` up to float32
summation order (tests: relative 1e-5 of ``|x| @ |Ŵ|.T``).

On CUDA tensors (``CodedWeight.to("cuda")``) the same call runs the GPU twin (``csrc/lut_gemv_cuda.cu``: one warp
per row, lanes over blocks, a fixed shuffle tree). Its order of float operations is spelled out in torch by
:func:`gemv_reference`, and the CPU runs the kernel's own ``__host__ __device__`` code in that order
(``_C.lut_gemv_core_cpu``); the tests check the two are equal bit for bit (no GPU was available to run it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from coset.quant import QuantizationConfig, coset_representative, encode, to_blocks
from coset.quant.offset import effective_dither

from . import _C  # type: ignore[attr-defined]  # compiled extension: in the wheel, not the source tree

__all__ = ["CodedWeight", "gemv_applicable", "gemv_reference", "lut_gemv", "representatives"]

_MAX_B = 8


@lru_cache(maxsize=32)
def representatives(config: QuantizationConfig) -> torch.Tensor:
    """``(q^d, d)`` float64 table of ``a(b)`` in index order (the reference decoder's representatives)."""
    q, d = config.q, config.dim
    Q = q**d
    if Q > 2**16:
        raise ValueError(f"q**d = {Q} representatives: the GEMV kernels support q**d <= 65536")
    i = torch.arange(Q, dtype=torch.int64)
    digits = torch.stack([(i // q**j) % q for j in range(d)], dim=-1).to(torch.uint8)
    return coset_representative(digits, config.lattice, q, config.with_tie_dither)


def _check_config(config) -> QuantizationConfig:
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if config.with_dither:
        raise ValueError("config: lut_gemv needs codes without random dither")
    if config.q**config.dim > 2**16:
        raise ValueError(f"config: q**d = {config.q**config.dim} > 65536 is not supported by lut_gemv")
    if len(config.scales) > 256:
        raise ValueError("config: at most 256 scale steps")
    return config


def gemv_applicable(config: QuantizationConfig) -> bool:
    """True when :func:`lut_gemv` runs ``config``'s codes on its int8 codebook kernel (the fast path): q^d <=
    65536 representatives that fit int8, no random dither, at most 16 scale steps."""
    try:
        _check_config(config)
    except (TypeError, ValueError):
        return False
    return _kernel_tables(config)[1] is not None and len(config.scales) <= 16


@dataclass(frozen=True, eq=False)
class CodedWeight:
    """A weight ``(n, k)`` as HNLQ codes for :func:`lut_gemv`.

    Attributes
    ----------
    idx : (n, K, M) uint8 (q^d <= 256) or int16 (uint16 bit pattern) label indices (a non-contiguous view is
        stored as a dense copy: the kernels read row-major arrays)
    T : (n, K) uint8 scale steps (idem)
    config : QuantizationConfig (no dither)
    k : columns before padding to K*d
    """

    idx: torch.Tensor
    T: torch.Tensor
    config: QuantizationConfig
    k: int

    def __post_init__(self) -> None:
        c = _check_config(self.config)
        if not isinstance(self.idx, torch.Tensor) or self.idx.ndim != 3 or self.idx.shape[2] != c.M:
            raise ValueError(f"idx must be a tensor of shape (n, K, M={c.M})")
        want = torch.uint8 if c.q**c.dim <= 256 else torch.int16
        if self.idx.dtype != want:
            raise TypeError(f"idx must have dtype {want} for q**d = {c.q**c.dim}, got {self.idx.dtype}")
        if not isinstance(self.T, torch.Tensor) or self.T.dtype != torch.uint8 or self.T.shape != self.idx.shape[:2]:
            raise ValueError(f"T must be a uint8 tensor of shape {tuple(self.idx.shape[:2])}")
        if self.T.device != self.idx.device:
            raise ValueError(f"idx and T must be on the same device, got {self.idx.device} and {self.T.device}")
        if self.idx.device.type not in ("cpu", "cuda"):
            raise ValueError(f"idx and T must be CPU or CUDA tensors, got device {self.idx.device}")
        # the kernels read idx and T as dense row-major arrays from their data pointers: a strided / expanded /
        # transposed view would be read as garbage (or past the end of its storage), so it is stored densely
        if not self.idx.is_contiguous():
            object.__setattr__(self, "idx", self.idx.contiguous())
        if not self.T.is_contiguous():
            object.__setattr__(self, "T", self.T.contiguous())
        K = self.idx.shape[1]
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not (K - 1) * c.dim < self.k <= K * c.dim:
            raise ValueError(f"k must be an int in ({(K - 1) * c.dim}, {K * c.dim}], got {self.k!r}")
        if self.T.numel() and int(self.T.max()) > c.max_scaling_iterations:
            raise ValueError(f"T must lie in [0, {c.max_scaling_iterations}]")
        Q = c.q**c.dim
        if self.idx.numel() and int((self.idx.to(torch.int32) & 0xFFFF).max()) >= Q:
            raise ValueError(f"idx entries must lie in [0, q**d = {Q})")

    @classmethod
    def from_labels(cls, labels: torch.Tensor, T: torch.Tensor, config: QuantizationConfig, k: int) -> CodedWeight:
        """From ``coset.quant.encode`` output on ``(n, K, d)`` blocks: labels (n, K, M, d), T (n, K)."""
        c = _check_config(config)
        if not isinstance(labels, torch.Tensor) or labels.ndim != 4 or tuple(labels.shape[2:]) != (c.M, c.dim):
            raise ValueError(f"labels must have shape (n, K, M={c.M}, d={c.dim})")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c.q):
            raise ValueError(f"labels must lie in [0, q={c.q})")
        w = torch.tensor([c.q**i for i in range(c.dim)], dtype=torch.int64, device=labels.device)
        ix = (labels.to(torch.int64) * w).sum(-1)  # (n, K, M)
        if c.q**c.dim <= 256:
            ix = ix.to(torch.uint8)
        else:
            ix = torch.where(ix >= 2**15, ix - 2**16, ix).to(torch.int16)  # uint16 bit pattern
        if not isinstance(T, torch.Tensor) or T.shape != labels.shape[:2]:
            raise ValueError(f"T must have shape {tuple(labels.shape[:2])}")
        return cls(idx=ix.contiguous(), T=T.to(torch.uint8).contiguous(), config=c, k=k)

    @classmethod
    def from_dense(cls, W: torch.Tensor, config: QuantizationConfig) -> CodedWeight:
        """Encode the rows of ``W`` (n, k) in zero-padded d-blocks with :func:`coset.quant.encode`."""
        c = _check_config(config)
        if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.shape[1] == 0:
            raise ValueError("W must be a 2-D (n, k) tensor with k >= 1")
        blocks, _ = to_blocks(W, c.dim)
        b, T = encode(blocks, config=c)
        return cls.from_labels(b, T, c, W.shape[1])

    def to(self, device: torch.device | str) -> CodedWeight:
        """The same codes on ``device`` (a CUDA device runs :func:`lut_gemv`'s GPU kernel)."""
        return CodedWeight(idx=self.idx.to(device), T=self.T.to(device), config=self.config, k=self.k)

    @property
    def n(self) -> int:
        return self.idx.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: the index tensor plus one T byte per block."""
        return self.idx.numel() * self.idx.element_size() + self.T.numel()

    def dequantize(self) -> torch.Tensor:
        """``Ŵ`` (n, k) float32 (for tests and comparisons)."""
        c = self.config
        a = representatives(c)
        ix = self.idx.cpu().to(torch.int64) & 0xFFFF
        w = torch.tensor([float(c.q**m) for m in range(c.M)], dtype=torch.float64).view(1, 1, -1, 1)
        pts = (a[ix] * w).sum(2)  # (n, K, d)
        off = _offset(c)
        if off is not None:
            pts = pts - off
        s = torch.tensor(c.scales, dtype=torch.float64)[self.T.cpu().long()]
        return (pts * s.unsqueeze(-1)).reshape(self.n, -1)[:, : self.k].to(torch.float32)


@lru_cache(maxsize=32)
def _kernel_tables(config: QuantizationConfig):
    a = representatives(config)
    h = 2.0 if config.lattice.name == "E8" else 1.0
    a_h = (a * h).round()
    if not torch.equal(a_h / h, a) or a_h.abs().max() > 127:
        a_i8 = None
    else:
        a_i8 = a_h.to(torch.int8).contiguous()
    scales = torch.tensor(config.scales, dtype=torch.float64).to(torch.float32).contiguous()
    # centred codes: x_hat = s (sum_m q^m a_m - c), one offset c for all M layers; the int8 codebook keeps a and
    # the codebook kernels subtract h c from each block's integers; the one-sided tables can hold <a - c, x> only
    # when there is one layer (M = 1; _tables_ok)
    c = _offset(config)
    hc = None if c is None else (c * h).to(torch.float32).contiguous()
    af = a if c is None else a - c
    return af.to(torch.float32).contiguous(), a_i8, h, scales, _pair_table(config, a_i8), hc


def _tables_ok(config: QuantizationConfig) -> None:
    if config.center and config.M > 1:
        raise ValueError("tables method: centred codes need M = 1 (the offset is not per layer); use the codebook")


def _offset(config: QuantizationConfig) -> torch.Tensor | None:
    """The centring offset ``c`` (d,) float64 of a centred code, else None."""
    if not config.center:
        return None
    c = effective_dither(1, config.lattice, config, None, "cpu")
    assert c is not None  # centred: the offset, (1, d)
    return c[0].to(torch.float64)


def _pair_table(config: QuantizationConfig, a_i8: torch.Tensor | None) -> torch.Tensor | None:
    """Codebook of two layers at once, ``A2[i0 + 256 i1] = A[i0] + q A[i1]`` (int8), when ``q^d <= 256``, M is
    even and the sums fit int8: then the uint8 indices of layers (2m, 2m+1) read as one little-endian uint16
    index and the kernel does M/2 lookups per block with ``q^2`` in place of ``q`` (same exact integers)."""
    Q = config.q**config.dim
    if a_i8 is None or Q > 256 or config.M % 2:
        return None
    a = a_i8.to(torch.int32)
    a2 = torch.zeros(256, 256, config.dim, dtype=torch.int32)
    a2[:Q, :Q] = a.unsqueeze(0) + config.q * a.unsqueeze(1)  # [i1, i0]: index i0 + 256 i1
    if a2.abs().max() > 127:
        return None
    return a2.reshape(65536, config.dim).to(torch.int8).contiguous()


def lut_gemv(x: torch.Tensor, W: CodedWeight, *, method: str = "auto") -> torch.Tensor:
    """``x @ Ŵ.T`` from the codes of ``W``.

    Parameters
    ----------
    x : (k,) or (B, k) float tensor (any B; the kernel runs 8 queries per pass), finite
    W : CodedWeight (n, k)
    method : "auto" (codebook when the representatives fit int8, else tables), "tables" or "codebook"

    Returns
    -------
    (n,) or (B, n) float32
    """
    if not isinstance(W, CodedWeight):
        raise TypeError(f"W must be a CodedWeight, got {type(W).__name__}")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating torch.Tensor")
    if x.ndim not in (1, 2) or x.shape[-1] != W.k:
        raise ValueError(f"x must have shape (k={W.k},) or (B, {W.k}), got {tuple(x.shape)}")
    if x.device != W.idx.device:
        raise ValueError(f"x must be on the device of W's codes ({W.idx.device}), got {x.device}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"lut_gemv runs on CPU and CUDA tensors, got {x.device}")
    if x.device.type == "cuda" and not _gpu_ok():
        raise ValueError("lut_gemv on CUDA tensors needs coset.cuda built with CUDA (nvcc) and a visible GPU")
    if x.numel() and not bool(torch.isfinite(x.to(torch.float32)).all()):  # the kernels' precision
        raise ValueError("x contains NaN or Inf, or values beyond the float32 range")
    if method not in ("auto", "tables", "codebook"):
        raise ValueError(f"method must be 'auto', 'tables' or 'codebook', got {method!r}")
    if x.ndim == 1:
        return lut_gemv(x.unsqueeze(0), W, method=method)[0]
    c = W.config
    d, K, M, Q = c.dim, W.idx.shape[1], c.M, c.q**c.dim
    af, ai8, h, scales, a2, hc = _kernel_tables(c)
    if method == "auto":  # the int8 codebook kernel is the faster one wherever it applies (benchmarks/results)
        method = "codebook" if ai8 is not None else "tables"
    if method == "codebook" and ai8 is None:
        raise ValueError("codebook method: the representatives do not fit int8")
    if method == "tables":
        _tables_ok(c)
    xb = x.to(torch.float32)
    if W.k != K * d:
        xb = torch.nn.functional.pad(xb, (0, K * d - W.k))
    Bt, n = xb.shape[0], W.n
    out = torch.empty((Bt, n), dtype=torch.float32, device=x.device)
    ib = W.idx.element_size()
    for j0 in range(0, Bt, _MAX_B):
        xj = xb[j0 : j0 + _MAX_B]
        B = xj.shape[0]
        Bk = 1 if B == 1 else 2 if B == 2 else 4 if B <= 4 else 8
        if Bk != B:
            xj = torch.nn.functional.pad(xj, (0, 0, 0, Bk - B))
        xj = xj.contiguous()
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                res = _twin_pass(xj, W, method, gpu=True)
            out[j0 : j0 + B] = res[:, :B].T
            continue
        res = torch.empty((n, Bk), dtype=torch.float32)
        if method == "tables":
            tab = torch.empty((K, Q, Bk), dtype=torch.float32)
            _C.lut_build_tables_cpu(xj.data_ptr(), K * d, af.data_ptr(), Bk, K, d, Q, tab.data_ptr())
            _C.lut_gemv_tables_cpu(
                W.idx.data_ptr(),
                ib,
                W.T.data_ptr(),
                scales.data_ptr(),
                scales.numel(),
                0,
                tab.data_ptr(),
                n,
                K,
                M,
                Q,
                c.q,
                Bk,
                res.data_ptr(),
            )
        else:
            xh = (xj / h).contiguous()  # exact (h is 1 or 2)
            # two layers per lookup (see _pair_table) wherever the sums fit int8: with the E8 loop that takes the
            # scales 8 blocks at a time, the 512 KiB pair table (L2) beats the 2 KiB single-layer one (L1) at every
            # batch size, 1.89 vs 3.12 ms at 4096x4096 and one query (benchmarks/results/kernels.md)
            if a2 is not None and W.idx.is_contiguous():
                idx, ibk, Mk, qk, A = W.idx.view(torch.int16), 2, M // 2, c.q * c.q, a2
            else:
                idx, ibk, Mk, qk, A = W.idx, ib, M, c.q, ai8
            _C.lut_gemv_codebook_cpu(
                idx.data_ptr(),
                ibk,
                W.T.data_ptr(),
                scales.data_ptr(),
                0,
                A.data_ptr(),
                d,
                xh.data_ptr(),
                K * d,
                n,
                K,
                Mk,
                qk,
                Bk,
                res.data_ptr(),
                scales.numel(),
                0 if hc is None else hc.data_ptr(),
            )
        out[j0 : j0 + B] = res[:, :B].T
    return out


# ------------------------------------------------------------------------------- the GPU twin and its order
def _gpu_ok() -> bool:
    from ._ops import cuda_available

    return cuda_available()


@lru_cache(maxsize=64)
def _twin_tables(config: QuantizationConfig, device: str):
    af, ai8, h, scales, _, hc = _kernel_tables(config)
    return (
        af.to(device),
        None if ai8 is None else ai8.to(device),
        h,
        scales.to(device),
        None if hc is None else hc.to(device),
    )


def _twin_pass(xj: torch.Tensor, W: CodedWeight, method: str, *, gpu: bool) -> torch.Tensor:
    """One pass of 1/2/4/8 queries ``xj`` (B, K*d) float32 through the CUDA kernels (``gpu=True``, tensors on
    the GPU) or through the same ``__host__ __device__`` code in the GPU's order on the CPU (``gpu=False``:
    ``_C.lut_gemv_core_cpu``). Returns (n, B) float32."""
    c = W.config
    d, K, M, Q, n, Bk = c.dim, W.idx.shape[1], c.M, c.q**c.dim, W.n, xj.shape[0]
    af, ai8, h, scales, hc = _twin_tables(c, str(xj.device))
    res = torch.empty((n, Bk), dtype=torch.float32, device=xj.device)
    st: tuple[int, ...] = ()
    if gpu:
        st = (int(torch.cuda.current_stream(xj.device).cuda_stream),)
        build, gemv = _C.lut_build_tables_cuda, _C.lut_gemv_cuda
    else:
        build, gemv = _C.lut_build_tables_core_cpu, _C.lut_gemv_core_cpu
    idx, ib, T, sc = W.idx.data_ptr(), W.idx.element_size(), W.T.data_ptr(), scales.data_ptr()
    if method == "tables":
        _tables_ok(c)
        tab = torch.empty((K, Q, Bk), dtype=torch.float32, device=xj.device)
        build(xj.data_ptr(), K * d, af.data_ptr(), Bk, K, d, Q, tab.data_ptr(), *st)
        gemv(idx, ib, T, sc, 0, 0, d, 0, 0, tab.data_ptr(), Q, n, K, M, c.q, Bk, res.data_ptr(), *st, 0)
    else:
        if ai8 is None:
            raise ValueError("codebook method: the representatives do not fit int8")
        xh = (xj / h).contiguous()  # exact (h is 1 or 2)
        hcp = 0 if hc is None else hc.data_ptr()
        gemv(
            idx, ib, T, sc, 0, ai8.data_ptr(), d, xh.data_ptr(), K * d, 0, Q, n, K, M, c.q, Bk, res.data_ptr(), *st, hcp
        )
    return res


_WARP = 32  # lanes per row in lut_gemv_cuda.cu


def _lane_sum(dot: torch.Tensor) -> torch.Tensor:
    """(n, K, B) block contributions -> (n, B) in the GPU's order: lane l sums blocks l, l + 32, ... from +0.0
    (missing blocks add +0.0, which changes nothing: a lane sum is never -0.0), then lane i += lane i + h for
    h = 16, 8, 4, 2, 1."""
    n, K, B = dot.shape
    Kp = -(-K // _WARP) * _WARP
    dot = torch.nn.functional.pad(dot, (0, 0, 0, Kp - K)).view(n, Kp // _WARP, _WARP, B)
    acc = torch.zeros((n, _WARP, B), dtype=torch.float32)
    for t in range(Kp // _WARP):
        acc = acc + dot[:, t]
    while acc.shape[1] > 1:
        h = acc.shape[1] // 2
        acc = acc[:, :h] + acc[:, h:]
    return acc[:, 0]


def _codebook_blocks(
    idx: torch.Tensor, s: torch.Tensor, A: torch.Tensor, xh: torch.Tensor, q: int, hc: torch.Tensor | None = None
) -> torch.Tensor:
    """Block contributions of the codebook kernel: idx (n, K, M) int64, s (n, K) float32, A (Q, d) int8, xh
    (B, K*d) float32 (queries / h) -> (n, K, B): ``v = sum_m q^m A[idx_m]`` (exact), ``w = float(v) * s``
    (centred: ``(float(v) - hc) * s``), ``dot = ((w_0 x_0 + w_1 x_1) + ...)``, one float32 rounding per operation."""
    M, d = idx.shape[-1], A.shape[1]
    A = A.to(torch.int64)
    v = A[idx[..., M - 1]]
    for m in range(M - 2, -1, -1):
        v = v * q + A[idx[..., m]]
    vf = v.to(torch.float32) if hc is None else v.to(torch.float32) - hc
    w = vf * s.unsqueeze(-1)  # (n, K, d)
    xk = xh.view(xh.shape[0], -1, d).permute(1, 2, 0)  # (K, d, B)
    dot = w[..., 0, None] * xk[None, :, 0, :]
    for c in range(1, d):
        dot = dot + w[..., c, None] * xk[None, :, c, :]
    return dot


def _tables_blocks(idx: torch.Tensor, s: torch.Tensor, tab: torch.Tensor, q: int) -> torch.Tensor:
    """Block contributions of the tables kernel: tab (K, Q, B) -> (n, K, B), ``v = (t_{M-1} q + ...) + t_0``,
    ``s * v``."""
    M, K = idx.shape[-1], tab.shape[0]
    kk = torch.arange(K).view(1, K)
    qf = torch.tensor(float(q), dtype=torch.float32)
    v = tab[kk, idx[..., M - 1]]
    for m in range(M - 2, -1, -1):
        v = v * qf + tab[kk, idx[..., m]]
    return s.unsqueeze(-1) * v


def _build_tables(xb: torch.Tensor, af: torch.Tensor) -> torch.Tensor:
    """``tab[k, i, j] = ((a_i0 x_j,k0 + a_i1 x_j,k1) + ...)`` in float32: (B, K*d) x (Q, d) -> (K, Q, B)."""
    d = af.shape[1]
    xk = xb.view(xb.shape[0], -1, d).permute(1, 2, 0)  # (K, d, B)
    tab = af[None, :, 0, None] * xk[:, None, 0, :]
    for c in range(1, d):
        tab = tab + af[None, :, c, None] * xk[:, None, c, :]
    return tab


def gemv_reference(x: torch.Tensor, W: CodedWeight, method: str = "codebook") -> torch.Tensor:
    """The GPU kernel's result, spelled out in torch (float32, the kernel's order of operations).

    ``lut_gemv`` on CUDA tensors returns exactly this (bit for bit); on the CPU it agrees to float32 rounding.

    Parameters
    ----------
    x : (B, k) float tensor (CPU)
    W : CodedWeight (CPU)
    method : "codebook" or "tables"

    Returns
    -------
    (B, n) float32
    """
    if method not in ("codebook", "tables"):
        raise ValueError(f"method must be 'codebook' or 'tables', got {method!r}")
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != W.k:
        raise ValueError(f"x must have shape (B, k={W.k})")
    c = W.config
    d, K = c.dim, W.idx.shape[1]
    af, ai8, h, scales, _, hc = _kernel_tables(c)
    xb = torch.nn.functional.pad(x.cpu().to(torch.float32), (0, K * d - W.k))
    idx = W.idx.cpu().to(torch.int64) & 0xFFFF
    s = scales[W.T.cpu().long()]
    if method == "codebook":
        if ai8 is None:
            raise ValueError("codebook method: the representatives do not fit int8")
        dot = _codebook_blocks(idx, s, ai8, xb / h, c.q, hc)
    else:
        _tables_ok(c)
        dot = _tables_blocks(idx, s, _build_tables(xb, af), c.q)
    return _lane_sum(dot).T.contiguous()


def _gemv_core_cpu(x: torch.Tensor, W: CodedWeight, method: str) -> torch.Tensor:
    """(tests) ``lut_gemv`` through the CUDA kernel's shared code run on the CPU in the GPU's order."""
    c = W.config
    K, d = W.idx.shape[1], c.dim
    xb = torch.nn.functional.pad(x.to(torch.float32), (0, K * d - W.k))
    outs = []
    for j0 in range(0, xb.shape[0], _MAX_B):
        xj = xb[j0 : j0 + _MAX_B]
        B = xj.shape[0]
        Bk = 1 if B == 1 else 2 if B == 2 else 4 if B <= 4 else 8
        xj = torch.nn.functional.pad(xj, (0, 0, 0, Bk - B)).contiguous()
        outs.append(_twin_pass(xj, W, method, gpu=False)[:, :B].T)
    return torch.cat(outs)
