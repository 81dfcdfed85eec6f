"""Algorithm 1 (hierarchical encoder) with the geometric overload ramp (paper.md §2, §5.1).

For one vector in lattice units ``g``: ``lambda_0 = Q(g)``, ``lambda_{m+1} = Q(lambda_m / q)``,
``b_m = G^{-1} lambda_m mod q``; overload iff ``Q(lambda_{M-1} / q) != 0``. The vector is scaled by
``1 / (beta 2^(alpha T))`` with the smallest T that does not overload. Everything runs in float64 on the
whole batch; only the vectors still overloaded are re-encoded at the next step. With ``config.center`` the
scaled vector is shifted by the constellation offset c before quantization (``g = x / s + c + z``,
:mod:`coset.quant.offset`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from coset.lattice import Lattice

from .backend import select_backend
from .config import OverloadError, QuantizationConfig
from .dither import sample_dither
from .offset import constellation_offset, effective_dither

__all__ = ["encode", "encode_layers", "check_vectors", "resolve", "clamp_radius"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve(config: Optional[QuantizationConfig], lattice: Optional[Lattice] = None) -> tuple[Lattice, QuantizationConfig]:
    """Fill in defaults: ``config`` defaults to ``QuantizationConfig()``, ``lattice`` to ``config.lattice``.

    A ``lattice`` passed explicitly must be the one ``config.lattice_type`` names (compared by name,
    case-insensitively); otherwise ``ValueError``: the labels would be decoded with another lattice.
    """
    if config is None:
        config = QuantizationConfig()
    elif not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if lattice is None:
        return config.lattice, config
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    if lattice.name.strip().upper() != config.lattice_type.strip().upper():
        raise ValueError(
            f"lattice {lattice.name!r} disagrees with config.lattice_type={config.lattice_type!r}; "
            "pass lattice=None (the config names the lattice) or a matching one"
        )
    return lattice, config


def check_vectors(x, d: int, argname: str = "x") -> None:
    """Validate a float tensor ``(..., d)`` with finite entries (clear ``TypeError``/``ValueError``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{argname} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != d:
        raise ValueError(
            f"{argname} must have last dimension d={d} (use coset.quant.to_blocks for other lengths), "
            f"got shape {tuple(x.shape)}"
        )
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{argname} contains NaN or Inf; HNLQ cannot encode non-finite values")


def encode_layers(g: torch.Tensor, lattice: Lattice, q: int, M: int, tie_dither: bool = True):
    """Algorithm 1 on float64 lattice-unit vectors ``(N, d)``.

    Returns
    -------
    b : (N, M, d) uint8 labels, b[:, 0] the finest layer
    top : (N, d) float64, ``Q(lambda_{M-1}/q)``; the vector overloads iff ``top != 0``.
    """
    labels = []
    for _ in range(M):
        lam = lattice.closest_point64(g, tie_dither)
        labels.append(torch.remainder(lattice.coords64(lam), q))
        g = lam / q
    top = lattice.closest_point64(g, tie_dither)
    return torch.stack(labels, dim=-2).to(torch.uint8), top


def _safe_radius(lattice: Lattice, q: int, M: int, dithered: bool, offset_norm: float = 0.0) -> float:
    """Radius (lattice units) below which a vector cannot overload.

    Sandwich bound (paper.md §4): ``||lambda||_V <= q^M (1 - r)`` implies no overload, with
    ``r = (1 - q^(1-M)) / (q - 1)``. ``||.||_V <= ||.||_2 / rho`` (packing radius rho) and
    ``||Q(x)|| <= ||x|| + R_cov``; a random dither adds at most another R_cov and a centring offset ``c``
    (``config.center``) at most ``offset_norm = ||c||``. 1% margin for rounding.
    """
    r = (1.0 - q ** (1.0 - M)) / (q - 1.0)
    rad = (
        lattice.packing_radius * q**M * (1.0 - r)
        - lattice.covering_radius * (2.0 if dithered else 1.0)
        - float(offset_norm)
    )
    return 0.99 * rad


def clamp_radius(lattice: Lattice, config: QuantizationConfig, dithered: bool) -> float:
    """The clamp radius of the encoder (and of every backend) for one call.

    Parameters
    ----------
    lattice, config : the code
    dithered : whether a ``dither`` tensor is passed to the encoder. With ``config.center`` the dither
        tensor always holds the offset ``c``; it then contains a random part iff ``config.with_dither``.

    Returns
    -------
    float, ``_safe_radius(lattice, q, M, random_dither, ||c||)`` (``||c|| = 0`` without centring)
    """
    if not config.center:
        return _safe_radius(lattice, config.q, config.M, dithered)
    c = constellation_offset(lattice, config.q, config.M, config.with_tie_dither)
    return _safe_radius(lattice, config.q, config.M, config.with_dither, math.sqrt(float((c * c).sum())))


def _seq_norm(u: torch.Tensor) -> torch.Tensor:
    s = u[..., 0] * u[..., 0]
    for i in range(1, u.shape[-1]):
        s = s + u[..., i] * u[..., i]
    return torch.sqrt(s)


def _encode_flat(x64: torch.Tensor, lattice: Lattice, config: QuantizationConfig, z: Optional[torch.Tensor]):
    """Reference encoder on float64 ``(N, d)``: returns ``(b, T, clamped)``."""
    N, d = x64.shape
    q, M = config.q, config.M
    dev = x64.device
    b = torch.zeros((N, M, d), dtype=torch.uint8, device=dev)
    T = torch.zeros(N, dtype=torch.uint8, device=dev)
    clamped = torch.zeros(N, dtype=torch.bool, device=dev)
    scales = config.scales
    steps = 1 if config.disable_overload_protection else len(scales)
    idx = torch.arange(N, device=dev)
    for t in range(steps):
        xs = x64.index_select(0, idx) if t else x64
        u = xs / scales[t]
        g = u + z.index_select(0, idx) if z is not None else u
        bt, top = encode_layers(g, lattice, q, M, config.with_tie_dither)
        ovl = (top != 0).any(dim=-1)
        if config.disable_overload_protection:
            b = bt
            break
        ok = ~ovl
        b[idx[ok]] = bt[ok]
        T[idx[ok]] = t
        idx = idx[ovl]
        if idx.numel() == 0:
            break
        if t == steps - 1:
            # still overloaded at the largest scale
            if config.overload_policy == "error":
                raise OverloadError(
                    f"{idx.numel()} of {N} vectors overload even at scale beta*2^(alpha*{t}) = {scales[t]:.4g}; "
                    "raise beta, alpha or max_scaling_iterations, or use overload_policy='clamp'"
                )
            ub = u[ovl]
            zb = z.index_select(0, idx) if z is not None else None
            rad = clamp_radius(lattice, config, z is not None)
            if rad > 0:
                nrm = _seq_norm(ub)
                factor = torch.clamp(rad / nrm, max=1.0)
                ub = ub * factor.unsqueeze(-1)
            else:
                ub = torch.zeros_like(ub)
            g = ub + zb if zb is not None else ub
            bt, top = encode_layers(g, lattice, q, M, config.with_tie_dither)
            still = (top != 0).any(dim=-1)
            if bool(still.any()):  # cannot happen by the sandwich bound; encode those as the origin
                g0 = torch.zeros_like(ub[still]) if zb is None else zb[still]
                b0, top0 = encode_layers(g0, lattice, q, M, config.with_tie_dither)
                bt[still] = b0
            b[idx] = bt
            T[idx] = t
            clamped[idx] = True
    return b, T, clamped


def prepare_vectors(x: torch.Tensor, config: Optional[QuantizationConfig], lattice: Optional[Lattice]):
    """Shared prologue of encode/quantize: defaults, input checks, flattening to ``(N, d)`` and the dither
    the backends receive (random dither and/or the centring offset, float64 ``(N, d)``, or ``None``)."""
    lattice, config = resolve(config, lattice)
    check_vectors(x, lattice.dim)
    xf = x.reshape(-1, lattice.dim)
    N = xf.shape[0]
    z = sample_dither(N, lattice, config.dither_seed, x.device) if config.with_dither else None
    return lattice, config, xf, effective_dither(N, lattice, config, z, x.device)


def encode(
    x: torch.Tensor,
    config: Optional[QuantizationConfig] = None,
    *,
    lattice: Optional[Lattice] = None,
    backend: str = "auto",
    return_clamped: bool = False,
):
    """Encode the last dimension of ``x`` with HNLQ (Algorithm 1 + overload ramp).

    Parameters
    ----------
    x : (..., d) float tensor, finite
    config : QuantizationConfig, optional (default ``QuantizationConfig()``)
    lattice : Lattice, optional, keyword-only (default ``config.lattice``); must match ``config.lattice_type``
    backend : "auto" (native kernels when registered), "torch" (reference) or a backend name
    return_clamped : also return the mask of vectors clamped past the scaling cap

    Returns
    -------
    b : (..., M, d) uint8, labels in [0, q); ``b[..., 0, :]`` is the finest layer
    T : (...) uint8, number of beta steps used (0 .. max_scaling_iterations)
    clamped : (...) bool, only with ``return_clamped=True``

    Raises
    ------
    TypeError / ValueError for a non-tensor, non-float, wrong last dim or non-finite input, or a ``lattice``
    that disagrees with ``config.lattice_type``;
    OverloadError past the cap with ``overload_policy="error"``.
    """
    lattice, config, xf, z = prepare_vectors(x, config, lattice)
    lead = x.shape[:-1]
    be = select_backend(backend, "encode", xf, lattice, config)
    if be is not None:
        b, T, clamped = be.encode(xf, lattice, config, z)
    else:
        b, T, clamped = _encode_flat(xf.to(torch.float64), lattice, config, z)
    b = b.reshape(*lead, config.M, lattice.dim)
    T = T.reshape(lead)
    if return_clamped:
        return b, T, clamped.reshape(lead)
    return b, T
