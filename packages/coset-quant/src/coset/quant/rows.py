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
incremental re-quantization hint, see :func:`quantize_rows`); the others are called without them. A backend whose
``returns_counts`` attribute is True accepts ``return_counts=True`` and then appends ``(n_overloaded, n_clamped)``
(ints: blocks with T > 0 or clamped, clamped blocks) to its results; for the others they are counted here.
"""

from __future__ import annotations

import warnings

import torch

from coset.lattice import Lattice

from ._core import count_true, resolve, warn_clamped
from .backend import get_backend, registry_generation, select_backend
from .blocks import from_blocks, to_blocks
from .config import ClampWarning, QuantizationConfig
from .quantize import quantize
from .rms import RmsBetas, check_rms_betas, rms_betas

__all__ = ["quantize_rows", "RowQuantizer"]


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
    return_counts: bool = False,
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
    return_counts : also return ``(n_overloaded, n_clamped)`` (ints): the blocks with T > 0 or clamped, and the
        clamped ones — what a training loop logs every step, counted by a native backend as it writes the masks

    Returns
    -------
    (R, k) contiguous tensor of the work dtype [, T uint8 (R, nb), clamped bool (R, nb)] [, betas (R,) float64]
    [, (n_overloaded, n_clamped)] (the betas only for an :class:`RmsBetas`: float32 values, as
    :func:`coset.quant.rms_betas`; the counts last, only with ``return_counts``)

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
    counts = None
    if rms is not None:
        be = _rows_backend(backend, xw, lattice, config, "quantize_rows_rms")
        if be is not None:
            r = be.quantize_rows(xw, rms, lattice, config, out=out, **_hint(be, hint), **_counts(be, return_counts))
            res, T, clamped, b32 = r[:4]
            if not getattr(be, "checks_rms_betas", False):
                check_rms_betas(b32, xw)
            counts = _result_counts(r, 4, T, clamped, return_counts)
            if warn:
                warn_clamped(clamped, config, "quantize_rows", n=None if counts is None else counts[1])
            derived = b32.to(torch.float64)
            out4 = (res, T, clamped, derived) if return_info else (res, derived)
            return (*out4, counts) if return_counts else out4
        derived = rms_betas(xw, rms)
    bsrc = derived if rms is not None else betas
    bw = None if not isinstance(bsrc, torch.Tensor) else bsrc.detach().to(device=x.device, dtype=wd)
    be = _rows_backend(backend, xw, lattice, config)
    if be is not None:
        r = be.quantize_rows(xw, bw, lattice, config, out=out, **_hint(be, hint), **_counts(be, return_counts))
        res, T, clamped = r[:3]
        counts = _result_counts(r, 3, T, clamped, return_counts)
        if warn:
            warn_clamped(clamped, config, "quantize_rows", n=None if counts is None else counts[1])
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
    ret: tuple = (res, T, clamped) if return_info else (res,)
    if derived is not None:
        ret = (*ret, derived)
    if return_counts:
        ret = (*ret, counts if counts is not None else _mask_counts(T, clamped))
    return ret if len(ret) > 1 else res


def _counts(be, return_counts: bool) -> dict:
    """``return_counts=True`` for a backend that counts the masks itself (``returns_counts``)."""
    return {"return_counts": True} if return_counts and getattr(be, "returns_counts", False) else {}


def _result_counts(r: tuple, n: int, T: torch.Tensor, clamped: torch.Tensor, need: bool) -> tuple[int, int] | None:
    """The counts a backend appended to its results (after its ``n`` outputs), else counted here when ``need``."""
    if len(r) > n:
        return r[n]
    return _mask_counts(T, clamped) if need else None


def _mask_counts(T: torch.Tensor, clamped: torch.Tensor) -> tuple[int, int]:
    n_clamped = count_true(clamped)
    return count_true(T != 0) if not n_clamped else int(torch.count_nonzero((T != 0) | clamped)), n_clamped


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


class RowQuantizer:
    """:func:`quantize_rows` prepared for repeated calls on ``(R, k)`` matrices of one shape, dtype and device — a
    QAT layer re-quantizing its weight (or its input batch) every step.

    The config, the backend and the kernel's constants are resolved once, here; a call checks its tensors against
    the prepared shape and runs the backend's prepared kernel (a backend method ``prepare_quantize_rows(lattice,
    config, shape, rms)``; without one, or where it returns None, each call is a :func:`quantize_rows` call). The
    results are :func:`quantize_rows`'s bit for bit.

    Parameters
    ----------
    shape : (R, k)
    config, lattice, backend : as for :func:`quantize_rows`
    betas : an :class:`RmsBetas` (the betas are derived from each call's ``x``) or None (passed to each call)
    dtype : the matrices' dtype, float32 or float64 (the work dtype)
    device : the matrices' device

    Calling ``rq(x, betas=None, *, out=None, previous_betas=None, workspace=None)`` (``x: (R, k)`` of the dtype and
    device; ``betas``: (R,) float or None, only without an RmsBetas; the keywords as for :func:`quantize_rows`)
    returns ``(res, T, clamped, derived, (n_overloaded, n_clamped))``: ``derived`` the rms betas as (R,) tensor of
    the work dtype (float32 values), or None.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        config: QuantizationConfig | None = None,
        *,
        lattice: Lattice | None = None,
        betas: RmsBetas | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
    ) -> None:
        if (
            not isinstance(shape, tuple | list)
            or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise ValueError(f"shape must be (R, k) with ints >= 0, got {shape!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if betas is not None and not isinstance(betas, RmsBetas):
            raise TypeError(f"betas must be None or an RmsBetas, got {type(betas).__name__}")
        self.lattice, self.config = resolve(config, lattice)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype, self.device, self.rms, self.backend = dtype, torch.device(device), betas, backend
        self.nb = -(-self.shape[1] // self.lattice.dim)
        probe = torch.empty((0, self.shape[1]), dtype=dtype, device=self.device)
        op = "quantize_rows" if betas is None else "quantize_rows_rms"
        be = _rows_backend(backend, probe, self.lattice, self.config, op)
        prepare = getattr(be, "prepare_quantize_rows", None)
        self._kernel = prepare(self.lattice, self.config, self.shape, betas) if prepare is not None else None
        #: True when the backend uses ``previous_betas`` / ``workspace`` (else they are ignored: no need to keep them)
        self.takes_previous_betas = bool(getattr(be, "takes_previous_betas", False))

    def __call__(
        self,
        x: torch.Tensor,
        betas: torch.Tensor | None = None,
        *,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        previous_betas: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
    ):
        kernel = self._kernel
        if betas is not None and self.rms is not None:
            raise ValueError("betas: this RowQuantizer derives its betas (RmsBetas); pass none")
        if kernel is None or not self._plain(x, betas, out, previous_betas, workspace):
            spec = self.rms if self.rms is not None else betas
            r = quantize_rows(
                x, spec, self.config, lattice=self.lattice, backend=self.backend, return_info=True, out=out,
                warn=False, previous_betas=previous_betas, workspace=workspace, return_counts=True,
            )  # fmt: skip
            derived = r[3].to(self.dtype) if self.rms is not None else None
            return r[0], r[1], r[2], derived, r[-1]
        if out is None:
            R, k = self.shape
            out = (
                torch.empty((R, k), dtype=self.dtype, device=self.device),
                torch.empty((R, self.nb), dtype=torch.uint8, device=self.device),
                torch.empty((R, self.nb), dtype=torch.bool, device=self.device),
            )
        return kernel(x, betas, out, previous_betas, workspace)

    def _plain(self, x, betas, out, previous_betas, workspace) -> bool:
        """True when every argument is what the prepared kernel takes as it is (else :func:`quantize_rows` runs:
        it converts what it can and raises its errors)."""
        R, k = self.shape
        dt, dev = self.dtype, self.device
        if not (
            isinstance(x, torch.Tensor)
            and x.dtype == dt
            and x.shape == self.shape
            and x.device == dev
            and x.is_contiguous()
            and not x.requires_grad
        ):
            return False
        if betas is not None and not (
            isinstance(betas, torch.Tensor) and betas.dtype == dt and betas.shape == (R,) and betas.is_contiguous()
        ):
            return False
        if previous_betas is not None and (
            out is None
            or not (
                isinstance(previous_betas, torch.Tensor)
                and previous_betas.dtype == dt
                and previous_betas.shape == (R,)
                and previous_betas.is_contiguous()
            )
        ):
            return False
        if workspace is not None and not (
            isinstance(workspace, torch.Tensor)
            and workspace.dtype == torch.int8
            and workspace.numel() == R * self.nb * self.lattice.dim
            and workspace.is_contiguous()
            and workspace.device == dev
        ):
            return False
        if out is None:
            return True
        if not (isinstance(out, tuple) and len(out) == 3):
            return False
        o, T, c = out
        if not (
            isinstance(o, torch.Tensor)
            and isinstance(T, torch.Tensor)
            and isinstance(c, torch.Tensor)
            and o.dtype == dt
            and T.dtype == torch.uint8
            and c.dtype == torch.bool
            and o.shape == self.shape
            and T.shape == c.shape == (R, self.nb)
            and o.is_contiguous()
            and T.is_contiguous()
            and c.is_contiguous()
            and o.device == T.device == c.device == dev
            and not (o.requires_grad or T.requires_grad or c.requires_grad)
        ):
            return False
        # no overlap between x and the outputs, or among the outputs (the kernel reads x while it writes)
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (x, o, T, c) if t.numel())
        return all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False))
