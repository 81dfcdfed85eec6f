"""``CodedKVStore``: the per-layer KV cache in HNLQ codes, and attention computed from it.

Independent of transformers (the Cache adapter is :mod:`coset.kv.hf_cache`). Tokens are appended once and
never re-quantized: each new key/value head vector is rotated, normalised, encoded (:mod:`coset.kv.codes`)
and its bytes appended. With ``config.sink = S > 0`` the first S tokens of the sequence stay in full precision
for good (attention sinks); with ``config.window = W > 0`` the W most recent tokens stay in full precision and
are encoded when they leave the window. Token order in the cache: sink, coded, window.

Attention for queries ``(B, Hq, Lq, D)`` (grouped-query: KV head h serves query heads ``h G .. h G + G - 1``):
scores of the coded tokens from the key codes (one-sided LUT or decode-then-dot,
``config.score_path``), scores of the sink and window tokens by a plain matmul, one softmax over both, values
accumulated from the value codes in the rotated domain and rotated back once per query.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from . import native
from .attention import masked_softmax
from .codes import (
    _MAX_RMS,
    KVCodes,
    _check_states,
    decode_states,
    encode_checked,
    encode_normalised,
    normalise_checked,
)
from .config import KVQuantConfig
from .key_transform import KeyTransform
from .lut import scores_lut, scores_reference, values_from_codes
from .rope import RotaryTable, apply_rotary, unapply_rotary
from .rotation import HeadRotation
from .store import TokenBuffer
from .trellis import TrellisCode, schedule_tensor, trellis_codebook

__all__ = ["CodedKVStore"]

#: Smallest per-channel key scale of ``key_channel_scale`` (relative to their rms, 1): later keys are amplified
#: at most 100x in a channel the first chunk saw (nearly) constant.
CHAN_FLOOR = 1e-2


def _saturate(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` cast to ``dtype``, clamped to its finite range first: a decoded vector (or an attention output) may
    exceed the range of float16 states by its quantization error; it must not become inf."""
    if dtype is None or dtype == x.dtype or torch.finfo(dtype).max >= torch.finfo(x.dtype).max:
        return x if dtype is None else x.to(dtype)
    fi = torch.finfo(dtype)
    return x.clamp(min=fi.min, max=fi.max).to(dtype)


