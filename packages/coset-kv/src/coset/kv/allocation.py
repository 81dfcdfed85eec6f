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

from .config import KVQuantConfig

__all__ = ["allocate_layers"]

_UNIT = 16  # rates in 1/16 bit: (bytes_k + bytes_v) * 4 / 64 at D = 64


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
    ValueError for an empty or negative/non-finite sensitivity, no options, or a target no mix of the options
    reaches exactly.
    """
    s = [float(x) for x in sensitivity]
    if not s or not all(math.isfinite(x) and x >= 0 for x in s):
        raise ValueError("sensitivity must be a non-empty sequence of finite numbers >= 0")
    opts = list(options)
    if not opts or not all(isinstance(o, KVQuantConfig) for o in opts):
        raise ValueError("options must be a non-empty sequence of KVQuantConfig")
    for name, v in (("target_bits", target_bits), ("reference_bits", reference_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    n = len(s)
    units = [_units(o, head_dim) for o in opts]
    total = target_bits * _UNIT * n
    if abs(total - round(total)) > 1e-6:
        raise ValueError(f"target_bits * {n} layers is not a multiple of 1/{_UNIT} bit")
    budget = round(total)
    lo, hi = min(units), max(units)
    if not n * lo <= budget <= n * hi:
        raise ValueError(f"target_bits={target_bits} is outside the options' range [{lo / _UNIT}, {hi / _UNIT}]")
    # best[b] = (cost, choices) over the layers so far using exactly b units
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for sl in s:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for b, (c, ch) in best.items():
            for j, u in enumerate(units):
                nb = b + u
                if nb > budget:
                    continue
                cost = c + sl * 4.0 ** (-(u / _UNIT - reference_bits))
                if nb not in nxt or cost < nxt[nb][0]:
                    nxt[nb] = (cost, ch + [j])
        best = nxt
    if budget not in best:
        raise ValueError(f"no mix of the options' rates {sorted({u / _UNIT for u in units})} averages {target_bits}")
    return [opts[j] for j in best[budget][1]]
