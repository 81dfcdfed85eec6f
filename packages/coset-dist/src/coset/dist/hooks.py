"""DDP communication hooks that send HNLQ-compressed gradients (PyTorch ``ddp_comm_hooks`` contract).

A hook is ``hnlq_hook(state, bucket) -> Future[Tensor]``; the state is a plain :class:`HNLQHookState`
(validated on construction, picklable without its process group). Three modes:

* ``"allgather"``: every rank bit-packs its HNLQ labels + per-block scale steps T and all-gathers them;
  each rank decodes every part and averages. Sent per rank: ``(W-1) x payload``.
* ``"modular"``: compressed-domain all-reduce. One scale per chunk is agreed by a tiny all-reduce; each rank
  sends the flat code ``G^{-1} lam mod q^M`` of its lattice points; ``all_reduce(SUM)`` of the codes is the
  code of the sum, decoded exactly. Sent per rank: ``2 (W-1)/W x code buffer`` for any W.
* ``"decode"``: quantize locally, all-reduce the decoded float32 tensor. Saves **no** bytes; a reference
  for the accuracy of the quantizer alone.

Note: this module must not use ``from __future__ import annotations``; DDP compares the hook's annotations
with ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` as objects.
"""

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist

from coset.lattice.validate import check_bool, check_int
from coset.quant import QuantizationConfig, beta_min

from .codec import (
    allgather_bytes,
    choose_sum_packing,
    chunk_block_norms,
    decode_payload,
    encode_payload,
    modular_decode,
    modular_dither,
    modular_encode,
    modular_margin,
    modular_scales,
    pack_sum_fields,
    payload_layout,
    rank_seed,
    ring_allreduce_bytes,
    unpack_sum_fields,
)
from .fast_codec import native_hook

__all__ = ["HNLQHookState", "hnlq_hook", "register", "default_config", "MODES"]

MODES = ("allgather", "modular", "decode")
_NONFINITE = ("raise", "allreduce")


def default_config(q: int = 4, M: int = 2, lattice_type: str = "D4") -> QuantizationConfig:
    """The hooks' default HNLQ config: ``beta = beta_min`` for unit-RMS input, ramp ``alpha=1`` up to T=7.

    In allgather/decode modes a bucket is divided by its RMS before encoding, so ``beta`` is in RMS units.
    """
    base = QuantizationConfig(lattice_type=lattice_type, q=q, M=M)
    return base.replace(beta=beta_min(base, 1.0), alpha=1.0, max_scaling_iterations=7)


