"""Frozen, validated configurations of the two KV codes: HNLQ (:class:`KVQuantConfig`) and the KIVI-style
scalar baseline (:class:`ScalarKVConfig`), with their all-in storage cost in bits per cached element.

HNLQ code of one head vector ``x`` (D = head_dim, K = D / 8 blocks):

* ``rho = rms(x)`` stored as float16 (the per-token, per-head scale);
* ``u = R x / rho`` (rotation of :mod:`coset.kv.rotation`) cut into K blocks of 8 and encoded with HNLQ on
  **E8, q = 2, M = bits** (centred, ``center=True``: q = 2 needs it). With q = 2 a label of one layer of one
  block is 8 bits = **one byte, which is also the index of the block's 256-entry lookup table**: the codes are
  bit-packed and LUT-addressable at once, with no packing or unpacking step;
* ``T`` (the overload-ramp step) per block in ``t_bits`` bits (``max_scaling_iterations = 2^t_bits - 1``),
  bit-packed per vector.

All-in bits per element = ``bits + t_bits / 8 + scale_bits / D`` (D = 64, bits = 4, t_bits = 2: 4.5). Keys and values
may use different label bits (``value_bits``): the all-in figure is then the mean of the two, e.g. keys 4 and
values 3 bits at t_bits = 2: ``(4.5 + 3.5) / 2 = 4.0`` exactly.

KIVI baseline (Liu et al. 2024): keys quantized per channel over groups of ``group_size`` tokens, values per
token over the head dimension, asymmetric ``bits``-bit integers with a float16 scale and zero point per group:
``(bits + 32 / group_size + value_bits + 32 / D) / 2`` bits per element (D = 64, G = 64, 4 bits: 4.5; keys 4
and values 3 bits: 4.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import torch

from coset.quant import QuantizationConfig, calibrate_beta

from .trellis import TrellisCode

__all__ = ["KVQuantConfig", "ScalarKVConfig", "BLOCK", "calibrated_beta", "search_beta", "check_head_dim"]

#: Block length: the E8 lattice dimension.
BLOCK = 8


def _int(name: str, v, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


def _choice(name: str, v, allowed: tuple[int, ...]) -> None:
    """ValueError unless ``v`` is one of ``allowed`` (a bool is not); TypeError for a non-int (e.g. 2.0)."""
    if isinstance(v, bool) or v not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {v!r}")
    if not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")


def check_head_dim(head_dim) -> None:
    """TypeError / ValueError unless ``head_dim`` is an int >= 8 and a multiple of 8 (whole E8 blocks)."""
    _int("head_dim", head_dim, BLOCK, 2**20)
    if head_dim % BLOCK:
        raise ValueError(f"head_dim must be a multiple of {BLOCK}, got {head_dim}")


#: Range of ``beta`` (in units of the per-vector rms, calibrated values 0.2 .. 1.7) and the largest step of the
#: overload ramp ``beta 2^(alpha (2^t_bits - 1))``: the float32 step tables and decoded vectors stay finite
#: (per-vector scales reach 2^16), and the encoder's ``x / beta`` stays in its exact range.
BETA_RANGE = (2.0**-20, 2.0**20)
MAX_LOG2_STEP = 64.0


#: ``calibrated_beta(bits, t_bits, alpha)`` for the common settings, computed once by its grid search (~15 s
#: each here); tests/test_kv_config.py recomputes entries. Other settings are computed on first use.
_BETA_TABLE: dict[tuple[int, int, float], float] = {
    (2, 0, 0.5): 1.7094,
    (2, 1, 0.5): 1.2925,
    (2, 1, 1.0): 1.1674,
    (2, 2, 0.5): 0.8339,
    (2, 2, 1.0): 0.4169,
    (3, 0, 0.5): 1.0215,
    (3, 1, 0.5): 0.7713,
    (3, 1, 1.0): 0.6671,
    (3, 2, 0.5): 0.5003,
    (3, 2, 1.0): 0.3961,
    (4, 0, 0.5): 0.5733,
    (4, 1, 0.5): 0.3961,
    (4, 1, 1.0): 0.3544,
    (4, 2, 0.5): 0.2606,
    (4, 2, 1.0): 0.1980,
}


def calibrated_beta(bits: int, t_bits: int, alpha: float) -> float:
    """MSE-optimal beta of the E8/q=2 code for unit-variance Gaussian coordinates (what the rotation and the
    rms normalisation produce): the table entry, else :func:`search_beta`."""
    if t_bits == 0:
        alpha = 0.5  # alpha is unused without T
    hit = _BETA_TABLE.get((bits, t_bits, float(alpha)))
    return hit if hit is not None else search_beta(bits, t_bits, alpha)


@cache
def search_beta(bits: int, t_bits: int, alpha: float) -> float:
    """Grid search (``coset.quant.calibrate_beta``, MSE) on 16384 seeded N(0, 1) blocks, rounded to 4 decimals."""
    cfg = QuantizationConfig(
        "E8", q=2, M=bits, alpha=alpha, max_scaling_iterations=2**t_bits - 1, center=True, overload_policy="clamp"
    )
    x = torch.randn(16384, BLOCK, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    beta, _ = calibrate_beta(x, config=cfg, objective="mse")
    return round(beta, 4)


@cache
def _quant_config(bits: int, beta: float, alpha: float, t_bits: int) -> QuantizationConfig:
    return QuantizationConfig(
        "E8",
        q=2,
        M=bits,
        beta=beta,
        alpha=alpha,
        max_scaling_iterations=2**t_bits - 1,
        center=True,
        overload_policy="clamp",
    )


@dataclass(frozen=True)
class KVQuantConfig:
    """HNLQ KV code (see the module docstring).

    Parameters
    ----------
    bits : 1..4, HNLQ layers M of the E8/q=2 code = label bits per element
    t_bits : 0, 1, 2 or 4, bits of the overload step T per 8-dim block (0: no T, vectors past the code are
        clamped radially)
    alpha : step of the overload ramp, ``scale_T = beta 2^(alpha T)``
    beta : base scale in units of the per-vector rms; ``None`` = :func:`calibrated_beta`
    window : number of most recent tokens kept in full precision (0: every token is coded at once)
    sink : number of first tokens of the sequence kept in full precision (the "attention sinks": token 0
        draws much of the attention mass of most heads and has outlier keys; coding it costs more in
        perplexity than its bytes are worth)
    seed : seed of the per-head random signs of the rotation (layer ``l`` uses ``seed + l``)
    score_path : how attention scores are computed from the key codes: ``"lut"`` (one-sided lookup tables,
        native kernel when available), ``"decode"`` (dequantize, then matmul) or ``"auto"`` (LUT when at most
        ``lut_max_queries`` queries per KV head, i.e. decoding steps; decode for prefill)
    lut_max_queries : threshold of ``"auto"``
    prefill : how a call that brings several tokens to an **empty** cache (the prompt) attends: ``"float"``
        (default) with the float keys and values it was given, through SDPA, while only their codes are stored
        (transformers' ``QuantizedCache`` does the same); ``"codes"``: over the stored codes like every later
        call (the perplexity benchmark uses it, so that every position reads the quantized cache)
    subtract_mean : code ``x - mu`` with ``mu`` the per-head mean of the first coded chunk (frozen, float32,
        counted in the bytes). Exact for attention: a fixed key offset shifts every score of a query by the
        same ``<q, mu_k>`` (added back), a fixed value offset adds ``mu_v`` to the output (the weights sum to
        1). It removes the per-channel bias of keys (RoPE'd outlier channels) from what the code must carry.
    scale_bits : 16 (the per-vector rms scale in float16) or 8 (an 8-bit log code, steps of 2^(1/8) = 9%:
        0.125 bits/element less side information at D = 64; :mod:`coset.kv.codes`)
    value_bits : label bits of the values (1..4; ``None`` = ``bits``). Keys carry the attention logits, whose
        errors the softmax amplifies, values only a convex combination: at equal average bits, keys 4 / values 3
        beats 4 / 4 with a cheaper code (docs/kv.md). ``beta`` (when given) applies to both.
    value_t_bits, value_alpha : T bits and ramp step of the values (``None`` = ``t_bits`` / ``alpha``); the ramp
        needs ``alpha ~ 1 / t_bits`` (1, 0.5, 0.25 for 1, 2, 4 T bits) to reach the same top scale. Keys with
        4 T bits and values with 2, both with 8-bit scales, land on the same exact rates as the default split
        (keys 4.625 + values 3.375 = 2 x 4.0) and measured better (docs/kv.md).
    key_channel_scale : exponent ``e`` of a per-head, per-channel key scale ``s_c = std_c^e`` (std of channel c
        of the first coded chunk, frozen, float32, counted in the bytes; 0 = off): keys are coded as
        ``(k - mu) / s`` and queries scaled by ``s`` instead (exact: ``<q, s * k'> = <s * q, k'>``), so the
        quantization error of a channel follows its spread (KIVI's per-channel insight) for ``e = 1``, or
        sits between that and white error for ``0 < e < 1``.
    value_code : a :class:`coset.kv.TrellisCode` to code the values with instead of E8 (``value_bits``,
        ``value_t_bits`` and ``value_alpha`` must then be unset). The values are decoded, never scored from
        tables, so their code need not have byte labels: the trellis code sits ~0.25 bit per element from the
        Gaussian distortion-rate bound where the E8 q=2 code with T sits ~0.8 bit from it (docs/kv.md).
    key_code : a :class:`coset.kv.TrellisCode` to code the keys with instead of E8 (``bits``, ``t_bits``,
        ``alpha`` and ``beta`` then describe only E8 values, if any). Trellis keys have no one-sided tables: their
        scores are computed from the streams by decode-then-dot (a native kernel walks each stream once per
        token for all the queries of a KV head), so ``score_path`` must not be ``"lut"``. At equal bytes they
        carry the logits with ~0.5 bit per element less error than E8 keys (docs/kv.md).
    """

    bits: int = 4
    t_bits: int = 2
    alpha: float = 0.5
    beta: float | None = None
    window: int = 0
    sink: int = 0
    seed: int = 0
    score_path: str = "auto"
    lut_max_queries: int = 16
    prefill: str = "float"
    subtract_mean: bool = True
    key_channel_scale: float = 0.0
    value_bits: int | None = None
    scale_bits: int = 16
    value_t_bits: int | None = None
    value_alpha: float | None = None
    value_code: TrellisCode | None = None
    key_code: TrellisCode | None = None

    def __post_init__(self) -> None:
        _int("bits", self.bits, 1, 4)
        if self.key_code is not None:
            if not isinstance(self.key_code, TrellisCode):
                raise TypeError(f"key_code must be a TrellisCode or None, got {type(self.key_code).__name__}")
            if self.score_path == "lut":
                raise ValueError("score_path='lut' needs E8 keys: trellis keys (key_code) have no one-sided tables")
        if self.value_code is not None:
            if not isinstance(self.value_code, TrellisCode):
                raise TypeError(f"value_code must be a TrellisCode or None, got {type(self.value_code).__name__}")
            if self.value_bits is not None or self.value_t_bits is not None or self.value_alpha is not None:
                raise ValueError(
                    "value_code replaces the E8 value code: value_bits, value_t_bits and value_alpha "
                    "must be None with it"
                )
        _choice("scale_bits", self.scale_bits, (8, 16))
        if self.value_bits is not None:
            _int("value_bits", self.value_bits, 1, 4)
        for name in ("t_bits",) + (("value_t_bits",) if self.value_t_bits is not None else ()):
            _choice(name, getattr(self, name), (0, 1, 2, 4))
        optional = tuple(n for n in ("beta", "value_alpha") if getattr(self, n) is not None)
        for name in ("alpha",) + optional:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.beta is not None and not BETA_RANGE[0] <= self.beta <= BETA_RANGE[1]:
            raise ValueError(f"beta must be in [2^-20, 2^20] (units of the per-vector rms), got {self.beta!r}")
        # the top step of each ramp (keys, values); a calibrated beta is < 2
        log2_beta = math.log2(self.beta) if self.beta is not None else 1.0
        vt = self.t_bits if self.value_t_bits is None else self.value_t_bits
        va = self.alpha if self.value_alpha is None else self.value_alpha
        for name, a, tb in (("alpha", self.alpha, self.t_bits), ("value_alpha", va, vt)):
            if log2_beta + a * (2**tb - 1) > MAX_LOG2_STEP:
                raise ValueError(
                    f"{name}={a!r} with {tb} T bits: the top step beta 2^({name} (2^t_bits - 1)) of the overload ramp "
                    f"is past 2^{MAX_LOG2_STEP:g}; lower {name}"
                )
        _int("window", self.window, 0, 2**31 - 1)
        _int("sink", self.sink, 0, 2**31 - 1)
        _int("seed", self.seed, 0, 2**62)
        if self.score_path not in ("auto", "lut", "decode"):
            raise ValueError(f"score_path must be 'auto', 'lut' or 'decode', got {self.score_path!r}")
        _int("lut_max_queries", self.lut_max_queries, 0, 2**31 - 1)
        if self.prefill not in ("float", "codes"):
            raise ValueError(f"prefill must be 'float' or 'codes', got {self.prefill!r}")
        v = self.key_channel_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 2:
            raise ValueError(f"key_channel_scale must be a number in [0, 2], got {v!r}")
        if not isinstance(self.subtract_mean, bool):
            raise TypeError(f"subtract_mean must be a bool, got {type(self.subtract_mean).__name__}")

    @property
    def resolved_value_bits(self) -> int:
        return self.bits if self.value_bits is None else self.value_bits

    @property
    def _values_differ(self) -> bool:
        return (
            self.value_bits is not None
            or self.value_t_bits is not None
            or self.value_alpha is not None
            or self.value_code is not None
        )

    def key_config(self) -> KVQuantConfig | TrellisCode:
        """The code of the keys alone: ``key_code`` when set, else the E8 configuration (the ``value_*`` fields
        cleared)."""
        if self.key_code is not None:
            return self.key_code
        if not self._values_differ:
            return self
        return replace(self, value_bits=None, value_t_bits=None, value_alpha=None, value_code=None, key_code=None)

    def value_config(self) -> KVQuantConfig | TrellisCode:
        """The code of the values alone: ``value_code`` when set, else the E8 configuration with ``bits``,
        ``t_bits``, ``alpha`` from the ``value_*`` fields that are set (those fields cleared)."""
        if self.value_code is not None:
            return self.value_code
        if not self._values_differ:
            return self if self.key_code is None else replace(self, key_code=None)
        return replace(
            self,
            bits=self.resolved_value_bits,
            t_bits=self.t_bits if self.value_t_bits is None else self.value_t_bits,
            alpha=self.alpha if self.value_alpha is None else self.value_alpha,
            value_bits=None,
            value_t_bits=None,
            value_alpha=None,
            key_code=None,
        )

    @property
    def resolved_beta(self) -> float:
        return float(self.beta) if self.beta is not None else calibrated_beta(self.bits, self.t_bits, float(self.alpha))

    def quant_config(self) -> QuantizationConfig:
        """The coset.quant configuration of the block code (built once per config: it is on the decode path)."""
        return _quant_config(self.bits, self.resolved_beta, float(self.alpha), self.t_bits)

    def code_key(self) -> tuple[int, int, float, float, int]:
        """``(bits, t_bits, alpha, beta, scale_bits)``: what a decoder must share with the encoder (recorded in
        :class:`KVCodes` so that codes read with another code raise instead of decoding to wrong vectors)."""
        return (self.bits, self.t_bits, float(self.alpha), self.resolved_beta, self.scale_bits)

    def t_bytes(self, head_dim: int) -> int:
        """Bytes of the packed T of one head vector."""
        check_head_dim(head_dim)
        return math.ceil(head_dim // BLOCK * self.t_bits / 8)

    def bytes_per_vector(self, head_dim: int, which: str = "k") -> int:
        """Stored bytes of one coded key (``which="k"``) or value (``"v"``) head vector: labels + T + scale."""
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v', got {which!r}")
        check_head_dim(head_dim)
        cfg = self.key_config() if which == "k" else self.value_config()
        if isinstance(cfg, TrellisCode):
            return cfg.bytes_per_vector(head_dim)
        return head_dim // BLOCK * cfg.bits + cfg.t_bytes(head_dim) + cfg.scale_bits // 8

    def bits_per_element(self, head_dim: int) -> float:
        """All-in stored bits per cached element, averaged over keys and values."""
        return 4.0 * (self.bytes_per_vector(head_dim, "k") + self.bytes_per_vector(head_dim, "v")) / head_dim


@dataclass(frozen=True)
class ScalarKVConfig:
    """KIVI-style scalar KV code: keys per channel over ``group_size`` tokens, values per token.

    Parameters
    ----------
    bits : 1..8, integer bits per element of the keys (and of the values unless ``value_bits``)
    value_bits : 1..8 bits of the values, ``None`` = ``bits`` (keys 4 / values 3 at G = 64: 4.0 bits all-in)
    group_size : tokens per key group (the last, incomplete group stays in full precision until it fills)
    sink : number of first tokens kept in full precision (as :attr:`KVQuantConfig.sink`)
    """

    bits: int = 4
    group_size: int = 64
    sink: int = 0
    value_bits: int | None = None

    def __post_init__(self) -> None:
        _int("bits", self.bits, 1, 8)
        if self.value_bits is not None:
            _int("value_bits", self.value_bits, 1, 8)
        _int("group_size", self.group_size, 1, 2**20)
        _int("sink", self.sink, 0, 2**31 - 1)

    def key_bits_per_element(self) -> float:
        return self.bits + 32.0 / self.group_size

    @property
    def resolved_value_bits(self) -> int:
        return self.bits if self.value_bits is None else self.value_bits

    def value_bits_per_element(self, head_dim: int) -> float:
        check_head_dim(head_dim)
        return self.resolved_value_bits + 32.0 / head_dim

    def bits_per_element(self, head_dim: int) -> float:
        """All-in bits per element, averaged over keys and values (full groups; the fp residual not counted)."""
        return (self.key_bits_per_element() + self.value_bits_per_element(head_dim)) / 2
