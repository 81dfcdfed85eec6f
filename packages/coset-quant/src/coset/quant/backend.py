"""Kernel backends: how coset.quant finds native kernels without importing them.

A backend is any object with ``name: str``, ``priority: int`` and these methods (all optional except
``supports``), each with *exactly* the semantics and bit-for-bit results of the PyTorch reference in
:mod:`coset.quant.encode` / :mod:`coset.quant.decode`::

    supports(op: str, tensor: torch.Tensor, lattice, config) -> bool       # op in {"encode","decode","quantize"}
    encode(x, lattice, config, dither) -> (b, T, clamped)                  # x (N, d) any float dtype
    decode(b, T, lattice, config, dither, dtype) -> xhat                   # b (N, M, d) uint8, T (N,) uint8
    quantize(x, lattice, config, dither) -> (xhat, T, clamped)             # xhat in x.dtype

``dither`` is ``None`` or the float64 ``(N, d)`` tensor the reference would use. An optional
``auto_select(op, tensor) -> bool`` lets a backend that *can* run an op decline to be picked by "auto" for
it (e.g. where it measured slower than the PyTorch path); naming it explicitly still uses it. Packages that ship
kernels register themselves through the entry-point group ``coset.backends`` (value: a zero-argument
callable returning the backend object), or by calling :func:`register_backend` directly. coset.quant never
imports them: the dependency points one way only.
"""

from __future__ import annotations

import threading
import warnings
from importlib.metadata import entry_points
from typing import Any, Optional

__all__ = ["register_backend", "unregister_backend", "available_backends", "get_backend", "select_backend"]

ENTRY_POINT_GROUP = "coset.backends"

_registry: dict[str, Any] = {}
_loaded = False
_lock = threading.Lock()


def register_backend(backend: Any) -> None:
    """Register a kernel backend object (see module docstring). Replaces one of the same name."""
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name or name == "torch":
        raise ValueError("backend.name must be a non-empty str other than 'torch'")
    if not callable(getattr(backend, "supports", None)):
        raise TypeError("backend must define supports(op, tensor, lattice, config)")
    _registry[name] = backend


def unregister_backend(name: str) -> None:
    _registry.pop(name, None)


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                backend = obj() if callable(obj) and not hasattr(obj, "supports") else obj
                if backend is not None and backend.name not in _registry:
                    register_backend(backend)
            except Exception as e:  # a broken optional plugin must not break the pure-Python path
                warnings.warn(f"coset: could not load kernel backend {ep.name!r}: {e}", RuntimeWarning)
        _loaded = True


def available_backends() -> list[str]:
    """Names of the usable backends, best first; ``"torch"`` (the reference) is always last."""
    _load_entry_points()
    names = sorted(_registry, key=lambda n: -getattr(_registry[n], "priority", 0))
    return names + ["torch"]


def get_backend(name: str) -> Optional[Any]:
    """The backend object called ``name`` (``None`` for ``"torch"``). Raises ``ValueError`` if unknown."""
    _load_entry_points()
    if name == "torch":
        return None
    if name not in _registry:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")
    return _registry[name]


def _auto_ok(backend: Any, op: str, tensor) -> bool:
    """A backend may run an op yet not be the fastest choice for it (``auto_select(op, tensor) -> bool``)."""
    f = getattr(backend, "auto_select", None)
    return True if f is None else bool(f(op, tensor))


def select_backend(backend: str, op: str, tensor, lattice, config) -> Optional[Any]:
    """Resolve ``backend`` ("auto", "torch" or a registered name) for one call; ``None`` means the reference.

    With "auto" the best registered backend that supports the call is used; with an explicit name the call
    fails with ``ValueError`` if that backend cannot run it.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "torch":
        return None
    if backend == "auto":
        _load_entry_points()
        for name in available_backends()[:-1]:
            b = _registry[name]
            if hasattr(b, op) and b.supports(op, tensor, lattice, config) and _auto_ok(b, op, tensor):
                return b
        return None
    b = get_backend(backend)
    if not hasattr(b, op) or not b.supports(op, tensor, lattice, config):
        raise ValueError(f"backend {backend!r} does not support {op} for this input/config")
    return b