def _inverse(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t^-1`` of ``(H, D, D)`` float32 matrices, computed in float64; a calibrated transform has cond ~1e1-1e3,
    a (near) singular one (float16 vectors far from orthonormal) is rejected."""
    t64 = t.to(torch.float64)
    if not float(torch.linalg.cond(t64).max()) <= 1e6:  # NaN (a zero matrix) fails too
        raise ValueError(f"{name} is singular or ill-conditioned (cond > 1e6)")
    return torch.linalg.inv(t64).to(torch.float32)


def check_states(keys, values) -> None:
    """TypeError / ValueError unless ``keys`` and ``values`` are floating ``(batch, kv_heads, seq_len, head_dim)``
    tensors (the first checks of an append, shared with :class:`coset.kv.PerHeadKVStore`)."""
    for name, x in (("key_states", keys), ("value_states", values)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (batch, kv_heads, seq_len, head_dim), got {tuple(x.shape)}")


class CodedKVStore:
    """Keys and values of one attention layer as HNLQ codes (plus an optional full-precision window).

    Parameters
    ----------
    config : KVQuantConfig
    seed : seed of this layer's rotation signs
    backend : kernel of the LUT path, ``"auto"`` | ``"torch"`` | ``"native"``
    key_scale : optional key transform fixed in advance, counted in the bytes; replaces
        ``config.key_channel_scale`` (the two cannot be combined). Either ``(H, D)`` positive per-channel scales
        ``s`` (e.g. :func:`coset.kv.hf_cache.calibrate_key_scales`): keys coded as ``(k - mu) / s``, queries
        scaled by ``s``; or a :class:`coset.kv.KeyTransform` ``T`` per head (vectors ``(H, D, r)``, e.g.
        :func:`coset.kv.hf_cache.calibrate_key_transforms`): keys coded as ``T (k - mu)``, queries mapped to
        ``T^-T q``. Both are exact for the scores.
    rope : optional :class:`coset.kv.RotaryTable` of the model: the key mean is taken *before* the rotary
        embedding and subtracted as ``R_p μ`` at each token's position ``p`` (:mod:`coset.kv.rope`; needs
        ``config.subtract_mean``). Positions count from the first token of the cache (sink, then coded tokens).
    head : optional ``(h, H)``: the store holds KV head ``h`` of a layer of ``H`` heads, alone (its states have
        one head; :class:`coset.kv.PerHeadKVStore`). Its rotation is then head ``h``'s of the layer's
        ``HeadRotation(H, D, seed)``, so the head is coded as a store of the whole layer codes it.
    """

    def __init__(
        self,
        config: KVQuantConfig | None = None,
        seed: int = 0,
        backend: str = "auto",
        key_scale: torch.Tensor | KeyTransform | None = None,
        rope: RotaryTable | None = None,
        *,
        head: tuple[int, int] | None = None,
    ):
        config = KVQuantConfig() if config is None else config
        if not isinstance(config, KVQuantConfig):
            raise TypeError(f"config must be a KVQuantConfig, got {type(config).__name__}")
        if rope is not None:
            if not isinstance(rope, RotaryTable):
                raise TypeError(f"rope must be a coset.kv.RotaryTable, got {type(rope).__name__}")
            if not config.subtract_mean:
                raise ValueError("rope centres the keys on their pre-RoPE mean: it needs config.subtract_mean=True")
        if backend not in ("auto", "torch", "native"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'native', got {backend!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if head is not None:
            ok = isinstance(head, tuple) and len(head) == 2
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in head)
            if not ok or not 0 <= head[0] < head[1]:
                raise ValueError(f"head must be None or a tuple (h, H) of ints with 0 <= h < H, got {head!r}")
        k_mat = q_mat = None
        if isinstance(key_scale, KeyTransform):
            if key_scale.vectors.ndim != 3:
                raise ValueError(
                    f"key_scale (a KeyTransform) must hold one transform per KV head: vectors (H, D, r), got "
                    f"{tuple(key_scale.vectors.shape)}"
                )
            if config.key_channel_scale:
                raise ValueError("key_scale and config.key_channel_scale cannot be combined")
            k_mat = key_scale.matrix()
            q_mat = _inverse(k_mat, "key_scale")
        elif key_scale is not None:
            if not isinstance(key_scale, torch.Tensor) or not key_scale.dtype.is_floating_point:
                raise TypeError("key_scale must be a floating torch.Tensor or a KeyTransform")
            if key_scale.ndim != 2:
                raise ValueError(f"key_scale must have shape (num_kv_heads, head_dim), got {tuple(key_scale.shape)}")
            if not bool(torch.isfinite(key_scale).all()) or not bool((key_scale > 0).all()):
                raise ValueError("key_scale must be finite and > 0")
            if config.key_channel_scale:
                raise ValueError("key_scale and config.key_channel_scale cannot be combined")
            key_scale = key_scale.detach().to(torch.float32).clone()
        self.config, self.seed, self.backend, self.rope, self.head = config, seed, backend, rope, head
        # the key and value codes (they differ when config.value_bits / value_t_bits / value_alpha are set)
        self.kcfg, self.vcfg = config.key_config(), config.value_config()
        self.key_scale = key_scale
        self.rotation: HeadRotation | None = None
        self._bufs = {
            n: TokenBuffer()
            for n in ("k_idx", "k_t", "k_scale", "v_idx", "v_t", "v_scale", "k_win", "v_win", "k_sink", "v_sink")
        }
        self.dtype: torch.dtype | None = None
        # (H, D) float32, frozen at the first coded chunk (with rope: the pre-RoPE mean, rotated per position)
        self.k_mean: torch.Tensor | None = None
        self.v_mean: torch.Tensor | None = None
        # (H, D) float32 per-channel key scale (key_channel_scale > 0, or a fixed (H, D) key_scale)
        self.k_chan: torch.Tensor | None = key_scale if isinstance(key_scale, torch.Tensor) else None
        # (H, D, D) float32 key transform T and T^-1 of a KeyTransform key_scale (derived, not counted)
        self.k_mat, self.q_mat = k_mat, q_mat

    # ------------------------------------------------------------------ contents
    @property
    def num_coded(self) -> int:
        return self._bufs["k_idx"].length

    @property
    def num_window(self) -> int:
        return self._bufs["k_win"].length

    @property
    def num_sink(self) -> int:
        return self._bufs["k_sink"].length

    def __len__(self) -> int:
        return self.num_sink + self.num_coded + self.num_window

    def _codes(self, which: str) -> KVCodes | None:
        if not self.num_coded:
            return None
        return self._require_codes(which)

    def _require_codes(self, which: str) -> KVCodes:
        """The ``"k"`` or ``"v"`` codes; raises RuntimeError when no token is coded."""
        if not self.num_coded:
            raise RuntimeError("no coded tokens in the cache")
        b = self._bufs
        code = (self.kcfg if which == "k" else self.vcfg).code_key()
        return KVCodes(b[f"{which}_idx"].tensor, b[f"{which}_t"].tensor, b[f"{which}_scale"].tensor, code)

    def _coded_rotary(self, start: int, stop: int, sink: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` (n, D) of coded tokens ``start .. stop-1`` (positions after the ``sink`` sink tokens,
        default the cache's)."""
        assert self.rope is not None
        sink = self.num_sink if sink is None else sink
        return self.rope.get(sink + start, sink + stop)

    def _key_mean_at(self, mean: torch.Tensor, start: int, stop: int, sink: int | None = None) -> torch.Tensor:
        """The key mean of coded tokens ``start .. stop-1``: ``(H, 1, D)``, or ``(H, n, D)`` rotated with rope."""
        if self.rope is None:
            return mean.unsqueeze(1)
        cos, sin = self._coded_rotary(start, stop, sink)
        return apply_rotary(mean.unsqueeze(1), cos.to(mean.device), sin.to(mean.device))

    def _require_rotation(self) -> HeadRotation:
        """The rotation, created by the first :meth:`append`; raises RuntimeError before that."""
        if self.rotation is None:
            raise RuntimeError("the cache is empty: append keys and values first")
        return self.rotation

    def _means(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(k_mean, v_mean)``, or None; the two are set together (:meth:`_commit`) and cleared
        together (:meth:`reset`)."""
        if self.k_mean is None and self.v_mean is None:
            return None
        if self.k_mean is None or self.v_mean is None:
            raise RuntimeError("inconsistent cache state: only one of k_mean / v_mean is set")
        return self.k_mean, self.v_mean

    @property
    def key_codes(self) -> KVCodes | None:
        return self._codes("k")

    @property
    def value_codes(self) -> KVCodes | None:
        return self._codes("v")

    @property
    def nbytes(self) -> int:
        """Bytes held: labels, T and scales of the coded tokens, the window in its own dtype, and the two
        frozen per-head means (float32) when ``config.subtract_mean``, and the key scale (float32) or
        :class:`KeyTransform` (float16; the dense T and T^-1 derived from it are not counted)."""
        side = (self.k_mean, self.v_mean, self.k_chan)
        means = sum(m.numel() * m.element_size() for m in side if m is not None)
        if isinstance(self.key_scale, KeyTransform):
            means += self.key_scale.nbytes
        return sum(b.nbytes for b in self._bufs.values()) + means

    # ------------------------------------------------------------------ updates
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append new tokens ``(B, H, L, D)`` (keys and values of the same shape; ``L = 0`` is a no-op that
        fixes the batch size, heads and head dim of an empty cache).

        Raises
        ------
        TypeError / ValueError for non-float, non-finite or mismatched tensors, a batch size of 0, a head dim
        that is not a power of two >= 8, a change of batch size, head count, head dim (or of dtype while
        full-precision sink or window tokens are kept), or a head vector past the range of the per-vector
        scale (:func:`coset.kv.encode_states`). A call that raises leaves the cache as it was.
        """
        self.stage(keys, values)()

    def stage(self, keys: torch.Tensor, values: torch.Tensor) -> Callable[[], None]:
        """The checks and encoding of :meth:`append`, without changing the store: returns the function that
        commits them (call it once, before any other change of the store). Raises as :meth:`append` does."""
        check_states(keys, values)
        if keys.shape != values.shape:
            raise ValueError(f"key_states {tuple(keys.shape)} and value_states {tuple(values.shape)} differ")
        if keys.dtype != values.dtype:
            raise ValueError(f"key_states ({keys.dtype}) and value_states ({values.dtype}) differ in dtype")
        B, H, L, D = keys.shape
        if B < 1:
            raise ValueError(f"key_states must have a batch size >= 1, got {tuple(keys.shape)}")
        # (the native encoder flags a vector that is not finite; the checks below then name it)
        if L and self._lean_append(B, H, D):
            lean = self._stage_native(keys, values)
            if lean is not None:
                return lean
        # a finite sum means finite states (a NaN or Inf carries into it; a sum that overflows is checked in full)
        if keys.numel() and not math.isfinite(float(keys.sum(dtype=torch.float32) + values.sum(dtype=torch.float32))):
            for name, x in (("key_states", keys), ("value_states", values)):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{name} contains NaN or Inf")
        S = min(max(self.config.sink - self.num_sink, 0), L)  # tokens that go to the sink
        W = self.config.window
        rotation = self.rotation
        if rotation is None:
            _check_states(keys, name="key_states")
            ks = self.key_scale
            shape = (
                tuple(ks.vectors.shape[:2] if isinstance(ks, KeyTransform) else ks.shape) if ks is not None else None
            )
            if shape is not None and shape != (H, D):
                raise ValueError(f"key_scale is for {shape[0]} heads of dim {shape[1]}; the states have {H} of dim {D}")
            if self.rope is not None and self.rope.head_dim != D:
                raise ValueError(f"rope is for head dim {self.rope.head_dim}; the states have head dim {D}")
            if self.head is None:
                rotation = HeadRotation(H, D, self.seed)
            elif H != 1:
                raise ValueError(f"states have {H} heads; this store holds head {self.head[0]} of a layer, alone")
            else:
                rotation = HeadRotation(self.head[1], D, self.seed).heads(self.head[0], self.head[0] + 1)
        elif (H, D) != (rotation.num_heads, rotation.head_dim):
            raise ValueError(
                f"states have {H} heads of dim {D}; this cache holds {rotation.num_heads} heads of dim "
                f"{rotation.head_dim}"
            )
        elif self._batch() >= 0 and B != self._batch():
            raise ValueError(f"states have batch size {B}, the cache holds {self._batch()}")
        fp = [b.dtype for b in (self._bufs["k_sink"], self._bufs["k_win"]) if b.dtype is not None]
        if fp and keys.dtype != fp[0] and (S > 0 or (W > 0 and L > S)):
            raise ValueError(
                f"key_states are {keys.dtype}; the cache keeps full-precision tokens in {fp[0]} (sink or window)"
            )
        # the tokens to code now: with a window, those pushed out of it (oldest first), else the new ones
        rest_k, rest_v = keys[:, :, S:], values[:, :, S:]
        from_win = keep = 0  # window tokens coded now; new tokens coded now
        if W == 0:
            code_k, code_v = rest_k, rest_v
        else:
            over = max(self.num_window + rest_k.shape[2] - W, 0)
            from_win = min(over, self.num_window)
            keep = over - from_win
            code_k, code_v = rest_k[:, :, :keep], rest_v[:, :, :keep]
            if from_win:
                code_k = torch.cat((self._bufs["k_win"].tensor[:, :, :from_win], code_k), dim=2)
                code_v = torch.cat((self._bufs["v_win"].tensor[:, :, :from_win], code_v), dim=2)
        # encode first (it may raise), then commit: bad input leaves no trace
        enc = self._encode(code_k, code_v, rotation, self.num_sink + S) if code_k.shape[2] else None

        def commit() -> None:
            if (L and not len(self)) or self.dtype is None:
                self.dtype = keys.dtype
            self.rotation = rotation
            if S > 0 or self._batch() < 0:  # the first tokens of the sequence are kept as they are (L = 0: fixes B)
                self._bufs["k_sink"].append(keys[:, :, :S].detach())
                self._bufs["v_sink"].append(values[:, :, :S].detach())
            if W:
                if from_win:
                    self._bufs["k_win"].pop_front(from_win)
                    self._bufs["v_win"].pop_front(from_win)
                self._bufs["k_win"].append(rest_k[:, :, keep:].detach())
                self._bufs["v_win"].append(rest_v[:, :, keep:].detach())
            if enc is not None:
                self._commit(*enc)

        return commit

    def _batch(self) -> int:
        for b in self._bufs.values():
            if b.batch is not None:
                return b.batch
        return -1

    def _encode(self, keys: torch.Tensor, values: torch.Tensor, rotation: HeadRotation, sink: int):
        """Codes of the tokens ``keys, values (B, H, n >= 1, D)`` that come after the coded ones (and after
        ``sink`` sink tokens), with the means and channel scale they use; changes nothing."""
        keys, values = keys.detach().to(torch.float32), values.detach().to(torch.float32)
        if self.num_coded and self._native_append():
            enc = self._encode_native(keys, values, rotation, sink)
            if enc is not None:
                return enc
        means = self._means()
        if self.config.subtract_mean:
            c0, c1 = self.num_coded, self.num_coded + keys.shape[2]
            if means is None:
                kp = keys
                if self.rope is not None:
                    cos, sin = self._coded_rotary(c0, c1, sink)
                    kp = unapply_rotary(keys, cos.to(keys.device), sin.to(keys.device))
                means = kp.mean(dim=(0, 2)), values.mean(dim=(0, 2))
            keys = keys - self._key_mean_at(means[0], c0, c1, sink)
            values = values - means[1].unsqueeze(1)
        chan = self.k_chan
        if self.config.key_channel_scale and chan is None:
            std = keys.std(dim=(0, 2), correction=0) if keys.shape[0] * keys.shape[2] > 1 else keys.abs()[0, :, 0]
            # relative to the largest channel first (the squares of tiny or huge stds would leave float32), with
            # a floor of 1e-6 of it; all-zero keys get uniform scales
            top = std.amax().clamp(min=torch.finfo(std.dtype).tiny)
            std = (std / top).clamp(min=1e-6)
            chan = (std / std.pow(2).mean(-1, keepdim=True).sqrt()).pow(self.config.key_channel_scale)
            # a first chunk of one or two tokens has channels of near-zero spread: without a floor, later keys
            # would be amplified without bound (past the range of the per-vector scale) in those channels
            chan = chan.clamp(min=CHAN_FLOOR)
        if chan is not None:
            keys = keys / chan.unsqueeze(1)
        if self.k_mat is not None:  # row vectors: k' = k T^T
            keys = keys @ self.k_mat.transpose(-1, -2).unsqueeze(0)
        # keys and values share the layer's rotation: one encode call for both when they share the code (its
        # fixed cost, ~0.4 ms of torch dispatch, is paid per layer and decoding step); append() has checked them
        B = keys.shape[0]
        if self.kcfg == self.vcfg:
            both = encode_checked(torch.cat((keys, values)), rotation, self.kcfg, ("key_states", "value_states"))
            kc = KVCodes(both.idx[:B], both.t[:B], both.scale[:B], both.code)
            vc = KVCodes(both.idx[B:], both.t[B:], both.scale[B:], both.code)
        elif self.kcfg.scale_bits == self.vcfg.scale_bits:  # one rotation and scale pass, two codes
            u, scale = normalise_checked(
                torch.cat((keys, values)), rotation, self.kcfg.scale_bits, ("key_states", "value_states")
            )
            kc = encode_normalised(u[:B], scale[:B], self.kcfg)
            vc = encode_normalised(u[B:], scale[B:], self.vcfg)
        else:
            kc = encode_checked(keys, rotation, self.kcfg, ("key_states",))
            vc = encode_checked(values, rotation, self.vcfg, ("value_states",))
        return kc, vc, means, chan

    def _native_append(self) -> bool:
        """Whether :meth:`_encode` can take the native encoder: trellis keys and values with 8-bit scales, a CPU
        cache and a native backend that has the kernel."""
        kc, vc = self.kcfg, self.vcfg
        return (
            self.backend != "torch"
            and isinstance(kc, TrellisCode)
            and isinstance(vc, TrellisCode)
            and kc.scale_bits == 8
            and vc.scale_bits == 8
            and self._bufs["k_idx"].device == torch.device("cpu")
            and native.append_available()
        )

    def _encode_native(self, keys: torch.Tensor, values: torch.Tensor, rotation: HeadRotation, sink: int):
        """:meth:`_encode` of tokens after the first coded chunk (means and channel scale frozen) in two native
        calls, one per side (centring, scaling, key transform and rotation as one matrix, 8-bit scale, Viterbi).
        Its codes equal the reference path's up to rounding (see :func:`coset.kv.native.trellis_normalise_encode`).
        None when a vector's scale is past the code's range: the reference path then raises the named error."""
        kcode, vcode = self.kcfg, self.vcfg
        assert isinstance(kcode, TrellisCode) and isinstance(vcode, TrellisCode)
        pos0 = sink + self.num_coded
        (a_k, ks_k, cb_k, kmode, mu_k, chan), (a_v, ks_v, cb_v, vmode, mu_v), cs = self._native_sides(
            rotation, pos0, keys.shape[2]
        )
        limit = _MAX_RMS[8]
        sk, ck, bad = native.trellis_normalise_encode(keys, a_k, ks_k, cb_k, limit, kmode, mu_k, cs, pos0, chan)
        if bad >= 0:
            return None
        sv, cv, bad = native.trellis_normalise_encode(values, a_v, ks_v, cb_v, limit, vmode, mu_v)
        if bad >= 0:
            return None
        t = sk.new_empty((*sk.shape[:3], 0))
        return KVCodes(sk, t, ck, kcode.code_key()), KVCodes(sv, t, cv, vcode.code_key()), self._means(), chan

    def _lean_append(self, B: int, H: int, D: int) -> bool:
        """Whether new tokens ``(B, H, n, D)`` go straight into the code buffers (:meth:`_stage_native`): every
        token is coded (no window, the sink full), the means and channel scale are frozen (tokens were coded
        before) and the native encoder applies."""
        rot = self.rotation
        return (
            rot is not None
            and self.config.window == 0
            and self.num_sink >= self.config.sink
            and self.num_coded > 0
            and (H, D) == (rot.num_heads, rot.head_dim)
            and B == self._bufs["k_idx"].batch
            and self._native_append()
        )

    def _stage_native(self, keys: torch.Tensor, values: torch.Tensor) -> Callable[[], None] | None:
        """:meth:`stage` of a decoding step's tokens in one native call that writes their codes into the buffers'
        spare capacity (unused until the commit advances the lengths: the store is unchanged before it). None when
        a vector is not finite or past the scale's range: the general path then raises the named error."""
        rotation = self.rotation
        assert rotation is not None
        n = keys.shape[2]
        pos0 = self.num_sink + self.num_coded
        k_side, v_side, cs = self._native_sides(rotation, pos0, n)
        bufs = [self._bufs[name] for name in ("k_idx", "k_scale", "v_idx", "v_scale", "k_t", "v_t")]
        out = tuple(b.reserve(n) for b in bufs[:4])
        for b in bufs[4:]:  # (the empty t codes of a trellis code keep their lengths with the others)
            b.reserve(n)
        bad = native.trellis_append(
            keys.detach(), values.detach(), k_side, v_side, _MAX_RMS[8], out, self.num_coded, cs, pos0
        )
        if bad >= 0:
            return None

        def commit() -> None:
            for b in bufs:
                b.advance(n)

        return commit

    def _native_sides(self, rotation: HeadRotation, pos0: int, n: int) -> tuple[tuple, tuple, torch.Tensor | None]:
        """The native encoder's arguments for ``n`` tokens from position ``pos0`` (means and channel scale frozen):
        ``(A_k, schedule, codebook, mean mode, mu_k, chan)``, ``(A_v, schedule, codebook, mean mode, mu_v)`` and the
        whole ``[cos | sin]`` table (keys centred on their rotating mean) or None. The schedules and codebooks are
        cached (the native encoder remembers the checks of the same tensors)."""
        a_k, a_v = self._encode_maps(rotation)
        tables = self.__dict__.get("_enc_tables")
        if tables is None:
            kc, vc = self.kcfg, self.vcfg
            assert isinstance(kc, TrellisCode) and isinstance(vc, TrellisCode)
            tables = self.__dict__["_enc_tables"] = tuple(
                (schedule_tensor(c.block_bits, rotation.head_dim), trellis_codebook(c.state_bits).contiguous())
                for c in (kc, vc)
            )
        (ks_k, cb_k), (ks_v, cb_v) = tables
        means = self._means()
        if means is None:
            return (a_k, ks_k, cb_k, 0, None, self.k_chan), (a_v, ks_v, cb_v, 0, None), None
        cs = self.rope.cat_table(pos0 + n) if self.rope is not None else None
        kmode = 2 if self.rope is not None else 1
        return (a_k, ks_k, cb_k, kmode, means[0], self.k_chan), (a_v, ks_v, cb_v, 1, means[1]), cs

    def _encode_maps(self, rotation: HeadRotation) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_k, A_v)`` ``(H, D, D)``: the key transform then the rotation as one matrix (``z = R T y``, formed in
        float64), and the rotation alone; cached while the rotation and transform stay the same objects."""
        hit = self.__dict__.get("_enc_maps")
        if hit is not None and hit[0] is rotation and hit[1] is self.k_mat:
            return hit[2]
        r = rotation.matrix.to(torch.float32)
        a_k = r if self.k_mat is None else (r.double() @ self.k_mat.double()).to(torch.float32)
        maps = (a_k.contiguous(), r.contiguous())
        self.__dict__["_enc_maps"] = (rotation, self.k_mat, maps)
        return maps

    def _commit(self, kc: KVCodes, vc: KVCodes, means, chan) -> None:
        if means is not None:
            self.k_mean, self.v_mean = means
        self.k_chan = chan
        for which, c in (("k", kc), ("v", vc)):
            self._bufs[f"{which}_idx"].append(c.idx)
            self._bufs[f"{which}_t"].append(c.t)
            self._bufs[f"{which}_scale"].append(c.scale)

    def crop(self, n: int) -> None:
        """Drop the ``n`` most recent tokens (window first, then codes, then sink): exact, codes are per token."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        w = min(n, self.num_window)
        self._bufs["k_win"].crop(w)
        self._bufs["v_win"].crop(w)
        c = min(n - w, self.num_coded)
        for name in ("k_idx", "k_t", "k_scale", "v_idx", "v_t", "v_scale"):
            self._bufs[name].crop(c)
        self._bufs["k_sink"].crop(n - w - c)
        self._bufs["v_sink"].crop(n - w - c)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the batch axis of every buffer (reorder, select, repeat)."""
        for b in self._bufs.values():
            b.map_batch(fn)

    def reset(self) -> None:
        for b in self._bufs.values():
            b.clear()
        self.k_mean = self.v_mean = None
        self.k_chan = self.key_scale if isinstance(self.key_scale, torch.Tensor) else None

    # ------------------------------------------------------------------ reads
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values ``(B, H, L, D)`` in the states' dtype (decoded codes + window);
        ``L = 0`` after an empty append or a crop of every token.

        Raises
        ------
        ValueError if nothing was ever appended (the shape is not known).
        """
        if not len(self):
            if self.rotation is None or self._batch() < 0 or self.dtype is None:
                raise ValueError("the cache is empty: append keys and values before reading them")
            r = self.rotation
            empty = torch.empty((self._batch(), r.num_heads, 0, r.head_dim), dtype=self.dtype)
            return empty, empty.clone()
        parts_k: list[torch.Tensor] = []
        parts_v: list[torch.Tensor] = []
        if self.num_sink:
            parts_k.append(self._bufs["k_sink"].tensor)
            parts_v.append(self._bufs["v_sink"].tensor)
        if self.num_coded:
            rotation = self._require_rotation()
            k = decode_states(self._require_codes("k"), rotation, self.kcfg)
            v = decode_states(self._require_codes("v"), rotation, self.vcfg)
            if self.k_chan is not None:
                k = k * self.k_chan.unsqueeze(1)
            if self.q_mat is not None:  # k = k' T^-T
                k = k @ self.q_mat.transpose(-1, -2).unsqueeze(0)
            means = self._means()
            if means is not None:
                k, v = k + self._key_mean_at(means[0], 0, self.num_coded), v + means[1].unsqueeze(1)
            parts_k.append(_saturate(k, self.dtype))
            parts_v.append(_saturate(v, self.dtype))
        if self.num_window:
            parts_k.append(self._bufs["k_win"].tensor)
            parts_v.append(self._bufs["v_win"].tensor)
        return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)

    def use_lut(self, n_queries: int) -> bool:
        p = self.config.score_path
        return p == "lut" or (p == "auto" and n_queries <= self.config.lut_max_queries)

    def attend(self, query: torch.Tensor, attention_mask=None, scaling: float | None = None) -> torch.Tensor:
        """Attention of ``query (B, Hq, Lq, D)`` over the whole cache.

        Returns
        -------
        (B, Lq, Hq, D) tensor in the query's dtype (the layout transformers' attention functions return)

        Raises
        ------
        TypeError for a query that is not a 4-d float tensor or a mask that is not a tensor; ValueError for an
        empty cache, a query whose batch, head dim or head count does not fit the cache (Hq must be a multiple
        of the KV heads), a bad mask (shape, NaN), a ``scaling`` that is not a finite number, or scores that are
        not finite (a query with NaN/Inf, or too large for the keys: float32 overflow).
        """
        if not isinstance(query, torch.Tensor) or not query.dtype.is_floating_point or query.ndim != 4:
            raise TypeError("query must be a floating tensor (batch, heads, q_len, head_dim)")
        if not len(self):
            raise ValueError("the cache is empty: append keys and values before attending")
        B, Hq, Lq, D = query.shape
        rotation = self._require_rotation()
        H = rotation.num_heads
        if D != rotation.head_dim or Hq % H or B != self._batch():
            raise ValueError(
                f"query {tuple(query.shape)} does not fit a cache of batch {self._batch()}, {H} KV heads, "
                f"head dim {rotation.head_dim}"
            )
        G = Hq // H
        if scaling is None:
            scaling = D**-0.5
        elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite number or None, got {scaling!r}")
        scaling = float(scaling)
        q = query.to(torch.float32).reshape(B, H, G * Lq, D)  # row g*Lq + i = query head h*G+g, position i
        parts: list[torch.Tensor] = []
        lut = self.use_lut(G * Lq)
        backend = self.backend if lut else "torch"
        means = self._means()
        if lut and Lq == 1 and attention_mask is None and self._fused():
            return self._attend_fused(q, query, scaling)
        Ls = self.num_sink
        if Ls:
            parts.append(q @ self._bufs["k_sink"].tensor.to(torch.float32).transpose(-1, -2))
        if self.num_coded:
            qr = self._query_transform(q)
            kc = self._require_codes("k")
            sc = scores_lut(qr, kc, self.kcfg, backend=backend) if lut else scores_reference(qr, kc, self.kcfg)
            if means is not None and self.rope is not None:
                # the codes hold k - R_p mu: add <q, R_p mu> = (q*mu) . cos_p + (q*rot(mu)) . sin_p back
                sc = sc + self.rope.mean_scores(q, means[0].unsqueeze(1), self.num_sink, self.num_sink + self.num_coded)
            elif means is not None:  # the codes hold k - mu_k: add <q, mu_k> back (same for every token)
                sc = sc + q @ means[0].unsqueeze(-1)
            parts.append(sc)
        if self.num_window:
            parts.append(q @ self._bufs["k_win"].tensor.to(torch.float32).transpose(-1, -2))
        s = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        Lk = s.shape[-1]
        s = s * scaling
        # a finite sum means finite scores (an Inf or NaN would carry into it): one reduction instead of a
        # full isfinite pass, every decoding step; the full check only when the sum is not finite
        if not math.isfinite(float(s.sum())) and not bool(torch.isfinite(s).all()):
            raise ValueError(
                "attention scores are not finite: the query (or scaling) is too large for the cached keys, or it "
                "holds NaN/Inf"
            )
        p = masked_softmax(s.view(B, H, G, Lq, Lk), attention_mask, H).view(B, H, G * Lq, Lk)
        out = torch.zeros((B, H, G * Lq, D), dtype=torch.float32, device=query.device)
        Lc = self.num_coded
        if Lc:
            pc = p[..., Ls : Ls + Lc].contiguous()
            out = rotation.unrotate(values_from_codes(pc, self._require_codes("v"), self.vcfg, backend=backend))
            if means is not None:  # the codes hold v - mu_v
                out = out + pc.sum(-1, keepdim=True) * means[1].unsqueeze(1)
        if Ls:
            out = out + p[..., :Ls] @ self._bufs["v_sink"].tensor.to(torch.float32)
        if self.num_window:
            out = out + p[..., Ls + Lc :] @ self._bufs["v_win"].tensor.to(torch.float32)
        return _saturate(out.view(B, H, G, Lq, D).reshape(B, Hq, Lq, D).transpose(1, 2), query.dtype)

    def _fused(self) -> bool:
        """Whether :meth:`attend` can take the fused native path: trellis keys and values with 8-bit scales, coded
        tokens, a CPU cache and a native backend that has the kernel."""
        kc, vc = self.kcfg, self.vcfg
        return (
            self.backend != "torch"
            and self.num_coded > 0
            and isinstance(kc, TrellisCode)
            and isinstance(vc, TrellisCode)
            and kc.scale_bits == 8
            and vc.scale_bits == 8
            and self._bufs["k_idx"].device == torch.device("cpu")
            and native.attend_available()
        )

    def _query_transform(self, q: torch.Tensor) -> torch.Tensor:
        """The queries ``(..., H, n, D)`` in the coded keys' domain: ``R (T^-T (c * q))`` (channel scale c, key
        transform T, rotation R; each as the store has it), so that ``<q, k> = <q', k'>``."""
        qk = q if self.k_chan is None else q * self.k_chan.unsqueeze(1)
        return self._require_rotation().rotate(qk if self.q_mat is None else qk @ self.q_mat.unsqueeze(0))

    def _fused_maps(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear maps around the fused kernel, from the frozen transforms and means (rebuilt when one of them
        is replaced): ``qmap (H, D, D + w)`` with ``q @ qmap = [q' | qm]`` (q' the transformed query, qm the query
        of the key mean's scores: ``width`` table columns with rope, 1 without, none without means), and
        ``omap (H, D (+ 1), D)`` with ``[acc | psum] @ omap = R^T acc + psum mu_v``. Applied inside the native decoding step
        (:func:`coset.kv.native.trellis_attend_step`), row by row for every batch entry alike."""
        rotation = self._require_rotation()
        key = (rotation, self.k_chan, self.q_mat, self.k_mean, self.v_mean)  # replaced, never changed in place
        hit = self.__dict__.get("_maps")
        if hit is not None and hit[1] == width and all(a is b for a, b in zip(hit[0], key, strict=True)):
            return hit[2]
        H, D = rotation.num_heads, rotation.head_dim
        eye = torch.eye(D).expand(1, H, D, D)  # f(q) = q @ M for a linear f, with rows M[d] = f(e_d)
        qcols = [self._query_transform(eye)]
        orows = [rotation.matrix.to(torch.float32)]
        means = self._means()
        if means is not None and self.rope is not None:
            qcols.append(self.rope.mean_query(eye, means[0].unsqueeze(1), 0)[0])
        elif means is not None:
            qcols.append(means[0].unsqueeze(-1).unsqueeze(0))
        if means is not None:
            orows.append(means[1].unsqueeze(1))
        maps = (torch.cat(qcols, dim=-1)[0].contiguous(), torch.cat(orows, dim=1).contiguous())
        self.__dict__["_maps"] = (key, width, maps)
        return maps

    def _attend_fused(self, q: torch.Tensor, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """:meth:`attend` of one query position without a mask (a decoding step), in one native call: the query
        maps (:meth:`_fused_maps`), the scores of the coded tokens (with the key mean's) and of the dense (sink,
        window) tokens, one softmax over them, the values accumulated from their codes and the dense values, the
        output map. Each of those as a torch op cost 10-100 us of dispatch (0.6 ms per layer and step)."""
        B, H, n, D = q.shape
        Ls, Lc = self.num_sink, self.num_coded
        b = self._bufs
        dense: list[tuple | None] = []
        for p in ("sink", "win"):  # full-precision tokens, float32 for the kernel (a float32 model's own dtype)
            kb, vb = b[f"k_{p}"], b[f"v_{p}"]
            if not kb.length:
                dense.append(None)
            elif kb.dtype == torch.float32:
                dense.append((kb.storage, vb.storage, kb.length))
            else:
                dense.append((kb.tensor.to(torch.float32), vb.tensor.to(torch.float32), kb.length))
        means = self._means()
        mode, tab = 0, None
        if means is not None and self.rope is not None:  # codes hold k - R_p mu: <q, R_p mu> = <qm, table[p]>
            mode, tab = 2, self.rope.mean_table(Ls + Lc)
        elif means is not None:  # codes hold k - mu: <q, mu> for every token
            mode = 1
        qmap, omap = self._fused_maps(tab.shape[1] if tab is not None else 0)
        out = native.trellis_attend_step(
            (b["k_idx"].storage, b["k_scale"].storage), (b["v_idx"].storage, b["v_scale"].storage), Lc,
            self._tables("k"), self._tables("v"), q, qmap, omap, scaling, dense[0], dense[1], mode, tab, Ls,
        )  # fmt: skip
        return _saturate(out.view(B, query.shape[1], 1, D).transpose(1, 2), query.dtype)

    def _tables(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ks, cb)`` of the ``"k"`` or ``"v"`` trellis code at this store's head dim (cached)."""
        key = f"_tables_{which}"
        t = self.__dict__.get(key)
        if t is None:
            code = self.kcfg if which == "k" else self.vcfg
            assert isinstance(code, TrellisCode)
            D = self._require_rotation().head_dim
            t = self.__dict__[key] = (schedule_tensor(code.block_bits, D), code.decode_table().contiguous())
        return t
