"""The float64 core of HNLQ: Algorithm 1, Algorithm 2, the centring offset, the clamp radius, the flat
reference encoder/decoder and the input checks. The bottom module of coset.quant (it imports only
:mod:`coset.lattice` and :mod:`.config`); every user-facing module and every native kernel follows it.

Algorithm 1 (Kaplan & Ordentlich 2025, arXiv 2505.13164, §3): for one vector in lattice units ``g``:
``lambda_0 = Q(g)``, ``lambda_{m+1} = Q(lambda_m / q)``, ``b_m = G^{-1} lambda_m mod q``; overload iff
``Q(lambda_{M-1} / q) != 0``. The vector is scaled by ``1 / (beta 2^(alpha T))`` with the smallest T that does not
overload; past the cap it is clamped radially (``overload_policy="clamp"``) or refused (``"error"``).

Algorithm 2: ``x_hat = s_T (sum_m q^m (G b_m - q Q(G b_m / q)) - z)`` with ``z`` the dither passed to the
encoder (random dither and/or the centring offset ``c``, :mod:`coset.quant.offset`).
"""

from __future__ import annotations

import math
import threading
import warnings

import torch

from coset.lattice import Lattice
from coset.lattice.validate import FLOAT_DTYPES, check_bool, check_int, check_q

from .config import ClampWarning, OverloadError, QuantizationConfig

__all__ = [
    "resolve",
    "check_labels",
    "check_label_ranges",
    "encode_layers",
    "coset_representative",
    "decode_lattice_units",
    "constellation_offset",
    "clamp_radius",
    "encode_flat",
    "decode_flat",
    "check_out_dtype",
    "check_magnitude",
    "check_vector_shape",
    "max_abs_input",
    "MAX_LATTICE_UNITS",
    "warn_clamped",
    "count_true",
    "ENUMERATE_LIMIT",
    "SAMPLE_LABELS",
    "SAMPLE_SEED",
]


# ------------------------------------------------------------------------------------------ arguments
def resolve(config: QuantizationConfig | None, lattice: Lattice | None = None) -> tuple[Lattice, QuantizationConfig]:
    """Fill in defaults: ``config`` defaults to ``QuantizationConfig()``, ``lattice`` to ``config.lattice``.

    A ``lattice`` passed explicitly must be the one ``config.lattice_type`` names (compared by name,
    case-insensitively); otherwise ``ValueError``: the labels would be decoded with another lattice.
    """
    if config is None:
        config = QuantizationConfig()
    elif not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if lattice is None:
        return config.lattice, config
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    if lattice.name.strip().upper() != config.lattice_type.strip().upper():
        raise ValueError(
            f"lattice {lattice.name!r} disagrees with config.lattice_type={config.lattice_type!r}; "
            "pass lattice=None (the config names the lattice) or a matching one"
        )
    return lattice, config


#: ``|x| / beta`` above this is refused: the encoder's float64 arithmetic (``G^{-1} x``, the sums of Q_L)
#: would overflow. Norms are computed overflow-free below it (:func:`_seq_norm`).
MAX_LATTICE_UNITS = 2.0**900
#: With ``disable_overload_protection`` the vector is quantized at T = 0 with no ramp and no clamp; float64 holds
#: lattice points (half-integers) exactly only below 2^52, so beyond 2^50 backends could round differently.
MAX_UNPROTECTED_LATTICE_UNITS = 2.0**50


def max_abs_input(config: QuantizationConfig) -> float:
    """The largest ``|x|`` an encoder accepts under ``config``: ``beta * 2^900`` (inf when that overflows), or
    ``beta * 2^50`` when ``disable_overload_protection`` leaves the float64 closest-point search no scaling."""
    units = MAX_UNPROTECTED_LATTICE_UNITS if config.disable_overload_protection else MAX_LATTICE_UNITS
    return config.scales[0] * units


