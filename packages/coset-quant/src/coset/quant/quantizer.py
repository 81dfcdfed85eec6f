"""``Quantizer``: a lattice + config pair with encode/decode/quantize and running statistics for logging."""

from __future__ import annotations

from typing import Optional

import torch

from coset.lattice import Lattice

from .config import QuantizationConfig
from .decode import decode
from ._core import resolve
from .encode import encode
from .quantize import quantize

__all__ = ["Quantizer"]


class Quantizer:
    """HNLQ quantizer bound to one configuration.

    Keeps running counts over every call: vectors seen, vectors that needed T > 0 and were encoded without
    loss of range (overload at beta, resolved by the ramp), vectors clamped past the cap (counted separately:
    a clamp loses data), and the mean of T. ``stats()`` returns them as a dict.
    """

    def __init__(
        self, config: Optional[QuantizationConfig] = None, *, lattice: Optional[Lattice] = None, backend: str = "auto"
    ) -> None:
        self.lattice, self.config = resolve(config, lattice)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend
        self.reset_stats()

    @property
    def dim(self) -> int:
        return self.lattice.dim

    def reset_stats(self) -> None:
        self._n = 0
        self._n_overload = 0
        self._n_clamped = 0
        self._sum_T = 0

    def _record(self, T: torch.Tensor, clamped: torch.Tensor) -> None:
        self._n += T.numel()
        self._n_overload += int(((T > 0) & ~clamped).sum())
        self._n_clamped += int(clamped.sum())
        self._sum_T += int(T.sum(dtype=torch.int64))

    def stats(self) -> dict:
        """Counts since the last reset.

        Returns
        -------
        dict: ``vectors``; ``overload_rate`` (share with T > 0 that the ramp resolved, clamped ones excluded);
        ``clamped`` (count) and ``clamp_rate`` (share clamped past the cap); ``mean_T``.
        """
        n = max(self._n, 1)
        return {
            "vectors": self._n,
            "overload_rate": self._n_overload / n,
            "clamped": self._n_clamped,
            "clamp_rate": self._n_clamped / n,
            "mean_T": self._sum_T / n,
        }

    def encode(self, x: torch.Tensor):
        """``(..., d)`` -> ``(b (..., M, d) uint8, T (...) uint8)``."""
        b, T, clamped = encode(x, self.config, lattice=self.lattice, backend=self.backend, return_clamped=True)
        self._record(T, clamped)
        return b, T

    def decode(self, b: torch.Tensor, T: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32):
        """``(..., M, d)`` labels (+ T) -> ``(..., d)``."""
        return decode(b, self.config, T, lattice=self.lattice, dtype=dtype, backend=self.backend)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> reconstruction of the same shape and dtype."""
        xh, T, clamped = quantize(x, self.config, lattice=self.lattice, backend=self.backend, return_info=True)
        self._record(T, clamped)
        return xh

    def __repr__(self) -> str:
        return f"Quantizer({self.config!r})"
