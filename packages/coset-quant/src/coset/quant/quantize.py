"""``quantize``: encode then decode, in the input dtype (fused in native backends)."""

from __future__ import annotations

from typing import Optional

import torch

from coset.lattice import Lattice

from .backend import select_backend
from .config import QuantizationConfig
from .decode import _decode_flat
from .encode import _encode_flat, prepare_vectors

__all__ = ["quantize"]


def quantize(
    x: torch.Tensor,
    config: Optional[QuantizationConfig] = None,
    *,
    lattice: Optional[Lattice] = None,
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
    """
    lattice, config, xf, z = prepare_vectors(x, config, lattice)
    lead = x.shape[:-1]
    be = select_backend(backend, "quantize", xf, lattice, config)
    if be is not None:
        xh, T, clamped = be.quantize(xf, lattice, config, z)
    else:
        b, T, clamped = _encode_flat(xf.to(torch.float64), lattice, config, z)
        xh = _decode_flat(b, T, lattice, config, z, x.dtype)
    xh = xh.reshape(x.shape)
    if return_info:
        return xh, T.reshape(lead), clamped.reshape(lead)
    return xh