def check_magnitude(x: torch.Tensor, max_abs: float, argname: str = "x") -> None:
    """One pass over ``x``: ``ValueError`` for NaN/Inf or an entry above ``max_abs`` (the same rule and message on
    every backend)."""
    if x.numel() == 0:
        return
    # one read of x and no temporary (x.abs().amax() wrote a full-size |x| first: twice the time); NaN
    # propagates through aminmax, -inf shows as -lo
    lo, hi = torch.aminmax(x.detach())
    m = max(-float(lo), float(hi))
    if not math.isfinite(m):
        raise ValueError(f"{argname} contains NaN or Inf; HNLQ cannot encode non-finite values")
    if m > max_abs:
        raise ValueError(
            f"{argname} has an entry of magnitude {m:.4g} > {max_abs:.4g} (beta * 2^900, or beta * 2^50 with "
            "disable_overload_protection): x / beta would leave the range of the encoder's exact float64 arithmetic; "
            "use a larger beta"
        )


def check_vector_shape(x, d: int, argname: str = "x") -> None:
    """Validate a float tensor ``(..., d)`` (type, dtype and shape only: no pass over the values)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{argname} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != d:
        raise ValueError(
            f"{argname} must have last dimension d={d} (use coset.quant.to_blocks for other lengths), "
            f"got shape {tuple(x.shape)}"
        )


def check_labels(b, T, lattice: Lattice, config: QuantizationConfig, ranges: bool = True) -> None:
    """Validate labels ``(..., M, d)`` in [0, q) and, unless None, ``T`` ``(...)`` in [0, cap].

    ``ranges=False``: types and shapes only (then :func:`check_label_ranges`, or the caller's kernel in its own
    pass, checks the values).
    """
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype.is_floating_point or b.dtype == torch.bool or b.dtype.is_complex:
        raise TypeError(f"b must be an integer tensor of labels, got dtype {b.dtype}")
    if b.ndim < 2 or b.shape[-1] != lattice.dim or b.shape[-2] != config.M:
        raise ValueError(f"b must have shape (..., M={config.M}, d={lattice.dim}), got {tuple(b.shape)}")
    if T is not None:
        if not isinstance(T, torch.Tensor):
            raise TypeError(f"T must be a torch.Tensor or None, got {type(T).__name__}")
        if T.shape != b.shape[:-2]:
            raise ValueError(f"T must have shape {tuple(b.shape[:-2])}, got {tuple(T.shape)}")
        if T.dtype.is_floating_point or T.dtype.is_complex or T.dtype == torch.bool:
            raise TypeError(f"T must be an integer tensor, got {T.dtype}")
    if ranges:
        check_label_ranges(b, T, config)


def check_label_ranges(b: torch.Tensor, T: torch.Tensor | None, config: QuantizationConfig) -> None:
    """The value checks of :func:`check_labels`: labels in [0, q), T in [0, max_scaling_iterations]."""
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= config.q):
        raise ValueError(f"labels in b must lie in [0, q={config.q})")
    if T is not None and T.numel() and (int(T.min()) < 0 or int(T.max()) > config.max_scaling_iterations):
        raise ValueError(f"T must lie in [0, max_scaling_iterations={config.max_scaling_iterations}]")


def check_out_dtype(dtype) -> torch.dtype:
    """The output dtype of a decoder: a floating dtype (integer outputs would truncate the reconstruction)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype {tuple(str(t) for t in FLOAT_DTYPES)}, got {dtype}")
    return dtype


# ------------------------------------------------------------------------------------ Algorithms 1, 2
def encode_layers(g: torch.Tensor, lattice: Lattice, q: int, M: int, tie_dither: bool = True):
    """Algorithm 1 on float64 lattice-unit vectors ``(N, d)``.

    Returns
    -------
    b : (N, M, d) uint8 labels, b[:, 0] the finest layer
    top : (N, d) float64, ``Q(lambda_{M-1}/q)``; the vector overloads iff ``top != 0``.
    """
    labels = []
    for _ in range(M):
        lam = lattice.closest_point64(g, tie_dither)
        labels.append(torch.remainder(lattice.coords64(lam), q))
        g = lam / q
    top = lattice.closest_point64(g, tie_dither)
    return torch.stack(labels, dim=-2).to(torch.uint8), top


