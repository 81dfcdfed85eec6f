"""Kernel backends: how coset.quant finds native kernels without importing them.

A backend is any object with ``name: str``, ``priority: int``, ``backend_api: int`` (the version of this
protocol it implements; :func:`register_backend` refuses any other than :data:`BACKEND_API`, as jax refuses a
jaxlib of the wrong version) and these methods (all optional except
``supports``), each with *exactly* the semantics and bit-for-bit results of the PyTorch reference in
:mod:`coset.quant.encode` / :mod:`coset.quant.decode`::

    supports(op: str, tensor: torch.Tensor, lattice, config) -> bool       # op in {"encode","decode","quantize"}
    encode(x, lattice, config, dither) -> (b, T, clamped)                  # x (N, d) any float dtype
    decode(b, T, lattice, config, dither, dtype) -> xhat                   # b (N, M, d) uint8, T (N,) uint8
    quantize(x, lattice, config, dither) -> (xhat, T, clamped)             # xhat in x.dtype

Higher packages look up their own ops the same way (``select_backend("auto", op, tensor, lattice, config)``
then ``getattr(backend, op)``): coset.lut's ``lut_one_sided`` / ``lut_two_sided``, and coset.dist's
``bucket_codec`` (``bucket_codec()`` returns the object holding its one-call-per-bucket codec functions).

A backend whose ``decode`` itself raises ``ValueError`` for labels ``>= q`` or ``T > max_scaling_iterations`` (in
its one pass over the labels) sets ``validates_labels = True``; :func:`coset.quant.decode` then skips its own
range pass for uint8 labels and T (a min/max over the labels costs a fifth of a native decode).

``dither`` is ``None`` or the float64 ``(N, d)`` tensor the reference would use. An optional
``auto_select(op, tensor) -> bool`` lets a backend that *can* run an op decline to be picked by "auto" for
it (e.g. where it measured slower than the PyTorch path); naming it explicitly still uses it. Packages that ship
kernels register themselves through the entry-point group ``coset.backends`` (value: a zero-argument
callable returning the backend object), or by calling :func:`register_backend` directly. coset.quant never
imports them: the dependency points one way only.

Native code gets every constant of a call from :func:`kernel_constants` (the generator, its inverse, the tie
offset, the scale table, the clamp radius), so that it reads nothing private of coset.lattice or coset.quant.

Protocol versions: 1 = the methods above with ``(x, lattice, config, dither)`` arguments and
:func:`kernel_constants`.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from coset.lattice import Lattice

from ._core import check_magnitude, clamp_radius, max_abs_input
from .config import QuantizationConfig

__all__ = [
    "BACKEND_API",
    "KernelConstants",
    "kernel_constants",
    "check_magnitude",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "get_backend",
    "select_backend",
    "registry_generation",
]

#: Version of the backend protocol (methods, their arguments, :class:`KernelConstants`).
BACKEND_API = 1


@dataclass(frozen=True, eq=False)
class KernelConstants:
    """Everything a kernel needs for one (lattice, config, dithered) triple; read-only float64 arrays.

    Attributes
    ----------
    d, q, M : block length, modulus, layers
    G, G_inv : (d, d) generator (basis in columns) and its inverse
    eps : (d,) the fixed tie offset added inside Q_L, or None with ``with_tie_dither=False``
    scales : (max_scaling_iterations + 1,) the table ``beta 2^(alpha t)`` every backend divides by
    clamp_radius : radius (lattice units) to which a vector still overloaded at the cap is shrunk
    max_abs_input : the largest ``|x|`` an encoder accepts (``beta 2^900``); larger entries, NaN and Inf are
        refused with :func:`check_magnitude` (ValueError) by every backend
    """

    d: int
    q: int
    M: int
    G: np.ndarray
    G_inv: np.ndarray
    eps: np.ndarray | None
    scales: np.ndarray
    clamp_radius: float
    max_abs_input: float


def _frozen(a) -> np.ndarray:
    a = np.ascontiguousarray(np.array(a, dtype=np.float64))
    a.setflags(write=False)
    return a


@lru_cache(maxsize=256)
def _kernel_constants(lattice: Lattice, config: QuantizationConfig, dithered: bool) -> KernelConstants:
    return KernelConstants(
        d=lattice.dim,
        q=config.q,
        M=config.M,
        G=_frozen(lattice.G.numpy()),
        G_inv=_frozen(lattice.G_inv.numpy()),
        eps=_frozen(lattice.eps.numpy()) if config.with_tie_dither else None,
        scales=_frozen(config.scales),
        clamp_radius=float(clamp_radius(lattice, config, dithered)),  # includes ||c|| when config.center
        max_abs_input=max_abs_input(config),
    )


def kernel_constants(lattice: Lattice, config: QuantizationConfig, dithered: bool) -> KernelConstants:
    """The constants of one call (cached): what the torch reference uses, in the form kernels take.

    Parameters
    ----------
    lattice, config : the code (the lattice must be the one the config names)
    dithered : whether the call passes a ``dither`` tensor (it changes the clamp radius)
    """
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if not isinstance(dithered, bool):
        raise TypeError(f"dithered must be a bool, got {type(dithered).__name__}")
    return _kernel_constants(lattice, config, dithered)


ENTRY_POINT_GROUP = "coset.backends"

_registry: dict[str, Any] = {}
_loaded = False
_lock = threading.Lock()
_generation = 0  # bumped whenever the registry changes (callers may cache a selection per generation)


def registry_generation() -> int:
    """A counter that changes whenever a backend is registered or removed: a cached backend selection made under
    one value stays valid while it is unchanged."""
    _load_entry_points()
    return _generation


def register_backend(backend: Any) -> None:
    """Register a kernel backend object (see module docstring). Replaces one of the same name.

    Raises
    ------
    ValueError for a missing/reserved name or a ``backend_api`` other than :data:`BACKEND_API`; TypeError when
    ``supports`` is missing.
    """
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name or name == "torch":
        raise ValueError("backend.name must be a non-empty str other than 'torch'")
    if not callable(getattr(backend, "supports", None)):
        raise TypeError("backend must define supports(op, tensor, lattice, config)")
    api = getattr(backend, "backend_api", None)
    if api != BACKEND_API:
        raise ValueError(
            f"backend {name!r} implements backend API {api!r}, but this coset.quant needs {BACKEND_API}; "
            "install matching versions"
        )
    global _generation
    _registry[name] = backend
    _generation += 1


def unregister_backend(name: str) -> None:
    global _generation
    _registry.pop(name, None)
    _generation += 1


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
                warnings.warn(f"coset: could not load kernel backend {ep.name!r}: {e}", RuntimeWarning, stacklevel=2)
        _loaded = True


def available_backends() -> list[str]:
    """Names of the usable backends, best first; ``"torch"`` (the reference) is always last."""
    _load_entry_points()
    names = sorted(_registry, key=lambda n: -getattr(_registry[n], "priority", 0))
    return names + ["torch"]


def get_backend(name: str) -> Any | None:
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


def select_backend(backend: str, op: str, tensor, lattice, config, method: str | None = None) -> Any | None:
    """Resolve ``backend`` ("auto", "torch" or a registered name) for one call; ``None`` means the reference.

    With "auto" the best registered backend that supports the call is used; with an explicit name the call
    fails with ``ValueError`` if that backend cannot run it. ``method``: the backend method the op calls, when it
    is not named ``op`` (``"quantize_rows_rms"`` runs ``quantize_rows``).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "torch":
        return None
    m = op if method is None else method
    if backend == "auto":
        _load_entry_points()
        for name in available_backends()[:-1]:
            b = _registry[name]
            if hasattr(b, m) and b.supports(op, tensor, lattice, config) and _auto_ok(b, op, tensor):
                return b
        return None
    b = get_backend(backend)
    if b is None or not hasattr(b, m) or not b.supports(op, tensor, lattice, config):
        raise ValueError(f"backend {backend!r} does not support {op} for this input/config")
    return b
