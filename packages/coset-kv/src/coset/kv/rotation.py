"""Per-KV-head random rotation ``R = H diag(s)``: a normalized Walsh-Hadamard transform after random signs.

Keys and values of one attention head are far from isotropic (a few channels carry most of the energy,
and RoPE pairs them up). ``R`` spreads every vector's energy evenly over all coordinates, so the rotated
coordinates are near-Gaussian and an 8-dim lattice block rarely overloads. ``R`` is orthogonal, hence
``<R q, R k> = <q, k>``: queries are rotated with the same ``R`` and scores need no inverse transform, and an
attention output computed in the rotated domain is rotated back once per query (not once per cached token).
"""

from __future__ import annotations

import math

import torch

__all__ = ["fwht", "HeadRotation"]

#: Entries of the ``(num_heads, D, D)`` rotation matrices a :class:`HeadRotation` may build (float64 while it is
#: made: 512 MB); real layers need far fewer (128 KV heads of dim 512: 2^25).
MAX_MATRIX_ENTRIES = 1 << 26


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform over the last dimension (orthogonal and symmetric).

    Parameters
    ----------
    x : (..., n) float tensor, n a power of two

    Returns
    -------
    (..., n) tensor ``H x`` with ``H = H^T = H^{-1}``
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating torch.Tensor")
    n = x.shape[-1] if x.ndim else 0
    if n < 1 or n & (n - 1):
        raise ValueError(f"the last dimension of x must be a power of two, got {n}")
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


class HeadRotation:
    """One orthogonal ``R_h = H diag(s_h)`` per KV head, random signs ``s_h`` drawn from ``seed``.

    Parameters
    ----------
    num_heads : int >= 1
    head_dim : int, a power of two
    seed : int >= 0

    The matrices are built once (``(num_heads, D, D)`` float32, via :func:`fwht` of the identity) and applied
    with a batched matmul, which is faster than the butterfly for D = 64.
    """

    def __init__(self, num_heads: int, head_dim: int, seed: int = 0):
        for name, v in (("num_heads", num_heads), ("head_dim", head_dim), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim < 1 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two for the Hadamard rotation, got {head_dim}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_heads * head_dim * head_dim > MAX_MATRIX_ENTRIES:
            raise ValueError(
                f"num_heads={num_heads} x head_dim={head_dim}^2 rotation entries exceed {MAX_MATRIX_ENTRIES} (2^26): "
                "not the shape of an attention layer"
            )
        self.num_heads, self.head_dim, self.seed = num_heads, head_dim, seed
        gen = torch.Generator().manual_seed(seed)
        self.signs = (torch.randint(0, 2, (num_heads, head_dim), generator=gen) * 2 - 1).to(torch.float64)
        # R[h] = H diag(s_h): column j of R is H e_j s_j, i.e. (H diag(s))^T rows = fwht(diag(s)) rows
        self.matrix = fwht(torch.diag_embed(self.signs)).transpose(-1, -2).contiguous().to(torch.float32)
        self._cache: dict = {}

    def heads(self, start: int, stop: int) -> HeadRotation:
        """The rotations of heads ``start .. stop-1`` alone: ``signs`` and ``matrix`` rows ``start:stop`` (the same
        values), ``seed`` kept. A store of one KV head (:class:`coset.kv.PerHeadKVStore`) rotates its head with
        ``HeadRotation(H, D, seed).heads(h, h + 1)``, as the layer's joint store does.

        Raises
        ------
        TypeError / ValueError unless ``0 <= start < stop <= num_heads`` are ints.
        """
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= start < stop <= self.num_heads:
            raise ValueError(f"need 0 <= start < stop <= num_heads={self.num_heads}, got {start}, {stop}")
        out = HeadRotation.__new__(HeadRotation)
        out.num_heads, out.head_dim, out.seed = stop - start, self.head_dim, self.seed
        out.signs = self.signs[start:stop].clone()
        out.matrix = self.matrix[start:stop].clone()
        out._cache = {}
        return out

    def _mat(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        m = self._cache.get(key)
        if m is None:
            m = self._cache[key] = self.matrix.to(device=like.device, dtype=like.dtype)
        return m

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError("x must be a floating torch.Tensor")
        if x.ndim < 3 or x.shape[-3] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must have shape (..., num_heads={self.num_heads}, L, head_dim={self.head_dim}), "
                f"got {tuple(x.shape)}"
            )

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``R_h x`` for ``x`` of shape ``(..., num_heads, L, head_dim)``."""
        self._check(x)
        return x @ self._mat(x).transpose(-1, -2)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """``R_h^T y`` (the inverse) for ``y`` of shape ``(..., num_heads, L, head_dim)``."""
        self._check(y)
        return y @ self._mat(y)
