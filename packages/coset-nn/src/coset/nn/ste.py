"""Straight-through estimators: forward returns the quantized tensor exactly, backward passes the gradient
to the float (shadow) tensor, optionally multiplied by a per-element factor.

* identity: ``dL/dw = dL/dw_hat``.
* clipped: the factor is 0 on the blocks that overloaded (T > 0 or clamped), 1 elsewhere.
* smooth: the factor ``1 / (1 + (||w_blk|| / r)^8)`` fades smoothly past the overload radius r.
"""

from __future__ import annotations

import torch

from coset.quant import from_blocks

__all__ = ["ste", "block_grad_scale"]


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        ctx.has_scale = scale is not None
        if scale is not None:
            ctx.save_for_backward(scale)
        # no copy: autograd returns an input as a view of it with this node as grad_fn
        return xq

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.has_scale:
            (s,) = ctx.saved_tensors
            return g * s, None, None
        return g, None, None


def ste(x: torch.Tensor, xq: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through estimator.

    Parameters
    ----------
    x : tensor (any shape), the float input (receives the gradient)
    xq : tensor of x's shape and dtype, its quantized value (returned exactly by the forward)
    scale : tensor broadcastable to x, or None; the backward returns ``grad * scale`` (None: ``grad``)

    Returns
    -------
    tensor equal to ``xq`` whose gradient flows to ``x``.
    """
    if xq.shape != x.shape:
        raise ValueError(f"xq must have x's shape {tuple(x.shape)}, got {tuple(xq.shape)}")
    return _STE.apply(x, xq if xq.dtype == x.dtype else xq.to(x.dtype), scale)


def block_grad_scale(
    mode: str,
    blocks: torch.Tensor,
    overloaded: torch.Tensor,
    radius: torch.Tensor,
    pad: int,
) -> torch.Tensor | None:
    """The per-element gradient factor of an STE mode, for a tensor viewed as d-blocks.

    Parameters
    ----------
    mode : "identity", "clipped" or "smooth"
    blocks : (..., nb, d) float tensor, the float values in blocks (for "smooth")
    overloaded : (..., nb) bool, blocks with T > 0 or clamped (for "clipped")
    radius : tensor broadcastable to (..., nb), overload radius ``beta q^M rho`` (for "smooth")
    pad : zeros appended to the last block (stripped from the result)

    Returns
    -------
    None for "identity", else a (..., nb*d - pad) float tensor of factors in [0, 1].
    """
    if mode == "identity":
        return None
    if mode == "clipped":
        f = (~overloaded).to(blocks.dtype).unsqueeze(-1).expand(blocks.shape)
    elif mode == "smooth":
        n = blocks.detach().norm(dim=-1) / radius
        f = (1.0 / (1.0 + n.pow(8))).to(blocks.dtype).unsqueeze(-1).expand(blocks.shape)
    else:
        raise ValueError(f"unknown STE mode {mode!r}")
    return from_blocks(f.contiguous(), pad)
