"""Validated torch-tensor wrappers around the raw-pointer extension ``coset.cuda._C``.

Every function here checks shapes, dtypes, devices, values and index ranges exactly as :mod:`coset.quant` does
(the same exception types for the same inputs: NaN/Inf, out-of-range magnitudes, integer output dtypes), makes
the inputs contiguous, allocates the outputs and calls the CPU or CUDA kernel (with the tensor's device made
current). Nothing in the extension ever sees an unchecked pointer. Constants come from coset.quant's public
seam :func:`coset.quant.kernel_constants`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from coset.lattice import DnLattice, E8Lattice, Lattice, ZnLattice
from coset.lattice.validate import check_int, check_q
from coset.quant import OverloadError, QuantizationConfig, RmsBetas, kernel_constants
from coset.quant.backend import check_magnitude
from coset.quant.rms import check_rms_betas

from . import _C  # type: ignore[attr-defined]  # compiled extension: in the wheel, not the source tree

__all__ = [
    "WITH_CUDA",
    "cuda_available",
    "lattice_kind",
    "encode",
    "decode",
    "quantize",
    "quantize_rows",
    "rms_betas",
    "row_sumsq",
    "rows_applicable",
    "lut_one_sided",
    "lut_two_sided",
    "add_modq",
    "get_num_threads",
    "set_num_threads",
    "parallel_backend",
]

#: True when the extension was compiled with the CUDA kernels (nvcc present at build time).
WITH_CUDA: bool = bool(_C.with_cuda)

_KIND_Z, _KIND_D, _KIND_E8 = 0, 1, 2
MAX_DIM = 16
_NATIVE_FLOATS = (torch.float32, torch.float64)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and a GPU is visible to both the extension and torch."""
    if not WITH_CUDA:
        return False
    n, _msg = _C.cuda_device_count()
    return n > 0 and torch.cuda.is_available()


def get_num_threads() -> int:
    """Threads used by the CPU kernels (default: all cores; env ``COSET_NUM_THREADS``)."""
    return int(_C.get_num_threads())


