"""``quantize_rows``: per-row scaled HNLQ reconstruction of a matrix in d-blocks (a per-channel fake quantizer).

``out[r, :] = beta_r * quantize(x[r, :] / beta_r)`` over the d-blocks of each row, the last block zero padded
(the padding is stripped). This is the forward of quantization-aware training with per-channel betas; the
PyTorch composition below is the specification, and a backend may implement it in one pass (op name
``"quantize_rows"``, method ``quantize_rows(x, betas, lattice, config) -> (out, T, clamped)`` on a float32
``(R, k)`` matrix and float32 ``(R,)`` betas or None, bit for bit the composition).
"""

from __future__ import annotations

import torch

from coset.lattice import Lattice

from ._core import resolve, warn_clamped
from .backend import get_backend, select_backend
from .blocks import from_blocks, to_blocks
from .config import QuantizationConfig
from .quantize import quantize

__all__ = ["quantize_rows"]


def _rows_backend(backend: str, x: torch.Tensor, lattice: Lattice, config: QuantizationConfig):
    """The backend running the fused op, or None (then the composition runs, with ``backend`` for quantize)."""
    if backend == "auto":
        return select_backend("auto", "quantize_rows", x, lattice, config)
    if backend == "torch":
        return None
    b = get_backend(backend)
    if b is not None and hasattr(b, "quantize_rows") and b.supports("quantize_rows", x, lattice, config):
        return b
    return None


def quantize_rows(
    x: torch.Tensor,
    betas: torch.Tensor | None = None,
    config: QuantizationConfig | None = None,
    *,
    lattice: Lattice | None = None,
    backend: str = "auto",
    return_info: bool = False,
):
    """Per-row scaled HNLQ reconstruction ``beta_r * quantize(x[r] / beta_r)`` in d-blocks.

    Parameters
    ----------
    x : (R, k) float tensor, finite; the work dtype is float64 for float64 input, float32 otherwise
    betas : (R,) float tensor of per-row scales, or None (no scaling: ``quantize`` of the blocks). They are
        rounded to the work dtype; ``x[r] / beta_r`` and the product by ``beta_r`` are rounded once each.
    config, lattice, backend : as for :func:`coset.quant.quantize` (the config's own beta applies as well)
    return_info : also return ``(T, clamped)`` per block, each of shape ``(R, ceil(k/d))``

    Returns
    -------
    (R, k) contiguous tensor of the work dtype [, T uint8 (R, nb), clamped bool (R, nb)]

    Raises / Warns
    --------------
    TypeError / ValueError for a non-tensor, non-float or non-2-D ``x``, betas of the wrong shape, or non-finite
    scaled blocks (as :func:`coset.quant.quantize`); one ``ClampWarning`` per call that clamps.
    """
    lattice, config = resolve(config, lattice)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (R, k), got {tuple(x.shape)}")
    if betas is not None:
        if not isinstance(betas, torch.Tensor) or not betas.is_floating_point():
            raise TypeError("betas must be None or a floating torch.Tensor")
        if tuple(betas.shape) != (x.shape[0],):
            raise ValueError(f"betas must have shape ({x.shape[0]},), got {tuple(betas.shape)}")
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.detach().to(wd)
    bw = None if betas is None else betas.detach().to(device=x.device, dtype=wd)
    be = _rows_backend(backend, xw, lattice, config)
    if be is not None:
        out, T, clamped = be.quantize_rows(xw, bw, lattice, config)
        warn_clamped(clamped, config, "quantize_rows")
    else:
        blocks, pad = to_blocks(xw, lattice.dim)
        if bw is not None:
            blocks = blocks / bw.reshape(-1, 1, 1)
        xh, T, clamped = quantize(blocks, config, lattice=lattice, backend=backend, return_info=True)
        if bw is not None:
            xh = xh * bw.reshape(-1, 1, 1)
        out = from_blocks(xh, pad).contiguous()  # the layout of the fused op (a matmul's rounding depends on it)
    if return_info:
        return out, T, clamped
    return out
