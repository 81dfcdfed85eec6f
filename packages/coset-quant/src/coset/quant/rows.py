"""``quantize_rows``: per-row scaled HNLQ reconstruction of a matrix in d-blocks (a per-channel fake quantizer).

``out[r, :] = beta_r * quantize(x[r, :] / beta_r)`` over the d-blocks of each row, the last block zero padded
(the padding is stripped). This is the forward of quantization-aware training with per-channel betas; the
PyTorch composition below is the specification, and a backend may implement it in one pass (op name
``"quantize_rows"``, method ``quantize_rows(x, betas, lattice, config, out=None) -> (out, T, clamped)`` on a
float32 ``(R, k)`` matrix and float32 ``(R,)`` betas or None, bit for bit the composition, writing into the
checked ``out`` tensors when given). The betas may also be derived from the rows (:class:`RmsBetas`, op name
``"quantize_rows_rms"``: the same method called with the ``RmsBetas`` returns ``(out, T, clamped, betas)``, the
betas float32 and equal to :func:`coset.quant.rms_betas`); a backend without it gets the betas computed here.
A backend's ``supports`` answer for these two ops may depend on ``x``'s device and dtype only (it is cached per
device, dtype, lattice and config). A backend whose ``checks_rms_betas`` attribute is True raises ``ValueError``
itself for rms betas that are not finite (NaN/Inf in ``x``, or a beta past the float32 range). A backend whose
``takes_previous_betas`` attribute is True accepts the keywords ``previous_betas`` and ``workspace`` (the
incremental re-quantization hint, see :func:`quantize_rows`); the others are called without them.
"""

from __future__ import annotations

import warnings

import torch

from coset.lattice import Lattice

from ._core import resolve, warn_clamped
from .backend import get_backend, registry_generation, select_backend
from .blocks import from_blocks, to_blocks
from .config import ClampWarning, QuantizationConfig
from .quantize import quantize
from .rms import RmsBetas, check_rms_betas, rms_betas

__all__ = ["quantize_rows"]


# (backend, op, device, dtype, lattice, config) -> backend or None, valid for one registry generation. A training
# loop quantizes the same matrices every step; selecting the backend each time cost ~10 us a call (measured), while
# a backend's answer for these two ops may depend on x's device and dtype only (the protocol above).
_selected: dict = {}
_selected_gen = -1


def _rows_backend(
    backend: str, x: torch.Tensor, lattice: Lattice, config: QuantizationConfig, op: str = "quantize_rows"
):
    """The backend running the fused op, or None (then the composition runs, with ``backend`` for quantize)."""
    global _selected_gen
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "torch":
        return None
    gen = registry_generation()
    if gen != _selected_gen or len(_selected) > 256:
        _selected.clear()
        _selected_gen = gen
    key = (backend, op, x.device, x.dtype, lattice, config)
    if key in _selected:
        return _selected[key]
    if backend == "auto":  # (the rms op runs the backend's quantize_rows method too)
        b = select_backend("auto", op, x, lattice, config, method="quantize_rows")
    else:
        b = get_backend(backend)
        if b is None or not hasattr(b, "quantize_rows") or not b.supports(op, x, lattice, config):
            b = None
    _selected[key] = b
    return b


