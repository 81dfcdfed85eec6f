"""The hook's native path: one native call per bucket to encode (+ pack) and one to decode (+ unpack).

A kernel package registered with coset.quant's backend registry may serve the op ``"bucket_codec"``
(``select_backend("auto", "bucket_codec", bucket, lattice, config)``; coset-cuda's ``NativeBackend`` does):
its ``bucket_codec()`` object encodes a whole float32 CPU bucket into the exact bytes of
:mod:`coset.dist.codec` (the allgather payload, or the packed modular codes) and decodes the gathered / summed
buffer straight into the bucket, with the error-feedback residual fused in. Results are bit-identical to the
Python path, so ranks may even mix the two. coset-dist depends on coset-quant only: without such a backend (or
for what it does not cover: fp16/bf16 or GPU buckets, random dither, the ``decode`` mode)
:func:`native_hook` returns ``None`` and the hook takes its Python path.

``state.native = False`` (an attribute of :class:`~coset.dist.HNLQHookState`, default True) forces the
Python path; ``state.native_buckets`` counts the buckets that took the native one and ``state.native_cpu_s``
(dict: "encode", "decode") sums the CPU time of the calling thread spent in the native calls (the codec's own
work when it runs on one thread, ``COSET_NUM_THREADS=1``).
"""

import time
from typing import Any

import torch
import torch.distributed as dist

from coset.quant.backend import select_backend

from .codec import allgather_bytes, choose_sum_packing, modular_scales, payload_layout, ring_allreduce_bytes

__all__ = ["native_available", "native_codec", "native_hook"]

_PROBE = torch.zeros(1, dtype=torch.float32)


def native_codec(config) -> Any | None:
    """The registered bucket codec for ``config`` on float32 CPU buckets, or ``None`` (Python path)."""
    try:
        be = select_backend("auto", "bucket_codec", _PROBE, config.lattice, config)
    except Exception:  # a broken optional plugin must not break the Python path
        return None
    return None if be is None else be.bucket_codec()


def native_available() -> bool:
    """True when a registered backend serves the bucket codec for the hooks' default config."""
    from .hooks import default_config

    return native_codec(default_config()) is not None


def _codec(state, buf: torch.Tensor) -> Any | None:
    if not getattr(state, "native", True) or state.mode not in ("allgather", "modular"):
        return None
    if buf.dtype != torch.float32 or buf.device.type != "cpu" or not buf.is_contiguous():
        return None
    cache = state.__dict__.setdefault("_native_codec", {})  # one registry lookup per config
    key = state.config
    if key not in cache:
        cache[key] = native_codec(state.config)
    return cache[key]


def _cpu(state, stage: str, t0: float) -> None:
    acc = state.__dict__.setdefault("native_cpu_s", {"encode": 0.0, "decode": 0.0})
    acc[stage] += time.thread_time() - t0


def _residual(state, idx: int, n: int) -> torch.Tensor | None:
    """This bucket's residual buffer (zeros when missing or stale), or None without error feedback."""
    if not state.error_feedback:
        return None
    r = state.residuals.get(idx)
    if r is None or r.shape != (n,) or r.dtype != torch.float32 or r.device.type != "cpu" or not r.is_contiguous():
        r = torch.zeros(n, dtype=torch.float32)
    return r


def native_hook(state, buf: torch.Tensor, idx: int, W: int) -> torch.futures.Future | None:
    """Run one compressed bucket through the native codec; ``None`` if it cannot (caller falls back).

    Parameters
    ----------
    state : HNLQHookState; buf : the bucket's flat buffer (n,); idx : bucket index; W : world size
    """
    codec = _codec(state, buf)
    if codec is None:
        return None
    state.native_buckets = getattr(state, "native_buckets", 0) + 1
    if state.mode == "allgather":
        return _allgather(codec, state, buf, idx, W)
    return _modular(codec, state, buf, idx, W)


_FLT_MAX = torch.finfo(torch.float32).max


def _may_overflow(bound: float) -> bool:
    """Whether decoded values (or residuals) can round past float32's range: then the bucket and the residual are
    clamped like the Python path's (hooks._clamp_finite_); else that pass over the bucket is skipped."""
    return not bound < _FLT_MAX / 4  # NaN-safe


def _fail_or_allreduce(state, buf: torch.Tensor, idx: int, W: int):
    from .hooks import _nonfinite_error  # the same message as the Python path

    state._counters["buckets_nonfinite"] += 1
    state.residuals.pop(idx, None)  # it was overwritten by x + residual, which holds the NaN/Inf
    if state.nonfinite == "raise":
        raise _nonfinite_error(idx)
    state._counters["bytes_sent"] += ring_allreduce_bytes(buf.numel() * buf.element_size(), W)
    dist.all_reduce(buf, group=state.group)  # synchronous, inside the callback (like the Python path)
    return buf.div_(W)