#: The most CPU threads :func:`set_num_threads` accepts: the kernels split work in chunks of >= 2048 rows, and
#: asking libgomp for an absurd team can fail thread creation, which it treats as fatal (the process exits).
MAX_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Set the number of threads of the CPU kernels (``1 <= n <= MAX_THREADS``)."""
    _C.set_num_threads(check_int("n", n, 1, MAX_THREADS))


def parallel_backend() -> str:
    """Where the CPU kernels' threads come from: ``"openmp"`` (the process's GNU OpenMP team, e.g. torch's
    libgomp, whose workers would otherwise spin against a second pool) or ``"threads"`` (the kernels' own pool:
    no OpenMP runtime loaded, env ``COSET_OPENMP=0``, or a forked child)."""
    return str(_C.parallel_backend())


def lattice_kind(lattice: Lattice) -> int | None:
    """Kernel code of ``lattice`` (0 Z^n, 1 D_n, 2 E8) or ``None`` if the kernels do not cover it."""
    if isinstance(lattice, E8Lattice):
        return _KIND_E8
    if isinstance(lattice, DnLattice) and 3 <= lattice.dim <= MAX_DIM:
        return _KIND_D
    if isinstance(lattice, ZnLattice) and 1 <= lattice.dim <= MAX_DIM:
        return _KIND_Z
    return None


def _device_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or (t.device.type == "cuda" and cuda_available())


def _stream(t: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _consts(lattice: Lattice, config: QuantizationConfig, dithered: bool):
    """Kernel constants from coset.quant's public seam (read-only arrays; the C++ side never writes them),
    plus the largest accepted ``|x|``."""
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    return _consts_of(lattice, config, bool(dithered))


@lru_cache(maxsize=256)  # (the lattice and the frozen config are hashable); a QAT step asks twice per layer
def _consts_of(lattice: Lattice, config: QuantizationConfig, dithered: bool):
    kind = lattice_kind(lattice)
    if kind is None:
        raise ValueError(f"lattice: the native kernels support Z^n/D_n (n <= {MAX_DIM}) and E8, got {lattice!r}")
    k = kernel_constants(lattice, config, dithered)
    return kind, k.d, k.G, k.G_inv, k.eps, k.q, k.M, k.scales, k.clamp_radius, k.max_abs_input


def _check_x(x, d: int, max_abs: float, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape (N, {d}), got {tuple(x.shape)}")
    if not _device_ok(x):
        raise ValueError(f"{name}: device {x.device} is not supported by this build of coset.cuda")
    check_magnitude(x, max_abs, name)


def _check_dither(z, x: torch.Tensor, d: int) -> torch.Tensor | None:
    if z is None:
        return None
    if not isinstance(z, torch.Tensor) or z.dtype != torch.float64 or tuple(z.shape) != (x.shape[0], d):
        raise ValueError(f"dither must be None or a float64 tensor of shape ({x.shape[0]}, {d})")
    if not _device_ok(z):
        raise ValueError(f"dither: device {z.device} is not supported by this build of coset.cuda")
    z = z.to(x.device).contiguous()
    if z.numel() and not bool(torch.isfinite(z).all()):  # a NaN/Inf dither would reach float -> int casts
        raise ValueError("dither contains NaN or Inf")
    return z


def _raise_overload(n_err: int, N: int, config: QuantizationConfig) -> None:
    t = config.max_scaling_iterations
    raise OverloadError(
        f"{n_err} of {N} vectors overload even at scale beta*2^(alpha*{t}) = {config.scales[t]:.4g}; "
        "raise beta, alpha or max_scaling_iterations, or use overload_policy='clamp'"
    )


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


def encode(x: torch.Tensor, lattice: Lattice, config: QuantizationConfig, dither: torch.Tensor | None = None):
    """Fused HNLQ encoder (Algorithm 1 + overload ramp + clamp), bit-exact with ``coset.quant`` (torch).

    Parameters
    ----------
    x : (N, d) float16/bfloat16/float32/float64 tensor, finite
    lattice, config : the lattice (Z^n, D_n with n <= 16, or E8) and the configuration
    dither : None or (N, d) float64, the subtractive dither added in lattice units

    Returns
    -------
    b : (N, M, d) uint8 labels; T : (N,) uint8; clamped : (N,) bool
    """
    kind, d, G, Gi, eps, q, M, scales, rad, max_abs = _consts(lattice, config, dither is not None)
    _check_x(x, d, max_abs)
    if x.dtype not in _NATIVE_FLOATS:
        x = x.to(torch.float32)  # exact for float16 / bfloat16
    x = x.contiguous()
    z = _check_dither(dither, x, d)
    N = x.shape[0]
    b = torch.empty((N, M, d), dtype=torch.uint8, device=x.device)
    T = torch.empty(N, dtype=torch.uint8, device=x.device)
    clamped = torch.empty(N, dtype=torch.bool, device=x.device)
    single = int(config.disable_overload_protection)
    perr = int(config.overload_policy == "error")
    x_dbl = int(x.dtype == torch.float64)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            errs = torch.zeros(1, dtype=torch.int32, device=x.device)
            _C.encode_cuda(
                kind,
                d,
                G,
                Gi,
                eps,
                q,
                M,
                scales,
                single,
                perr,
                rad,
                _ptr(x),
                x_dbl,
                _ptr(z),
                N,
                _ptr(b),
                _ptr(T),
                _ptr(clamped),
                _ptr(errs),
                _stream(x),
            )
            n_err = int(errs.item()) if perr else 0
    else:
        n_err = _C.encode_cpu(
            kind,
            d,
            G,
            Gi,
            eps,
            q,
            M,
            scales,
            single,
            perr,
            rad,
            _ptr(x),
            x_dbl,
            _ptr(z),
            N,
            _ptr(b),
            _ptr(T),
            _ptr(clamped),
        )
    if n_err:
        _raise_overload(n_err, N, config)
    return b, T, clamped


def decode(
    b: torch.Tensor,
    T: torch.Tensor,
    lattice: Lattice,
    config: QuantizationConfig,
    dither: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fused HNLQ decoder (Algorithm 2, then ``(point - z) * scales[T]``), bit-exact with ``coset.quant``.

    Parameters
    ----------
    b : (N, M, d) uint8 labels in [0, q); T : (N,) integer scale steps in [0, max_scaling_iterations]
    dither : None or (N, d) float64; dtype : output dtype (float16/bfloat16/float32/float64)

    Returns
    -------
    (N, d) tensor of ``dtype``
    """
    kind, d, G, Gi, eps, q, M, scales, _, _ = _consts(lattice, config, dither is not None)
    if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.ndim != 3 or tuple(b.shape[1:]) != (M, d):
        raise ValueError(f"b must be a uint8 tensor of shape (N, {M}, {d})")
    if not _device_ok(b):
        raise ValueError(f"b: device {b.device} is not supported by this build of coset.cuda")
    N = b.shape[0]
    if (
        not isinstance(T, torch.Tensor)
        or T.dtype.is_floating_point
        or T.dtype.is_complex
        or T.dtype == torch.bool
        or tuple(T.shape) != (N,)
    ):
        raise ValueError(f"T must be an integer tensor of shape ({N},)")
    if not _device_ok(T):
        raise ValueError(f"T: device {T.device} is not supported by this build of coset.cuda")
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOATS:
        raise TypeError(f"dtype must be a floating dtype {tuple(str(t) for t in _FLOATS)}, got {dtype}")
    if T.dtype != torch.uint8:  # uint8 T can only be too large, which the kernel checks
        if N and (int(T.min()) < 0 or int(T.max()) > config.max_scaling_iterations):
            raise ValueError(f"T must lie in [0, max_scaling_iterations={config.max_scaling_iterations}]")
    b = b.contiguous()
    T = T.to(device=b.device, dtype=torch.uint8).contiguous()
    z = _check_dither(dither, b, d)
    out_dtype = dtype if dtype in _NATIVE_FLOATS else torch.float64
    out = torch.empty((N, d), dtype=out_dtype, device=b.device)
    o_dbl = int(out_dtype == torch.float64)
    # the kernels check labels < q and T <= cap on the fly (one pass) and count the bad rows
    if b.device.type == "cuda":
        with torch.cuda.device(b.device):
            bad_t = torch.zeros(1, dtype=torch.int32, device=b.device)
            _C.decode_cuda(
                kind,
                d,
                G,
                Gi,
                eps,
                q,
                M,
                scales,
                _ptr(b),
                _ptr(T),
                _ptr(z),
                N,
                _ptr(out),
                o_dbl,
                _ptr(bad_t),
                _stream(b),
            )
            bad = int(bad_t.item())
    else:
        bad = _C.decode_cpu(kind, d, G, Gi, eps, q, M, scales, _ptr(b), _ptr(T), _ptr(z), N, _ptr(out), o_dbl)
    if bad:  # (the error path only: find which input it was, with coset.quant's messages)
        if int(b.max()) >= q:
            raise ValueError(f"labels in b must lie in [0, q={q})")
        raise ValueError(f"T must lie in [0, max_scaling_iterations={config.max_scaling_iterations}]")
    return out if out_dtype == dtype else out.to(dtype)  # double -> half directly, like the reference