def coset_representative(b: torch.Tensor, lattice: Lattice, q: int, tie_dither: bool = True) -> torch.Tensor:
    """``a(b) = G b - q Q(G b / q)``, the representative of label ``b`` in ``A_q = L ∩ qV`` (float64)."""
    Gb = lattice.points64(b)
    return Gb - q * lattice.closest_point64(Gb / q, tie_dither)


def decode_lattice_units(b: torch.Tensor, lattice: Lattice, q: int, tie_dither: bool = True) -> torch.Tensor:
    """Algorithm 2 without scaling: ``(..., M, d)`` labels -> ``(..., d)`` float64 lattice point (exact)."""
    M = b.shape[-2]
    out = coset_representative(b[..., 0, :], lattice, q, tie_dither)
    for m in range(1, M):
        out = out + float(q**m) * coset_representative(b[..., m, :], lattice, q, tie_dither)
    return out


# ------------------------------------------------------------------------------------ centring offset
#: A_q is enumerated exactly when q^d is at most this many labels.
ENUMERATE_LIMIT = 2**20
#: Otherwise the mean of A_q is estimated from this many uniform labels drawn with ``SAMPLE_SEED``.
SAMPLE_LABELS = 2**18
SAMPLE_SEED = 0x5EED_C0DE
#: Estimates are rounded to this grid so that they do not depend on the summation order of a platform.
_ROUND = 2.0**-20

_lock = threading.Lock()
_offsets: dict[tuple, torch.Tensor] = {}


