"""Inner-product lookup tables over the coset representatives ``A_q`` (paper.md §6).

``a(b) = G b - q Q_L(G b / q)`` is the representative of label ``b``. The two-sided table holds
``<a_i, a_j>`` for all pairs of labels (``q^d x q^d``); the one-sided table holds ``<a_i, y>`` for one
unquantized d-vector ``y`` (``q^d`` entries), built once per query and reused across all encoded rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property

import torch

from coset.lattice import Lattice
from coset.lattice.validate import check_float_tensor, check_int, check_q
from coset.quant import coset_representative

from .index import index_labels

__all__ = ["TwoSidedLUT", "build_two_sided_lut", "build_one_sided_lut", "representative_table", "DEFAULT_MAX_ENTRIES"]

#: Default budget of :func:`build_two_sided_lut`: 2^24 entries (D4 q<=8, E8 q=2, Z2 q<=16 fit; E8 q=4 does not).
DEFAULT_MAX_ENTRIES = 2**24

_lock = threading.Lock()
_rep_cache: dict[tuple, torch.Tensor] = {}
_lut_cache: dict[tuple, "TwoSidedLUT"] = {}


def _check_lattice_q(lattice, q) -> None:
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    check_q(q, 256)


def _key(lattice: Lattice, q: int, tie_dither: bool) -> tuple:
    # The generator bytes make the key safe for user lattices that reuse a name.
    return (type(lattice).__name__, lattice.name, lattice.G.numpy().tobytes(), q, bool(tie_dither))


def representative_table(lattice: Lattice, q: int, tie_dither: bool = True) -> torch.Tensor:
    """All coset representatives ``a_i = a(index_labels(i))`` in index order (cached, read-only).

    Parameters
    ----------
    lattice : Lattice
    q : int
    tie_dither : must match ``config.with_tie_dither`` of the codes it is used with

    Returns
    -------
    (q**d, d) float64 tensor (lattice points, exactly representable: integers or halves)
    """
    _check_lattice_q(lattice, q)
    d = lattice.dim
    if q**d > 2**26:
        raise ValueError(f"q**d = {q}**{d} = {q**d} representatives is too many to tabulate (limit 2**26)")
    key = _key(lattice, q, tie_dither)
    with _lock:
        t = _rep_cache.get(key)
        if t is None:
            labels = index_labels(torch.arange(q**d), q, d)
            t = coset_representative(labels, lattice, q, tie_dither)
            _rep_cache[key] = t
    return t


def _smallest_int_dtype(lo: int, hi: int) -> torch.dtype:
    for dt in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return torch.int64


@dataclass(frozen=True, eq=False)
class TwoSidedLUT:
    """The ``(q^d, q^d)`` table ``table[i, j] = <a_i, a_j>`` of one (lattice, q).

    ``table`` is an exact integer tensor in the smallest dtype that holds it (D4 q=4: int8, range [-9, 16]),
    or float64 for a non-integral lattice. Shared through a cache: do not modify it in place.
    """

    table: torch.Tensor
    lattice_name: str
    q: int
    dim: int
    tie_dither: bool

    @property
    def num_entries(self) -> int:
        return self.table.numel()

    @property
    def nbytes(self) -> int:
        """Memory of the stored table in bytes."""
        return self.table.numel() * self.table.element_size()

    @property
    def min(self) -> int | float:
        return self.table.min().item()

    @property
    def max(self) -> int | float:
        return self.table.max().item()

    @cached_property
    def table_f32(self) -> torch.Tensor:
        """float32 copy for the PyTorch gather path (exact: entries are small integers)."""
        return self.table.to(torch.float32)

    def __repr__(self) -> str:
        return (
            f"TwoSidedLUT(lattice={self.lattice_name}, q={self.q}, shape={tuple(self.table.shape)}, "
            f"dtype={self.table.dtype}, range=[{self.min}, {self.max}], nbytes={self.nbytes})"
        )


def build_two_sided_lut(
    lattice: Lattice, q: int, max_entries: int = DEFAULT_MAX_ENTRIES, tie_dither: bool = True
) -> TwoSidedLUT:
    """The two-sided inner-product table ``<a_i, a_j>`` over ``A_q x A_q`` (cached per lattice and q).

    Parameters
    ----------
    lattice : Lattice
    q : int
    max_entries : int
        Budget on ``q**(2d)``; a larger table raises ``ValueError`` before anything is allocated.
    tie_dither : must match ``config.with_tie_dither`` of the codes

    Returns
    -------
    TwoSidedLUT with ``.table`` of shape ``(q**d, q**d)``
    """
    _check_lattice_q(lattice, q)
    check_int("max_entries", max_entries, 1)
    Q = q**lattice.dim
    n = Q * Q
    if n > max_entries:
        raise ValueError(
            f"two-sided LUT for {lattice.name} with q={q} has (q^d)^2 = {Q}^2 = {n} entries "
            f"(>= {n:.3g} bytes even as int8), over max_entries={max_entries}; use the one-sided path "
            f"or a smaller q"
        )
    key = _key(lattice, q, tie_dither)
    with _lock:
        hit = _lut_cache.get(key)
    if hit is not None:
        return hit
    a = representative_table(lattice, q, tie_dither)
    g = a @ a.T
    r = torch.round(g)
    if bool((g - r).abs().max() <= 1e-9):  # integral lattice (Z^n, D_n, E8): store exactly as integers
        lo, hi = int(r.min()), int(r.max())
        table = r.to(_smallest_int_dtype(lo, hi))
    else:
        table = g
    lut = TwoSidedLUT(table=table, lattice_name=lattice.name, q=q, dim=lattice.dim, tie_dither=bool(tie_dither))
    with _lock:
        return _lut_cache.setdefault(key, lut)


def build_one_sided_lut(y: torch.Tensor, lattice: Lattice, q: int, tie_dither: bool = True) -> torch.Tensor:
    """One-sided tables ``T[..., i] = <a_i, y>`` for unquantized d-vectors ``y``.

    Parameters
    ----------
    y : (..., d) float tensor, finite
    lattice, q, tie_dither : as for :func:`build_two_sided_lut`

    Returns
    -------
    (..., q**d) tensor, float64 for float64 ``y``, else float32
    """
    _check_lattice_q(lattice, q)
    check_float_tensor("y", y, lattice.dim)
    dt = torch.float64 if y.dtype == torch.float64 else torch.float32
    a = representative_table(lattice, q, tie_dither).to(device=y.device, dtype=dt)
    return y.to(dt) @ a.T
