"""Containers of a quantized linear layer's code: the rotation and the HNLQ labels (``LinearCodes``).

Conventions (PTQ_PLAN.md): W is (m, n) = (out_features, in_features). ``V = H_n S_v`` acts on the input
side, ``U = H_m S_u`` on the output side, ``W̃ = U W Vᵀ``. The HNLQ code lives on W̃ in blocks of d along
the input dimension: ``W̃ ≈ scale[..., None, None] * decode(labels, T)`` reshaped to (m, n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coset.quant import QuantizationConfig, decode

from .hadamard import hadamard_factors, hadamard_transform

__all__ = ["Rotation", "LinearCodes", "rotation_signs"]


def rotation_signs(n: int, seed: int, device=None) -> torch.Tensor:
    """The ±1 float32 sign vector ``diag(S)`` of length n drawn from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1
    return s.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class Rotation:
    """Randomized orthonormal Hadamard ``R = H_n S`` (S = diag of seeded random signs).

    Parameters
    ----------
    n : order (must be supported by :func:`coset.ptq.hadamard.hadamard_factors`)
    seed : int in [0, 2^64), the only thing stored
    """

    n: int
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2^64), got {self.seed!r}")
        hadamard_factors(self.n)  # ValueError for unsupported orders

    def signs(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``diag(S)``, shape (n,)."""
        return rotation_signs(self.n, self.seed, device).to(dtype)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError("x must be a floating torch.Tensor")
        if x.ndim == 0 or x.shape[-1] != self.n:
            raise ValueError(f"x must have last dimension n={self.n}, got shape {tuple(x.shape)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x ↦ H_n S x`` along the last dim; (..., n) -> (..., n)."""
        self._check(x)
        return hadamard_transform(x * self.signs(x.dtype, x.device))

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x ↦ S H_nᵀ x`` (exact inverse of :meth:`apply`); (..., n) -> (..., n)."""
        self._check(x)
        return hadamard_transform(x, transpose=True) * self.signs(x.dtype, x.device)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """Dense (n, n) matrix R with ``apply(x) == R @ x`` (tests only)."""
        return self.apply(torch.eye(self.n, dtype=dtype)).t().contiguous()


@dataclass
class LinearCodes:
    """HNLQ code of one linear layer in the rotated basis.

    Attributes
    ----------
    code : QuantizationConfig with beta = 1 (the scale lives in ``scale``)
    labels : (m, n/d, M, d) uint8
    T : (m, n/d) integer overload steps
    scale : () or (m,) float32 — per layer or per row (rows of W̃)
    rot_in, rot_out : Rotation of order n (V) and m (U), or None (identity)
    in_features, out_features : n, m
    """

    code: QuantizationConfig
    labels: torch.Tensor
    T: torch.Tensor
    scale: torch.Tensor
    rot_in: Rotation | None
    rot_out: Rotation | None
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if not isinstance(self.code, QuantizationConfig):
            raise TypeError(f"code must be a QuantizationConfig, got {type(self.code).__name__}")
        m, n = self.out_features, self.in_features
        d, M = self.code.dim, self.code.M
        if n % d:
            raise ValueError(f"in_features={n} is not a multiple of the lattice dimension d={d}")
        if tuple(self.labels.shape) != (m, n // d, M, d):
            raise ValueError(f"labels must have shape {(m, n // d, M, d)}, got {tuple(self.labels.shape)}")
        if tuple(self.T.shape) != (m, n // d):
            raise ValueError(f"T must have shape {(m, n // d)}, got {tuple(self.T.shape)}")
        if tuple(self.scale.shape) not in ((), (m,)):
            raise ValueError(f"scale must have shape () or ({m},), got {tuple(self.scale.shape)}")
        if self.rot_in is not None and self.rot_in.n != n:
            raise ValueError(f"rot_in.n={self.rot_in.n} != in_features={n}")
        if self.rot_out is not None and self.rot_out.n != m:
            raise ValueError(f"rot_out.n={self.rot_out.n} != out_features={m}")

    def rotated(self, dtype=torch.float32) -> torch.Tensor:
        """Decoded ``Ŵ̃`` in the rotated basis, (m, n)."""
        m, n = self.out_features, self.in_features
        x = decode(self.labels, config=self.code, T=self.T, dtype=torch.float64)  # (m, n/d, d)
        s = self.scale.to(torch.float64)
        x = x * (s if s.ndim == 0 else s[:, None, None])
        return x.reshape(m, n).to(dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """``Ŵ = Uᵀ Ŵ̃ V`` in the original basis, (m, n)."""
        w = self.rotated(torch.float64)
        if self.rot_in is not None:
            w = self.rot_in.inverse(w)  # rows: Vᵀ r
        if self.rot_out is not None:
            w = self.rot_out.inverse(w.t()).t()  # columns: Uᵀ c
        return w.to(dtype).contiguous()