def quantize(x: torch.Tensor, lattice: Lattice, config: QuantizationConfig, dither: torch.Tensor | None = None):
    """Fused encode + decode (no label tensor is materialized), bit-exact with ``coset.quant.quantize``.

    Parameters
    ----------
    x : (N, d) float tensor, finite; dither : None or (N, d) float64

    Returns
    -------
    xhat : (N, d) in x.dtype; T : (N,) uint8; clamped : (N,) bool
    """
    kind, d, G, Gi, eps, q, M, scales, rad, max_abs = _consts(lattice, config, dither is not None)
    _check_x(x, d, max_abs)
    in_dtype = x.dtype
    # float16/bfloat16: exact conversion to float64 in and out, rounded once at the end like the reference
    xin = x if in_dtype in _NATIVE_FLOATS else x.to(torch.float64)
    xin = xin.contiguous()
    z = _check_dither(dither, xin, d)
    N = xin.shape[0]
    out_dtype = xin.dtype
    out = torch.empty((N, d), dtype=out_dtype, device=x.device)
    T = torch.empty(N, dtype=torch.uint8, device=x.device)
    clamped = torch.empty(N, dtype=torch.bool, device=x.device)
    single = int(config.disable_overload_protection)
    perr = int(config.overload_policy == "error")
    x_dbl, o_dbl = int(xin.dtype == torch.float64), int(out_dtype == torch.float64)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            errs = torch.zeros(1, dtype=torch.int32, device=x.device)
            _C.quantize_cuda(
                kind,
                d,
                G,
                Gi,
                eps,
                q,
                M,
                scales,
                single,
                perr,
                rad,
                _ptr(xin),
                x_dbl,
                _ptr(z),
                N,
                _ptr(out),
                o_dbl,
                _ptr(T),
                _ptr(clamped),
                _ptr(errs),
                _stream(x),
            )
            n_err = int(errs.item()) if perr else 0
    else:
        n_err = _C.quantize_cpu(
            kind,
            d,
            G,
            Gi,
            eps,
            q,
            M,
            scales,
            single,
            perr,
            rad,
            _ptr(xin),
            x_dbl,
            _ptr(z),
            N,
            _ptr(out),
            o_dbl,
            _ptr(T),
            _ptr(clamped),
        )
    if n_err:
        _raise_overload(n_err, N, config)
    return (out if out_dtype == in_dtype else out.to(in_dtype)), T, clamped


