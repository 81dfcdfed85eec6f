"""``get_lattice(name)``: one shared instance per lattice name ("Z2", "Zn" forms like "Z8", "D4", "D8", "E8")."""

from __future__ import annotations

import re
from functools import cache

from .base import Lattice
from .dn import D4Lattice, DnLattice
from .e8 import E8Lattice
from .zn import Z2Lattice, ZnLattice

__all__ = ["get_lattice", "LATTICE_NAMES"]

#: The lattices HNLQ is usually run with.
LATTICE_NAMES = ("Z2", "D4", "E8")


@cache
def _make(name: str) -> Lattice:
    if name == "Z2":
        return Z2Lattice()
    if name == "D4":
        return D4Lattice()
    if name == "E8":
        return E8Lattice()
    m = re.fullmatch(r"([ZD])(\d+)", name)
    if m:
        n = int(m.group(2))
        return ZnLattice(n) if m.group(1) == "Z" else DnLattice(n)
    raise ValueError(f"unknown lattice {name!r}; expected 'Z2', 'D4', 'E8', 'Z<n>' or 'D<n>' (n >= 3)")


def get_lattice(name: str) -> Lattice:
    """Return the lattice called ``name`` (case-insensitive), e.g. ``get_lattice("D4")``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return _make(name.strip().upper())
