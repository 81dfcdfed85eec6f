"""Two-sided randomized Hadamard incoherence processing of a linear layer.

``V = H_n S_v`` (input side), ``U = H_m S_u`` (output side); ``W̃ = U W Vᵀ``, ``H̃ = V H Vᵀ`` so that
``tr(ΔW̃ H̃ ΔW̃ᵀ) = tr(ΔW H ΔWᵀ)`` (both are orthogonal), and ``y = W x = Uᵀ W̃ (V x)``.
The signs of each side of each layer come from their own seed, derived from ``(base seed, layer name,
side)`` by a stable hash (blake2b), never Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib

import torch

from .codes import Rotation

__all__ = [
    "derive_seed",
    "layer_rotations",
    "rotate_weight",
    "unrotate_weight",
    "rotate_hessian",
    "rotate_input",
    "unrotate_output",
]


def derive_seed(base_seed: int, name: str, side: str) -> int:
    """A 63-bit seed from ``(base_seed, name, side)``; stable across processes and platforms."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"base_seed must be a non-negative int, got {base_seed!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    h = hashlib.blake2b(f"{base_seed}\x00{name}\x00{side}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1  # fits int64 for storage


def layer_rotations(m: int, n: int, base_seed: int, name: str) -> tuple[Rotation, Rotation]:
    """``(rot_out, rot_in)`` = (U of order m, V of order n) for the layer ``name``."""
    return Rotation(m, derive_seed(base_seed, name, "out")), Rotation(n, derive_seed(base_seed, name, "in"))


def _check_w(W, rot_out, rot_in):
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError("W must be a 2-D tensor (out_features, in_features)")
    if rot_out is not None and rot_out.n != W.shape[0]:
        raise ValueError(f"rot_out has order {rot_out.n}, W has {W.shape[0]} rows")
    if rot_in is not None and rot_in.n != W.shape[1]:
        raise ValueError(f"rot_in has order {rot_in.n}, W has {W.shape[1]} columns")


def rotate_weight(W: torch.Tensor, rot_out: Rotation | None, rot_in: Rotation | None) -> torch.Tensor:
    """``W̃ = U W Vᵀ``; (m, n) -> (m, n). A side that is None is the identity."""
    _check_w(W, rot_out, rot_in)
    if rot_in is not None:
        W = rot_in.apply(W)  # each row r -> V r, i.e. W Vᵀ
    if rot_out is not None:
        W = rot_out.apply(W.t()).t()  # each column c -> U c
    return W.contiguous()


def unrotate_weight(Wt: torch.Tensor, rot_out: Rotation | None, rot_in: Rotation | None) -> torch.Tensor:
    """``W = Uᵀ W̃ V`` (inverse of :func:`rotate_weight`)."""
    _check_w(Wt, rot_out, rot_in)
    if rot_in is not None:
        Wt = rot_in.inverse(Wt)
    if rot_out is not None:
        Wt = rot_out.inverse(Wt.t()).t()
    return Wt.contiguous()


def rotate_hessian(H: torch.Tensor, rot_in: Rotation | None) -> torch.Tensor:
    """``H̃ = V H Vᵀ`` for symmetric H (n, n), symmetrized against rounding."""
    if not isinstance(H, torch.Tensor) or H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError("H must be a square 2-D tensor")
    if rot_in is None:
        return H
    if rot_in.n != H.shape[0]:
        raise ValueError(f"rot_in has order {rot_in.n}, H is {tuple(H.shape)}")
    X = rot_in.apply(H)  # H Vᵀ (H symmetric: rows of H are its columns)
    X = rot_in.apply(X.t()).t()  # V (H Vᵀ)
    return (0.5 * (X + X.t())).contiguous()


def rotate_input(x: torch.Tensor, rot_in: Rotation | None) -> torch.Tensor:
    """``x ↦ V x`` on the last dim (what the rotated layer consumes)."""
    return x if rot_in is None else rot_in.apply(x)


def unrotate_output(y: torch.Tensor, rot_out: Rotation | None) -> torch.Tensor:
    """``ỹ ↦ Uᵀ ỹ`` on the last dim (back to the original output basis)."""
    return y if rot_out is None else rot_out.inverse(y)