def rows_applicable(lattice: Lattice, config: QuantizationConfig) -> bool:
    """True when the fused row kernel (fast_quant.h, float32 + integer) covers the code: D4, D8 or E8, q a
    power of two, the tie offset on, no dither or centring, overload protection on, <= 65 scale steps."""
    kind = lattice_kind(lattice)
    lat = kind == _KIND_E8 or (kind == _KIND_D and lattice.dim in (4, 8))
    q = config.q
    return (
        lat
        and q & (q - 1) == 0
        and config.with_tie_dither
        and not config.with_dither
        and not config.center
        and not config.disable_overload_protection
        and len(config.scales) <= 65
    )


def quantize_rows(
    x: torch.Tensor,
    betas: torch.Tensor | RmsBetas | None,
    lattice: Lattice,
    config: QuantizationConfig,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    previous_betas: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    return_counts: bool = False,
):
    """Fused per-row fake quantizer ``out[r] = beta_r * Q(x[r] / beta_r)`` in d-blocks (last block zero padded),
    bit-exact with :func:`coset.quant.quantize_rows`'s composition; one pass, all CPU threads.

    Parameters
    ----------
    x : (R, k) float32 CPU tensor
    betas : (R,) float32, None (beta 1) or a :class:`coset.quant.RmsBetas`: the betas of
        :func:`coset.quant.rms_betas`, computed natively in the same call (a pass over x before the quantizing one)
    out : optional (out, T, clamped) to write into (contiguous CPU float32 (R, k), uint8 (R, nb), bool (R, nb);
        coset.quant.quantize_rows checks them)
    previous_betas : optional (R,) float32 CPU tensor, with ``out``: coset.quant.quantize_rows's hint that ``out``
        holds the results of the call with these betas (the kernel then re-quantizes only the blocks whose point
        may have moved; D4 / D8 codes with betas)
    workspace : optional contiguous int8 CPU tensor of R * nb * d elements: the kernel keeps each block's t = 0
        point there for the next call's hint (pass the same tensor, unchanged, every call)
    return_counts : also return ``(n_overloaded, n_clamped)``: the blocks with T > 0 or clamped, and the clamped
        ones (counted by the kernel as it writes them: a training step then scans neither mask)

    Returns
    -------
    out : (R, k) float32; T : (R, nb) uint8; clamped : (R, nb) bool, nb = ceil(k / d); and, for an RmsBetas,
    betas : (R,) float32; and, with ``return_counts``, ``(n_overloaded, n_clamped)`` ints

    Raises
    ------
    TypeError / ValueError for bad arguments or non-finite / too large ``x / beta`` (as coset.quant), OverloadError.
    """
    kind, d, G, Gi, eps, q, M, scales, rad, max_abs = _consts(lattice, config, False)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2 or x.device.type != "cpu":
        raise TypeError("x must be a float32 CPU tensor of shape (R, k)")
    R, k = x.shape
    rms = betas if isinstance(betas, RmsBetas) else None
    if (
        rms is None
        and betas is not None
        and (
            not isinstance(betas, torch.Tensor)
            or betas.dtype != torch.float32
            or tuple(betas.shape) != (R,)
            or betas.device.type != "cpu"
        )
    ):
        raise TypeError(f"betas must be None, an RmsBetas or a float32 CPU tensor of shape ({R},)")
    if not rows_applicable(lattice, config):
        raise ValueError("quantize_rows: this code is not covered by the fused kernel (see rows_applicable)")
    nb = -(-k // d)
    xc = x.contiguous()
    bc = None if rms is not None or betas is None else betas.contiguous()  # type: ignore[union-attr]
    b_out = torch.empty((R,), dtype=torch.float32) if rms is not None else None
    nb = -(-k // d)
    pb = None
    if previous_betas is not None:
        if out is None:
            raise ValueError("previous_betas is a hint about out: pass out as well")
        if (
            not isinstance(previous_betas, torch.Tensor)
            or previous_betas.dtype != torch.float32
            or tuple(previous_betas.shape) != (R,)
            or previous_betas.device.type != "cpu"
        ):
            raise TypeError(f"previous_betas must be a float32 CPU tensor of shape ({R},)")
        if betas is not None:  # (the hint needs betas: without them there is nothing to re-quantize cheaply)
            pb = previous_betas.contiguous()
    if workspace is not None and not (
        isinstance(workspace, torch.Tensor)
        and workspace.dtype == torch.int8
        and workspace.numel() == R * nb * d
        and workspace.is_contiguous()
        and workspace.device.type == "cpu"
    ):
        raise TypeError(f"workspace must be a contiguous int8 CPU tensor of {R * nb * d} elements")
    if out is None:
        res = torch.empty((R, k), dtype=torch.float32)
        T = torch.empty((R, nb), dtype=torch.uint8)
        clamped = torch.empty((R, nb), dtype=torch.bool)
    else:
        if not (isinstance(out, (tuple, list)) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError("out must be None or a tuple of three tensors (out, T, clamped)")
        res, T, clamped = out
        if not (
            res.dtype == torch.float32
            and T.dtype == torch.uint8
            and clamped.dtype == torch.bool
            and tuple(res.shape) == (R, k)
            and tuple(T.shape) == tuple(clamped.shape) == (R, nb)
            and all(t.is_contiguous() and t.device.type == "cpu" for t in out)
        ):
            raise ValueError("out must be contiguous CPU tensors: float32 (R, k), uint8 (R, nb), bool (R, nb)")
    c = (kind, d, G, Gi, eps, q, M, scales, rad, max_abs)
    return _rows_call(c, lattice, config, xc, bc, res, T, clamped, rms, b_out, pb, workspace, return_counts)


def _rows_call(c, lattice, config, xc, bc, res, T, clamped, rms, b_out, pb, ws, return_counts: bool):
    """The kernel call of :func:`quantize_rows` and :class:`PreparedRows` on checked tensors, and its errors."""
    kind, d, G, Gi, eps, q, M, scales, rad, max_abs = c
    R, k = xc.shape
    nb = -(-k // d)
    err, nonfinite, n_over, n_clamped = _C.quantize_rows_cpu(
        kind,
        d,
        G,
        Gi,
        eps,
        q,
        M,
        scales,
        int(config.overload_policy == "error"),
        rad,
        _ptr(xc),
        _ptr(bc),
        R,
        k,
        float(max_abs),
        _ptr(res),
        _ptr(T),
        _ptr(clamped),
        0.0 if rms is None else rms.scale,
        int(rms is None or rms.per_row),
        _ptr(b_out),
        _ptr(pb),
        _ptr(ws),
    )
    if b_out is not None:
        if nonfinite or err < 0:  # the kernel stops at rms betas that are not finite: coset.quant's error
            check_rms_betas(b_out, xc)
        bc = b_out
    if nonfinite:  # the reference's check and message on the scaled blocks (float32 limit: compose if it passes)
        check_magnitude(xc, float("inf"))
        check_magnitude(xc if bc is None else xc / bc.reshape(-1, 1), max_abs)
        err = -1
    if err < 0:  # the float32 + integer path is switched off (COSET_FAST_PATH=0): compose the native ops
        blocks = torch.nn.functional.pad(xc, (0, nb * d - k)).reshape(R, nb, d)
        if bc is not None:
            blocks = blocks / bc.reshape(-1, 1, 1)
        xh, Tf, cf = quantize(blocks.reshape(-1, d), lattice, config)
        if bc is not None:
            xh = xh.reshape(R, nb, d) * bc.reshape(-1, 1, 1)
        res.copy_(xh.reshape(R, nb * d)[:, :k])
        T.copy_(Tf.reshape(R, nb))
        clamped.copy_(cf.reshape(R, nb))
    elif err:
        _raise_overload(int(err), R * nb, config)
    ret = (res, T, clamped) if b_out is None else (res, T, clamped, b_out)
    if not return_counts:
        return ret
    if n_over < 0:  # composed above: count here
        n_over, n_clamped = int(torch.count_nonzero((T != 0) | clamped)), int(torch.count_nonzero(clamped))
    return (*ret, (int(n_over), int(n_clamped)))


class PreparedRows:
    """:func:`quantize_rows` on float32 ``(R, k)`` CPU matrices of one shape with its constants resolved once: the
    backend half of :class:`coset.quant.RowQuantizer`, which checks every tensor before the call (this class does
    not: the arguments are trusted).

    ``prepared(x, betas, out, previous_betas, workspace)`` with ``betas`` an (R,) float32 tensor or None (ignored
    with ``rms``), ``out`` the checked ``(res, T, clamped)`` -> ``(res, T, clamped, rms betas or None, (n_overloaded,
    n_clamped))``.
    """

    __slots__ = ("_c", "_lattice", "_config", "_rms", "_shape")

    def __init__(self, lattice: Lattice, config: QuantizationConfig, shape: tuple[int, int], rms: RmsBetas | None):
        if not rows_applicable(lattice, config):
            raise ValueError("quantize_rows: this code is not covered by the fused kernel (see rows_applicable)")
        self._c = _consts(lattice, config, False)
        self._lattice, self._config, self._rms, self._shape = lattice, config, rms, shape

    def __call__(self, x, betas, out, previous_betas=None, workspace=None):
        rms = self._rms
        b_out = torch.empty((self._shape[0],), dtype=torch.float32) if rms is not None else None
        res, T, clamped = out
        pb = previous_betas if rms is not None or betas is not None else None  # (the hint needs betas)
        r = _rows_call(
            self._c,
            self._lattice,
            self._config,
            x,
            None if rms is not None else betas,
            res,
            T,
            clamped,
            rms,
            b_out,
            pb,
            workspace,
            True,
        )
        return res, T, clamped, b_out, r[-1]


def rms_betas(x: torch.Tensor, spec: RmsBetas) -> torch.Tensor:
    """:func:`coset.quant.rms_betas` of a float32 (R, k) CPU tensor, natively: (R,) float32."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2 or x.device.type != "cpu":
        raise TypeError("x must be a float32 CPU tensor of shape (R, k)")
    if not isinstance(spec, RmsBetas):
        raise TypeError(f"spec must be an RmsBetas, got {type(spec).__name__}")
    xc = x.contiguous()
    out = torch.empty((x.shape[0],), dtype=torch.float32)
    _C.rms_betas_cpu(_ptr(xc), x.shape[0], x.shape[1], spec.scale, int(spec.per_row), _ptr(out))
    return out


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """:func:`coset.quant.rms.row_sumsq` of a float32 (R, k) CPU tensor, natively: (R,) float64."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2 or x.device.type != "cpu":
        raise TypeError("x must be a float32 CPU tensor of shape (R, k)")
    xc = x.contiguous()
    out = torch.empty((x.shape[0],), dtype=torch.float64)
    _C.row_sumsq_cpu(_ptr(xc), x.shape[0], x.shape[1], _ptr(out))
    return out


# ------------------------------------------------------------------------------------------------- LUT ops
def _check_q(q) -> int:
    return check_q(q, 16)


def _check_idx(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_f32(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_range(name: str, t: torch.Tensor, Q: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= Q):
        raise ValueError(f"{name}: label indices must lie in [0, Q={Q})")


def _same_device(*ts: torch.Tensor) -> torch.device:
    dev = ts[0].device
    for t in ts[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on the same device, got {dev} and {t.device}")
    if not _device_ok(ts[0]):
        raise ValueError(f"device {dev} is not supported by this build of coset.cuda")
    return dev


def _cuda_only(op: str, dev: torch.device) -> None:
    # The CPU LUT kernels lost to coset.lut's PyTorch path (benchmarks/results/lut.md) and were removed.
    if dev.type != "cuda":
        raise ValueError(
            f"{op}: the native LUT kernels run on CUDA tensors only; on the CPU use coset.lut "
            "(backend='auto' or 'torch')"
        )


def lut_one_sided(ix: torch.Tensor, sx: torch.Tensor, tables: torch.Tensor, q: int) -> torch.Tensor:
    """One-sided LUT scores ``scores[r, j] = sum_k sx[r,k] sum_m q^m tables[j, k, ix[r,k,m]]``.

    Parameters
    ----------
    ix : (n, K, M) int32 label indices ``sum_i b_i q^i`` of n encoded rows
    sx : (n, K) float32 per-block scales
    tables : (m, K, Q) float32, ``tables[j, k, i] = <a_i, y_jk>``
    q : int in [2, 16]

    Returns
    -------
    (n, m) float32 (accumulated in float32 by the GEMV kernels of lut_gemv.h / lut_gemv_cuda.cu, 8 queries per pass)

    Raises
    ------
    TypeError / ValueError for bad dtypes, shapes, devices or label indices >= Q.
    """
    q = _check_q(q)
    _check_idx("ix", ix, 3)
    n, K, M = ix.shape
    _check_f32("sx", sx, (n, K))
    if not isinstance(tables, torch.Tensor) or tables.dtype != torch.float32 or tables.ndim != 3:
        raise TypeError("tables must be a float32 tensor of shape (m, K, Q)")
    m, K2, Q = tables.shape
    if K2 != K:
        raise ValueError(f"tables must have K={K} blocks (dim 1), got {K2}")
    dev = _same_device(ix, sx, tables)
    _check_range("ix", ix, Q)
    ix, sx, tables = ix.contiguous(), sx.contiguous(), tables.contiguous()
    out = torch.empty((n, m), dtype=torch.float32, device=dev)
    if n == 0 or m == 0:
        return out
    if K == 0 or M == 0:
        return out.zero_()
    # GEMV kernel on codes (lut_gemv.h; CUDA: lut_gemv_cuda.cu): tables as [k][i][query], 1/2/4/8 queries a pass
    for j0 in range(0, m, 8):
        tj = tables[j0 : j0 + 8]
        B = tj.shape[0]
        Bk = 1 if B == 1 else 2 if B == 2 else 4 if B <= 4 else 8
        tab = tj.permute(1, 2, 0)
        if Bk != B:
            tab = torch.nn.functional.pad(tab, (0, Bk - B))
        tab = tab.contiguous()
        res = torch.empty((n, Bk), dtype=torch.float32, device=dev)
        if dev.type == "cpu":
            _C.lut_gemv_tables_cpu(_ptr(ix), 4, 0, 0, 0, _ptr(sx), _ptr(tab), n, K, M, Q, q, Bk, _ptr(res))
        else:
            with torch.cuda.device(dev):
                _C.lut_gemv_cuda(
                    _ptr(ix), 4, 0, 0, _ptr(sx), 0, 0, 0, 0, _ptr(tab), Q, n, K, M, q, Bk, _ptr(res), _stream(ix), 0
                )
        out[:, j0 : j0 + B] = res[:, :B]
    return out


_LUT_BYTES = {torch.int8: 1, torch.int16: 2, torch.int32: 4}


def lut_two_sided(
    ix: torch.Tensor, sx: torch.Tensor, iy: torch.Tensor, sy: torch.Tensor, lut: torch.Tensor, q: int
) -> torch.Tensor:
    """(CUDA tensors only) Two-sided LUT inner products of two encoded sets.

    ``out[r, j] = sum_k sx[r,k] sy[j,k] sum_{m,l} q^(m+l) lut[ix[r,k,m], iy[j,k,l]]`` with the inner double
    sum exact in integers (int64 accumulator).

    Parameters
    ----------
    ix : (n, K, M) int32; sx : (n, K) float32; iy : (m, K, M) int32; sy : (m, K) float32
    lut : (Q, Q) int8/int16/int32, ``lut[i, j] = <a_i, a_j>``; q : int in [2, 16]

    Returns
    -------
    (n, m) float32
    """
    q = _check_q(q)
    _check_idx("ix", ix, 3)
    _check_idx("iy", iy, 3)
    n, K, M = ix.shape
    m = iy.shape[0]
    if tuple(iy.shape[1:]) != (K, M):
        raise ValueError(f"iy must have shape (m, {K}, {M}), got {tuple(iy.shape)}")
    _check_f32("sx", sx, (n, K))
    _check_f32("sy", sy, (m, K))
    if not isinstance(lut, torch.Tensor) or lut.dtype not in _LUT_BYTES:
        raise TypeError("lut must be an int8, int16 or int32 tensor")
    if lut.ndim != 2 or lut.shape[0] != lut.shape[1]:
        raise ValueError(f"lut must have shape (Q, Q), got {tuple(lut.shape)}")
    Q = lut.shape[0]
    dev = _same_device(ix, sx, iy, sy, lut)
    _cuda_only("lut_two_sided", dev)
    _check_range("ix", ix, Q)
    _check_range("iy", iy, Q)
    ix, sx, iy, sy, lut = ix.contiguous(), sx.contiguous(), iy.contiguous(), sy.contiguous(), lut.contiguous()
    out = torch.empty((n, m), dtype=torch.float32, device=dev)
    if n == 0 or m == 0:
        return out
    if K == 0 or M == 0:
        return out.zero_()
    nb = _LUT_BYTES[lut.dtype]
    with torch.cuda.device(dev):
        _C.lut_two_sided_cuda(
            _ptr(ix), _ptr(sx), _ptr(iy), _ptr(sy), _ptr(lut), nb, n, m, K, M, Q, q, _ptr(out), _stream(ix)
        )
    return out


def add_modq(a: torch.Tensor, b: torch.Tensor, q: int) -> torch.Tensor:
    """``(a + b) mod q`` on two uint8 label tensors of the same shape (same result as ``coset.quant.add_modq``).

    Parameters
    ----------
    a, b : uint8 tensors of one shape, entries in [0, q); q : int in [2, 16]

    Returns
    -------
    uint8 tensor of that shape
    """
    q = _check_q(q)
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError(f"{name} must be a uint8 tensor")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dev = _same_device(a, b)
    if a.numel() and (int(a.max()) >= q or int(b.max()) >= q):
        raise ValueError(f"labels must lie in [0, q={q})")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _C.add_modq_cuda(_ptr(a), _ptr(b), _ptr(out), a.numel(), q, _stream(a))
    else:
        _C.add_modq_cpu(_ptr(a), _ptr(b), _ptr(out), a.numel(), q)
    return out