def _allgather(codec, state, buf, idx, W):
    cfg = state.config
    n = buf.numel()
    rank = dist.get_rank(state.group)
    lay = payload_layout(n, cfg)
    resid = _residual(state, idx, n)
    payload = torch.empty(lay.nbytes, dtype=torch.uint8)
    t0 = time.thread_time()
    info = codec.allgather_encode(buf, cfg, payload, resid=resid)
    _cpu(state, "encode", t0)
    if not info["nonfinite"]:
        state._counters["blocks"] += lay.n_blocks
        state._counters["blocks_overloaded"] += info["overloaded"]
        state._counters["blocks_clamped"] += info["clamped"]
    state.bucket_scales[idx] = torch.tensor([info["rho"] * cfg.beta], dtype=torch.float64)
    state._counters["bytes_sent"] += allgather_bytes(lay.nbytes, W)
    gathered = torch.empty((W, lay.nbytes), dtype=torch.uint8)
    fut = dist.all_gather(list(gathered.unbind(0)), payload, group=state.group, async_op=True).get_future()

    def finish(f):
        f.wait()
        t0 = time.thread_time()
        rc = codec.allgather_decode(gathered, n, cfg, buf, own=rank, resid=resid)
        _cpu(state, "decode", t0)
        if rc:
            return _fail_or_allreduce(state, buf, idx, W)
        # |x_hat| <= rho * scales[cap] * (a lattice point's largest coordinate, < 2 q^M): clamp only if it may
        # pass float32's range (the rho of each payload is in its header)
        rho = float(gathered[:, -8:-4].reshape(-1).clone().view(torch.float32).abs().max())
        if _may_overflow(rho * cfg.scales[-1] * 4 * cfg.q**cfg.M):
            from .hooks import _clamp_finite_

            _clamp_finite_(buf)
            if resid is not None:
                _clamp_finite_(resid)
        if resid is not None:
            state.residuals[idx] = resid
        return buf

    return fut.then(finish)


def _modular(codec, state, buf, idx, W):
    cfg = state.config
    d, n = cfg.dim, buf.numel()
    nb = -(-n // d)
    bpc = nb if state.chunk_size is None else max(1, state.chunk_size // d)
    resid = _residual(state, idx, n)
    t0 = time.thread_time()
    norms, bad = codec.modular_norms(buf, d, max(bpc, 1), resid=resid)
    _cpu(state, "encode", t0)
    xe = resid if resid is not None else buf
    if bad:
        norms.zero_()
    hdr = torch.cat([norms, torch.tensor([1.0 if bad else 0.0], dtype=torch.float64)]).to(torch.float32)
    state._counters["bytes_sent"] += ring_allreduce_bytes(hdr.numel() * 4, W)
    dist.all_reduce(hdr, group=state.group)  # tiny, synchronous: the shared scales must be known to encode
    if hdr[-1] > 0:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut.then(lambda f: _fail_or_allreduce(state, buf, idx, W))
    scales = modular_scales(hdr[:-1].to(torch.float64), cfg.lattice, cfg.q, cfg.M, W, cfg.with_dither)
    from .hooks import _overflow_allreduce, _scales_overflow  # the Python path's fallback, identical

    if _scales_overflow(scales):  # resid (x + old residual) is dropped there, as on the Python path
        return _overflow_allreduce(state, buf, idx, W)
    state.bucket_scales[idx] = scales.clone()
    packing = choose_sum_packing(cfg.q**cfg.M, W, state.code_packing)
    t0 = time.thread_time()
    packed = codec.modular_encode(xe, scales, cfg, max(bpc, 1), packing, resid=resid)
    _cpu(state, "encode", t0)
    # lattice points have norm < q^M (the sum's ball; an own point's coordinates alike): |lam * s| < q^M s
    overflow = _may_overflow(float(scales.max()) * 2 * cfg.q**cfg.M) if scales.numel() else False
    if overflow and resid is not None:
        from .hooks import _clamp_finite_

        _clamp_finite_(resid)
    if resid is not None:
        state.residuals[idx] = resid
    state._counters["blocks"] += nb
    state._counters["bytes_sent"] += ring_allreduce_bytes(packed.numel() * packed.element_size(), W)
    fut = dist.all_reduce(packed, group=state.group, async_op=True).get_future()

    def finish(f):
        f.wait()
        t0 = time.thread_time()
        codec.modular_decode(packed, n, scales, cfg, max(bpc, 1), packing, W, buf)
        _cpu(state, "decode", t0)
        if overflow:
            from .hooks import _clamp_finite_

            _clamp_finite_(buf)
        return buf

    return fut.then(finish)
