"""Native DDP bucket codec for coset.dist: one call per gradient bucket (CPU, multi-threaded).

Bit-exact with ``coset.dist.codec`` (same payload bytes / packed codes, same decoded values), with the
error-feedback residual fused in: ``resid`` (float32, the bucket's shape) holds the old residual on entry;
the encoders replace it by the corrected gradient ``x + resid`` and the allgather decoder by
``x + resid - x_hat_own`` (the new residual), exactly as the hook's Python path computes them.

* allgather: :func:`allgather_encode` (RMS, encode, pack_labels + pack_codes' T coding: the payload bytes),
  :func:`allgather_decode` (unpack + decode + average of the W gathered payloads, in rank order);
* modular: :func:`modular_norms` (per-chunk largest block norm), :func:`modular_encode` (packed flat codes),
  :func:`modular_decode` (the summed codes -> the average).

coset.dist reaches this module through coset.quant's backend registry (``NativeBackend.bucket_codec``),
never by importing coset.cuda.
"""

from __future__ import annotations

import torch

from coset.quant import QuantizationConfig

from . import _C  # type: ignore[attr-defined]  # compiled extension: in the wheel, not the source tree
from ._ops import _consts

__all__ = [
    "supports",
    "allgather_nbytes",
    "allgather_encode",
    "allgather_decode",
    "modular_norms",
    "modular_encode",
    "modular_decode",
]


def supports(config: QuantizationConfig) -> bool:
    """True when the native codec reproduces the Python codec for ``config`` (no random dither, no centring,
    clamp policy with overload protection, a lattice the kernels cover)."""
    if not isinstance(config, QuantizationConfig):
        return False
    if config.with_dither or config.center or config.disable_overload_protection or config.overload_policy != "clamp":
        return False
    try:
        _consts(config.lattice, config, False)
    except ValueError:
        return False
    return True