class HNLQHookState:
    """State of :func:`hnlq_hook` (model: PyTorch's ``PowerSGDState``).

    Parameters
    ----------
    config : QuantizationConfig, optional
        HNLQ parameters; default :func:`default_config` (D4, q=4, M=2). ``overload_policy`` must be
        "clamp" and ``disable_overload_protection`` False (a hook must never raise on one rank only).
        In allgather/decode modes ``beta`` is in units of the bucket's RMS. The modular mode picks its own
        scales, so there a ``beta`` other than 1.0 or :func:`default_config`'s (and ``center=True``) raises
        ``ValueError`` instead of being ignored.
        ``with_dither=True`` turns on random subtractive dither (fresh per step, bucket and rank).
    mode : {"allgather", "modular", "decode"}
    error_feedback : bool
        Keep the per-rank residual ``x - x_hat`` per bucket index and add it to the next step's bucket.
    process_group : ProcessGroup or None (default group)
    start_iter : int
        Iterations ``0 .. start_iter-1`` use a plain all-reduce (warm-up, like ``start_powerSGD_iter``).
        Must be >= 2 with error feedback, because DDP rebuilds its buckets after the first iteration.
    chunk_size : int or None
        modular mode: coordinates sharing one scale (a multiple of d); None = one scale per bucket. Smaller
        chunks adapt to the gradient's local magnitude (fewer lattice points wasted on the largest block)
        at 4 bytes of side information per chunk and rank (256: +0.016 byte per coordinate).
    code_packing : {"auto", "uint8", "int64"}
        modular mode: how codes travel in the SUM (see :func:`coset.dist.codec.choose_sum_packing`).
    nonfinite : {"raise", "allreduce"}
        What to do when any rank's bucket holds NaN/Inf (agreed across ranks, so no rank hangs): "raise" fails
        the bucket's future with ``ValueError``; "allreduce" falls back to a plain all-reduce of that bucket
        (the non-finite values reach the gradients, as without a hook, e.g. for ``GradScaler``).
    seed : int
        Base seed of the dither.
    """

    def __init__(
        self,
        config: Optional[QuantizationConfig] = None,
        mode: str = "allgather",
        error_feedback: bool = True,
        process_group: Optional[Any] = None,
        start_iter: int = 10,
        chunk_size: Optional[int] = 256,
        code_packing: str = "auto",
        nonfinite: str = "raise",
        seed: int = 0,
    ) -> None:
        if config is None:
            config = default_config()
        if not isinstance(config, QuantizationConfig):
            raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
        if config.overload_policy != "clamp":
            raise ValueError("config.overload_policy must be 'clamp' in a comm hook (an OverloadError would hang DDP)")
        if config.disable_overload_protection:
            raise ValueError("config.disable_overload_protection must be False in a comm hook (labels would wrap)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "modular":  # fields the modular code does not use are refused, never silently ignored
            default_beta = default_config(config.q, config.M, config.lattice_type).beta
            if config.beta not in (1.0, default_beta):
                raise ValueError(
                    f"config.beta={config.beta!r} is not used in modular mode (each chunk's scale comes from the "
                    "ranks' shared block norms); leave beta at its default or use mode='allgather'"
                )
            if config.center:
                raise ValueError("config.center=True is not used in modular mode (flat codes are not centred)")
        check_bool("error_feedback", error_feedback)
        check_int("start_iter", start_iter, 0)
        if error_feedback and start_iter < 2:
            raise ValueError(
                "start_iter must be >= 2 when error_feedback=True: DDP rebuilds its buckets after the first "
                "iteration, so residuals keyed by bucket index are only valid from iteration 1 on"
            )
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
            if chunk_size % config.dim:
                raise ValueError(f"chunk_size must be a multiple of the lattice dimension {config.dim}, got {chunk_size}")
        if code_packing not in ("auto", "uint8", "int64"):
            raise ValueError(f"code_packing must be 'auto', 'uint8' or 'int64', got {code_packing!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        check_int("seed", seed, 0)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}")
        self.config = config
        self.mode = mode
        self.error_feedback = error_feedback
        self.process_group = process_group
        self.start_iter = start_iter
        self.chunk_size = chunk_size
        self.code_packing = code_packing
        self.nonfinite = nonfinite
        self.seed = seed
        self.iter = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self.bucket_scales: dict[int, torch.Tensor] = {}
        self._counters = dict.fromkeys(
            (
                "buckets_compressed",
                "buckets_uncompressed",
                "buckets_nonfinite",
                "bytes_sent",
                "bytes_fp32_baseline",
                "blocks",
                "blocks_overloaded",
                "blocks_clamped",
            ),
            0,
        )
        self._world_ok = False
        if dist.is_available() and dist.is_initialized():
            self._check_world(self.world_size)
            self._world_ok = True

    # ------------------------------------------------------------------ group helpers
    @property
    def group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def _check_world(self, W: int) -> None:
        if self.mode != "modular":
            return
        c = self.config
        if modular_margin(c.lattice, c.q, c.M, W, c.with_dither) <= 0:
            raise ValueError(
                f"modular mode: q^M={c.q**c.M} on {c.lattice_type} cannot hold the sum of {W} ranks without "
                "overload (0.99 * packing radius * q^M must exceed W * covering radius); raise q or M"
            )
        choose_sum_packing(c.q**c.M, W, self.code_packing)

    # ------------------------------------------------------------------ metrics
    def stats(self) -> dict:
        """Counters since construction (per rank; identical on every rank).

        ``bytes_sent`` counts what this rank puts on the wire under the ring model (all-reduce of B bytes:
        ``2(W-1)/W B``; all-gather of B bytes per rank: ``(W-1) B``), including warm-up and side information.
        ``bytes_fp32_baseline`` is the same for a float32 ring all-reduce of every bucket.
        ``overload_rate``: fraction of encoded d-blocks that needed a scale step T > 0 (allgather/decode);
        ``clamp_rate``: fraction clamped past the ramp. The modular mode cannot overload by construction.
        ``scales``: per bucket index, (min, max) of the last scale(s) used.
        """
        c: dict[str, Any] = dict(self._counters)
        c["iter"] = self.iter
        c["mode"] = self.mode
        c["compression_ratio"] = c["bytes_fp32_baseline"] / c["bytes_sent"] if c["bytes_sent"] else float("nan")
        c["overload_rate"] = c["blocks_overloaded"] / c["blocks"] if c["blocks"] else 0.0
        c["clamp_rate"] = c["blocks_clamped"] / c["blocks"] if c["blocks"] else 0.0
        c["scales"] = {
            int(k): (float(v.min()), float(v.max())) for k, v in self.bucket_scales.items() if v.numel()
        }
        return c

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain, picklable state (no process group): config fields, options, iteration, residuals, counters."""
        return {
            "config": dataclasses.asdict(self.config),
            "mode": self.mode,
            "error_feedback": self.error_feedback,
            "start_iter": self.start_iter,
            "chunk_size": self.chunk_size,
            "code_packing": self.code_packing,
            "nonfinite": self.nonfinite,
            "seed": self.seed,
            "iter": self.iter,
            "residuals": {int(k): v.detach().clone() for k, v in self.residuals.items()},
            "bucket_scales": {int(k): v.detach().clone() for k, v in self.bucket_scales.items()},
            "counters": dict(self._counters),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` output (validated like the constructor; the process group is kept).

        Raises
        ------
        TypeError / ValueError naming the key for a missing key, an invalid config or option, residuals that
        are not finite 1-D float32 tensors, or unknown/negative counters.
        """
        if not isinstance(sd, dict):
            raise TypeError(f"state dict must be a dict, got {type(sd).__name__}")
        missing = {"config", "mode", "iter", "residuals"} - set(sd)
        if missing:
            raise ValueError(f"state dict is missing keys {sorted(missing)}")
        if not isinstance(sd["config"], dict):
            raise TypeError(f"state dict 'config' must be a dict of QuantizationConfig fields, got {type(sd['config']).__name__}")
        for key in ("residuals", "bucket_scales"):
            for k in sd.get(key, {}) if isinstance(sd.get(key, {}), dict) else ():
                if isinstance(k, bool) or not isinstance(k, (int, str)) or not str(k).lstrip("-").isdigit():
                    raise TypeError(f"state dict '{key}' keys must be int bucket indices, got {k!r}")
        pg = self.process_group
        self.__init__(  # type: ignore[misc]  # re-validate everything exactly as the constructor does
            config=QuantizationConfig(**sd["config"]),
            mode=sd["mode"],
            error_feedback=sd.get("error_feedback", True),
            process_group=pg,
            start_iter=sd.get("start_iter", 10),
            chunk_size=sd.get("chunk_size", 256),
            code_packing=sd.get("code_packing", "auto"),
            nonfinite=sd.get("nonfinite", "raise"),
            seed=sd.get("seed", 0),
        )
        check_int("iter", sd["iter"], 0)
        self.iter = sd["iter"]
        if not isinstance(sd["residuals"], dict):
            raise TypeError("state dict 'residuals' must be a dict {bucket index: tensor}")
        for k, v in sd["residuals"].items():
            if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.dtype != torch.float32:
                raise TypeError(f"residuals[{k}] must be a 1-D float32 tensor")
            if not bool(torch.isfinite(v).all()):  # would poison every later step of that bucket
                raise ValueError(f"residuals[{k}] holds NaN or Inf")
        if not isinstance(sd.get("bucket_scales", {}), dict) or not isinstance(sd.get("counters", {}), dict):
            raise TypeError("state dict 'bucket_scales' and 'counters' must be dicts")
        for k, v in sd.get("bucket_scales", {}).items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise TypeError(f"bucket_scales[{k}] must be a float tensor")
        counters = sd.get("counters", {})
        unknown = set(counters) - set(self._counters)
        if unknown:
            raise ValueError(f"state dict 'counters' has unknown keys {sorted(unknown)}")
        for k, v in counters.items():
            check_int(f"counters[{k!r}]", v, 0)
        self.residuals = {int(k): v.clone() for k, v in sd["residuals"].items()}
        self.bucket_scales = {int(k): v.clone() for k, v in sd.get("bucket_scales", {}).items()}
        self._counters.update(counters)

    def __getstate__(self) -> dict:
        """Pickle without the process group (like ``PowerSGDState``)."""
        return self.state_dict()

    def __setstate__(self, sd: dict) -> None:
        self.process_group = None
        self.load_state_dict(sd)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"HNLQHookState(mode={self.mode!r}, lattice={c.lattice_type}, q={c.q}, M={c.M}, "
            f"error_feedback={self.error_feedback}, start_iter={self.start_iter}, iter={self.iter})"
        )

    # ------------------------------------------------------------------ internals
    def _take_residual(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        if not self.error_feedback:
            return x
        r = self.residuals.get(idx)
        if r is None or r.shape != x.shape or r.device != x.device:
            return x
        return x + r

    def _set_residual(self, idx: int, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if self.error_feedback:
            self.residuals[idx] = _clamp_finite_((x - x_hat.to(torch.float32)).detach())

    def _rank_config(self, idx: int, rank: int, it: int) -> QuantizationConfig:
        if not self.config.with_dither:
            return self.config
        return self.config.replace(dither_seed=rank_seed(self.seed, it, idx, rank))


def _clamp_finite_(t: torch.Tensor) -> torch.Tensor:
    """In place: +-inf -> +-finfo(dtype).max (NaN stays NaN). The reconstruction of a finite value within one
    quantization step of the dtype's largest value can round past it; the average (and residual) of finite
    gradients is then the largest finite value, not Inf (the native path does the same, see fast_codec)."""
    m = torch.finfo(t.dtype).max
    return t.clamp_(-m, m)


def _completed(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _failed(buf: torch.Tensor, exc: Exception) -> torch.futures.Future:
    """A future that fails with ``exc`` when DDP waits on it (raised from a callback, as in the other modes)."""

    def fail(_f):
        raise exc

    return _completed(buf).then(fail)


def _nonfinite_error(idx: int) -> ValueError:
    return ValueError(
        f"hnlq_hook: gradient bucket {idx} holds NaN/Inf on at least one rank; HNLQ cannot encode it "
        "(use HNLQHookState(nonfinite='allreduce') to fall back to a plain all-reduce, e.g. with GradScaler)"
    )


def _plain_allreduce(state: HNLQHookState, buf: torch.Tensor, W: int) -> torch.futures.Future:
    state._counters["bytes_sent"] += ring_allreduce_bytes(buf.numel() * buf.element_size(), W)
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(W))


def _scales_overflow(scales: torch.Tensor) -> bool:
    """True when a modular scale is not a finite float32: the agreed block norms of huge (|x| ~ 1e38) finite
    gradients overflowed the float32 header, and ``lam * s`` would decode to NaN/Inf (0 * inf)."""
    return not bool(torch.isfinite(scales.to(torch.float32)).all())


def _overflow_allreduce(state: "HNLQHookState", buf: torch.Tensor, idx: int, W: int) -> torch.futures.Future:
    """Modular mode, scales beyond float32 (the same on every rank: they come from the all-reduced header): the
    bucket goes through a plain all-reduce instead of decoding to NaN; its residual is dropped."""
    state._counters["buckets_compressed"] -= 1
    state._counters["buckets_uncompressed"] += 1
    state.residuals.pop(idx, None)
    return _plain_allreduce(state, buf, W)


def hnlq_hook(state: HNLQHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce (average) a gradient bucket through HNLQ codes; see :class:`HNLQHookState` for the modes.

    Parameters
    ----------
    state : HNLQHookState
    bucket : dist.GradBucket (only ``buffer()``, ``index()`` and ``is_last()`` are used)

    Returns
    -------
    Future of the bucket's flat buffer ``(n,)`` in its own dtype (fp32/fp16/bf16), holding the average over
    ranks of the (compressed) gradients; the buffer is updated in place. All ranks get identical values.

    Raises
    ------
    TypeError for a state that is not an :class:`HNLQHookState` or a bucket buffer that is not a 1-D floating
    tensor (the same on every rank, so no rank hangs).
    """
    if not isinstance(state, HNLQHookState):
        raise TypeError(f"state must be an HNLQHookState, got {type(state).__name__}")
    W = state.world_size
    if not state._world_ok:  # the same W and config on every rank: all ranks raise together, none hangs
        state._check_world(W)
        state._world_ok = True
    buf = bucket.buffer()
    if not isinstance(buf, torch.Tensor) or buf.ndim != 1 or not buf.dtype.is_floating_point:
        what = f"shape {tuple(buf.shape)}, dtype {buf.dtype}" if isinstance(buf, torch.Tensor) else type(buf).__name__
        raise TypeError(f"hnlq_hook: the bucket buffer must be a 1-D floating tensor, got {what}")
    idx = int(bucket.index())
    it = state.iter
    if bucket.is_last():
        state.iter += 1
    n = buf.numel()
    state._counters["bytes_fp32_baseline"] += ring_allreduce_bytes(4 * n, W)
    if it < state.start_iter or n == 0:
        state._counters["buckets_uncompressed"] += 1
        return _plain_allreduce(state, buf, W)
    state._counters["buckets_compressed"] += 1
    fut = native_hook(state, buf, idx, W)  # one native call per bucket when coset-cuda is installed
    if fut is not None:
        return fut
    # a float32 copy (never an alias of the bucket, which the future overwrites in place)
    x = state._take_residual(idx, buf.detach().to(torch.float32, copy=True))
    if state.mode == "modular":
        return _modular(state, buf, x, idx, it, W)
    if state.mode == "allgather":
        return _allgather(state, buf, x, idx, it, W)
    return _decode_mode(state, buf, x, idx, it, W)


# ---------------------------------------------------------------------------------------------- modes
def _count_blocks(state: HNLQHookState, info: dict) -> None:
    T = info["T"]
    state._counters["blocks"] += T.numel()
    state._counters["blocks_overloaded"] += int((T > 0).sum())
    state._counters["blocks_clamped"] += int(info["clamped"].sum())


def _allgather(state, buf, x, idx, it, W):
    rank = dist.get_rank(state.group)
    n = x.numel()
    cfg = state.config
    payload, info = encode_payload(x, state._rank_config(idx, rank, it))
    _count_blocks(state, info)
    state.bucket_scales[idx] = torch.tensor([info["rho"] * cfg.beta], dtype=torch.float64)
    state._counters["bytes_sent"] += allgather_bytes(payload.numel(), W)
    outs = [torch.empty_like(payload) for _ in range(W)]
    fut = dist.all_gather(outs, payload, group=state.group, async_op=True).get_future()

    def finish(f):
        f.wait()
        total = torch.zeros(n, dtype=torch.float64, device=x.device)
        bad = False
        own = None
        for r in range(W):
            xr, flag = decode_payload(outs[r], n, state._rank_config(idx, r, it))
            bad = bad or flag
            if r == rank:
                own = xr
            total += xr
        if bad:
            state._counters["buckets_nonfinite"] += 1
            if state.nonfinite == "raise":
                raise _nonfinite_error(idx)
            state._counters["bytes_sent"] += ring_allreduce_bytes(buf.numel() * buf.element_size(), W)
            dist.all_reduce(buf, group=state.group)  # synchronous, inside the callback (like PowerSGD)
            return buf.div_(W)
        state._set_residual(idx, x, own)
        buf.copy_((total / W).to(buf.dtype))
        return _clamp_finite_(buf)

    return fut.then(finish)


def _modular(state, buf, x, idx, it, W):
    cfg = state.config
    lat = cfg.lattice
    d = lat.dim
    modulus = cfg.q**cfg.M
    n = x.numel()
    nb = -(-n // d)
    bpc = nb if state.chunk_size is None else max(1, state.chunk_size // d)
    finite = bool(torch.isfinite(x).all())
    n_chunks = -(-nb // bpc)
    norms = chunk_block_norms(x, d, bpc) if finite else torch.zeros(n_chunks, dtype=torch.float64, device=x.device)
    # float32 side information: the float32 sum of W norms is within W*2^-24 of the real sum, far inside the
    # 1% margin of modular_scales, so the no-overload guarantee still holds.
    flag = torch.tensor([0.0 if finite else 1.0], dtype=torch.float64, device=x.device)
    hdr = torch.cat([norms, flag]).to(torch.float32)
    state._counters["bytes_sent"] += ring_allreduce_bytes(hdr.numel() * 4, W)
    dist.all_reduce(hdr, group=state.group)  # tiny, synchronous: the shared scales must be known to encode
    if hdr[-1] > 0:
        state._counters["buckets_nonfinite"] += 1
        if state.nonfinite == "raise":
            return _failed(buf, _nonfinite_error(idx))
        return _plain_allreduce(state, buf, W)
    scales = modular_scales(hdr[:-1].to(torch.float64), lat, cfg.q, cfg.M, W, cfg.with_dither)
    if _scales_overflow(scales):
        return _overflow_allreduce(state, buf, idx, W)
    state.bucket_scales[idx] = scales.clone()
    rank = dist.get_rank(state.group)
    z_own = z_sum = None
    if cfg.with_dither:
        zs = [modular_dither(nb, lat, rank_seed(state.seed, it, idx, r), x.device) for r in range(W)]
        z_own = zs[rank]
        z_sum = torch.stack(zs).sum(0)
    codes, lam = modular_encode(x, scales, lat, modulus, bpc, z_own, cfg.with_tie_dither)
    s_blocks = scales.repeat_interleave(bpc)[:nb].unsqueeze(-1)
    own = ((lam - z_own) if z_own is not None else lam) * s_blocks
    state._set_residual(idx, x, own.reshape(-1)[:n])
    state._counters["blocks"] += nb
    packing = choose_sum_packing(modulus, W, state.code_packing)
    packed = pack_sum_fields(codes, packing)
    state._counters["bytes_sent"] += ring_allreduce_bytes(packed.numel() * packed.element_size(), W)
    fut = dist.all_reduce(packed, group=state.group, async_op=True).get_future()

    def finish(f):
        f.wait()
        lam_sum = modular_decode(unpack_sum_fields(packed, nb * d, packing), lat, modulus, cfg.with_tie_dither)
        if z_sum is not None:
            lam_sum = lam_sum - z_sum
        est = (lam_sum * s_blocks).reshape(-1)[:n] / W
        buf.copy_(est.to(buf.dtype))
        return _clamp_finite_(buf)

    return fut.then(finish)


def _decode_mode(state, buf, x, idx, it, W):
    rank = dist.get_rank(state.group)
    n = x.numel()
    cfg = state._rank_config(idx, rank, it)
    payload, info = encode_payload(x, cfg)
    if info["nonfinite"]:
        contrib = x.clone()  # carries the NaN/Inf to every rank, so all ranks take the same branch below
    else:
        _count_blocks(state, info)
        own, _ = decode_payload(payload, n, cfg)
        state._set_residual(idx, x, own)
        contrib = _clamp_finite_(own.to(torch.float32))  # a finite bucket is never flagged non-finite
    state.bucket_scales[idx] = torch.tensor([info["rho"] * cfg.beta], dtype=torch.float64)
    state._counters["bytes_sent"] += ring_allreduce_bytes(4 * n, W)
    fut = dist.all_reduce(contrib, group=state.group, async_op=True).get_future()

    def finish(f):
        f.wait()
        if not bool(torch.isfinite(contrib).all()):
            state._counters["buckets_nonfinite"] += 1
            if state.nonfinite == "raise":
                raise _nonfinite_error(idx)
            # a plain all-reduce of the bucket itself, as in the other modes (contrib is x in float32, residual
            # included: not what the bucket holds)
            state._counters["bytes_sent"] += ring_allreduce_bytes(buf.numel() * buf.element_size(), W)
            dist.all_reduce(buf, group=state.group)  # synchronous, inside the callback (like PowerSGD)
            return buf.div_(W)
        buf.copy_((contrib / W).to(buf.dtype))
        return _clamp_finite_(buf)

    return fut.then(finish)


def register(ddp_model, **kwargs) -> HNLQHookState:
    """Build an :class:`HNLQHookState` from ``kwargs`` and register :func:`hnlq_hook` on ``ddp_model``.

    Parameters
    ----------
    ddp_model : torch.nn.parallel.DistributedDataParallel
    **kwargs : forwarded to :class:`HNLQHookState` (``config``, ``mode``, ``error_feedback``, ...)

    Returns
    -------
    The state (keep it for :meth:`HNLQHookState.stats` and checkpointing).
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel model, got {type(ddp_model).__name__}")
    state = HNLQHookState(**kwargs)
    ddp_model.register_comm_hook(state, hnlq_hook)
    return state
