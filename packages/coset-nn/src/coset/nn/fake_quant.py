"""Block quantization of weights (codes kept) and activations (fake-quant only), with automatic beta.

A weight ``W`` is viewed as ``(C_out, k)`` (k = in_features, or in_channels/groups*kh*kw for convolutions)
and split into ``nb = ceil(k/d)`` d-blocks per row, the last one zero-padded (``pad = nb d - k`` zeros,
stripped again after decoding). Each row c is divided by its beta (per-channel, per-tensor or the
config's), encoded with ``beta = 1`` and decoded (float32 work, float64 for float64 weights); with ``granularity="fixed"`` the blocks go to
coset.quant with the config's beta, so the result is bit-for-bit ``coset.quant.quantize(blocks, config=weight)``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from coset.quant import (
    ClampWarning,
    DegenerateConfigWarning,
    OverloadError,
    QuantizationConfig,
    beta_min,
    decode,
    encode,
    from_blocks,
    quantize,
    quantize_rows,
    to_blocks,
)

from .config import QATConfig

__all__ = [
    "overload_radius",
    "weight_betas",
    "scaled_weight_blocks",
    "encode_weight",
    "labels_from_quantized",
    "quantize_weight",
    "decode_weight",
    "activation_beta",
    "quantize_activation",
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


def _scaled_rms(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """rms in float64 of each row (or of the whole tensor, as a (1,) tensor), scaled by the largest magnitude
    first so that it never overflows."""
    w = w.to(torch.float64)
    if not per_row:
        w = w.reshape(1, -1)
    m = w.abs().amax(dim=1, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return m.squeeze(1) * (w / m).pow(2).mean(dim=1).sqrt()


def weight_betas(w2: torch.Tensor, qat: QATConfig) -> torch.Tensor:
    """Betas of a ``(C_out, k)`` weight: float64 ``(C_out,)`` (per_channel) or ``(1,)``.

    Automatic betas are ``beta_scale * beta_min(weight, rms)`` (rms = norm / sqrt(k), the norm accumulated by
    ``torch.linalg.vector_norm`` in the weight's work dtype) rounded to float32 (so a float32 copy is
    exact); an all-zero row gets beta 1. "fixed" returns the config's effective beta unchanged.
    """
    cfg = _wcfg(qat)
    if qat.granularity == "fixed":
        return torch.tensor([cfg.effective_beta], dtype=torch.float64, device=w2.device)
    w = w2.detach().to(_work_dtype(w2))
    # one pass, no w*w temporary: rms = ||row|| / sqrt(k)
    if qat.granularity == "per_channel":
        nrm, count = torch.linalg.vector_norm(w, dim=1), w.shape[1]
    else:
        nrm, count = torch.linalg.vector_norm(w).reshape(1), w.numel()
    rms = nrm.to(torch.float64) / math.sqrt(max(count, 1))
    unit = qat.beta_scale * beta_min(cfg, 1.0)
    # the (C_out,) float64 arithmetic in numpy: the same IEEE operations, ~1 us each instead of ~8 per torch op
    # (this runs every training step); the finiteness test needs the values on the host anyway
    r = rms.cpu().numpy()
    if not np.isfinite(r).all() and bool(torch.isfinite(w).all()):
        r = _scaled_rms(w, per_row=qat.granularity == "per_channel").cpu().numpy()  # w*w overflowed: no inf beta
    return torch.from_numpy(np.where(r > 0, r * unit, 1.0).astype(np.float32).astype(np.float64)).to(rms.device)


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
    betas: torch.Tensor,
    qat: QATConfig,
    dtype: torch.dtype = torch.float32,
    snapshot: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """Fused encode+decode of a ``(C_out, k)`` weight; equal to ``decode_weight(encode_weight(...))``.

    One :func:`coset.quant.quantize_rows` call (a single pass in the native backend): row c divided by
    ``beta_c``, quantized with beta 1 and multiplied back (or, "fixed", quantized with the config's beta).

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
    """
    cfg = _wcfg(qat)
    fixed = qat.granularity == "fixed"
    try:
        with _layer_warns():
            wq, T, clamped = quantize_rows(
                w2.detach(),
                None if fixed else betas.reshape(-1).expand(w2.shape[0]),  # per_tensor: one beta for all rows
                cfg if fixed else _unit_config(cfg),
                backend=qat.backend,
                return_info=True,
                out=out,
            )
    except OverloadError:
        raise
    except ValueError as e:  # coset.quant checks finiteness; say which tensor
        raise ValueError(f"weight: {e}") from None
    if wq.dtype == dtype and not labels_need_weight(qat):  # the labels follow from wq: no copy of the weight
        return wq, T, clamped, (wq, betas, True)
    if snapshot is None:
        snapshot = w2.detach().clone()
    else:
        snapshot.copy_(w2.detach())
    return wq.to(dtype), T, clamped, (snapshot, betas, False)


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
    """Per-tensor beta of an activation batch: ``act_beta_scale * beta_min(activation, rms(x))`` (float32-rounded;
    rms = ``torch.linalg.vector_norm(x) / sqrt(n)`` in the work dtype)."""
    xd = x.detach()
    # one pass, no x*x temporary: rms = ||x|| / sqrt(n)
    rms = float(torch.linalg.vector_norm(xd.to(_work_dtype(xd)))) / math.sqrt(x.numel()) if x.numel() else 0.0
    if rms == float("inf"):  # x*x overflowed
        rms = float(_scaled_rms(xd, per_row=False))
    if not rms > 0 or rms != rms:
        return 1.0
    return float(torch.tensor(qat.act_beta_scale * beta_min(_acfg(qat), 1.0) * rms, dtype=torch.float32))


def quantize_activation(x: torch.Tensor, beta: float, qat: QATConfig):
    """Fake-quantize the last dimension of ``x`` in d-blocks (zero-padded, stripped).

    Returns
    -------
    xq : tensor of x's shape and dtype
    blocks : (..., nb, d) the padded float blocks of x
    T : (..., nb) uint8 scale steps
    clamped : (..., nb) bool, blocks still overloaded at the cap (clamped)
    pad : int
    """
    cfg = _acfg(qat).replace(beta=float(beta))
    xd = x.detach()
    blocks, pad = to_blocks(xd, cfg.dim)
    if x.dtype not in (torch.float32, torch.float64):  # half inputs: one rounding from float64, as quantize does
        with _layer_warns():
            xh, T, clamped = quantize(blocks, config=cfg, backend=qat.backend, return_info=True)
        return from_blocks(xh, pad), blocks, T, clamped, pad
    k, lead = x.shape[-1], x.shape[:-1]
    with _layer_warns():  # one fused pass over the (rows, k) view: quantize_rows(None) == quantize of the blocks
        xh, T, clamped = quantize_rows(xd.reshape(-1, k), None, cfg, backend=qat.backend, return_info=True)
    nb = blocks.shape[-2]
    return xh.reshape(x.shape), blocks, T.reshape(*lead, nb), clamped.reshape(*lead, nb), pad