def _check_vec(name: str, t: torch.Tensor | None, n: int | None = None, dtype=torch.float32) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise TypeError(f"{name} must be a contiguous CPU {dtype} tensor")
    if t.ndim != 1 or (n is not None and t.numel() != n):
        raise ValueError(f"{name} must be 1-D with {n} elements, got shape {tuple(t.shape)}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


def _lat(config: QuantizationConfig, dithered: bool = False):
    # the bucket is normalised by its RMS before coding, so the magnitude bound of _consts cannot bind here
    kind, d, G, Gi, eps, q, M, scales, rad, _max_abs = _consts(config.lattice, config, dithered)
    return kind, d, G, Gi, eps, q, M, scales, rad


def allgather_nbytes(n: int, config: QuantizationConfig) -> int:
    """Payload bytes of a bucket of ``n`` values (``coset.dist.codec.payload_layout(n, config).nbytes``)."""
    return int(_C.bucket_allgather_nbytes(int(n), config.dim, config.M, config.q, config.max_scaling_iterations))


def allgather_encode(
    x: torch.Tensor, config: QuantizationConfig, payload: torch.Tensor, resid: torch.Tensor | None = None
) -> dict:
    """Encode one rank's bucket into its allgather payload (``coset.dist.codec.encode_payload``'s bytes).

    Parameters
    ----------
    x : (n,) float32 contiguous CPU tensor (the bucket)
    config : QuantizationConfig (see :func:`supports`)
    payload : (allgather_nbytes(n, config),) uint8, written
    resid : (n,) float32 or None; replaced by ``x + resid`` (error feedback), which is what gets encoded

    Returns
    -------
    dict with ``rho`` (the float32 RMS), ``nonfinite`` (bool), ``overloaded`` and ``clamped`` (block counts)
    """
    if not supports(config):
        raise ValueError("config is not supported by the native bucket codec (see supports())")
    _check_vec("x", x)
    n = x.numel()
    _check_vec("resid", resid, n)
    _check_vec("payload", payload, allgather_nbytes(n, config), dtype=torch.uint8)
    kind, d, G, Gi, eps, q, M, scales, rad = _lat(config)
    rho, bad, ovl, clamped = _C.bucket_allgather_encode(
        kind, d, G, Gi, eps, q, M, scales, rad, _ptr(x), _ptr(resid), n, _ptr(payload)
    )
    return {"rho": float(rho), "nonfinite": bool(bad), "overloaded": int(ovl), "clamped": int(clamped)}


def allgather_decode(
    payloads: torch.Tensor,
    n: int,
    config: QuantizationConfig,
    out: torch.Tensor,
    own: int = -1,
    resid: torch.Tensor | None = None,
) -> int:
    """Average W gathered payloads into ``out`` (float32, n): ``float(sum_r decode(payload_r) / W)``.

    Parameters
    ----------
    payloads : (W, payload_bytes) uint8, rank order
    own, resid : this rank's index and its (n,) float32 buffer from :func:`allgather_encode`, which becomes
        the new residual ``x + old residual - x_hat_own``; ``own=-1`` skips it

    Returns
    -------
    0 on success, 1 if some rank flagged a non-finite bucket (``out``/``resid`` untouched).

    Raises
    ------
    ValueError for a damaged payload (nothing is written) or payloads of the wrong size.
    """
    if not supports(config):
        raise ValueError("config is not supported by the native bucket codec (see supports())")
    if not isinstance(payloads, torch.Tensor) or payloads.dtype != torch.uint8 or payloads.ndim != 2:
        raise TypeError("payloads must be a (W, payload_bytes) uint8 tensor")
    if payloads.device.type != "cpu":
        raise TypeError("payloads must be a CPU tensor")
    payloads = payloads.contiguous()
    W, pb = payloads.shape
    _check_vec("out", out, n)
    _check_vec("resid", resid, n)
    if not -1 <= own < W:
        raise ValueError(f"own must be in [-1, {W}), got {own}")
    need = allgather_nbytes(n, config)
    if pb != need:
        raise ValueError(f"each payload must have {need} bytes for n={n}, got {pb}")
    kind, d, G, Gi, eps, q, M, scales, _ = _lat(config)
    rc, why = _C.bucket_allgather_decode(
        kind, d, G, Gi, eps, q, M, scales, _ptr(payloads), W, own, n, _ptr(out), _ptr(resid)
    )
    if rc < 0:
        raise ValueError(f"allgather payload is damaged: {why}")
    return int(rc)


def modular_norms(x: torch.Tensor, d: int, blocks_per_chunk: int, resid: torch.Tensor | None = None):
    """Per chunk of ``blocks_per_chunk`` d-blocks, the largest block norm (float64); resid <- x + resid.

    Returns
    -------
    (norms (n_chunks,) float64, nonfinite: bool)
    """
    _check_vec("x", x)
    n = x.numel()
    _check_vec("resid", resid, n)
    if blocks_per_chunk < 1:
        raise ValueError(f"blocks_per_chunk must be >= 1, got {blocks_per_chunk}")
    nb = -(-n // d)
    norms = torch.zeros(-(-nb // blocks_per_chunk), dtype=torch.float64)
    bad = _C.bucket_modular_norms(_ptr(x), _ptr(resid), n, d, blocks_per_chunk, _ptr(norms))
    return norms, bool(bad)


def _packing_args(packing) -> tuple[int, int, int]:
    if packing.kind == "uint8":
        return 0, 8, 1
    return 1, int(packing.width), int(packing.fields)


def modular_encode(
    xe: torch.Tensor,
    scales: torch.Tensor,
    config: QuantizationConfig,
    blocks_per_chunk: int,
    packing,
    resid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed flat codes of ``lam = Q_L(x / s)`` (``pack_sum_fields(modular_encode(...)[0], packing)``).

    Parameters
    ----------
    xe : (n,) float32, the corrected gradient; scales : (n_chunks,) float64 from ``modular_scales``
    packing : coset.dist.codec.SumPacking
    resid : (n,) float32 holding ``xe``; becomes ``xe - (float)(lam * s)``

    Returns
    -------
    the summable buffer: (n_blocks d,) uint8 or (ceil(n_blocks d / fields),) int64
    """
    _check_vec("xe", xe)
    n = xe.numel()
    _check_vec("resid", resid, n)
    _check_vec("scales", scales, dtype=torch.float64)
    kind, d, G, Gi, eps, *_ = _lat(config)
    nb = -(-n // d)
    if scales.numel() != -(-nb // blocks_per_chunk):
        raise ValueError(f"scales must have {-(-nb // blocks_per_chunk)} entries, got {scales.numel()}")
    pk, width, fields = _packing_args(packing)
    modulus = config.q**config.M
    if pk == 0:
        out = torch.empty(nb * d, dtype=torch.uint8)
    else:
        out = torch.empty(-(-(nb * d) // fields), dtype=torch.int64)
    _C.bucket_modular_encode(
        kind,
        d,
        G,
        Gi,
        eps,
        modulus,
        _ptr(xe),
        _ptr(resid),
        n,
        _ptr(scales),
        blocks_per_chunk,
        pk,
        width,
        fields,
        _ptr(out),
    )
    return out


def modular_decode(
    packed: torch.Tensor,
    n: int,
    scales: torch.Tensor,
    config: QuantizationConfig,
    blocks_per_chunk: int,
    packing,
    world_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out = float((from_flat_code(sum mod q^M) * s) / W)`` from the all-reduced code buffer."""
    _check_vec("out", out, n)
    _check_vec("scales", scales, dtype=torch.float64)
    kind, d, G, Gi, eps, *_ = _lat(config)
    nb = -(-n // d)
    pk, width, fields = _packing_args(packing)
    want = (torch.uint8, nb * d) if pk == 0 else (torch.int64, -(-(nb * d) // fields))
    if not isinstance(packed, torch.Tensor) or packed.dtype != want[0] or packed.numel() != want[1]:
        raise ValueError(f"packed must be a {want[0]} tensor of {want[1]} elements")
    packed = packed.contiguous()
    _C.bucket_modular_decode(
        kind,
        d,
        G,
        Gi,
        eps,
        config.q**config.M,
        _ptr(packed),
        n,
        _ptr(scales),
        blocks_per_chunk,
        pk,
        width,
        fields,
        int(world_size),
        _ptr(out),
    )
    return out
