"""``encode``: Algorithm 1 with the geometric overload ramp over the last dimension of any tensor.

The algorithm itself (float64, whole batch) is :func:`coset.quant._core.encode_flat`; this module resolves the
arguments, builds the dither the backends receive and dispatches to a registered kernel or the reference.
"""

from __future__ import annotations

import torch

from coset.lattice import Lattice

from ._core import check_magnitude, check_vector_shape, encode_flat, max_abs_input, resolve, warn_clamped
from .backend import select_backend
from .config import QuantizationConfig
from .dither import sample_dither
from .offset import effective_dither

__all__ = ["check_reference_input", "encode", "prepare_vectors"]


def prepare_vectors(x: torch.Tensor, config: QuantizationConfig | None, lattice: Lattice | None):
    """Shared prologue of encode/quantize: defaults, type and shape checks, flattening to ``(N, d)`` and the
    dither the backends receive (random dither and/or the centring offset, float64 ``(N, d)``, or ``None``).

    The values (NaN/Inf, magnitude) are checked once, where they are read: by the backend that runs the call
    (its protocol duty, :class:`coset.quant.backend.KernelConstants`), or by :func:`check_reference_input`
    before the reference path — not a second full pass here.
    """
    lattice, config = resolve(config, lattice)
    check_vector_shape(x, lattice.dim)
    xf = x.reshape(-1, lattice.dim)
    N = xf.shape[0]
    z = sample_dither(N, lattice, config.dither_seed, x.device) if config.with_dither else None
    return lattice, config, xf, effective_dither(N, lattice, config, z, x.device)


def check_reference_input(xf: torch.Tensor, config: QuantizationConfig) -> None:
    """The value check of the reference path (the backends run their own): finite, ``|x| <= max_abs_input``."""
    check_magnitude(xf, max_abs_input(config), "x")


def encode(
    x: torch.Tensor,
    config: QuantizationConfig | None = None,
    *,
    lattice: Lattice | None = None,
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
    that disagrees with ``config.lattice_type``; OverloadError past the cap with ``overload_policy="error"``.

    Warns
    -----
    ClampWarning once per call when any vector was clamped past the cap (``overload_policy="clamp"``).
    """
    lattice, config, xf, z = prepare_vectors(x, config, lattice)
    lead = x.shape[:-1]
    be = select_backend(backend, "encode", xf, lattice, config)
    if be is not None:
        b, T, clamped = be.encode(xf, lattice, config, z)
    else:
        check_reference_input(xf, config)
        b, T, clamped = encode_flat(xf.to(torch.float64), lattice, config, z)
    warn_clamped(clamped, config, "encode")
    b = b.reshape(*lead, config.M, lattice.dim)
    T = T.reshape(lead)
    if return_clamped:
        return b, T, clamped.reshape(lead)
    return b, T
