"""The :class:`Lattice` base class: generator, closest point Q_L, integer coordinates.

Conventions (research/paper.md §1, §7):

* ``L = G Z^d`` with the basis vectors as the **columns** of ``G``; a lattice point is ``G @ z``.
  Over a batch of row vectors this is ``z @ G.T``.
* ``closest_point`` works on the last dimension of any tensor, any leading dims, float16/bf16/float32/float64,
  on any device. It computes in float64 internally and returns the input dtype.
* Tie-breaking. HNLQ needs ``Q(x + l) == Q(x) + l`` for every lattice point ``l``, *including on Voronoi
  boundaries* (paper.md §7.4: points ``G b / q`` sit on boundaries very often for even q). We use
  ``Q(x) := CP(x + eps)`` with one fixed, generic, tiny offset ``eps`` (norm 1e-9, direction built from
  square roots of primes): every exact tie is resolved the same way for every translate, so the partition is
  half-open and L-periodic. Without the offset (``tie_dither=False``) the bare Conway & Sloane rule is used,
  which is deterministic but not translation-consistent at ties.
"""

from __future__ import annotations

import numpy as np
import torch

from .validate import check_float_tensor

__all__ = ["Lattice", "tie_offset"]


def _primes(n: int) -> list[int]:
    out: list[int] = []
    k = 2
    while len(out) < n:
        if all(k % p for p in out if p * p <= k):
            out.append(k)
        k += 1
    return out


def tie_offset(dim: int, scale: float = 1e-9) -> np.ndarray:
    """The fixed generic tie-breaking offset ``eps`` (float64, shape (dim,), norm ``scale``).

    Its direction ``frac(sqrt(p_i)) - 1/2`` over the first primes is irrational, so it is not parallel to any
    facet of a Voronoi cell of Z^n, D_n or E8, and no exact tie survives the shift. 1e-9 is far above the
    float64 spacing of any value HNLQ feeds to Q (|x| <= q^M (1+r) <= 7e4 gives spacing <= 1.5e-11) and far
    below the lattice's packing radius.
    """
    u = np.sqrt(np.array(_primes(dim), dtype=np.float64)) % 1.0 - 0.5
    return scale * u / np.linalg.norm(u)


