"""The coset.kv attention kernels (``csrc/kv_cpu.cpp``) on torch tensors, served through :class:`NativeBackend`.

coset.kv finds them through the coset.quant backend registry (``select_backend(..., "kv_scores", ...)``), never
by importing this package. Shapes (BH = batch * kv heads, L tokens, K = D / 8 blocks, M layers, n queries per
KV head): ``idx (BH, L, K, M)`` uint8, ``t (BH, L, ceil(K t_bits / 8))`` uint8, ``rho (BH, L)`` float32,
``steps (2^t_bits,)`` float32; scores: ``tab (BH, K, 256, n)``, ``cy (BH, K, n)`` -> ``(BH, n, L)``; values:
``p (BH, n, L)``, ``a (256, 8)``, ``c (8,)`` -> ``(BH, n, 8 K)``.
"""

from __future__ import annotations

import weakref

import torch

from . import _C  # type: ignore[attr-defined]  # compiled extension

__all__ = [
    "kv_scores",
    "kv_values",
    "trellis_attend",
    "trellis_append",
    "trellis_attend_step",
    "trellis_encode",
    "trellis_normalise_encode",
    "trellis_scores",
    "trellis_values",
]


def _f32(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU torch.Tensor (the CUDA twin kv_cuda.cu is not bound yet)")
    if t.dtype.is_complex:  # .to(float32) would drop the imaginary part silently
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype == torch.float32 and t.is_contiguous():  # the common case, without two dispatches per tensor
        return t
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


def _trellis_args(ks, cb, D: int):
    if (
        not isinstance(ks, torch.Tensor)
        or ks.dtype != torch.uint8
        or tuple(ks.shape) != (D,)
        or ks.device.type != "cpu"
    ):
        raise ValueError(f"ks must be a CPU uint8 tensor of shape ({D},)")
    if not isinstance(cb, torch.Tensor) or cb.ndim != 1 or cb.numel() < 64 or cb.numel() & (cb.numel() - 1):
        raise ValueError("cb must be a 1-d tensor of 2^L entries, 6 <= L <= 14")
    L = cb.numel().bit_length() - 1
    if L > 14:
        raise ValueError("cb must be a 1-d tensor of 2^L entries, 6 <= L <= 14")
    ksc = ks.contiguous()
    return ksc, _f32("cb", cb, (cb.numel(),)), L, _stream_bytes(ksc)


#: schedules already checked: id -> (weak reference, version, stream bytes); a cache calls a kernel per layer and
#: decoding step with the same cached schedule tensor, and its three reductions cost more than the call
_CHECKED: dict[int, tuple[weakref.ref, int, int]] = {}


def _stream_bytes(ks: torch.Tensor) -> int:
    hit = _CHECKED.get(id(ks))
    if hit is not None and hit[0]() is ks and hit[1] == ks._version:
        return hit[2]
    if int(ks.min()) < 1 or int(ks.max()) > 4 or int(ks.sum()) % 8:
        raise ValueError("ks must hold 1..4 bits per element, a whole number of bytes in all")
    nbytes = int(ks.sum()) // 8
    if len(_CHECKED) > 256:
        _CHECKED.clear()
    _CHECKED[id(ks)] = (weakref.ref(ks), ks._version, nbytes)
    return nbytes


def trellis_encode(u, ks, cb) -> torch.Tensor:
    """Streams ``(n, sum(ks) / 8)`` uint8 of the vectors ``u (n, D)`` (coset.kv.trellis.trellis_encode)."""
    if not isinstance(u, torch.Tensor) or u.ndim != 2 or u.device.type != "cpu" or not u.dtype.is_floating_point:
        raise ValueError("u must be a 2-d floating CPU tensor (n, D)")
    n, D = u.shape
    ks, cb, L, nbytes = _trellis_args(ks, cb, D)
    u = _f32("u", u, (n, D))
    out = torch.empty((n, nbytes), dtype=torch.uint8)
    if n:
        rc = _C.trellis_encode_cpu(u.data_ptr(), n, D, ks.data_ptr(), cb.data_ptr(), L, out.data_ptr(), nbytes,
                                   int(_C.get_num_threads()))  # fmt: skip
        if rc:
            raise ValueError(f"trellis_encode_cpu rejected its arguments (code {rc})")
    return out


def trellis_normalise_encode(
    x, A, ks, cb, scale_tab, limit: float, mean_mode: int = 0, mu=None, cs=None, pos0: int = 0, chan=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The encoder of a cache's new tokens (``trellis_normalise_encode_cpu``): ``x (B, H, n, D)`` float32 ->
    streams ``(B, H, n, sum(ks) / 8)`` and 8-bit scale codes ``(B, H, n)`` uint8, and the first flat row whose rms
    is past ``limit`` (-1: none; the outputs are then incomplete). Per head vector: minus the mean (``mean_mode``
    0 none, 1 ``mu (H, D)``, 2 ``mu`` rotated to position ``pos0 + t`` with ``cs`` rows ``[cos | sin]`` of 2 D),
    divided by ``chan (H, D)`` (optional), times ``A (H, D, D)`` (``z = A[h] y``), scaled by its 8-bit log scale
    (``scale_tab``) and Viterbi-encoded."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.device.type != "cpu":
        raise ValueError("x must be a CPU tensor (B, H, n, D)")
    B, H, n, D = x.shape
    ks, cb, L, nbytes = _trellis_args(ks, cb, D)
    x = _f32("x", x, (B, H, n, D))
    A = _f32("A", A, (H, D, D))
    scale_tab = _f32("scale_tab", scale_tab, (256,))
    if isinstance(mean_mode, bool) or mean_mode not in (0, 1, 2):
        raise ValueError(f"mean_mode must be 0, 1 or 2, got {mean_mode!r}")
    mu_t = _f32("mu", mu, (H, D)) if mean_mode else None
    cs_t = None
    if mean_mode == 2:
        if isinstance(pos0, bool) or not isinstance(pos0, int) or pos0 < 0:
            raise ValueError(f"pos0 must be an int >= 0, got {pos0!r}")
        if not isinstance(cs, torch.Tensor) or cs.ndim != 2 or cs.shape[1] != 2 * D or cs.shape[0] < pos0 + n:
            raise ValueError(f"cs must be a (>= {pos0 + n}, {2 * D}) tensor")
        cs_t = _f32("cs", cs, tuple(cs.shape))
    chan_t = _f32("chan", chan, (H, D)) if chan is not None else None
    stream = torch.empty((B, H, n, nbytes), dtype=torch.uint8)
    scale = torch.empty((B, H, n), dtype=torch.uint8)
    if not x.numel():
        return stream, scale, -1
    rc, bad = _C.trellis_normalise_encode_cpu(
        x.data_ptr(), B * H * n, n, H, D, mean_mode, 0 if mu_t is None else mu_t.data_ptr(),
        0 if cs_t is None else cs_t.data_ptr(), int(pos0), 0 if chan_t is None else chan_t.data_ptr(), A.data_ptr(),
        scale_tab.data_ptr(), float(limit), ks.data_ptr(), cb.data_ptr(), L, stream.data_ptr(), scale.data_ptr(),
        nbytes, int(_C.get_num_threads()),
    )  # fmt: skip
    if rc == 1:
        raise ValueError(f"trellis_normalise_encode_cpu rejected its arguments (code {rc})")
    return stream, scale, int(bad)


def _stream_args(stream, ks, cb):
    if not isinstance(stream, torch.Tensor) or stream.ndim != 3 or stream.dtype != torch.uint8:
        raise ValueError("stream must be a uint8 tensor (BH, L, nbytes)")
    if stream.device.type != "cpu":
        raise ValueError("stream must be a CPU tensor (the CUDA twin trellis_cuda.cu is not bound yet)")
    BH, L, nb = stream.shape
    D = ks.shape[0] if isinstance(ks, torch.Tensor) and ks.ndim == 1 else -1
    ks, cb, LB, nbytes = _trellis_args(ks, cb, D)
    if nb != nbytes:
        raise ValueError(f"stream has {nb} bytes per vector, the schedule ks codes {nbytes}")
    # the caller keeps this tensor alive over the kernel call: a temporary's data_ptr() would dangle
    return stream.contiguous(), BH, L, D, ks, cb, LB, nbytes


def _stream_call(kernel: str, stream, rho, x, ks, cb, name: str, values: bool) -> torch.Tensor:
    stream, BH, L, D, ks, cb, LB, nbytes = _stream_args(stream, ks, cb)
    n = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim == 3 else -1
    rho, x = _f32("rho", rho, (BH, L)), _f32(name, x, (BH, n, L if values else D))
    out = torch.zeros((BH, n, D if values else L), dtype=torch.float32)
    if out.numel() and L:
        rc = getattr(_C, kernel)(stream.data_ptr(), rho.data_ptr(), x.data_ptr(), BH, L, n, D, ks.data_ptr(),
                                 cb.data_ptr(), LB, nbytes, out.data_ptr(), int(_C.get_num_threads()))  # fmt: skip
        if rc:
            raise ValueError(f"{kernel} rejected its arguments (code {rc})")
    return out


def trellis_scores(stream, rho, q, ks, cb) -> torch.Tensor:
    """``out[bh, i, t] = rho[bh, t] <q[bh, i], u_hat(stream[bh, t])>``: ``stream (BH, L, nbytes)`` uint8,
    ``rho (BH, L)``, ``q (BH, n, D)`` -> ``(BH, n, L)`` float32 (D = ``len(ks)``)."""
    return _stream_call("trellis_scores_cpu", stream, rho, q, ks, cb, "q", values=False)


def trellis_values(stream, rho, p, ks, cb) -> torch.Tensor:
    """``out[bh, i] = sum_t p[bh, i, t] rho[bh, t] u_hat(stream[bh, t])``: ``stream (BH, L, nbytes)`` uint8,
    ``rho (BH, L)``, ``p (BH, n, L)`` -> ``(BH, n, D)`` float32 (D = ``len(ks)``)."""
    return _stream_call("trellis_values_cpu", stream, rho, p, ks, cb, "p", values=True)


def _rows(name: str, t, trailing: int) -> tuple[torch.Tensor, int]:
    """``t (B, H, L, *trailing)`` read in place as ``B H`` rows (a view of a cache buffer with spare capacity: each
    token contiguous, rows a fixed stride apart), else a contiguous copy: the tensor and its row stride."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.device.type != "cpu" or t.ndim != 3 + trailing:
        raise ValueError(f"{name} must be a CPU uint8 tensor with {3 + trailing} dims")
    B, H, L = t.shape[:3]
    inner = t.shape[3] if trailing else 1
    st = t.stride()  # one call: each .stride(i) is a dispatch
    stride = st[1] if H > 1 else st[0]
    ok = (inner == 1 or st[3] == 1) and (L <= 1 or st[2] == inner)
    ok = ok and (B == 1 or H == 1 or st[0] == H * st[1]) and (B * H == 1 or stride >= L * inner)
    if not ok:
        t = t.contiguous()
    if not ok or B * H == 1:
        stride = L * inner
    return t, int(stride)


def _side_tables(kks, kcb, vks, vcb) -> int:
    """Checks the key and value schedules ``(D,)`` uint8 and decode tables ``(2^L,)`` float32 of the fused kernels
    (read in place: no copies); returns D."""
    D = kks.shape[0] if isinstance(kks, torch.Tensor) and kks.ndim == 1 else -1
    for name, ks, cb in (("kks", kks, kcb), ("vks", vks, vcb)):
        if (
            not isinstance(ks, torch.Tensor)
            or ks.dtype != torch.uint8
            or tuple(ks.shape) != (D,)
            or not ks.is_contiguous()
        ):
            raise ValueError(f"{name} must be a contiguous uint8 tensor of shape ({D},)")
        if not isinstance(cb, torch.Tensor) or cb.dtype != torch.float32 or cb.ndim != 1 or not cb.is_contiguous():
            raise ValueError(f"{name[0]}cb must be a contiguous 1-d float32 tensor of 2^L entries, 6 <= L <= 14")
        if cb.numel() < 64 or cb.numel() > 1 << 14 or cb.numel() & (cb.numel() - 1):
            raise ValueError(f"{name[0]}cb must be a contiguous 1-d float32 tensor of 2^L entries, 6 <= L <= 14")
    return D


def _code_sides(kstream, kscale, kks, kcb, vstream, vscale, vks, vcb) -> tuple[list, tuple[int, int, int, int]]:
    """The key and value sides of the fused kernels, checked: their C arguments (streams and scales read in place,
    schedules, tables, state bits, stream bytes) and ``(B, H, L, D)``."""
    kstream, ksr = _rows("kstream", kstream, 1)
    vstream, vsr = _rows("vstream", vstream, 1)
    kscale, kcr = _rows("kscale", kscale, 0)
    vscale, vcr = _rows("vscale", vscale, 0)
    B, H, L, nbk = kstream.shape
    nbv = vstream.shape[3]
    if tuple(vstream.shape[:3]) != (B, H, L) or tuple(kscale.shape) != (B, H, L) or tuple(vscale.shape) != (B, H, L):
        raise ValueError("trellis_attend: the key and value streams and scales must share (B, H, L)")
    D = _side_tables(kks, kcb, vks, vcb)
    kcb_n, vcb_n = kcb.numel(), vcb.numel()
    args = [
        kstream.data_ptr(), ksr, kscale.data_ptr(), kcr, kks.data_ptr(), kcb.data_ptr(), kcb_n.bit_length() - 1, nbk,
        vstream.data_ptr(), vsr, vscale.data_ptr(), vcr, vks.data_ptr(), vcb.data_ptr(), vcb_n.bit_length() - 1, nbv,
    ]  # fmt: skip
    return args, (B, H, L, D)


def _not_finite(rc: int, name: str) -> None:
    if rc == 2:  # (the message of coset.kv's own check)
        raise ValueError(
            "attention scores are not finite: the query (or scaling) is too large for the cached keys, or it holds "
            "NaN/Inf"
        )
    if rc:
        raise ValueError(f"{name} rejected its arguments (code {rc})")


def trellis_attend(
    kstream,
    kscale,
    kks,
    kcb,
    vstream,
    vscale,
    vks,
    vcb,
    scale_tab,
    q,
    scaling: float,
    extra,
    bias_mode: int = 0,
    bias=None,
    tab=None,
    pos0: int = 0,
):
    """Fused decode attention over trellis-coded keys and values (``trellis_attend_cpu``, see trellis_cpu.cpp).

    ``kstream (B, H, L, nbk)``, ``kscale (B, H, L)`` uint8 8-bit scale codes (``rho = scale_tab[code]``), the same
    for the values; ``q (B, H, n, D)`` rotated queries; ``extra (B, H, n, Le)`` the already scaled scores of the
    dense tokens; ``bias_mode`` 0 (none), 1 (``bias (B, H, n)`` added to every coded score) or 2 (``bias (B, H, n,
    tdim)`` dotted with rows ``pos0 + t`` of ``tab (P, tdim)``). Returns ``acc (B, H, n, D)`` (rotated domain),
    ``pe (B, H, n, Le)`` and ``psum (B, H, n)``; raises ValueError when a score is not finite.
    """
    sides, (B, H, L, D) = _code_sides(kstream, kscale, kks, kcb, vstream, vscale, vks, vcb)
    n = q.shape[2] if isinstance(q, torch.Tensor) and q.ndim == 4 else -1
    q = _f32("q", q, (B, H, n, D))
    Le = extra.shape[-1] if isinstance(extra, torch.Tensor) and extra.ndim == 4 else -1
    extra = _f32("extra", extra, (B, H, n, Le))
    scale_tab = _f32("scale_tab", scale_tab, (256,))
    tdim, bias_t, tab_t = 0, q, q
    if bias_mode == 1:
        bias_t = _f32("bias", bias, (B, H, n))
    elif bias_mode == 2:
        tdim = bias.shape[-1] if isinstance(bias, torch.Tensor) and bias.ndim == 4 else -1
        bias_t = _f32("bias", bias, (B, H, n, tdim))
        if not isinstance(tab, torch.Tensor) or tab.ndim != 2 or tab.shape[1] != tdim or tab.shape[0] < pos0 + L:
            raise ValueError(f"tab must be a (>= {pos0 + L}, {tdim}) tensor")
        tab_t = _f32("tab", tab, tuple(tab.shape))
    elif bias_mode != 0:
        raise ValueError(f"bias_mode must be 0, 1 or 2, got {bias_mode!r}")
    acc = torch.empty((B, H, n, D), dtype=torch.float32)
    pe = torch.empty((B, H, n, Le), dtype=torch.float32)
    psum = torch.empty((B, H, n), dtype=torch.float32)
    rc = _C.trellis_attend_cpu(
        *sides, scale_tab.data_ptr(), B * H, L, n, D, q.data_ptr(), bias_mode, bias_t.data_ptr(), tab_t.data_ptr(),
        pos0, tdim, float(scaling), extra.data_ptr(), Le, acc.data_ptr(), pe.data_ptr(), psum.data_ptr(),
        int(_C.get_num_threads()),
    )  # fmt: skip
    _not_finite(rc, "trellis_attend_cpu")
    return acc, pe, psum


def _storage(name: str, t, trailing: int, dtype: torch.dtype, used: int, B: int = -1, H: int = -1) -> torch.Tensor:
    """A contiguous ``(B, H, C, *trailing)`` buffer of capacity ``C >= used`` tokens (rows ``C * inner`` apart)."""
    if (
        not isinstance(t, torch.Tensor)
        or t.dtype != dtype
        or t.ndim != 3 + trailing
        or t.device.type != "cpu"
        or not t.is_contiguous()
    ):
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor with {3 + trailing} dims")
    if t.shape[2] < used or (B >= 0 and (t.shape[0] != B or t.shape[1] != H)):
        raise ValueError(f"{name} {tuple(t.shape)} does not hold {used} tokens of batch {B}, {H} heads")
    return t


#: the static arguments of trellis_attend_step already checked, per query map: id -> (weak references, versions,
#: bias mode, C arguments, (D, qw, rows, tdim)); a cache passes the same tables and maps every decoding step, and
#: their checks cost about a tenth of the step's kernel on a small model
_STEP_STATIC: dict[int, tuple] = {}


def _remembered(cache: dict[int, tuple], ts: tuple, tag, check):
    """``check()`` of the static arguments ``ts`` (tensors or Nones; keyed by the first), or its remembered result
    while ``ts`` are the very same tensors, unchanged since (``_version``) and ``tag`` is the same."""
    hit = cache.get(id(ts[0]))
    if hit is not None and hit[2] == tag and _same(hit[0], hit[1], ts):
        return hit[3]
    out = check()
    if len(cache) > 1024:
        cache.clear()
    refs = tuple(None if t is None else weakref.ref(t) for t in ts)
    cache[id(ts[0])] = (refs, tuple(-1 if t is None else t._version for t in ts), tag, out)
    return out


def _step_static(kks, kcb, vks, vcb, scale_tab, qmap, omap, tab, bias_mode: int) -> tuple[list, tuple]:
    ts = (qmap, kks, kcb, vks, vcb, scale_tab, omap, tab if bias_mode == 2 else None)
    return _remembered(
        _STEP_STATIC,
        ts,
        bias_mode,
        lambda: _check_step_static(kks, kcb, vks, vcb, scale_tab, qmap, omap, tab, bias_mode),
    )


def _check_step_static(kks, kcb, vks, vcb, scale_tab, qmap, omap, tab, bias_mode: int) -> tuple[list, tuple]:
    D = _side_tables(kks, kcb, vks, vcb)
    nbk, nbv = _stream_bytes(kks), _stream_bytes(vks)
    if (
        not isinstance(scale_tab, torch.Tensor)
        or scale_tab.dtype != torch.float32
        or tuple(scale_tab.shape) != (256,)
        or not scale_tab.is_contiguous()
    ):
        raise ValueError("scale_tab must be a contiguous float32 tensor of shape (256,)")
    tdim = 0
    if bias_mode == 2:
        if (
            not isinstance(tab, torch.Tensor)
            or tab.dtype != torch.float32
            or tab.ndim != 2
            or tab.shape[1] < 1
            or not tab.is_contiguous()
        ):
            raise ValueError("tab must be a contiguous 2-d float32 tensor (positions, tdim)")
        tdim = tab.shape[1]
    elif bias_mode not in (0, 1) or isinstance(bias_mode, bool):
        raise ValueError(f"bias_mode must be 0, 1 or 2, got {bias_mode!r}")
    qw = D + (1 if bias_mode == 1 else tdim)
    H = qmap.shape[0] if isinstance(qmap, torch.Tensor) and qmap.ndim == 3 else -1
    for name, m in (("qmap", qmap), ("omap", omap)):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.float32 or not m.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor")
    rows = omap.shape[1] if omap.ndim == 3 and omap.shape[1] in (D, D + 1) else -1
    if tuple(qmap.shape) != (H, D, qw) or tuple(omap.shape) != (H, rows, D):
        raise ValueError(f"qmap must be (H, {D}, {qw}) and omap (H, {D} or {D + 1}, {D}) with the same H >= 1")
    args = [kks.data_ptr(), kcb.data_ptr(), kcb.numel().bit_length() - 1, nbk,
            vks.data_ptr(), vcb.data_ptr(), vcb.numel().bit_length() - 1, nbv, scale_tab.data_ptr(),
            qmap.data_ptr(), omap.data_ptr(), tab.data_ptr() if tdim else 0]  # fmt: skip
    return args, (H, D, qw, rows, tdim)


def _same(refs: tuple, versions: tuple, ts: tuple) -> bool:
    """Whether ``ts`` are the very tensors (or Nones) behind ``refs``, unchanged since (``_version``)."""
    for r, v, t in zip(refs, versions, ts, strict=True):
        if t is None:
            if r is not None:
                return False
        elif r is None or r() is not t or t._version != v:
            return False
    return True


def trellis_attend_step(
    kstream,
    kscale,
    vstream,
    vscale,
    L: int,
    kks,
    kcb,
    vks,
    vcb,
    scale_tab,
    query,
    qmap,
    omap,
    scaling: float,
    sink=None,
    window=None,
    bias_mode: int = 0,
    tab=None,
    pos0: int = 0,
) -> torch.Tensor:
    """A whole decoding step of one layer in one call (``trellis_attend_step_cpu``, see trellis_cpu.cpp).

    ``kstream (B, H, C, nbk)``, ``kscale (B, H, C)``, ``vstream``, ``vscale``: a cache's whole contiguous buffers
    (capacity ``C``), of which the first ``L`` tokens are read; ``kks``, ``kcb``, ``vks``, ``vcb``, ``scale_tab`` as
    for :func:`trellis_attend`; ``query (B, H, n, D)`` the layer's queries (row ``i`` of KV head ``h``); ``qmap (H,
    D, qw)`` with ``query @ qmap[h] = [q' | qm]`` (q' in the coded keys' domain, qm the bias query: ``qw - D`` = 0,
    1 or ``tdim`` columns for ``bias_mode`` 0, 1, 2 as in :func:`trellis_attend`; ``tab (P >= pos0 + L, tdim)``);
    ``omap (H, D or D + 1, D)`` with ``out = [acc | psum] @ omap[h]``; ``sink``, ``window``: ``(keys, values,
    length)`` of the dense tokens (``(B, H, C', D)`` float32 buffers) or None, scored against ``query`` and added
    to the output with their weights. Returns ``(B, H, n, D)`` float32; raises ValueError when a score is not
    finite. The static arguments (tables, maps) are checked once and remembered while unchanged.
    """
    if isinstance(L, bool) or not isinstance(L, int) or L < 0:
        raise ValueError(f"L must be an int >= 0, got {L!r}")
    static, (H, D, qw, rows, tdim) = _step_static(kks, kcb, vks, vcb, scale_tab, qmap, omap, tab, bias_mode)
    nbk, nbv = static[3], static[7]
    kstream = _storage("kstream", kstream, 1, torch.uint8, L)
    B, C = kstream.shape[0], kstream.shape[2]
    if kstream.shape[1] != H or kstream.shape[3] != nbk:
        raise ValueError(f"kstream must be (B, {H}, C, {nbk})")
    vstream = _storage("vstream", vstream, 1, torch.uint8, L, B, H)
    kscale = _storage("kscale", kscale, 0, torch.uint8, L, B, H)
    vscale = _storage("vscale", vscale, 0, torch.uint8, L, B, H)
    if vstream.shape[3] != nbv:
        raise ValueError(f"vstream must be ({B}, {H}, C, {nbv})")
    if tdim and tab.shape[0] < pos0 + L:
        raise ValueError(f"tab must hold >= {pos0 + L} positions, has {tab.shape[0]}")
    n = query.shape[2] if isinstance(query, torch.Tensor) and query.ndim == 4 else -1
    query = _f32("query", query, (B, H, n, D))
    dense: list[int] = []
    for name, part in (("sink", sink), ("window", window)):
        if part is None:
            dense += [0, 0, 0, 0]
            continue
        if not isinstance(part, (tuple, list)) or len(part) != 3:
            raise ValueError(f"{name} must be a (keys, values, length) triple or None")
        k, v, Ld = part
        if isinstance(Ld, bool) or not isinstance(Ld, int) or Ld < 0:
            raise ValueError(f"{name} length must be an int >= 0, got {Ld!r}")
        k = _storage(f"{name} keys", k, 1, torch.float32, Ld, B, H)
        v = _storage(f"{name} values", v, 1, torch.float32, Ld, B, H)
        if k.shape != v.shape or k.shape[3] != D:
            raise ValueError(f"{name} keys and values must both be ({B}, {H}, C, {D})")
        dense += [k.data_ptr(), v.data_ptr(), k.shape[2] * D, Ld]
    if L + dense[3] + dense[7] < 1:
        raise ValueError("trellis_attend_step: no tokens to attend to")
    kk, kc, kL, _, vk, vc, vL, _, st, qm, om, tb = static
    out = torch.empty((B, H, n, D), dtype=torch.float32)
    rc = _C.trellis_attend_step_cpu(
        kstream.data_ptr(), C * nbk, kscale.data_ptr(), C, kk, kc, kL, nbk,
        vstream.data_ptr(), vstream.shape[2] * nbv, vscale.data_ptr(), vscale.shape[2], vk, vc, vL, nbv,
        st, B * H, H, L, n, D, query.data_ptr(), qm, qw, om, rows, bias_mode, tb, pos0, tdim, float(scaling),
        *dense, out.data_ptr(), int(_C.get_num_threads()),
    )  # fmt: skip
    _not_finite(rc, "trellis_attend_step_cpu")
    return out


#: the static arguments of trellis_append already checked, per key map (as _STEP_STATIC)
_APPEND_STATIC: dict[int, tuple] = {}


def _append_static(k_side, v_side, scale_tab, cs, H: int, D: int) -> list:
    """C arguments of the static parts (maps, means, channel scale, codes, tables), checked once while the same
    unchanged tensors come back."""
    A_k, kks, kcb, k_mode, mu_k, chan = k_side
    A_v, vks, vcb, v_mode, mu_v = v_side
    ts = (A_k, kks, kcb, mu_k, chan, A_v, vks, vcb, mu_v, scale_tab, cs if k_mode == 2 else None)
    return _remembered(
        _APPEND_STATIC, ts, (k_mode, v_mode, H, D), lambda: _check_append_static(k_side, v_side, scale_tab, cs, H, D)
    )


def _check_append_static(k_side, v_side, scale_tab, cs, H: int, D: int) -> list:
    A_k, kks, kcb, k_mode, mu_k, chan = k_side
    A_v, vks, vcb, v_mode, mu_v = v_side
    if isinstance(k_mode, bool) or k_mode not in (0, 1, 2):
        raise ValueError(f"the keys' mean_mode must be 0, 1 or 2, got {k_mode!r}")
    if isinstance(v_mode, bool) or v_mode not in (0, 1):
        raise ValueError(f"the values' mean_mode must be 0 or 1, got {v_mode!r}")

    def exact(name: str, t, shape: tuple[int, ...]) -> int:  # pointers into the caller's own tensors only
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != torch.float32
            or t.device.type != "cpu"
            or tuple(t.shape) != shape
            or not t.is_contiguous()
        ):
            raise ValueError(f"{name} must be a contiguous CPU float32 tensor of shape {shape}")
        return t.data_ptr()

    kks, kcb, kL, knb = _trellis_args(kks, kcb, D)
    vks, vcb, vL, vnb = _trellis_args(vks, vcb, D)
    if kks is not k_side[1] or kcb is not k_side[2] or vks is not v_side[1] or vcb is not v_side[2]:
        raise ValueError("ks and cb must be contiguous float32 / uint8 tensors (no copies: they are remembered)")
    cs_p = 0
    if k_mode == 2:
        if not isinstance(cs, torch.Tensor) or cs.ndim != 2:
            raise ValueError(f"cs must be a (positions, {2 * D}) tensor")
        cs_p = exact("cs", cs, (cs.shape[0], 2 * D))
    args = [
        k_mode, exact("mu_k", mu_k, (H, D)) if k_mode else 0, cs_p,
        exact("chan", chan, (H, D)) if chan is not None else 0, exact("A_k", A_k, (H, D, D)),
        kks.data_ptr(), kcb.data_ptr(), kL, knb,
        v_mode, exact("mu_v", mu_v, (H, D)) if v_mode else 0, exact("A_v", A_v, (H, D, D)),
        vks.data_ptr(), vcb.data_ptr(), vL, vnb, exact("scale_tab", scale_tab, (256,)),
    ]  # fmt: skip
    return args


def trellis_append(
    xk, xv, k_side, v_side, scale_tab, limit: float, kstream, kscale, vstream, vscale, t0: int, cs=None, pos0: int = 0
) -> int:
    """A decoding step's append in one call (``trellis_append_cpu``): :func:`trellis_normalise_encode` of the keys
    ``xk`` and the values ``xv`` (``(B, H, n, D)``), written in place at tokens ``t0 .. t0 + n - 1`` of a cache's
    contiguous buffers ``kstream (B, H, C, nbk)``, ``kscale (B, H, C)``, ``vstream``, ``vscale``.

    ``k_side = (A_k, kks, kcb, mean_mode 0 / 1 / 2, mu_k or None, chan or None)``, ``v_side = (A_v, vks, vcb,
    mean_mode 0 / 1, mu_v or None)``; ``cs`` the ``[cos | sin]`` table (``>= pos0 + n`` rows) for the keys' mean
    mode 2. Returns the first flat row (keys' rows, then the values' after them) whose rms is past ``limit`` or not
    finite, -1 for none; the buffers past ``t0`` are then partly written (the caller's length marks what is used).
    The static parts are checked once and remembered while the same unchanged tensors come back.
    """
    if not isinstance(xk, torch.Tensor) or xk.ndim != 4 or xk.device.type != "cpu":
        raise ValueError("xk must be a CPU tensor (B, H, n, D)")
    B, H, n, D = xk.shape
    xk, xv = _f32("xk", xk, (B, H, n, D)), _f32("xv", xv, (B, H, n, D))
    static = _append_static(k_side, v_side, scale_tab, cs, H, D)
    knb, vnb = static[8], static[15]
    if isinstance(t0, bool) or not isinstance(t0, int) or t0 < 0:
        raise ValueError(f"t0 must be an int >= 0, got {t0!r}")
    C = kstream.shape[2] if isinstance(kstream, torch.Tensor) and kstream.ndim == 4 else -1
    if C < t0 + n:
        raise ValueError(f"the buffers ({C} tokens) do not hold tokens {t0} .. {t0 + n - 1}")
    for name, t, shape in (("kstream", kstream, (B, H, C, knb)), ("kscale", kscale, (B, H, C)),
                           ("vstream", vstream, (B, H, C, vnb)), ("vscale", vscale, (B, H, C))):  # fmt: skip
        if _storage(name, t, len(shape) - 3, torch.uint8, t0 + n, B, H).shape != shape:
            raise ValueError(f"{name} must be a contiguous CPU uint8 tensor {shape}")
    if k_side[3] == 2:
        if isinstance(pos0, bool) or not isinstance(pos0, int) or pos0 < 0:
            raise ValueError(f"pos0 must be an int >= 0, got {pos0!r}")
        if cs.shape[0] < pos0 + n:
            raise ValueError(f"cs must hold >= {pos0 + n} positions, has {cs.shape[0]}")
    if not n or not B:
        return -1
    (km, mk, csp, ch, ak, kk, kc, kL, _, vm, mv, av, vk, vc, vL, _, st) = static
    rc, bad = _C.trellis_append_cpu(
        xk.data_ptr(), km, mk, csp, ch, ak, kk, kc, kL, knb, kstream.data_ptr(), kscale.data_ptr(),
        xv.data_ptr(), vm, mv, av, vk, vc, vL, vnb, vstream.data_ptr(), vscale.data_ptr(),
        B * H, n, H, D, int(pos0), st, float(limit), C, t0, int(_C.get_num_threads()),
    )  # fmt: skip
    if rc == 1:
        raise ValueError(f"trellis_append_cpu rejected its arguments (code {rc})")
    return int(bad)
