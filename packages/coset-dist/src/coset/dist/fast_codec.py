"""The hook's native path: one native call per bucket to encode (+ pack) and one to decode (+ unpack).

When coset-cuda is installed, ``coset.cuda.bucket_codec`` encodes a whole float32 CPU bucket of the modular
mode into the exact packed codes of :mod:`coset.dist.codec` and decodes the summed buffer straight into the
bucket, with the error-feedback residual fused in. Results are bit-identical to the Python path, so ranks may
even mix the two. The allgather mode always takes the Python codec: its payload stores T with
``coset.quant.pack_codes``' coding, which the native codec does not write. coset-dist does not depend on
coset-cuda: without it (or for what the native codec does not cover: fp16/bf16 or GPU buckets, random dither,
the allgather and ``decode`` modes)
:func:`native_hook` returns ``None`` and the hook takes its Python path.

``state.native = False`` (an attribute of :class:`~coset.dist.HNLQHookState`, default True) forces the
Python path; ``state.native_buckets`` counts the buckets that took the native one.
"""

import importlib
from typing import Any

import torch
import torch.distributed as dist

from .codec import choose_sum_packing, modular_scales, ring_allreduce_bytes

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
        # allgather payloads carry pack_codes' T coding, which only the Python codec writes
        and state.mode == "modular"
        and buf.dtype == torch.float32
        and buf.device.type == "cpu"
        and buf.is_contiguous()
        and _native.supports(state.config)
    )


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
    if not _usable(state, buf):
        return None
    state.native_buckets = getattr(state, "native_buckets", 0) + 1
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