class Lattice:
    """A full-rank lattice ``L = G Z^d`` with a batched closest-point quantizer.

    Subclasses implement :meth:`_closest_point_raw` (a Conway & Sloane algorithm on float64) and give the
    theoretical normalized second moment ``nsm``.

    Parameters
    ----------
    name : str
        Short name, e.g. ``"D4"``.
    generator : array_like, (d, d)
        Basis vectors as columns.
    """

    name: str
    nsm: float

    def __init__(self, name: str, generator: np.ndarray) -> None:
        g = np.asarray(generator, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"generator must be a square matrix, got shape {g.shape}")
        det = abs(float(np.linalg.det(g)))
        if det < 1e-12:
            raise ValueError("generator must be non-singular")
        self.name = name
        self._volume = det  # read per call by beta_min (QAT re-quantizes every step): no det each time
        self._G = g
        self._G_inv = np.linalg.inv(g)

        self._eps = tie_offset(self.dim)
        self._cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ basic properties
    @property
    def dim(self) -> int:
        """Dimension d."""
        return self._G.shape[0]

    @property
    def G(self) -> torch.Tensor:
        """Generator ``(d, d)`` float64, basis vectors as columns."""
        return torch.from_numpy(self._G.copy())

    @property
    def G_inv(self) -> torch.Tensor:
        """Inverse generator ``(d, d)`` float64."""
        return torch.from_numpy(self._G_inv.copy())

    @property
    def eps(self) -> torch.Tensor:
        """The fixed tie offset ``(d,)`` float64 added inside :meth:`closest_point64` (``tie_dither=True``)."""
        return torch.from_numpy(self._eps.copy())

    @property
    def volume(self) -> float:
        """Volume of the Voronoi cell, ``|det G|``."""
        return self._volume

    @property
    def second_moment(self) -> float:
        """Theoretical sigma^2(L) = E||U||^2 / d for U uniform on the Voronoi cell."""
        return self.nsm * self.volume ** (2.0 / self.dim)

    @property
    def packing_radius(self) -> float:
        """Half the minimal distance: the Voronoi cell contains the ball of this radius."""
        r = self.__dict__.get("_packing_radius")
        if r is None:  # once per lattice: coset-nn's STE reads it every training step (~0.1 ms to recompute)
            r = self._packing_radius = float(np.sqrt(np.min(np.sum(self.minimal_vectors() ** 2, axis=1)))) / 2.0
        return r

    @property
    def covering_radius(self) -> float:
        """Largest distance of a point of space to the lattice."""
        raise NotImplementedError

    def minimal_vectors(self) -> np.ndarray:
        """The Voronoi-relevant vectors (for Z^n, D_n (n >= 3) and E8: the minimal vectors), (k, d)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"

    # ------------------------------------------------------------------ device-cached constants
    def _const(self, what: str, device: torch.device) -> torch.Tensor:
        key = (what, str(device))
        t = self._cache.get(key)
        if t is None:
            src = {"G": self._G, "G_inv": self._G_inv, "eps": self._eps}[what]
            t = torch.as_tensor(src, dtype=torch.float64, device=device)
            self._cache[key] = t
        return t

    # ------------------------------------------------------------------ the quantizer
    def _closest_point_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Conway & Sloane closest point on a float64 tensor ``(..., d)`` with no tie offset."""
        raise NotImplementedError

    def closest_point64(self, x: torch.Tensor, tie_dither: bool = True) -> torch.Tensor:
        """Q_L on a float64 tensor ``(..., d)`` (no checks, no copies beyond the algorithm's).

        This is the primitive that the encoder and decoder call; :meth:`closest_point` adds validation and
        dtype handling around it.
        """
        if tie_dither:
            x = x + self._const("eps", x.device)
        return self._closest_point_raw(x)

    def closest_point(self, x: torch.Tensor, tie_dither: bool = True) -> torch.Tensor:
        """Nearest lattice point ``Q_L(x)`` over the last dimension.

        Parameters
        ----------
        x : (..., d) float tensor
            Any leading dims, any floating dtype, any device.
        tie_dither : bool
            Add the fixed tie offset (see module docstring). Keep it on for HNLQ.

        Returns
        -------
        (..., d) tensor of x's dtype: lattice points.
        """
        self._check_input(x, "x")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf; Q_L is undefined there")
        y = self.closest_point64(x.to(torch.float64), tie_dither=tie_dither)
        return y.to(x.dtype)

    def coords(self, points: torch.Tensor) -> torch.Tensor:
        """Integer coordinates ``z`` with ``points = G z`` (``(..., d)`` -> ``(..., d)`` int64).

        Exact for lattice points: G^{-1} of Z^n, D4 and E8 is dyadic, so the float64 products are exact.
        """
        self._check_input(points, "points")
        p = points.to(torch.float64)
        return self.coords64(p).to(torch.int64)

    def coords64(self, p: torch.Tensor) -> torch.Tensor:
        """Integer coordinates of float64 lattice points, as float64 integers (no checks)."""
        return torch.round(p @ self._const("G_inv", p.device).T)

    def points64(self, z: torch.Tensor) -> torch.Tensor:
        """Lattice points ``G z`` (float64) from integer coordinates ``(..., d)``."""
        return z.to(torch.float64) @ self._const("G", z.device).T

    def _check_input(self, x: torch.Tensor, argname: str) -> None:
        check_float_tensor(argname, x, finite=False)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{argname} must have last dimension {self.dim} for {self.name}, got shape {tuple(x.shape)}"
            )


def _seq_sqnorm(e: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last dim, accumulated left to right (a fixed order the C++ kernels repeat)."""
    s = e[..., 0] * e[..., 0]
    for i in range(1, e.shape[-1]):
        s = s + e[..., i] * e[..., i]
    return s


def _check_dim(n: int, lo: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < lo:
        raise ValueError(f"{what} needs n >= {lo}, got {n}")
    return int(n)
