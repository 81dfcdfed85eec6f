"""The hook's native path: one native call per bucket to encode (+ pack) and one to decode (+ unpack).

When coset-cuda is installed, ``coset.cuda.bucket_codec`` encodes a whole float32 CPU bucket into the exact
bytes of :mod:`coset.dist.codec` (allgather payload, or packed modular codes) and decodes the gathered /
summed buffer straight into the bucket, with the error-feedback residual fused in. Results are bit-identical
to the Python path, so ranks may even mix the two. coset-dist does not depend on coset-cuda: without it (or
for what the native codec does not cover: fp16/bf16 or GPU buckets, random dither, the ``decode`` mode)
:func:`native_hook` returns ``None`` and the hook takes its Python path.

``state.native = False`` (an attribute of :class:`~coset.dist.HNLQHookState`, default True) forces the
Python path; ``state.native_buckets`` counts the buckets that took the native one.
"""

import importlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from .codec import allgather_bytes, choose_sum_packing, modular_scales, payload_layout, ring_allreduce_bytes

__all__ = ["native_available", "native_hook"]

try:  # optional: coset-cuda sits beside coset-dist, not below it in the dependency graph of the wheels
    _native: Any = importlib.import_module("coset.cuda.bucket_codec")
except Exception:  # ImportError, or an extension built without the bucket codec
    _native = None


def native_available() -> bool:
    """True when coset-cuda's bucket codec is importable."""
    return _native is not None


def _usable(state, buf: torch.Tensor) -> bool:
    return (
        _native is not None
        and getattr(state, "native", True)
        and state.mode in ("allgather", "modular")
        and buf.dtype == torch.float32
        and buf.device.type == "cpu"
        and buf.is_contiguous()
        and _native.supports(state.config)
    )


def _residual(state, idx: int, n: int) -> Optional[torch.Tensor]:
    """This bucket's residual buffer (zeros when missing or stale), or None without error feedback."""
    if not state.error_feedback:
        return None
    r = state.residuals.get(idx)
    if r is None or r.shape != (n,) or r.dtype != torch.float32 or r.device.type != "cpu" or not r.is_contiguous():
        r = torch.zeros(n, dtype=torch.float32)
    return r


def native_hook(state, buf: torch.Tensor, idx: int, W: int) -> Optional[torch.futures.Future]:
    """Run one compressed bucket through the native codec; ``None`` if it cannot (caller falls back).

    Parameters
    ----------
    state : HNLQHookState; buf : the bucket's flat buffer (n,); idx : bucket index; W : world size
    """
    if not _usable(state, buf):
        return None
    state.native_buckets = getattr(state, "native_buckets", 0) + 1
    if state.mode == "allgather":
        return _allgather(state, buf, idx, W)
    return _modular(state, buf, idx, W)


def _fail_or_allreduce(state, buf: torch.Tensor, idx: int, W: int):
    from .hooks import _nonfinite_error  # the same message as the Python path

    state._counters["buckets_nonfinite"] += 1
    state.residuals.pop(idx, None)  # it was overwritten by x + residual, which holds the NaN/Inf
    if state.nonfinite == "raise":
        raise _nonfinite_error(idx)
    state._counters["bytes_sent"] += ring_allreduce_bytes(buf.numel() * buf.element_size(), W)
    dist.all_reduce(buf, group=state.group)  # synchronous, inside the callback (like the Python path)
    return buf.div_(W)


def _allgather(state, buf, idx, W):
    cfg = state.config
    n = buf.numel()
    rank = dist.get_rank(state.group)
    lay = payload_layout(n, cfg)
    resid = _residual(state, idx, n)
    payload = torch.empty(lay.nbytes, dtype=torch.uint8)
    info = _native.encode_allgather(buf, cfg, payload, resid=resid)
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
        if _native.decode_allgather(gathered, n, cfg, buf, own=rank, resid=resid):
            return _fail_or_allreduce(state, buf, idx, W)
        if resid is not None:
            state.residuals[idx] = resid
        return buf

    return fut.then(finish)


def _modular(state, buf, idx, W):
    cfg = state.config
    d, n = cfg.dim, buf.numel()
    nb = -(-n // d)
    bpc = nb if state.chunk_size is None else max(1, state.chunk_size // d)
    resid = _residual(state, idx, n)
    norms, bad = _native.modular_norms(buf, d, max(bpc, 1), resid=resid)
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
    state.bucket_scales[idx] = scales.clone()
    packing = choose_sum_packing(cfg.q**cfg.M, W, state.code_packing)
    packed = _native.modular_encode(xe, scales, cfg, max(bpc, 1), packing, resid=resid)
    if resid is not None:
        state.residuals[idx] = resid
    state._counters["blocks"] += nb
    state._counters["bytes_sent"] += ring_allreduce_bytes(packed.numel() * packed.element_size(), W)
    fut = dist.all_reduce(packed, group=state.group, async_op=True).get_future()

    def finish(f):
        f.wait()
        _native.modular_decode(packed, n, scales, cfg, max(bpc, 1), packing, W, buf)
        return buf

    return fut.then(finish)
