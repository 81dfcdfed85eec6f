"""Argument checks shared by every coset package (lowest layer, reused upward), with one message style.

Every check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value of the right kind
outside its range, with the message ``"<name> must be <what>, got <value>"``. ``bool`` is never accepted as an
int (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "FLOAT_DTYPES",
    "check_int",
    "check_pos",
    "check_bool",
    "check_q",
    "check_float_tensor",
    "check_int_tensor",
]

#: Floating dtypes accepted for data tensors.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``v`` as an int in ``[lo, hi]`` (either bound may be None)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if lo is None:
            raise ValueError(f"{name} must be an int <= {hi}, got {v!r}")
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return int(v)


def check_pos(name: str, v) -> float:
    """``v`` as a finite float > 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def check_q(q, hi: int = 256, name: str = "q") -> int:
    """A code modulus ``q`` in ``[2, hi]`` (16 for the codes, 256 for byte labels, 2^16 for flat codes)."""
    return check_int(name, q, 2, hi)


def check_float_tensor(name: str, x, d: Optional[int] = None, finite: bool = True) -> torch.Tensor:
    """A floating tensor ``(..., d)`` (any ``d`` when None), with finite entries when ``finite``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if d is not None and (x.ndim == 0 or x.shape[-1] != d):
        raise ValueError(f"{name} must have last dimension d={d}, got shape {tuple(x.shape)}")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def check_int_tensor(name: str, t) -> torch.Tensor:
    """An integer (not bool, not floating, not complex) tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t
