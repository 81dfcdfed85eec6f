"""Block quantization of weights (codes kept) and activations (fake-quant only), with automatic beta.

A weight ``W`` is viewed as ``(C_out, k)`` (k = in_features, or in_channels/groups*kh*kw for convolutions)
and split into ``nb = ceil(k/d)`` d-blocks per row, the last one zero-padded (``pad = nb d - k`` zeros,
stripped again after decoding). Each row c is divided by its beta (per-channel, per-tensor or the
config's), encoded with ``beta = 1`` and decoded (float32 work, float64 for float64 weights); with ``granularity="fixed"`` the blocks go to
coset.quant with the config's beta, so the result is bit-for-bit ``coset.quant.quantize(blocks, config=weight)``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch

from coset.quant import (
    ClampWarning,
    DegenerateConfigWarning,
    OverloadError,
    QuantizationConfig,
    RmsBetas,
    RowQuantizer,
    beta_min,
    decode,
    encode,
    from_blocks,
    quantize_rows,
    rms_betas,
    to_blocks,
)

from .config import QATConfig

__all__ = [
    "overload_radius",
    "weight_rms",
    "act_rms",
    "weight_betas",
    "scaled_weight_blocks",
    "encode_weight",
    "labels_from_quantized",
    "quantize_weight",
    "decode_weight",
    "activation_beta",
    "quantize_activation",
    "fake_quantize_activation",
    "weight_rows",
    "act_rows",
]


def overload_radius(cfg: QuantizationConfig) -> float:
    """``q^M rho`` in lattice units (rho = packing radius): about half of the blocks of this norm overload
    at T = 0 for D4/E8 with q=4 (the inscribed radius of the code's Voronoi region ``q^M V``)."""
    return float(cfg.q**cfg.M * cfg.lattice.packing_radius)


@contextlib.contextmanager
def _layer_warns() -> Iterator[None]:
    """Silence coset.quant's per-call ClampWarning: the layer quantizers warn once per layer instead (naming the
    layer) and count every clamp in ``stats()``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClampWarning)
        yield


def _wcfg(qat: QATConfig) -> QuantizationConfig:
    if qat.weight is None:
        raise ValueError("qconfig.weight is None: this layer does not quantize its weight")
    return qat.weight


def _acfg(qat: QATConfig) -> QuantizationConfig:
    if qat.activation is None:
        raise ValueError("qconfig.activation is None: this layer does not quantize its input")
    return qat.activation


def _unit_config(cfg: QuantizationConfig) -> QuantizationConfig:
    return cfg if cfg.beta == 1.0 else cfg.replace(beta=1.0)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=256)  # QATConfig is frozen (hashable); this runs every training step
def weight_rms(qat: QATConfig) -> RmsBetas:
    """The automatic weight betas as a :class:`coset.quant.RmsBetas`: ``beta_scale * beta_min(weight, rms)`` per row
    (per_channel) or for the whole weight (per_tensor)."""
    cfg = _wcfg(qat)
    return RmsBetas(qat.beta_scale * beta_min(cfg, 1.0), per_row=qat.granularity == "per_channel")


@functools.lru_cache(maxsize=256)
def act_rms(qat: QATConfig) -> RmsBetas:
    """The automatic activation beta as a :class:`coset.quant.RmsBetas`: ``act_beta_scale * beta_min(activation,
    rms)`` of the whole batch."""
    return RmsBetas(qat.act_beta_scale * beta_min(_acfg(qat), 1.0), per_row=False)


def weight_rows(shape: tuple[int, int], dtype: torch.dtype, device, qat: QATConfig) -> RowQuantizer:
    """The :class:`coset.quant.RowQuantizer` of :func:`quantize_weight` with automatic betas (per_channel /
    per_tensor) for ``(C_out, k)`` weights of the work ``dtype`` and ``device``."""
    return RowQuantizer(
        shape, _unit_config(_wcfg(qat)), betas=weight_rms(qat), dtype=dtype, device=device, backend=qat.backend
    )


def act_rows(shape: tuple[int, int], dtype: torch.dtype, device, qat: QATConfig) -> RowQuantizer:
    """The :class:`coset.quant.RowQuantizer` of :func:`fake_quantize_activation` with the batch's own beta for
    ``(rows, k)`` inputs of the work ``dtype`` and ``device``."""
    return RowQuantizer(
        shape, _unit_config(_acfg(qat)), betas=act_rms(qat), dtype=dtype, device=device, backend=qat.backend
    )


def weight_betas(w2: torch.Tensor, qat: QATConfig) -> torch.Tensor:
    """Betas of a ``(C_out, k)`` weight: float64 ``(C_out,)`` (per_channel) or ``(1,)``.

    Automatic betas are :func:`coset.quant.rms_betas` with :func:`weight_rms` (``beta_scale * beta_min(weight,
    rms)`` rounded to float32, the sum of squares in float64 in coset.quant's fixed order, so that the kernel
    that quantizes the rows computes the same floats); an all-zero row gets beta 1. "fixed" returns
    the config's effective beta unchanged.
    """
    cfg = _wcfg(qat)
    if qat.granularity == "fixed":
        return torch.tensor([cfg.effective_beta], dtype=torch.float64, device=w2.device)
    return _granular(rms_betas(w2.detach().to(_work_dtype(w2)), weight_rms(qat)), qat)


def _granular(b: torch.Tensor, qat: QATConfig) -> torch.Tensor:
    """Per-row rms betas ``(C_out,)`` as the quantizer stores them: as they are (per_channel) or ``(1,)``."""
    return b if qat.granularity == "per_channel" else b[:1].clone()


def scaled_weight_blocks(w2: torch.Tensor, betas: torch.Tensor, qat: QATConfig):
    """The encoder input of a ``(C_out, k)`` weight and the config to encode it with.

    "fixed": the d-blocks themselves and the weight config (beta applied inside coset.quant, so results are
    exactly coset.quant's). Otherwise row c divided by ``beta_c`` (float32, or float64 for float64 weights)
    and the config with beta 1.

    Returns
    -------
    u : (C_out, nb, d) tensor; cfg : QuantizationConfig
    """
    cfg = _wcfg(qat)
    blocks, _ = to_blocks(w2.detach().to(_work_dtype(w2)), cfg.dim)
    if qat.granularity == "fixed":
        return blocks, cfg
    return blocks / betas.to(blocks.dtype).reshape(-1, 1, 1), _unit_config(cfg)


def encode_weight(w2: torch.Tensor, betas: torch.Tensor, qat: QATConfig):
    """Encode a ``(C_out, k)`` weight (see :func:`scaled_weight_blocks`).

    Returns
    -------
    labels : (C_out, nb, M, d) uint8
    T : (C_out, nb) uint8
    clamped : (C_out, nb) bool
    """
    u, cfg = scaled_weight_blocks(w2, betas, qat)
    try:
        with _layer_warns():
            return encode(u, config=cfg, backend=qat.backend, return_clamped=True)
    except OverloadError:
        raise
    except ValueError as e:  # coset.quant checks finiteness; say which tensor
        raise ValueError(f"weight: {e}") from None


def labels_from_quantized(wq2: torch.Tensor, T: torch.Tensor, betas: torch.Tensor, qat: QATConfig) -> torch.Tensor:
    """The labels of a quantized ``(C_out, k)`` weight ``wq2`` (float32 or float64, as :func:`quantize_weight`
    returned it) whose blocks were coded at ``T``: equal to :func:`encode_weight`'s labels of the weight it was
    quantized from, without that weight.

    Why it is exact: HNLQ's labels are a function of the block's lattice point ``P`` at its scale step ``T``
    alone (the layers ``Q(P / q^m)`` follow from it, paper §3), and ``wq2`` holds ``P s_T beta`` rounded twice
    (relative error < 2.5e-7, while ``P`` is 0.5 or more from any other lattice point in these units): encoding
    ``wq2 / beta`` at scale ``s_T`` alone finds ``P`` again, inside the code (no overload). A clamped block's
    reconstruction is a code point too. Needs a code without dither or centring (``labels_need_weight``).

    Returns
    -------
    labels : (C_out, nb, M, d) uint8
    """
    cfg = _wcfg(qat)
    if labels_need_weight(qat):
        raise ValueError("labels_from_quantized needs a weight code without dither or centring")
    blocks, _ = to_blocks(wq2.detach().to(torch.float64), cfg.dim)
    if qat.granularity != "fixed":
        blocks = blocks / betas.to(torch.float64).reshape(-1, 1, 1)
        cfg = _unit_config(cfg)
    labels = torch.empty(blocks.shape[:-1] + (cfg.M, cfg.dim), dtype=torch.uint8, device=blocks.device)
    scales = cfg.scales
    for t in torch.unique(T).tolist():
        sel = T == t
        with warnings.catch_warnings():  # the user's config was warned about when it was made
            warnings.simplefilter("ignore", DegenerateConfigWarning)
            one = cfg.replace(beta=scales[int(t)], max_scaling_iterations=0)
            b, _, clamped = encode(blocks[sel], config=one, backend=qat.backend, return_clamped=True)
        if bool(clamped.any()):  # cannot happen (see above): a reconstruction is a point of the code
            raise RuntimeError("labels_from_quantized: a reconstructed block overloaded its own scale step")
        labels[sel] = b
    return labels


def labels_need_weight(qat: QATConfig, dtype: torch.dtype | None = None) -> bool:
    """True when the weight code's labels cannot be recovered from the quantized weight alone: dither or
    centring shift the reconstruction off the lattice, or (with ``dtype``, the dtype of a weight re-quantized as
    itself) the quantized weight is rounded again from the work dtype. Then a snapshot of the weight is kept."""
    cfg = _wcfg(qat)
    return bool(cfg.with_dither or cfg.center) or (dtype is not None and dtype not in (torch.float32, torch.float64))


def quantize_weight(
    w2: torch.Tensor,
    betas: torch.Tensor | None,
    qat: QATConfig,
    dtype: torch.dtype = torch.float32,
    snapshot: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    previous_betas: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    return_counts: bool = False,
    rows: RowQuantizer | None = None,
):
    """Fused encode+decode of a ``(C_out, k)`` weight; equal to ``decode_weight(encode_weight(...))``.

    One :func:`coset.quant.quantize_rows` call (a single pass in the native backend): row c divided by
    ``beta_c``, quantized with beta 1 and multiplied back (or, "fixed", quantized with the config's beta).
    ``betas`` None (per_channel / per_tensor): the automatic betas (:func:`weight_betas`), computed in the same
    native call; they are returned in ``pending``.

    Returns
    -------
    wq : (C_out, k) tensor of ``dtype``
    T : (C_out, nb) uint8
    clamped : (C_out, nb) bool
    pending : (source, betas, quantized): what gives the labels later — ``wq`` itself (``quantized`` True:
        :func:`labels_from_quantized`) when it is returned in the work dtype and the code has no dither or
        centring, else a snapshot of the weight (copied into ``snapshot`` when given, a tensor of w2's shape,
        dtype and device, else a clone) for :func:`encode_weight`

    ``out``: tensors for :func:`coset.quant.quantize_rows` to write ``(wq, T, clamped)`` into (reused buffers).
    ``previous_betas``: :func:`coset.quant.quantize_rows`'s hint (``out`` holds, unchanged, the results of the
    call with these per-row betas): only blocks whose point may have moved are quantized again. ``workspace``:
    its int8 scratch (the same tensor every call). ``return_counts``: also return ``(n_overloaded, n_clamped)``
    (:func:`coset.quant.quantize_rows`'s counts) last. ``rows``: the :class:`coset.quant.RowQuantizer` to run
    (:func:`weight_rows` of this weight's shape, dtype and device: the same results with the checks done once).
    """
    cfg = _wcfg(qat)
    fixed = qat.granularity == "fixed"
    if fixed:
        if betas is None:
            betas = weight_betas(w2, qat)
        row_betas: torch.Tensor | RmsBetas | None = None
    elif betas is None:
        row_betas = weight_rms(qat)
    else:
        row_betas = betas.reshape(-1).expand(w2.shape[0])  # per_tensor: one beta for all rows
    try:  # warn=False: the layer counts the clamps in the mask and warns once per layer
        if rows is not None and betas is None and not fixed:
            r = rows(w2.detach(), out=out, previous_betas=previous_betas, workspace=workspace)
            res = (r[0], r[1], r[2], r[3], r[4]) if return_counts else r[:4]
        else:
            res = quantize_rows(
                w2.detach(),
                row_betas,
                cfg if fixed else _unit_config(cfg),
                backend=qat.backend,
                return_info=True,
                out=out,
                warn=False,
                previous_betas=None if fixed else previous_betas,
                workspace=None if fixed else workspace,
                return_counts=return_counts,
            )
    except OverloadError:
        raise
    except ValueError as e:  # coset.quant checks finiteness; say which tensor
        raise ValueError(f"weight: {e}") from None
    wq, T, clamped = res[:3]
    counts = (res[-1],) if return_counts else ()
    if betas is None:  # the kernel's rms betas
        betas = _granular(res[3], qat)
    if wq.dtype == dtype and not labels_need_weight(qat):  # the labels follow from wq: no copy of the weight
        return (wq, T, clamped, (wq, betas, True), *counts)
    if snapshot is None:
        snapshot = w2.detach().clone()
    else:
        snapshot.copy_(w2.detach())
    return (wq.to(dtype), T, clamped, (snapshot, betas, False), *counts)


def decode_weight(
    labels: torch.Tensor,
    T: torch.Tensor,
    betas: torch.Tensor,
    qat: QATConfig,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode codes from :func:`encode_weight` into the ``(C_out, k)`` quantized weight of ``dtype``.

    "fixed": :func:`coset.quant.decode` with the config's beta. Otherwise the beta-1 decode (lattice
    points times ``2^(alpha T)``, exact in float32) is multiplied by the float32 betas, one rounding.
    """
    cfg = _wcfg(qat)
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    if qat.granularity == "fixed":
        y = decode(labels, config=cfg, T=T, dtype=wd, backend=qat.backend)
    else:
        y = decode(labels, config=_unit_config(cfg), T=T, dtype=wd, backend=qat.backend)
        y = y * betas.to(wd).reshape(-1, 1, 1)
    pad = labels.shape[-3] * cfg.dim - k
    return from_blocks(y, pad).to(dtype)


def activation_beta(x: torch.Tensor, qat: QATConfig) -> float:
    """Per-tensor beta of an activation batch ``x: (..., k)``: :func:`coset.quant.rms_betas` of the batch read as
    one sequence with :func:`act_rms` (``act_beta_scale * beta_min(activation, rms(x))``, float32-rounded); 1.0
    for an empty or all-zero batch."""
    if not x.numel():
        return 1.0
    xd = x.detach()
    x2 = xd.to(_work_dtype(xd)).reshape(-1, x.shape[-1])
    return float(rms_betas(x2, act_rms(qat))[0])


def quantize_activation(x: torch.Tensor, beta: float | None, qat: QATConfig):
    """Fake-quantize the last dimension of ``x`` in d-blocks (zero-padded, stripped) with one beta for the tensor.

    The blocks are divided by ``beta``, quantized with beta 1 and multiplied back (:func:`coset.quant.quantize_rows`
    on the ``(rows, k)`` view: the arithmetic of the weights, in float32 for float32 input and float64 otherwise;
    half inputs are rounded once back to their dtype). ``beta`` None: the batch's own beta
    (:func:`activation_beta`), computed in the same native call.

    Returns
    -------
    xq : tensor of x's shape and dtype
    blocks : (..., nb, d) the padded float blocks of x
    T : (..., nb) uint8 scale steps
    clamped : (..., nb) bool, blocks still overloaded at the cap (clamped)
    pad : int
    beta : float, the beta used
    """
    xq, T, clamped, beta = fake_quantize_activation(x, beta, qat)
    blocks, pad = to_blocks(x.detach(), _acfg(qat).dim)
    return xq, blocks, T, clamped, pad, beta


def fake_quantize_activation(
    x: torch.Tensor, beta: float | None, qat: QATConfig, return_counts: bool = False, rows: RowQuantizer | None = None
):
    """:func:`quantize_activation` without the blocks (what a training forward needs every step).

    Returns
    -------
    xq : tensor of x's shape and dtype; T : (..., nb) uint8; clamped : (..., nb) bool; beta : float; and, with
    ``return_counts``, ``(n_overloaded, n_clamped)`` (:func:`coset.quant.quantize_rows`'s counts). ``rows``: the
    :class:`coset.quant.RowQuantizer` to run for ``beta`` None (:func:`act_rows` of the ``(rows, k)`` view).
    """
    cfg = _unit_config(_acfg(qat))
    k = x.shape[-1]
    xd = x.detach()
    xw = xd if x.dtype in (torch.float32, torch.float64) else xd.to(torch.float64)
    x2 = xw if xw.ndim == 2 else xw.reshape(-1, k)
    spec: torch.Tensor | RmsBetas
    if beta is None:
        spec = act_rms(qat)
    else:
        spec = torch.full((x2.shape[0],), float(beta), dtype=x2.dtype, device=x2.device)
    # one fused pass over the (rows, k) view; the layer counts the clamps itself (warn=False)
    if rows is not None and beta is None:
        res = rows(x2)
        res = res if return_counts else res[:4]
    else:
        res = quantize_rows(
            x2, spec, cfg, backend=qat.backend, return_info=True, warn=False, return_counts=return_counts
        )
    xh, T, clamped = res[:3]
    if beta is None:  # (a numpy read of the first beta: indexing the tensor costs ~30 us every training step)
        b = res[3]
        beta = (b.numpy()[0].item() if b.device.type == "cpu" else float(b[0])) if b.numel() else 1.0
    if x.ndim != 2:
        lead, nb = x.shape[:-1], -(-k // cfg.dim)
        xh, T, clamped = xh.reshape(x.shape), T.reshape(*lead, nb), clamped.reshape(*lead, nb)
    xq = xh if xh.dtype == x.dtype else xh.to(x.dtype)
    return (xq, T, clamped, beta, res[-1]) if return_counts else (xq, T, clamped, beta)
