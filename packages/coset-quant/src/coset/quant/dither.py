"""Random subtractive dither z ~ Unif(V) (paper.md §5.2), reproducible from a seed.

``z = p - Q_L(p)`` with ``p = G u``, ``u ~ Unif[0,1)^d``: the fundamental parallelepiped tiles space, so
reducing it modulo L gives exactly the uniform law on the Voronoi cell. The encoder adds z after scaling and
the decoder, which regenerates the same z from the seed and the number of vectors, subtracts it.
"""

from __future__ import annotations

import torch

from coset.lattice.validate import check_int

from coset.lattice import Lattice

__all__ = ["sample_dither"]


def sample_dither(n: int, lattice: Lattice, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` dither vectors, float64 ``(n, d)``, identical for the same (n, lattice, seed) on any device."""
    check_int("n", n, 0)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand((n, lattice.dim), generator=gen, dtype=torch.float64)
    p = lattice.points64(u)
    z = p - lattice.closest_point64(p)
    return z.to(device)
