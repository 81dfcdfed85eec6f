"""coset.lattice: lattices Z^n, D_n, E8 and their batched closest-point quantizers Q_L.

Conway & Sloane, "Fast quantizing and decoding algorithms for lattice quantizers and codes",
IEEE Trans. IT 28(2), 1982; SPLAG ch. 4 and 21.
"""

from .base import Lattice, tie_offset
from .dn import D4Lattice, DnLattice
from .e8 import E8Lattice
from .registry import LATTICE_NAMES, get_lattice
from .zn import Z2Lattice, ZnLattice

__all__ = [
    "Lattice",
    "ZnLattice",
    "Z2Lattice",
    "DnLattice",
    "D4Lattice",
    "E8Lattice",
    "get_lattice",
    "tie_offset",
    "LATTICE_NAMES",
]
__version__ = "0.1.0"
