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

from coset.lattice.validate import check_int
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


_INT32_MAX = 2**31 - 1
#: blocks per allgather payload: the code word's sparse T count has 25 bits (coset.dist.codec.payload_layout)
_MAX_PAYLOAD_BLOCKS = 1 << 25


def _check_config(config) -> QuantizationConfig:
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    return config


def _check_bpc(blocks_per_chunk) -> int:
    return check_int("blocks_per_chunk", blocks_per_chunk, 1, 2**62)


def _check_scales(scales, n_chunks: int) -> None:
    """The shared per-chunk scales: one finite float64 > 0 per chunk (the kernels index them by chunk and divide
    by them; a short tensor would be read past its end, a zero / NaN scale would make garbage codes)."""
    _check_vec("scales", scales, dtype=torch.float64)
    if scales.numel() != n_chunks:
        raise ValueError(f"scales must have {n_chunks} entries (one per chunk), got {scales.numel()}")
    if n_chunks and not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError("scales must be finite and > 0")


def _lat(config: QuantizationConfig, dithered: bool = False):
    # the bucket is normalised by its RMS before coding, so the magnitude bound of _consts cannot bind here
    kind, d, G, Gi, eps, q, M, scales, rad, _max_abs = _consts(config.lattice, config, dithered)
    return kind, d, G, Gi, eps, q, M, scales, rad


def allgather_nbytes(n: int, config: QuantizationConfig) -> int:
    """Payload bytes of a bucket of ``n`` values (``coset.dist.codec.payload_layout(n, config).nbytes``).

    Raises
    ------
    TypeError / ValueError for a non-config, a negative or non-int ``n``, or a bucket of 2^25 blocks or more
    (the payload's code word cannot describe it; coset.dist refuses it too).
    """
    _check_config(config)
    check_int("n", n, 0)
    if -(-n // config.dim) >= _MAX_PAYLOAD_BLOCKS:
        raise ValueError(f"n: a bucket of {n} values is too large for one payload (2^25 blocks or more)")
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
    _check_config(config)
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
    _check_config(config)
    if not supports(config):
        raise ValueError("config is not supported by the native bucket codec (see supports())")
    check_int("n", n, 0)
    check_int("own", own, -1)
    if not isinstance(payloads, torch.Tensor) or payloads.dtype != torch.uint8 or payloads.ndim != 2:
        raise TypeError("payloads must be a (W, payload_bytes) uint8 tensor")
    if payloads.device.type != "cpu":
        raise TypeError("payloads must be a CPU tensor")
    payloads = payloads.contiguous()
    W, pb = payloads.shape
    if W < 1:
        raise ValueError("payloads must hold at least one rank's payload (W >= 1), got W=0")
    if W > _INT32_MAX:
        raise ValueError(f"payloads: too many ranks ({W})")
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
    d = check_int("d", d, 1, 64)
    blocks_per_chunk = _check_bpc(blocks_per_chunk)
    nb = -(-n // d)
    norms = torch.zeros(-(-nb // blocks_per_chunk), dtype=torch.float64)
    bad = _C.bucket_modular_norms(_ptr(x), _ptr(resid), n, d, blocks_per_chunk, _ptr(norms))
    return norms, bool(bad)


def _packing_args(packing, modulus: int) -> tuple[int, int, int]:
    """(kind, width, fields) of a coset.dist.codec.SumPacking, checked: the kernels size their buffers and shifts
    from these, so a packing whose fields cannot hold codes mod ``modulus`` is refused."""
    kind = getattr(packing, "kind", None)
    if kind == "uint8":
        if 256 % modulus:
            raise ValueError(f"packing: uint8 fields need q^M to divide 256, got q^M={modulus}")
        return 0, 8, 1
    if kind != "int64":
        raise ValueError(f"packing must be a coset.dist.codec.SumPacking of kind 'uint8' or 'int64', got {packing!r}")
    width = check_int("packing.width", getattr(packing, "width", None), 1, 63)
    fields = check_int("packing.fields", getattr(packing, "fields", None), 1, 63)
    need = (modulus - 1).bit_length()
    if width < need or width * fields > 63:
        raise ValueError(
            f"packing: {fields} fields of {width} bits cannot carry codes mod {modulus} in an int64 word "
            f"(need width >= {need} and width * fields <= 63)"
        )
    return 1, width, fields


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
    _check_config(config)
    _check_vec("xe", xe)
    n = xe.numel()
    _check_vec("resid", resid, n)
    blocks_per_chunk = _check_bpc(blocks_per_chunk)
    kind, d, G, Gi, eps, *_ = _lat(config)
    nb = -(-n // d)
    _check_scales(scales, -(-nb // blocks_per_chunk))
    modulus = config.q**config.M
    pk, width, fields = _packing_args(packing, modulus)
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
    """``out = float((from_flat_code(sum mod q^M) * s) / W)`` from the all-reduced code buffer.

    Raises
    ------
    TypeError / ValueError naming the argument: ``packed`` of the wrong dtype, size or device, ``scales`` that are
    not one finite float64 > 0 per chunk, ``blocks_per_chunk`` or ``world_size`` < 1, a packing whose fields
    cannot hold codes mod q^M.
    """
    _check_config(config)
    check_int("n", n, 0)
    _check_vec("out", out, n)
    blocks_per_chunk = _check_bpc(blocks_per_chunk)
    world_size = check_int("world_size", world_size, 1, _INT32_MAX)
    kind, d, G, Gi, eps, *_ = _lat(config)
    nb = -(-n // d)
    _check_scales(scales, -(-nb // blocks_per_chunk))
    pk, width, fields = _packing_args(packing, config.q**config.M)
    want = (torch.uint8, nb * d) if pk == 0 else (torch.int64, -(-(nb * d) // fields))
    if not isinstance(packed, torch.Tensor) or packed.dtype != want[0] or packed.numel() != want[1]:
        raise ValueError(f"packed must be a {want[0]} tensor of {want[1]} elements")
    if packed.device.type != "cpu":
        raise TypeError(f"packed must be a CPU tensor, got device {packed.device}")
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
