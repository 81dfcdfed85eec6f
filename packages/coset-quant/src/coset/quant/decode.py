"""Algorithm 2 (decoder): ``x_hat = s_T * (sum_m q^m (G b_m - q Q(G b_m / q)) - z)`` (paper.md §3).

``z`` is the random dither (or 0) plus, with ``config.center``, the constellation offset ``c``
(:mod:`coset.quant.offset`).
"""

from __future__ import annotations

from typing import Optional

import torch

from coset.lattice import Lattice

from .backend import select_backend
from .config import QuantizationConfig
from .dither import sample_dither
from .encode import resolve
from .offset import effective_dither

__all__ = ["decode", "coset_representative", "decode_lattice_units", "check_labels"]


def coset_representative(b: torch.Tensor, lattice: Lattice, q: int, tie_dither: bool = True) -> torch.Tensor:
    """``a(b) = G b - q Q(G b / q)``, the representative of label ``b`` in ``A_q = L ∩ qV`` (float64)."""
    Gb = lattice.points64(b)
    return Gb - q * lattice.closest_point64(Gb / q, tie_dither)


def decode_lattice_units(b: torch.Tensor, lattice: Lattice, q: int, tie_dither: bool = True) -> torch.Tensor:
    """Algorithm 2 without scaling: ``(..., M, d)`` labels -> ``(..., d)`` float64 lattice point (exact)."""
    M = b.shape[-2]
    out = coset_representative(b[..., 0, :], lattice, q, tie_dither)
    for m in range(1, M):
        out = out + float(q**m) * coset_representative(b[..., m, :], lattice, q, tie_dither)
    return out


def check_labels(b, T, lattice: Lattice, config: QuantizationConfig) -> None:
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype.is_floating_point or b.dtype == torch.bool or b.dtype.is_complex:
        raise TypeError(f"b must be an integer tensor of labels, got dtype {b.dtype}")
    if b.ndim < 2 or b.shape[-1] != lattice.dim or b.shape[-2] != config.M:
        raise ValueError(f"b must have shape (..., M={config.M}, d={lattice.dim}), got {tuple(b.shape)}")
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= config.q):
        raise ValueError(f"labels in b must lie in [0, q={config.q})")
    if T is not None:
        if not isinstance(T, torch.Tensor):
            raise TypeError(f"T must be a torch.Tensor or None, got {type(T).__name__}")
        if T.shape != b.shape[:-2]:
            raise ValueError(f"T must have shape {tuple(b.shape[:-2])}, got {tuple(T.shape)}")
        if T.dtype.is_floating_point:
            raise TypeError(f"T must be an integer tensor, got {T.dtype}")
        if T.numel() and (int(T.min()) < 0 or int(T.max()) > config.max_scaling_iterations):
            raise ValueError(f"T must lie in [0, max_scaling_iterations={config.max_scaling_iterations}]")


def _decode_flat(b, T, lattice, config, z, dtype):
    y = decode_lattice_units(b, lattice, config.q, config.with_tie_dither)
    if z is not None:
        y = y - z
    scales = torch.tensor(config.scales, dtype=torch.float64, device=b.device)
    s = scales[T.long()] if T is not None else scales[0].expand(y.shape[0])
    return (y * s.unsqueeze(-1)).to(dtype)


def decode(
    b: torch.Tensor,
    config: Optional[QuantizationConfig] = None,
    T: Optional[torch.Tensor] = None,
    *,
    lattice: Optional[Lattice] = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode labels (Algorithm 2) and undo the scaling (and dither).

    Parameters
    ----------
    b : (..., M, d) integer labels in [0, q)
    config : as for :func:`coset.quant.encode`
    T : (...) integer scale steps from the encoder; ``None`` means all zero
    lattice : keyword-only, as for :func:`coset.quant.encode`
    dtype : output dtype

    Returns
    -------
    (..., d) tensor of ``dtype``
    """
    lattice, config = resolve(config, lattice)
    check_labels(b, T, lattice, config)
    lead = b.shape[:-2]
    bf = b.reshape(-1, config.M, lattice.dim)
    if bf.dtype != torch.uint8:
        bf = bf.to(torch.uint8)
    N = bf.shape[0]
    Tf = None if T is None else T.reshape(N).to(torch.uint8)
    z = sample_dither(N, lattice, config.dither_seed, b.device) if config.with_dither else None
    z = effective_dither(N, lattice, config, z, b.device)
    be = select_backend(backend, "decode", bf, lattice, config)
    if be is not None:
        if Tf is None:
            Tf = torch.zeros(N, dtype=torch.uint8, device=b.device)
        out = be.decode(bf, Tf, lattice, config, z, dtype)
    else:
        out = _decode_flat(bf, Tf, lattice, config, z, dtype)
    return out.reshape(*lead, lattice.dim)
