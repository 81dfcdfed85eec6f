"""``encode``: Algorithm 1 with the geometric overload ramp over the last dimension of any tensor.

The algorithm itself (float64, whole batch) is :func:`coset.quant._core.encode_flat`; this module resolves the
arguments, builds the dither the backends receive and dispatches to a registered kernel or the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from coset.lattice import Lattice

from ._core import check_vectors, encode_flat, max_abs_input, resolve, warn_clamped
from .backend import select_backend
from .config import QuantizationConfig
from .dither import sample_dither
from .offset import effective_dither

__all__ = ["encode", "prepare_vectors"]


def prepare_vectors(x: torch.Tensor, config: Optional[QuantizationConfig], lattice: Optional[Lattice]):
    """Shared prologue of encode/quantize: defaults, input checks, flattening to ``(N, d)`` and the dither
    the backends receive (random dither and/or the centring offset, float64 ``(N, d)``, or ``None``)."""
    lattice, config = resolve(config, lattice)
    check_vectors(x, lattice.dim, max_abs=max_abs_input(config))
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
        b, T, clamped = encode_flat(xf.to(torch.float64), lattice, config, z)
    warn_clamped(clamped, config, "encode")
    b = b.reshape(*lead, config.M, lattice.dim)
    T = T.reshape(lead)
    if return_clamped:
        return b, T, clamped.reshape(lead)
    return b, T
