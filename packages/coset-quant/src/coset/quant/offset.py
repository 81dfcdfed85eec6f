"""Centring offset of the HNLQ constellation (``QuantizationConfig.center``).

With the fixed tie offset the Voronoi cell V is half-open, so ``A_q = L ∩ qV`` is lopsided whenever points
of ``L/q`` lie on the boundary of V (always for even q; for D_n and E8 also for odd q): it holds only one of
``+-v`` for such v. The constellation ``C = sum_m q^m A_q`` (M layers) is then not centred at 0; for q = 2 on
Z^n it is ``{0 .. 2^M - 1}`` (up to sign) per coordinate, which wastes about half the code on symmetric data.

``center=True`` shifts the code by ``c = constellation_offset(lattice, q, M)``, the centroid of C with
uniform labels: a vector is encoded as ``g = x / s_t + c (+ z)`` and decoded as
``x_hat = s_T (point - c - z)``, so the reconstructions ``C - c`` are centred at 0. This is exactly the
backend's ``dither`` argument with ``dither = z + c`` (:func:`effective_dither`), so every backend supports it.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from coset.lattice import Lattice

from .config import QuantizationConfig

__all__ = ["constellation_offset", "effective_dither", "ENUMERATE_LIMIT", "SAMPLE_LABELS", "SAMPLE_SEED"]

#: A_q is enumerated exactly when q^d is at most this many labels.
ENUMERATE_LIMIT = 2**20
#: Otherwise the mean of A_q is estimated from this many uniform labels drawn with ``SAMPLE_SEED``.
SAMPLE_LABELS = 2**18
SAMPLE_SEED = 0x5EED_C0DE
#: Estimates are rounded to this grid so that they do not depend on the summation order of a platform.
_ROUND = 2.0**-20

_lock = threading.Lock()
_cache: dict[tuple, torch.Tensor] = {}


def _mean_representative(lattice: Lattice, q: int, tie_dither: bool) -> torch.Tensor:
    from .decode import coset_representative

    d = lattice.dim
    if q**d <= ENUMERATE_LIMIT:
        idx = torch.arange(q**d, dtype=torch.int64)
        labels = torch.stack([(idx // q**i) % q for i in range(d)], dim=-1)
        a = coset_representative(labels, lattice, q, tie_dither)
        return a.sum(0) / float(q**d)  # the representatives are integers or halves: the sum is exact
    gen = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
    labels = torch.randint(0, q, (SAMPLE_LABELS, d), generator=gen, dtype=torch.int64)
    a = coset_representative(labels, lattice, q, tie_dither)
    return torch.round(a.sum(0) / float(SAMPLE_LABELS) / _ROUND) * _ROUND


def constellation_offset(lattice: Lattice, q: int, M: int, tie_dither: bool = True) -> torch.Tensor:
    """Centroid of the HNLQ constellation ``sum_m q^m A_q`` with uniform labels, in lattice units.

    ``c = mean(A_q) (q^M - 1) / (q - 1)``. ``A_q`` is enumerated exactly when ``q^d <= 2^20``
    (:data:`ENUMERATE_LIMIT`); otherwise ``mean(A_q)`` is *estimated* from a fixed-seed sample of ``2^18``
    uniform labels (:data:`SAMPLE_LABELS`, :data:`SAMPLE_SEED`), rounded to a multiple of ``2^-20``. The
    estimate is deterministic, and any fixed vector is a correct offset as long as the encoder and the decoder
    use the same one (they both call this function); only how well the code is centred depends on it.

    Parameters
    ----------
    lattice : Lattice
    q : int in [2, 256]
    M : int >= 1, number of layers
    tie_dither : the tie rule of the codes (``config.with_tie_dither``); it changes ``A_q``

    Returns
    -------
    (d,) float64 tensor on the CPU (cached per lattice, q, M and tie rule; do not modify it in place)
    """
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q <= 256:
        raise ValueError(f"q must be an int in [2, 256], got {q!r}")
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be a positive int, got {M!r}")
    if not isinstance(tie_dither, bool):
        raise TypeError(f"tie_dither must be a bool, got {type(tie_dither).__name__}")
    key = (type(lattice).__name__, lattice.name, lattice.G.numpy().tobytes(), q, M, tie_dither)
    with _lock:
        c = _cache.get(key)
    if c is None:
        c = _mean_representative(lattice, q, tie_dither) * ((q**M - 1) / (q - 1))
        with _lock:
            c = _cache.setdefault(key, c)
    return c


def effective_dither(
    n: int, lattice: Lattice, config: QuantizationConfig, z: Optional[torch.Tensor], device
) -> Optional[torch.Tensor]:
    """The ``dither`` a backend receives: ``z`` (random dither or None) plus the centring offset if any.

    Returns
    -------
    None (no dither, no centring) or a contiguous float64 ``(n, d)`` tensor on ``device``:
    ``z + c`` with ``center=True``, else ``z``.
    """
    if not config.center:
        return z
    c = constellation_offset(lattice, config.q, config.M, config.with_tie_dither).to(device)
    if z is None:
        return c.expand(n, lattice.dim).contiguous()
    return (z + c).contiguous()
