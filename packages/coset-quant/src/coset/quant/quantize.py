"""``quantize``: encode then decode, in the input dtype (fused in native backends)."""

from __future__ import annotations

import torch

from coset.lattice import Lattice

from ._core import decode_flat, encode_flat, warn_clamped
from .backend import select_backend
from .config import QuantizationConfig
from .encode import check_reference_input, prepare_vectors

__all__ = ["quantize"]


def quantize(
    x: torch.Tensor,
    config: QuantizationConfig | None = None,
    *,
    lattice: Lattice | None = None,
    backend: str = "auto",
    return_info: bool = False,
):
    """HNLQ reconstruction ``decode(encode(x))`` of the last dimension of ``x``.

    Parameters
    ----------
    x : (..., d) float tensor, finite
    config, lattice, backend : as for :func:`coset.quant.encode`
    return_info : also return ``(T, clamped)``, each of shape ``(...)``

    Returns
    -------
    (..., d) tensor of x's dtype [, T uint8 (...), clamped bool (...)]

    Raises / Warns
    --------------
    As :func:`coset.quant.encode` (including one ``ClampWarning`` per call that clamps).
    """
    lattice, config, xf, z = prepare_vectors(x, config, lattice)
    lead = x.shape[:-1]
    be = select_backend(backend, "quantize", xf, lattice, config)
    if be is not None:
        xh, T, clamped = be.quantize(xf, lattice, config, z)
    else:
        check_reference_input(xf, config)
        b, T, clamped = encode_flat(xf.to(torch.float64), lattice, config, z)
        xh = decode_flat(b, T, lattice, config, z, x.dtype)
    warn_clamped(clamped, config, "quantize")
    xh = xh.reshape(x.shape)
    if return_info:
        return xh, T.reshape(lead), clamped.reshape(lead)
    return xh
