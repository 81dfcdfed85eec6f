"""View any tensor as blocks of d along its last dimension, with the padding recorded and stripped."""

from __future__ import annotations

import torch

from coset.lattice.validate import check_int

__all__ = ["to_blocks", "from_blocks"]


def to_blocks(x: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """Split the last dim of ``x`` into blocks of ``d``, zero-padding the end.

    Parameters
    ----------
    x : (..., n) tensor
    d : block length

    Returns
    -------
    blocks : (..., ceil(n/d), d) tensor
    pad : int, number of zeros appended (0 <= pad < d); pass it to :func:`from_blocks`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_int("d", d, 1)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    n = x.shape[-1]
    pad = (-n) % d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (n + pad) // d, d), pad


def from_blocks(blocks: torch.Tensor, pad: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``(..., nb, d)`` -> ``(..., nb*d - pad)``."""
    if not isinstance(blocks, torch.Tensor) or blocks.ndim < 2:
        raise ValueError("blocks must be a tensor of shape (..., nb, d)")
    d = blocks.shape[-1]
    check_int("pad", pad, 0, d - 1)
    x = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * d)
    return x[..., : x.shape[-1] - pad] if pad else x
