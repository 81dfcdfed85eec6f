"""``QuantizationConfig``: the frozen, validated parameter set of HNLQ.

Parameters (research/paper.md §2, §5):

* ``lattice_type``: "Z2", "D4", "E8" (or "Z<n>", "D<n>"); d is the lattice dimension.
* ``q`` (2..16) and ``M`` (1..4): M layers of base-q labels, rate ``R = M log2 q`` bits per dimension.
* ``beta``: base scale; a vector x is encoded as ``x / (beta 2^(alpha T))`` in lattice units.
* ``alpha``: step of the geometric overload ramp; T = 0, 1, ... is the smallest step with no overload.
* ``max_scaling_iterations``: the cap of T (default 15). A vector still overloaded at ``T = cap`` is handled by
  ``overload_policy``: "clamp" shrinks it radially (in lattice units) into the ball where overload is
  impossible (sandwich bound, paper.md §4) and counts it as *clamped* (with a :class:`ClampWarning`); "error"
  raises :class:`OverloadError`. The default 15 was chosen by measurement: with the paper's alpha = 1/3 and beta
  calibrated on N(0, 1) rows of 384 weights, a weight at 10x / 40x / 100x its row's rms needs T = 8 / 13 / 17
  (D4 q=4 M=2; E8 alike), so 15 covers outliers up to ~60x the rms (real ones sit at ~40x in
  all-MiniLM-L6-v2; the old default 10 clamped them), and T still fits the 4 bits that fixed-width
  serialisers used for the old default (``pack_codes`` stores only the bits the largest T needs).
* ``with_tie_dither``: the fixed tie offset inside Q_L (required for exact decoding with even q and E8).
* ``with_dither`` / ``dither_seed``: random subtractive dither ``z ~ Unif(V)`` regenerated from the seed by
  the decoder, which makes the error uniform and independent of x when there is no overload.
* ``center``: shift the code by the centroid ``c`` of its constellation (:mod:`coset.quant.offset`):
  encode ``x / s + c``, decode ``s (point - c)``. **q = 2 needs ``center=True``**: without it the
  constellation is one-sided (``{0 .. 2^M - 1}`` per coordinate on Z^n) and the SNR on N(0, 1) data is ~2 dB
  instead of ~22 dB (M = 4). It also helps every even q (0.3-0.5 dB at q = 4). Default False (the plain
  Algorithms 1/2 of the paper, which every identity in the tests refers to).
* ``disable_scaling``: ignore ``beta`` (x is already in lattice units). ``disable_overload_protection``: one
  pass with T = 0; overloaded vectors wrap around modulo the code and are only counted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property

from coset.lattice import Lattice, get_lattice
from coset.lattice.validate import check_bool as _check_bool
from coset.lattice.validate import check_int as _check_int
from coset.lattice.validate import check_pos as _check_pos

__all__ = ["QuantizationConfig", "OverloadError", "ClampWarning", "DegenerateConfigWarning", "MAX_T"]

#: T is stored as uint8; keep the cap well inside it.
MAX_T = 64


class OverloadError(ValueError):
    """Raised with ``overload_policy="error"`` when vectors overload even at the largest scale."""


class ClampWarning(UserWarning):
    """Issued (once per call) when vectors overload even at the largest scale and are clamped: data loss."""


class DegenerateConfigWarning(UserWarning):
    """Issued for a valid configuration that is known to quantize badly (e.g. q = 2 without ``center=True``)."""


#: The scale ladder must stay well inside float64: |log2(beta)| and log2(beta) + alpha * cap at most this.
_LOG2_SCALE_LIMIT = 1000.0


@dataclass(frozen=True)
class QuantizationConfig:
    """Frozen HNLQ configuration, validated on construction (``ValueError``/``TypeError`` name the field)."""

    lattice_type: str = "D4"
    q: int = 4
    M: int = 2
    beta: float = 1.0
    alpha: float = 1.0
    max_scaling_iterations: int = 15
    with_tie_dither: bool = True
    with_dither: bool = False
    disable_scaling: bool = False
    disable_overload_protection: bool = False
    overload_policy: str = "clamp"
    dither_seed: int = 0
    center: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lattice_type, str):
            raise TypeError(f"lattice_type must be a str, got {type(self.lattice_type).__name__}")
        try:
            get_lattice(self.lattice_type)
        except ValueError as e:
            raise ValueError(f"lattice_type: {e}") from None
        _check_int("q", self.q, 2, 16)
        _check_int("M", self.M, 1, 4)
        _check_pos("beta", self.beta)
        _check_pos("alpha", self.alpha)
        _check_int("max_scaling_iterations", self.max_scaling_iterations, 0, MAX_T)
        for name in ("with_tie_dither", "with_dither", "disable_scaling", "disable_overload_protection", "center"):
            _check_bool(name, getattr(self, name))
        if self.overload_policy not in ("clamp", "error"):
            raise ValueError(f"overload_policy must be 'clamp' or 'error', got {self.overload_policy!r}")
        _check_int("dither_seed", self.dither_seed, 0, 2**63 - 1)
        lb = math.log2(self.effective_beta)
        if abs(lb) > _LOG2_SCALE_LIMIT:
            raise ValueError(f"beta must lie in [2^-1000, 2^1000] (float64 scale arithmetic), got {self.beta!r}")
        top = lb + self.alpha * self.max_scaling_iterations
        if top > _LOG2_SCALE_LIMIT:
            raise ValueError(
                f"alpha * max_scaling_iterations + log2(beta) = {top:.4g} > 1000: the scale ladder "
                "beta * 2^(alpha * T) would leave the float64 range; lower alpha, max_scaling_iterations or beta"
            )
        if self.q == 2 and not self.center:
            warnings.warn(
                "q=2 without center=True: the constellation is one-sided ({0 .. 2^M - 1} per coordinate on Z^n) "
                "and wastes about half the code on symmetric data (relative error ~0.6 on Gaussian weights); "
                "use center=True",
                DegenerateConfigWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ derived quantities
    @property
    def lattice(self) -> Lattice:
        """The lattice named by ``lattice_type``."""
        return get_lattice(self.lattice_type)

    @property
    def dim(self) -> int:
        """Block length d (the lattice dimension)."""
        return self.lattice.dim

    @property
    def rate(self) -> float:
        """Nominal rate ``M log2 q`` in bits per dimension (labels only, no side information)."""
        return self.M * math.log2(self.q)

    @property
    def bits_per_label(self) -> int:
        """Stored bits per label digit, ``ceil(log2 q)``."""
        return (self.q - 1).bit_length()

    @property
    def effective_beta(self) -> float:
        return 1.0 if self.disable_scaling else float(self.beta)

    @cached_property
    def scales(self) -> tuple[float, ...]:
        """Scale ``beta 2^(alpha t)`` for t = 0..max_scaling_iterations, computed once in float64.

        Kernels receive this table instead of recomputing powers, so all backends divide by the same
        float64 numbers and agree bit for bit.
        """
        b = self.effective_beta
        return tuple(b * 2.0 ** (self.alpha * t) for t in range(self.max_scaling_iterations + 1))

    def replace(self, **changes) -> "QuantizationConfig":
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)
