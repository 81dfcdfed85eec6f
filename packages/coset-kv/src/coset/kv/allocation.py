"""Per-layer bit allocation of the KV cache at an exact average rate.

Layers of a model differ by an order of magnitude in how much coding their keys and values costs in
perplexity (SmolLM2-135M, keys 2 / values 1 bits on one layer at a time: from ~0% to +9%), so at a fixed
average rate the bits are better spent where they matter. Model: the log-perplexity excess of layer ``l`` coded
at ``r`` bits per element is ``s_l 4^-(r - r_ref)`` (a code's mean squared error falls 4x per bit), with
``s_l`` measured at the reference rate ``r_ref`` (:func:`coset.kv.hf_cache.layer_sensitivity`); excesses of
different layers add. :func:`allocate_layers` minimises the total over one option per layer subject to the
mean rate being **exactly** the target (dynamic programming over rates in units of 1/16 bit: every HNLQ rate
at D = 64 is such a multiple).

:func:`allocate_trellis` allocates the keys and the values of every layer separately, in the trellis code's
block bits (1/8 bit per element), from sensitivities modelled rather than measured
(:func:`coset.kv.hf_cache.fisher_sensitivity`: one gradient pass instead of a forward per layer, and no
perplexity noise): the excess of a unit with sensitivity ``a`` at ``b`` block bits is ``a 4^(-b/8)``.
:func:`allocate_trellis_heads` does the same over the KV heads of every layer (one config per layer and head,
for a cache that codes each KV head with its own code).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from .config import KVQuantConfig, check_head_dim
from .trellis import TrellisCode

__all__ = ["allocate_layers", "allocate_trellis", "allocate_trellis_heads"]

_UNIT = 16  # rates in 1/16 bit: (bytes_k + bytes_v) * 4 / 64 at D = 64
#: Layers :func:`allocate_layers` takes (its choice table is layers x budget units bytes: 512 layers at 8 bits
#: per element are 512 x 65536 = 32 MB); models have at most a few hundred
MAX_LAYERS = 512


def _units(cfg: KVQuantConfig, head_dim: int) -> int:
    r = cfg.bits_per_element(head_dim) * _UNIT
    if abs(r - round(r)) > 1e-9:
        raise ValueError(f"rate {cfg.bits_per_element(head_dim)} of {cfg} is not a multiple of 1/{_UNIT} bit")
    return round(r)


def _sensitivities(name: str, x) -> list[float]:
    try:
        s = [float(v) for v in x]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers >= 0") from None
    if not s or not all(math.isfinite(v) and v >= 0 for v in s):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers >= 0")
    return s


def allocate_layers(
    sensitivity: Sequence[float],
    options: Sequence[KVQuantConfig],
    target_bits: float,
    reference_bits: float,
    head_dim: int = 64,
) -> list[KVQuantConfig]:
    """One option per layer, mean all-in rate exactly ``target_bits``, least modelled perplexity excess.

    Parameters
    ----------
    sensitivity : per layer, the log-perplexity excess ``s_l >= 0`` with only that layer coded at
        ``reference_bits`` (:func:`coset.kv.hf_cache.layer_sensitivity`)
    options : the candidate codes (their all-in rates at ``head_dim``, :meth:`KVQuantConfig.bits_per_element`)
    target_bits : the mean rate over the layers, reached exactly
    reference_bits : the rate at which ``sensitivity`` was measured

    Returns
    -------
    list of ``len(sensitivity)`` configs (entries of ``options``)

    Raises
    ------
    ValueError for an empty or negative/non-finite sensitivity (or more than 512 layers), no options, a bad
    ``head_dim``, or a target no mix of the options reaches exactly.
    """
    s = _sensitivities("sensitivity", sensitivity)
    if len(s) > MAX_LAYERS:
        raise ValueError(f"sensitivity has {len(s)} layers, more than {MAX_LAYERS}")
    try:
        opts = list(options)
    except TypeError:
        raise ValueError("options must be a non-empty sequence of KVQuantConfig") from None
    if not opts or not all(isinstance(o, KVQuantConfig) for o in opts):
        raise ValueError("options must be a non-empty sequence of KVQuantConfig")
    for name, v in (("target_bits", target_bits), ("reference_bits", reference_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    check_head_dim(head_dim)
    n = len(s)
    units = [_units(o, head_dim) for o in opts]
    total = target_bits * _UNIT * n
    if abs(total - round(total)) > 1e-6:
        raise ValueError(f"target_bits * {n} layers is not a multiple of 1/{_UNIT} bit")
    budget = round(total)
    lo, hi = min(units), max(units)
    if not n * lo <= budget <= n * hi:
        raise ValueError(f"target_bits={target_bits} is outside the options' range [{lo / _UNIT}, {hi / _UNIT}]")
    # cost of layer l at option j: s_l 4^-(r_j - r_ref) = 4^(r_ref - r_lo) s_l 4^-(r_j - r_lo); the common factor
    # 4^(r_ref - r_lo) and the scale of s do not change the argmin, so the DP runs on s / max(s) 4^-(r_j - r_lo)
    # (no overflow for any finite input)
    top = max(s)
    w = torch.tensor([4.0 ** (-(u - lo) / _UNIT) for u in units], dtype=torch.float64)
    # best[b] = least cost over the layers so far using exactly b units (inf: unreachable); choice[l, b] the
    # option of layer l on that path
    best = torch.full((budget + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    if len(opts) > 127:
        raise ValueError(f"options must hold at most 127 configs, got {len(opts)}")
    choice = torch.zeros((n, budget + 1), dtype=torch.int8)
    for li, sl in enumerate(s):
        c = sl / top if top > 0 else 0.0
        nxt = torch.full_like(best, math.inf)
        for j, u in enumerate(units):
            if u > budget:
                continue
            cand = torch.full_like(best, math.inf)
            cand[u:] = best[: budget + 1 - u] + c * float(w[j])
            better = cand < nxt
            nxt = torch.where(better, cand, nxt)
            choice[li] = torch.where(better, torch.tensor(j, dtype=torch.int8), choice[li])
        best = nxt
    if not math.isfinite(float(best[budget])):
        raise ValueError(f"no mix of the options' rates {sorted({u / _UNIT for u in units})} averages {target_bits}")
    picks: list[int] = []
    b = budget
    for li in range(n - 1, -1, -1):
        j = int(choice[li, b])
        picks.append(j)
        b -= units[j]
    return [opts[j] for j in reversed(picks)]


def allocate_trellis(
    key_sensitivity: Sequence[float],
    value_sensitivity: Sequence[float],
    target_bits: float,
    base: KVQuantConfig,
    max_cut: float = 0.5,
    head_dim: int = 64,
) -> list[KVQuantConfig]:
    """Per-layer key and value block bits of a trellis-coded cache, mean all-in rate exactly ``target_bits``,
    least modelled excess ``sum_l a_l^k 4^(-b_l^k / 8) + a_l^v 4^(-b_l^v / 8)``.

    The excess is convex in each unit's bits, so handing out one block bit at a time to the unit whose excess
    it lowers most is optimal (ties: the lower layer, keys first). The model is second order: it trusts small
    errors only, so no unit gets fewer than ``8 (m - max_cut)`` block bits, ``m`` the mean stream rate per element
    (SmolLM2-135M at 3 bits without the floor: layer 0, whose gradients are tiny, fell to 1 bit per element and
    the perplexity ratio rose from 1.0337 / 1.0330 uniform to 1.0407 / 1.0342 on two rotation seeds; with
    ``max_cut = 0.5``: 1.0315 over four seeds against 1.0357 uniform). :func:`allocate_trellis_heads` is the same
    over the KV heads of every layer.

    Parameters
    ----------
    key_sensitivity, value_sensitivity : per layer, ``a >= 0`` (:func:`coset.kv.hf_cache.fisher_sensitivity`)
    target_bits : the mean all-in rate over keys, values and layers, reached exactly
    base : a config with ``key_code`` and ``value_code`` (:class:`coset.kv.TrellisCode`): everything but the
        block bits (state bits, scale bits, sink, ...) is kept
    max_cut : the floor, in bits per element below the mean stream rate (>= 0)
    head_dim : D

    Returns
    -------
    list of one KVQuantConfig per layer

    Raises
    ------
    TypeError for a base that is not a KVQuantConfig; ValueError for sensitivities that are empty, of different
    lengths, negative or non-finite, a base without trellis codes, a negative ``max_cut``, or a target the block
    bits (8..32 per unit, above the floor) cannot reach exactly.
    """
    ks, vs = _sensitivities("key_sensitivity", key_sensitivity), _sensitivities("value_sensitivity", value_sensitivity)
    if len(ks) != len(vs):
        raise ValueError(f"key_sensitivity ({len(ks)} layers) and value_sensitivity ({len(vs)}) differ in length")
    return _greedy_trellis(list(zip(ks, vs, strict=True)), target_bits, base, max_cut, head_dim, "layers")


def allocate_trellis_heads(
    key_sensitivity: Sequence[Sequence[float]],
    value_sensitivity: Sequence[Sequence[float]],
    target_bits: float,
    base: KVQuantConfig,
    max_cut: float = 0.5,
    head_dim: int = 64,
) -> list[tuple[KVQuantConfig, ...]]:
    """:func:`allocate_trellis` over (layer, KV head) units: per layer and KV head, key and value block bits at
    the mean all-in rate exactly ``target_bits`` (the mean over every head of every layer), least modelled
    excess ``sum_{l,h} a_lh^k 4^(-b_lh^k / 8) + a_lh^v 4^(-b_lh^v / 8)``; the same greedy (ties: the lower
    layer, then the lower head, keys first) and floor (``max_cut`` below the mean stream rate).

    Parameters
    ----------
    key_sensitivity, value_sensitivity : per layer, a sequence of one ``a >= 0`` per KV head
        (:func:`coset.kv.hf_cache.fisher_sensitivity` with ``per_head=True``): ``(layers, heads)``
    target_bits, base, max_cut, head_dim : as for :func:`allocate_trellis`

    Returns
    -------
    list of one tuple per layer of one KVQuantConfig per KV head (``CosetQuantizedCache(config=...)``)

    Raises
    ------
    TypeError / ValueError as :func:`allocate_trellis`; ValueError also for a layer without heads or whose key
    and value sensitivities differ in head count.
    """
    if isinstance(key_sensitivity, (str, bytes)) or isinstance(value_sensitivity, (str, bytes)):
        raise ValueError("key_sensitivity and value_sensitivity must be sequences of per-head sequences")
    try:
        ks_layers, vs_layers = list(key_sensitivity), list(value_sensitivity)
    except TypeError:
        raise ValueError("key_sensitivity and value_sensitivity must be sequences of per-head sequences") from None
    if not ks_layers or not vs_layers:
        raise ValueError("key_sensitivity and value_sensitivity must be non-empty sequences of per-head sequences")
    if len(ks_layers) != len(vs_layers):
        raise ValueError(
            f"key_sensitivity ({len(ks_layers)} layers) and value_sensitivity ({len(vs_layers)}) differ in length"
        )
    pairs: list[tuple[float, float]] = []
    heads: list[int] = []
    for l, (kl, vl) in enumerate(zip(ks_layers, vs_layers, strict=True)):
        k = _sensitivities(f"key_sensitivity[{l}]", kl)
        v = _sensitivities(f"value_sensitivity[{l}]", vl)
        if len(k) != len(v):
            raise ValueError(f"layer {l}: key_sensitivity ({len(k)} heads) and value_sensitivity ({len(v)}) differ")
        pairs += zip(k, v, strict=True)
        heads.append(len(k))
    flat = _greedy_trellis(pairs, target_bits, base, max_cut, head_dim, "heads")
    out, at = [], 0
    for h in heads:
        out.append(tuple(flat[at : at + h]))
        at += h
    return out


def _greedy_trellis(
    pairs: list[tuple[float, float]], target_bits, base, max_cut, head_dim, what: str
) -> list[KVQuantConfig]:
    """The greedy of :func:`allocate_trellis` over ``pairs`` of (key, value) sensitivities, one config each."""
    if not isinstance(base, KVQuantConfig):
        raise TypeError(f"base must be a KVQuantConfig, got {type(base).__name__}")
    kc, vc = base.key_code, base.value_code
    if not isinstance(kc, TrellisCode) or not isinstance(vc, TrellisCode):
        raise ValueError("base must code keys and values in trellis codes (key_code= and value_code=)")
    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not math.isfinite(target_bits):
        raise ValueError(f"target_bits must be a finite number, got {target_bits!r}")
    if isinstance(max_cut, bool) or not isinstance(max_cut, (int, float)) or not 0 <= max_cut < math.inf:
        raise ValueError(f"max_cut must be a finite number >= 0, got {max_cut!r}")
    check_head_dim(head_dim)
    n, lo_code, hi_code = len(pairs), 8, 32

    def pair(kb: int, vb: int) -> KVQuantConfig:
        return replace(
            base,
            key_code=replace(kc, block_bits=kb),
            value_code=replace(vc, block_bits=vb),
        )

    # each block bit adds D/8 stream bits to one of the 2 D elements of a (key, value) pair: 1/16 bit
    r0 = pair(lo_code, lo_code).bits_per_element(head_dim)
    extra = 16 * n * (target_bits - r0)  # block bits above 8 per unit, over all units
    if abs(extra - round(extra)) > 1e-6:
        raise ValueError(f"target_bits={target_bits} over {n} {what} is not a multiple of 1/16 bit above {r0}")
    total = 2 * n * lo_code + round(extra)
    mean = total / (2 * n)
    floor = max(lo_code, math.ceil(mean - 8 * max_cut - 1e-9))
    if not 2 * n * floor <= total <= 2 * n * hi_code:
        raise ValueError(f"target_bits={target_bits} needs {mean:g} block bits per unit: outside [{floor}, {hi_code}]")
    sens = [a for kv in pairs for a in kv]  # unit 2i: keys of pair i, 2i + 1: its values
    bits = [floor] * (2 * n)
    step = 1 - 4.0 ** (-1 / 8)
    top = max(sens) or 1.0  # relative sensitivities: no overflow or underflow of a * 4^(-b/8)
    heap = [(-(a / top) * 4.0 ** (-floor / 8) * step, i) for i, a in enumerate(sens)]
    heapq.heapify(heap)
    for _ in range(total - 2 * n * floor):
        _, i = heapq.heappop(heap)
        bits[i] += 1
        if bits[i] < hi_code:
            heapq.heappush(heap, (-(sens[i] / top) * 4.0 ** (-bits[i] / 8) * step, i))
    return [pair(bits[2 * i], bits[2 * i + 1]) for i in range(n)]