def quantize_rows(
    x: torch.Tensor,
    betas: torch.Tensor | RmsBetas | None = None,
    config: QuantizationConfig | None = None,
    *,
    lattice: Lattice | None = None,
    backend: str = "auto",
    return_info: bool = False,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    warn: bool = True,
    previous_betas: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
):
    """Per-row scaled HNLQ reconstruction ``beta_r * quantize(x[r] / beta_r)`` in d-blocks.

    Parameters
    ----------
    x : (R, k) float tensor, finite; the work dtype is float64 for float64 input, float32 otherwise
    betas : (R,) float tensor of per-row scales, None (no scaling: ``quantize`` of the blocks), or an
        :class:`RmsBetas` (the betas :func:`coset.quant.rms_betas` derives from ``x``, computed by a native
        backend in the same call; they are then returned as well). They are rounded to the work dtype;
        ``x[r] / beta_r`` and the product by ``beta_r`` are rounded once each.
    config, lattice, backend : as for :func:`coset.quant.quantize` (the config's own beta applies as well)
    return_info : also return ``(T, clamped)`` per block, each of shape ``(R, ceil(k/d))``
    out : optional ``(result, T, clamped)`` to write into and return instead of new tensors: contiguous, on
        ``x``'s device, of shapes ``(R, k)``, ``(R, nb)``, ``(R, nb)`` and dtypes work dtype, uint8, bool, not
        sharing memory with ``x`` (a training loop that re-quantizes every step reuses them: fresh 4 MB outputs
        cost page faults each step)
    warn : False: no :class:`ClampWarning` (for a caller that counts the clamps in ``clamped`` itself, as the
        QAT layers do, warning once per layer)
    previous_betas : optional (R,) float tensor, only with ``out``: a promise that ``out`` holds, unchanged, the
        results of the previous call with the same config and lattice on a matrix of this shape with these betas
        (a training loop re-quantizing a slowly moving weight every step). A backend that declares
        ``takes_previous_betas`` then re-quantizes only the blocks whose closest point may have moved (each kept
        point is certified to be the closest one; its overload state is taken from ``out``'s T, hence the
        promise); the results are those of a call without the hint. Other backends ignore it.
    workspace : optional int8 tensor of ``R * ceil(k/d) * d`` elements on ``x``'s device: scratch in which such
        a backend keeps per-block state for the next hinted call (pass the same tensor, unchanged, every call;
        its content is not part of the results)

    Returns
    -------
    (R, k) contiguous tensor of the work dtype [, T uint8 (R, nb), clamped bool (R, nb)] [, betas (R,) float64]
    (the betas last, only for an :class:`RmsBetas`: float32 values, as :func:`coset.quant.rms_betas`)

    Raises / Warns
    --------------
    TypeError / ValueError for a non-tensor, non-float or non-2-D ``x``, betas of the wrong shape, ``out`` tensors
    of the wrong type, dtype, shape, device or layout or overlapping ``x``, or non-finite scaled blocks (as
    :func:`coset.quant.quantize`); one ``ClampWarning`` per call that clamps.
    """
    lattice, config = resolve(config, lattice)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (R, k), got {tuple(x.shape)}")
    rms = betas if isinstance(betas, RmsBetas) else None
    if betas is not None and rms is None:
        if not isinstance(betas, torch.Tensor) or not betas.is_floating_point():
            raise TypeError("betas must be None, an RmsBetas or a floating torch.Tensor")
        if tuple(betas.shape) != (x.shape[0],):
            raise ValueError(f"betas must have shape ({x.shape[0]},), got {tuple(betas.shape)}")
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if out is not None:
        _check_out(out, x, wd, -(-x.shape[1] // lattice.dim))
    hint = {}
    if previous_betas is not None:
        if out is None:
            raise ValueError("previous_betas is a hint about out: pass out as well")
        if not isinstance(previous_betas, torch.Tensor) or not previous_betas.is_floating_point():
            raise TypeError("previous_betas must be a floating torch.Tensor")
        if tuple(previous_betas.shape) != (x.shape[0],):
            raise ValueError(f"previous_betas must have shape ({x.shape[0]},), got {tuple(previous_betas.shape)}")
        hint = {"previous_betas": previous_betas.detach().to(device=x.device, dtype=wd)}
    if workspace is not None:
        nbd = -(-x.shape[1] // lattice.dim) * lattice.dim
        if not isinstance(workspace, torch.Tensor) or workspace.dtype != torch.int8:
            raise TypeError("workspace must be an int8 torch.Tensor")
        if workspace.numel() != x.shape[0] * nbd or not workspace.is_contiguous() or workspace.device != x.device:
            raise ValueError(f"workspace must be a contiguous tensor of {x.shape[0] * nbd} elements on {x.device}")
        hint["workspace"] = workspace
    xw = x if x.dtype == wd and not x.requires_grad else x.detach().to(wd)
    derived = None  # the rms betas (float64 holding float32 values), returned last
    if rms is not None:
        be = _rows_backend(backend, xw, lattice, config, "quantize_rows_rms")
        if be is not None:
            res, T, clamped, b32 = be.quantize_rows(xw, rms, lattice, config, out=out, **_hint(be, hint))
            if not getattr(be, "checks_rms_betas", False):
                check_rms_betas(b32, xw)
            if warn:
                warn_clamped(clamped, config, "quantize_rows")
            derived = b32.to(torch.float64)
            return (res, T, clamped, derived) if return_info else (res, derived)
        derived = rms_betas(xw, rms)
    bsrc = derived if rms is not None else betas
    bw = None if not isinstance(bsrc, torch.Tensor) else bsrc.detach().to(device=x.device, dtype=wd)
    be = _rows_backend(backend, xw, lattice, config)
    if be is not None:
        res, T, clamped = be.quantize_rows(xw, bw, lattice, config, out=out, **_hint(be, hint))
        if warn:
            warn_clamped(clamped, config, "quantize_rows")
    else:
        blocks, pad = to_blocks(xw, lattice.dim)
        if bw is not None:
            blocks = blocks / bw.reshape(-1, 1, 1)
        with warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore", ClampWarning)
            xh, T, clamped = quantize(blocks, config, lattice=lattice, backend=backend, return_info=True)
        if bw is not None:
            xh = xh * bw.reshape(-1, 1, 1)
        res = from_blocks(xh, pad).contiguous()  # the layout of the fused op (a matmul's rounding depends on it)
        if out is not None:
            for o, r in zip(out, (res, T, clamped), strict=True):
                o.copy_(r)
            res, T, clamped = out
    if derived is not None:
        return (res, T, clamped, derived) if return_info else (res, derived)
    if return_info:
        return res, T, clamped
    return res


def _hint(be, hint: dict) -> dict:
    """The previous_betas hint for a backend that takes it (the others run without it: it never changes a result)."""
    return hint if hint and getattr(be, "takes_previous_betas", False) else {}


def _check_out(out, x: torch.Tensor, wd: torch.dtype, nb: int) -> None:
    if not isinstance(out, tuple) or len(out) != 3 or not all(isinstance(o, torch.Tensor) for o in out):
        raise TypeError("out must be a tuple of three tensors (result, T, clamped)")
    R, k = x.shape
    for name, o, dtype, shape in zip(
        ("out[0]", "out[1]", "out[2]"), out, (wd, torch.uint8, torch.bool), ((R, k), (R, nb), (R, nb)), strict=True
    ):
        if o.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {o.dtype}")
        if o.requires_grad:
            raise ValueError(f"{name} requires grad: the results are written into it outside autograd")
        if tuple(o.shape) != shape or not o.is_contiguous() or o.device != x.device:
            raise ValueError(
                f"{name} must be a contiguous {shape} tensor on {x.device}, got {tuple(o.shape)} on {o.device}"
            )
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (x, *out) if t.numel()]
    for i, (a0, a1) in enumerate(spans):
        for b0, b1 in spans[i + 1 :]:
            if a0 < b1 and b0 < a1:
                raise ValueError("out tensors must not share memory with x or with each other")