def _mean_representative(lattice: Lattice, q: int, tie_dither: bool) -> torch.Tensor:
    d = lattice.dim
    if q**d <= ENUMERATE_LIMIT:
        idx = torch.arange(q**d, dtype=torch.int64)
        labels = torch.stack([(idx // q**i) % q for i in range(d)], dim=-1)
        a = coset_representative(labels, lattice, q, tie_dither)
        return a.sum(0) / float(q**d)  # the representatives are integers or halves: the sum is exact
    gen = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
    labels = torch.randint(0, q, (SAMPLE_LABELS, d), generator=gen, dtype=torch.int64)
    a = coset_representative(labels, lattice, q, tie_dither)
    return torch.round(a.sum(0) / float(SAMPLE_LABELS) / _ROUND) * _ROUND


def constellation_offset(lattice: Lattice, q: int, M: int, tie_dither: bool = True) -> torch.Tensor:
    """Centroid of the HNLQ constellation ``sum_m q^m A_q`` with uniform labels, in lattice units.

    ``c = mean(A_q) (q^M - 1) / (q - 1)``. ``A_q`` is enumerated exactly when ``q^d <= 2^20``
    (:data:`ENUMERATE_LIMIT`); otherwise ``mean(A_q)`` is *estimated* from a fixed-seed sample of ``2^18``
    uniform labels (:data:`SAMPLE_LABELS`, :data:`SAMPLE_SEED`), rounded to a multiple of ``2^-20``. The
    estimate is deterministic, and any fixed vector is a correct offset as long as the encoder and the decoder
    use the same one (they both call this function); only how well the code is centred depends on it.

    Parameters
    ----------
    lattice : Lattice
    q : int in [2, 256]
    M : int >= 1, number of layers
    tie_dither : the tie rule of the codes (``config.with_tie_dither``); it changes ``A_q``

    Returns
    -------
    (d,) float64 tensor on the CPU (cached per lattice, q, M and tie rule; do not modify it in place)

    Raises
    ------
    TypeError for a non-Lattice, non-int q/M or non-bool tie_dither; ValueError for q outside [2, 256] or M < 1.
    """
    if not isinstance(lattice, Lattice):
        raise TypeError(f"lattice must be a coset.lattice.Lattice, got {type(lattice).__name__}")
    check_q(q, 256)
    check_int("M", M, 1)
    check_bool("tie_dither", tie_dither)
    key = (type(lattice).__name__, lattice.name, lattice.G.numpy().tobytes(), q, M, tie_dither)
    with _lock:
        c = _offsets.get(key)
    if c is None:
        c = _mean_representative(lattice, q, tie_dither) * ((q**M - 1) / (q - 1))
        with _lock:
            c = _offsets.setdefault(key, c)
    return c


# ------------------------------------------------------------------------------------------ clamping
def _safe_radius(lattice: Lattice, q: int, M: int, dithered: bool, offset_norm: float = 0.0) -> float:
    """Radius (lattice units) below which a vector cannot overload.

    Sandwich bound (arXiv 2505.13164, §4): ``||lambda||_V <= q^M (1 - r)`` implies no overload, with
    ``r = (1 - q^(1-M)) / (q - 1)``. ``||.||_V <= ||.||_2 / rho`` (packing radius rho) and
    ``||Q(x)|| <= ||x|| + R_cov``; a random dither adds at most another R_cov and a centring offset ``c``
    (``config.center``) at most ``offset_norm = ||c||``. 1% margin for rounding.
    """
    r = (1.0 - q ** (1.0 - M)) / (q - 1.0)
    rad = (
        lattice.packing_radius * q**M * (1.0 - r)
        - lattice.covering_radius * (2.0 if dithered else 1.0)
        - float(offset_norm)
    )
    return 0.99 * rad


def clamp_radius(lattice: Lattice, config: QuantizationConfig, dithered: bool) -> float:
    """The clamp radius of the encoder (and of every backend) for one call.

    Parameters
    ----------
    lattice, config : the code
    dithered : whether a ``dither`` tensor is passed to the encoder. With ``config.center`` the dither
        tensor always holds the offset ``c``; it then contains a random part iff ``config.with_dither``.

    Returns
    -------
    float, ``_safe_radius(lattice, q, M, random_dither, ||c||)`` (``||c|| = 0`` without centring)
    """
    if not config.center:
        return _safe_radius(lattice, config.q, config.M, dithered)
    c = constellation_offset(lattice, config.q, config.M, config.with_tie_dither)
    return _safe_radius(lattice, config.q, config.M, config.with_dither, math.sqrt(float((c * c).sum())))


def _seq_norm(u: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dim, accumulated left to right (``seq_norm`` in the C++ kernels).

    Above 2^500 a vector is first divided by the power of two of its largest entry (exact), so that no square
    overflows (1e200 has a finite norm); below, the plain formula.
    """
    m = u.abs().amax(dim=-1)
    big = m > 2.0**500
    if bool(big.any()):
        e = torch.where(big, torch.pow(2.0, torch.frexp(m).exponent.to(torch.float64)), torch.ones_like(m))
        v = u / e.unsqueeze(-1)
    else:
        e, v = None, u
    s = v[..., 0] * v[..., 0]
    for i in range(1, v.shape[-1]):
        s = s + v[..., i] * v[..., i]
    return torch.sqrt(s) if e is None else torch.sqrt(s) * e


# ------------------------------------------------------------------------- flat reference encoder/decoder
def encode_flat(x64: torch.Tensor, lattice: Lattice, config: QuantizationConfig, z: torch.Tensor | None):
    """Reference encoder on float64 ``(N, d)`` (``z``: the backend's ``dither``): returns ``(b, T, clamped)``."""
    N, d = x64.shape
    q, M = config.q, config.M
    dev = x64.device
    b = torch.zeros((N, M, d), dtype=torch.uint8, device=dev)
    T = torch.zeros(N, dtype=torch.uint8, device=dev)
    clamped = torch.zeros(N, dtype=torch.bool, device=dev)
    scales = config.scales
    steps = 1 if config.disable_overload_protection else len(scales)
    idx = torch.arange(N, device=dev)
    for t in range(steps):
        xs = x64.index_select(0, idx) if t else x64
        u = xs / scales[t]
        g = u + z.index_select(0, idx) if z is not None else u
        bt, top = encode_layers(g, lattice, q, M, config.with_tie_dither)
        ovl = (top != 0).any(dim=-1)
        if config.disable_overload_protection:
            b = bt
            break
        ok = ~ovl
        b[idx[ok]] = bt[ok]
        T[idx[ok]] = t
        idx = idx[ovl]
        if idx.numel() == 0:
            break
        if t == steps - 1:
            # still overloaded at the largest scale
            if config.overload_policy == "error":
                raise OverloadError(
                    f"{idx.numel()} of {N} vectors overload even at scale beta*2^(alpha*{t}) = {scales[t]:.4g}; "
                    "raise beta, alpha or max_scaling_iterations, or use overload_policy='clamp'"
                )
            ub = u[ovl]
            zb = z.index_select(0, idx) if z is not None else None
            rad = clamp_radius(lattice, config, z is not None)
            if rad > 0:
                nrm = _seq_norm(ub)
                factor = torch.clamp(rad / nrm, max=1.0)
                ub = ub * factor.unsqueeze(-1)
            else:
                ub = torch.zeros_like(ub)
            g = ub + zb if zb is not None else ub
            bt, top = encode_layers(g, lattice, q, M, config.with_tie_dither)
            still = (top != 0).any(dim=-1)
            if bool(still.any()):  # cannot happen by the sandwich bound; encode those as the origin
                g0 = torch.zeros_like(ub[still]) if zb is None else zb[still]
                b0, top0 = encode_layers(g0, lattice, q, M, config.with_tie_dither)
                bt[still] = b0
            b[idx] = bt
            T[idx] = t
            clamped[idx] = True
    return b, T, clamped


def decode_flat(b, T, lattice: Lattice, config: QuantizationConfig, z: torch.Tensor | None, dtype):
    """Reference decoder on ``(N, M, d)`` labels and ``(N,)`` T (or None): ``(N, d)`` of ``dtype``."""
    y = decode_lattice_units(b, lattice, config.q, config.with_tie_dither)
    if z is not None:
        y = y - z
    scales = torch.tensor(config.scales, dtype=torch.float64, device=b.device)
    s = scales[T.long()] if T is not None else scales[0].expand(y.shape[0])
    return (y * s.unsqueeze(-1)).to(dtype)


def count_true(mask: torch.Tensor) -> int:
    """The number of True (non-zero) entries of a mask; fast when there are none (the common case of clamp masks).

    A QAT layer checks its 262k-block clamp mask every training step: torch's ``any`` of a bool tensor takes
    ~140 us there, numpy's (a byte scan) ~6 us."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not mask.numel():
        return 0
    if mask.dtype == torch.bool and mask.device.type == "cpu":
        if not mask.detach().numpy().any():
            return 0
    elif not bool(mask.any()):
        return 0
    return int(torch.count_nonzero(mask))


def warn_clamped(
    clamped: torch.Tensor, config: QuantizationConfig, what: str = "encode", stacklevel: int = 3, n: int | None = None
) -> None:
    """One :class:`ClampWarning` per call that clamped any vector, with the count (a clamp loses data); ``n``: the
    count when the caller has it (no scan of the mask)."""
    n = count_true(clamped) if n is None else n
    if n:
        warnings.warn(
            f"{what}: {n} of {clamped.numel()} vectors overloaded even at T = max_scaling_iterations="
            f"{config.max_scaling_iterations} and were clamped (data lost); raise beta, alpha or "
            "max_scaling_iterations, or use overload_policy='error'",
            ClampWarning,
            stacklevel=stacklevel,
        )
