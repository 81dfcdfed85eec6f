"""``NativeBackend``: the object coset.quant's registry finds through the ``coset.backends`` entry point."""

from __future__ import annotations

from typing import Any

import torch

from coset.lattice import Lattice
from coset.quant import QuantizationConfig

from . import _ops, kv

__all__ = ["NativeBackend", "backend"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NativeBackend:
    """C++ (all CPU cores) / CUDA kernels with the exact semantics of the PyTorch reference.

    ``supports(op, tensor, lattice, config)`` is True for ``op`` in {"encode", "decode", "quantize"} on
    Z^n / D_n (n <= 16) and E8 with any valid config (CPU tensors, and CUDA tensors when the extension was
    built with CUDA and a GPU is present), "lut_one_sided" on CPU and CUDA tensors, "lut_two_sided" on CUDA tensors only,
    "bucket_codec" (coset.dist's DDP bucket codec) on float32 CPU buckets, "quantize_rows" (coset.quant's
    per-row fake quantizer, fused) on float32 CPU matrices for the codes of the float32 + integer path, and
    "coded_gemv" (``x @ Ŵ.T`` from uint8/uint16 labels and T steps, :func:`coset.cuda.lut_gemv.lut_gemv`) for
    codes whose representatives fit its int8 codebook (q^d <= 65536, no random dither).
    """

    name = "native"
    priority = 100
    backend_api = 1  # the coset.quant backend protocol this package implements (checked at registration)
    validates_labels = True  # decode counts labels >= q and T > cap in its one pass and raises ValueError
    checks_rms_betas = True  # quantize_rows raises ValueError itself for rms betas that are not finite
    takes_previous_betas = True  # quantize_rows uses coset.quant.quantize_rows's previous_betas hint
    returns_counts = True  # quantize_rows(return_counts=True) appends the kernel's (n_overloaded, n_clamped)

    def supports(self, op: str, tensor: Any, lattice: Lattice | None, config: QuantizationConfig | None) -> bool:
        if not isinstance(tensor, torch.Tensor) or not _ops._device_ok(tensor):
            return False
        if op == "lut_one_sided":  # the GEMV kernels: lut_gemv.h (CPU), lut_gemv_cuda.cu (CUDA)
            return True
        if op == "bucket_codec":  # coset.dist's DDP bucket codec: float32 CPU buckets
            from . import bucket_codec

            return (
                isinstance(config, QuantizationConfig)
                and tensor.device.type == "cpu"
                and tensor.dtype == torch.float32
                and bucket_codec.supports(config)
            )
        if op in ("coded_gemv", "coded_weight"):
            from .lut_gemv import gemv_applicable

            return tensor.dtype in _FLOATS and isinstance(config, QuantizationConfig) and gemv_applicable(config)
        if op == "lut_two_sided":
            return tensor.device.type == "cuda"
        if op in (
            "kv_scores",
            "kv_values",
            "kv_trellis_encode",
            "kv_trellis_values",
            "kv_trellis_scores",
            "kv_trellis_attend_step",
            "kv_trellis_append",
            "kv_trellis_normalise_encode",
        ):
            # coset.kv (kv.py): CPU only
            return tensor.device.type == "cpu"
        if op in ("quantize_rows", "quantize_rows_rms"):  # coset.quant.quantize_rows (with RmsBetas), float32 CPU
            return (
                tensor.device.type == "cpu"
                and tensor.dtype == torch.float32
                and isinstance(config, QuantizationConfig)
                and isinstance(lattice, Lattice)
                and _ops.rows_applicable(lattice, config)
            )
        if op not in ("encode", "decode", "quantize"):
            return False
        if not isinstance(config, QuantizationConfig) or not isinstance(lattice, Lattice):
            return False
        if _ops.lattice_kind(lattice) is None:
            return False
        if op == "decode":
            return tensor.dtype == torch.uint8
        return tensor.dtype in _FLOATS

    def auto_select(self, op: str, tensor: Any) -> bool:
        """ "auto" does not pick the CPU ``lut_one_sided`` (the GEMV kernel on int32 indices has not been
        measured faster than coset.lut's embedding_bag path; ``backend="native"`` runs it)."""
        if op == "lut_one_sided":
            return bool(getattr(tensor, "is_cuda", False))
        return True

    def encode(self, x, lattice, config, dither):
        return _ops.encode(x, lattice, config, dither)

    def decode(self, b, T, lattice, config, dither, dtype):
        return _ops.decode(b, T, lattice, config, dither, dtype)

    def quantize(self, x, lattice, config, dither):
        return _ops.quantize(x, lattice, config, dither)

    def quantize_rows(
        self, x, betas, lattice, config, out=None, previous_betas=None, workspace=None, return_counts=False
    ):
        return _ops.quantize_rows(
            x,
            betas,
            lattice,
            config,
            out=out,
            previous_betas=previous_betas,
            workspace=workspace,
            return_counts=return_counts,
        )

    def prepare_quantize_rows(self, lattice, config, shape, rms):
        """:meth:`quantize_rows` for float32 CPU matrices of ``shape``, its constants resolved once
        (:class:`coset.quant.RowQuantizer`), or None where the fused kernel does not apply."""
        return _ops.PreparedRows(lattice, config, shape, rms) if _ops.rows_applicable(lattice, config) else None

    def bucket_codec(self):
        """coset.dist's bucket codec (the module :mod:`coset.cuda.bucket_codec`): one call per DDP bucket."""
        from . import bucket_codec

        return bucket_codec

    def coded_weight(self, idx, T, config, k):
        """The handle ``coded_gemv`` multiplies by: codes ``idx`` (n, K, M) uint8 / int16 (uint16 bits) and ``T``
        (n, K) uint8, validated once (a :class:`coset.cuda.lut_gemv.CodedWeight`, no copy)."""
        from .lut_gemv import CodedWeight

        return CodedWeight(idx=idx, T=T, config=config, k=k)

    def coded_gemv(self, x, W):
        """``x @ Ŵ.T`` (x: (B, k) float, W from :meth:`coded_weight`) -> (B, n) float32."""
        from .lut_gemv import lut_gemv

        return lut_gemv(x, W)

    def lut_one_sided(self, ix, sx, tables, q):
        return _ops.lut_one_sided(ix, sx, tables, q)

    def lut_two_sided(self, ix, sx, iy, sy, lut, q):
        return _ops.lut_two_sided(ix, sx, iy, sy, lut, q)

    def kv_scores(self, idx, t, rho, steps, t_bits, tab, cy):
        return kv.kv_scores(idx, t, rho, steps, t_bits, tab, cy)

    def kv_values(self, idx, t, rho, steps, t_bits, p, a, c):
        return kv.kv_values(idx, t, rho, steps, t_bits, p, a, c)

    def kv_trellis_encode(self, u, ks, cb):
        return kv.trellis_encode(u, ks, cb)

    def kv_trellis_values(self, stream, rho, p, ks, cb):
        return kv.trellis_values(stream, rho, p, ks, cb)

    def kv_trellis_scores(self, stream, rho, q, ks, cb):
        return kv.trellis_scores(stream, rho, q, ks, cb)

    def kv_trellis_append(self, *args, **kwargs):
        return kv.trellis_append(*args, **kwargs)

    def kv_trellis_attend_step(self, *args, **kwargs):
        return kv.trellis_attend_step(*args, **kwargs)

    def kv_trellis_normalise_encode(self, *args, **kwargs):
        return kv.trellis_normalise_encode(*args, **kwargs)

    def __repr__(self) -> str:
        return f"NativeBackend(cuda={_ops.cuda_available()}, threads={_ops.get_num_threads()})"


_BACKEND = NativeBackend()


def backend() -> NativeBackend:
    """Entry point of the ``coset.backends`` group: the process-wide :class:`NativeBackend`."""
    return _BACKEND
