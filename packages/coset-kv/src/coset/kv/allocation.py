"""Per-layer bit allocation of the KV cache at an exact average rate.

Layers of a model differ by an order of magnitude in how much coding their keys and values costs in
perplexity (SmolLM2-135M, keys 2 / values 1 bits on one layer at a time: from ~0% to +9%), so at a fixed
average rate the bits are better spent where they matter. Model: the log-perplexity excess of layer ``l`` coded
at ``r`` bits per element is ``s_l 4^-(r - r_ref)`` (a code's mean squared error falls 4x per bit), with
``s_l`` measured at the reference rate ``r_ref`` (:func:`coset.kv.hf_cache.layer_sensitivity`); excesses of
different layers add. :func:`allocate_layers` minimises the total over one option per layer subject to the
mean rate being **exactly** the target (dynamic programming over rates in units of 1/16 bit: every HNLQ rate
at D = 64 is such a multiple).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import KVQuantConfig, check_head_dim

__all__ = ["allocate_layers"]

_UNIT = 16  # rates in 1/16 bit: (bytes_k + bytes_v) * 4 / 64 at D = 64
#: Layers :func:`allocate_layers` takes (its choice table is layers x budget units bytes: 512 layers at 8 bits
#: per element are 512 x 65536 = 32 MB); models have at most a few hundred
MAX_LAYERS = 512


def _units(cfg: KVQuantConfig, head_dim: int) -> int:
    r = cfg.bits_per_element(head_dim) * _UNIT
    if abs(r - round(r)) > 1e-9:
        raise ValueError(f"rate {cfg.bits_per_element(head_dim)} of {cfg} is not a multiple of 1/{_UNIT} bit")
    return round(r)


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
    try:
        s = [float(x) for x in sensitivity]
    except (TypeError, ValueError):
        raise ValueError("sensitivity must be a non-empty sequence of finite numbers >= 0") from None
    if not s or not all(math.isfinite(x) and x >= 0 for x in s):
        raise ValueError("sensitivity must be a non-empty sequence of finite numbers >= 0")
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
