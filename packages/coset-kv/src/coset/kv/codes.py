"""HNLQ codes of head vectors: encode ``(B, H, L, D)`` keys or values into bytes, decode them back.

Layout of one coded tensor (:class:`KVCodes`), ``K = D / 8`` blocks per head vector:

* ``idx`` ``(B, H, L, K, M)`` uint8: label of layer m of block k, read as the 8 bits ``b_0 .. b_7`` of the
  E8/q=2 label (little-endian), i.e. its index in the block's 256-entry tables (:mod:`coset.lut.index`);
* ``t`` ``(B, H, L, ceil(K t_bits / 8))`` uint8: the packed overload steps T (empty with ``t_bits = 0``);
* ``scale`` ``(B, H, L)``: ``rho = rms`` of the head vector, float16 (``config.scale_bits = 16``) or an 8-bit
  log code ``e`` (``scale_bits = 8``, uint8): ``rho = 2^((e - 128) / 8)`` (steps of 9%, range 2^-16 .. 2^16),
  ``e = 0`` for a zero vector. The dtype of the stored tensor says which (:func:`scale_values`).

Decoding: ``x = R^T (rho * s_T * (sum_m 2^m a(b_m) - c))`` per block, with ``a`` the coset representatives
of E8 mod 2E8, ``c`` the centring offset and ``s_T = beta 2^(alpha T)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import torch

from coset.lut import representative_table
from coset.quant import ClampWarning, constellation_offset, decode, encode, pack_labels

from .config import BLOCK, KVQuantConfig
from .rotation import HeadRotation
from .trellis import TrellisCode, trellis_decode, trellis_encode

__all__ = [
    "KVCodes",
    "encode_states",
    "encode_checked",
    "decode_states",
    "block_scales",
    "code_tables",
    "step_table",
    "unpack_t",
    "scale_values",
    "check_codes",
    "head_dim_of",
]

_FP16_MAX = float(torch.finfo(torch.float16).max)
#: The largest per-vector rms each scale format holds: float16's max, and the top 8-bit log step 2^(127/8)
#: (an rms up to half a step above it still rounds to it).
_MAX_RMS = {16: _FP16_MAX, 8: 2.0 ** (127.5 / 8)}


@dataclass
class KVCodes:
    """Coded head vectors (see the module docstring); all tensors share the leading ``(B, H, L)``.

    ``code`` is the :meth:`KVQuantConfig.code_key` of the code that wrote them (``None``: not recorded, e.g.
    codes assembled by hand); readers check it, so codes read with another code raise instead of decoding
    to wrong vectors (two codes can share every tensor shape: t_bits 1 and 2 at head_dim 32, or another beta).
    """

    idx: torch.Tensor
    t: torch.Tensor
    scale: torch.Tensor
    code: tuple | None = None

    @property
    def nbytes(self) -> int:
        """Stored bytes: every label, T and scale byte."""
        return sum(x.numel() * x.element_size() for x in (self.idx, self.t, self.scale))


@cache
def _tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    qc = KVQuantConfig(bits=bits, beta=1.0).quant_config()
    a = representative_table(qc.lattice, 2, qc.with_tie_dither).to(device=device, dtype=torch.float32)
    c = constellation_offset(qc.lattice, 2, bits, qc.with_tie_dither).to(device=device, dtype=torch.float32)
    return a, c


@cache
def _bit_weights(device: torch.device) -> torch.Tensor:
    return 1 << torch.arange(BLOCK, dtype=torch.int32, device=device)


def code_tables(config: KVQuantConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)``: the ``(256, 8)`` coset representatives ``a_j`` (index order) and the ``(8,)`` centring offset
    of the code, float32 (exact: E8 points are integers or halves)."""
    return _tables(config.bits, torch.device(device if device is not None else "cpu"))


def _check_states(x, head_dim: int | None = None, name: str = "states") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (batch, kv_heads, seq_len, head_dim), got {tuple(x.shape)}")
    D = x.shape[-1]
    if head_dim is not None and D != head_dim:
        raise ValueError(f"{name} must have head_dim={head_dim}, got {D}")
    if D % BLOCK or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two and a multiple of {BLOCK}, got {D}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def encode_states(x: torch.Tensor, rotation: HeadRotation, config: KVQuantConfig | TrellisCode) -> KVCodes:
    """Encode key or value states.

    Parameters
    ----------
    x : (B, H, L, D) float tensor, finite; H = ``rotation.num_heads``, D = ``rotation.head_dim``
    rotation : the layer's :class:`HeadRotation`
    config : KVQuantConfig (E8 code) or TrellisCode

    Returns
    -------
    KVCodes with ``idx (B, H, L, D/8, bits)``, ``t (B, H, L, t_bytes)``, ``scale (B, H, L)`` float16 or uint8;
    for a TrellisCode ``idx`` is the bit stream ``(B, H, L, stream_bytes)`` and ``t`` is ``(B, H, L, 0)``

    Raises
    ------
    TypeError for a non-float tensor; ValueError for a wrong shape, head count or non-finite values, or a head
    vector whose rms is past the largest per-vector scale (65504 with float16 scales, ~6e4 with 8-bit ones).
    """
    if not isinstance(rotation, HeadRotation):
        raise TypeError(f"rotation must be a HeadRotation, got {type(rotation).__name__}")
    if not isinstance(config, (KVQuantConfig, TrellisCode)):
        raise TypeError(f"config must be a KVQuantConfig or TrellisCode, got {type(config).__name__}")
    _check_states(x, rotation.head_dim)
    if x.shape[1] != rotation.num_heads:
        raise ValueError(f"states have {x.shape[1]} heads, the rotation was built for {rotation.num_heads}")
    return encode_checked(x, rotation, config)


def encode_checked(
    x: torch.Tensor, rotation: HeadRotation, config: KVQuantConfig | TrellisCode, names: tuple[str, ...] = ("states",)
) -> KVCodes:
    """:func:`encode_states` without the argument checks (for callers that made them: it runs once per layer
    and decoding step), except the range of the per-vector scales (ValueError naming ``names[i]`` when the
    offending vector is in the i-th of ``len(names)`` equal parts of the batch axis)."""
    u, scale = normalise_checked(x, rotation, config.scale_bits, names)
    return encode_normalised(u, scale, config)


def normalise_checked(
    x: torch.Tensor, rotation: HeadRotation, scale_bits: int, names: tuple[str, ...] = ("states",)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of :func:`encode_checked`, shared by every code of that ``scale_bits``: the rotated vectors
    divided by their scales ``u (B, H, L, D)`` float32, and the stored scale codes ``(B, H, L)``."""
    B = x.shape[0]
    xr = rotation.rotate(x.to(torch.float32))
    rms = xr.pow(2).mean(-1).sqrt()
    limit = _MAX_RMS[scale_bits]
    bad = rms > limit  # also an rms that overflowed float32
    if bool(bad.any()):
        part = names[int(bad.nonzero()[0, 0]) * len(names) // B]
        raise ValueError(
            f"{part} has a head vector of rms {float(rms.max()):.3g} (after centring and key scaling): past the "
            f"largest per-vector scale of the code ({limit:.6g} with {scale_bits}-bit scales)"
        )
    if scale_bits == 8:
        # nearest log step (not the next one up: T absorbs the rare overload, a scale rounded up would coarsen
        # every vector); vectors below 2^-16 rms get the smallest step, exact zeros the code 0
        e = torch.round(8.0 * torch.log2(rms.clamp(min=2.0**-20)) + 128.0).clamp_(1, 255)
        scale = torch.where(rms > 0, e, torch.zeros_like(e)).to(torch.uint8)
    else:
        scale = rms.clamp(max=_FP16_MAX).to(torch.float16)
    rho = scale_values(scale)
    div = torch.where(rho > 0, rho, torch.ones_like(rms))
    return xr / div.unsqueeze(-1), scale


def encode_normalised(u: torch.Tensor, scale: torch.Tensor, config: KVQuantConfig | TrellisCode) -> KVCodes:
    """The second half of :func:`encode_checked`: the codes of ``u (B, H, L, D)`` (finite) under ``config``."""
    B, H, L, D = u.shape
    K = D // BLOCK
    if isinstance(config, TrellisCode):
        stream = trellis_encode(u.reshape(-1, D), config, checked=True).view(B, H, L, -1)
        t = torch.zeros((B, H, L, 0), dtype=torch.uint8, device=u.device)
        return KVCodes(idx=stream, t=t, scale=scale, code=config.code_key())
    qc = config.quant_config()
    with warnings.catch_warnings():  # overload_policy="clamp" is the design: the rare clamped block is counted
        warnings.simplefilter("ignore", ClampWarning)  # in the measured quality, not worth a warning per token
        b, T = encode(u.reshape(B, H, L, K, BLOCK), config=qc)  # b (B,H,L,K,M,8) uint8 in {0,1}; T (B,H,L,K) uint8
    idx = (b.to(torch.int32) * _bit_weights(u.device)).sum(-1).to(torch.uint8)
    if config.t_bits:
        per = 8 // config.t_bits
        Kp = -(-K // per) * per
        Tp = T if Kp == K else torch.nn.functional.pad(T, (0, Kp - K))
        t = pack_labels(Tp, 2**config.t_bits).view(B, H, L, Kp // per)
    else:
        t = torch.zeros((B, H, L, 0), dtype=torch.uint8, device=u.device)
    return KVCodes(idx=idx, t=t, scale=scale, code=config.code_key())


def check_codes(codes, config, name: str = "codes") -> None:
    """TypeError / ValueError unless ``codes`` is a :class:`KVCodes` laid out as ``config`` codes them: ``idx``
    ``(B, H, L, K, config.bits)`` uint8 with K >= 1, ``t`` ``(B, H, L, config.t_bytes(8 K))`` uint8, ``scale``
    ``(B, H, L)`` float or uint8, and written by ``config``'s code when they record it (:attr:`KVCodes.code`)."""
    if not isinstance(codes, KVCodes):
        raise TypeError(f"{name} must be a KVCodes, got {type(codes).__name__}")
    if not isinstance(config, (KVQuantConfig, TrellisCode)):
        raise TypeError(f"config must be a KVQuantConfig or TrellisCode, got {type(config).__name__}")
    for field in ("idx", "t", "scale"):
        if not isinstance(getattr(codes, field), torch.Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(getattr(codes, field)).__name__}")
    idx, t, scale = codes.idx, codes.t, codes.scale
    if isinstance(config, TrellisCode):
        _check_trellis_codes(codes, config, name)
        return
    if idx.dtype != torch.uint8 or idx.ndim != 5 or idx.shape[3] < 1:
        raise ValueError(f"{name}.idx must be a (B, H, L, K >= 1, M) uint8 tensor, got {tuple(idx.shape)} {idx.dtype}")
    B, H, L, K, M = idx.shape
    if M != config.bits:
        raise ValueError(f"{name}.idx holds {M} layers per block, the config codes bits={config.bits}")
    tb = config.t_bytes(K * BLOCK)
    if t.dtype != torch.uint8 or tuple(t.shape) != (B, H, L, tb):
        raise ValueError(
            f"{name}.t must be a ({B}, {H}, {L}, {tb}) uint8 tensor for t_bits={config.t_bits}, got "
            f"{tuple(t.shape)} {t.dtype}"
        )
    _check_scale(scale, (B, H, L), name)
    # same layout, other code (t_bits 1 and 2 at head_dim 32, another beta or alpha): wrong vectors, not an error
    if codes.code is not None and codes.code != config.code_key():
        names = ("bits", "t_bits", "alpha", "beta", "scale_bits")
        diff = ", ".join(
            f"{n} {a!r} vs {b!r}" for n, a, b in zip(names, codes.code, config.code_key(), strict=False) if a != b
        )
        raise ValueError(f"{name} were written by another code than config's ({diff})")


def _check_scale(scale: torch.Tensor, lead: tuple[int, int, int], name: str) -> None:
    if tuple(scale.shape) != lead or not (scale.dtype == torch.uint8 or scale.dtype.is_floating_point):
        raise ValueError(f"{name}.scale must be a {lead} float or uint8 tensor, got {tuple(scale.shape)}")


def _check_trellis_codes(codes: KVCodes, config: TrellisCode, name: str) -> None:
    idx, t, scale = codes.idx, codes.t, codes.scale
    if idx.dtype != torch.uint8 or idx.ndim != 4:
        raise ValueError(
            f"{name}.idx must be a (B, H, L, stream_bytes) uint8 tensor, got {tuple(idx.shape)} {idx.dtype}"
        )
    B, H, L, nb = idx.shape
    D = head_dim_of(codes, config)
    if D < BLOCK or D % BLOCK or D * config.block_bits != nb * 64:
        raise ValueError(f"{name}.idx has {nb} bytes per vector: not a stream of block_bits={config.block_bits}")
    if t.dtype != torch.uint8 or tuple(t.shape) != (B, H, L, 0):
        raise ValueError(f"{name}.t must be an empty ({B}, {H}, {L}, 0) uint8 tensor, got {tuple(t.shape)}")
    _check_scale(scale, (B, H, L), name)
    if codes.code is not None and codes.code != config.code_key():
        raise ValueError(f"{name} were written by another code ({codes.code}) than config's ({config.code_key()})")


def head_dim_of(codes: KVCodes, config: KVQuantConfig | TrellisCode) -> int:
    """The head dim D of coded vectors."""
    if isinstance(config, TrellisCode):
        return codes.idx.shape[-1] * 64 // config.block_bits  # streams fill whole bytes (trellis_encode)
    return codes.idx.shape[3] * BLOCK


@cache
def _log_scales(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(256,)`` ``2^((e - 128) / 8)`` (0 for ``e = 0``), computed in float64 and rounded once to ``dtype``."""
    e = torch.arange(256, dtype=torch.float64)
    rho = torch.where(e > 0, torch.exp2((e - 128.0) / 8.0), torch.zeros_like(e))
    return rho.to(dtype=dtype, device=device)


def log_scale_table(device=None) -> torch.Tensor:
    """``(256,)`` float32 ``rho`` of each 8-bit scale code (read-only, cached): :func:`scale_values`' table."""
    return _log_scales(torch.float32, torch.device("cpu") if device is None else torch.device(device))


def scale_values(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-vector scales ``rho`` of stored ``scale`` codes: float16 as they are, uint8 8-bit log codes as
    ``2^((e - 128) / 8)`` (0 for ``e = 0``), read from a 256-entry table: the same value for a code whatever the
    shape or layout of the tensor holding it (a vectorised ``exp2`` may round the same code differently in
    different positions, so a store of one KV head would not decode as the layer's store does)."""
    if scale.dtype == torch.uint8:  # index_select on int32 codes: ~2x an advanced index on int64 (every read)
        flat = scale.reshape(-1).to(torch.int32)
        return _log_scales(dtype, scale.device).index_select(0, flat).view(scale.shape)
    return scale.to(dtype)


def unpack_t(t: torch.Tensor, config: KVQuantConfig, K: int) -> torch.Tensor:
    """``(..., t_bytes)`` packed T -> ``(..., K)`` uint8 T (the layout of ``coset.quant.pack_labels``: T of
    block k at bits ``[k t_bits, (k+1) t_bits)`` of the vector's little-endian bit stream)."""
    lead = t.shape[:-1]
    tb = config.t_bits
    if not tb:
        return torch.zeros((*lead, K), dtype=torch.uint8, device=t.device)
    shifts = torch.arange(0, 8, tb, dtype=torch.uint8, device=t.device)
    T = (t.unsqueeze(-1) >> shifts) & ((1 << tb) - 1)
    return T.reshape(*lead, T.shape[-2] * T.shape[-1])[..., :K]


@cache
def _steps(config: KVQuantConfig) -> torch.Tensor:
    return torch.tensor(config.quant_config().scales, dtype=torch.float32)


def step_table(config: KVQuantConfig) -> torch.Tensor:
    """``(2^t_bits,)`` float32 ``beta 2^(alpha t)``: the block factor of overload step t (read-only, cached)."""
    return _steps(config)


def block_scales(codes: KVCodes, config: KVQuantConfig, K: int) -> torch.Tensor:
    """``w[..., k] = rho * beta 2^(alpha T_k)``: the float32 factor of block k of each coded vector."""
    T = unpack_t(codes.t, config, K)
    steps = step_table(config).to(T.device)
    return scale_values(codes.scale).unsqueeze(-1) * steps[T.long()]


def decode_rotated(codes: KVCodes, config: KVQuantConfig | TrellisCode) -> torch.Tensor:
    """Decoded vectors in the rotated domain, ``(B, H, L, D)`` float32 (``R x`` up to quantization)."""
    if isinstance(config, TrellisCode):
        B, H, L, nb = codes.idx.shape
        D = head_dim_of(codes, config)
        u = trellis_decode(codes.idx.reshape(-1, nb), config, D).view(B, H, L, D)
        return u * scale_values(codes.scale).unsqueeze(-1)
    B, H, L, K, M = codes.idx.shape
    a, c = code_tables(config, codes.idx.device)
    pts = a[codes.idx.long()]  # (B,H,L,K,M,8)
    lw = (2.0 ** torch.arange(M, dtype=torch.float32, device=a.device)).view(M, 1)
    p = (pts * lw).sum(-2) - c  # (B,H,L,K,8)
    return (p * block_scales(codes, config, K).unsqueeze(-1)).reshape(B, H, L, K * BLOCK)


def decode_states(codes: KVCodes, rotation: HeadRotation, config: KVQuantConfig | TrellisCode) -> torch.Tensor:
    """Inverse of :func:`encode_states` up to quantization: ``(B, H, L, D)`` float32.

    Equals ``coset.quant.decode`` of the labels (tested), computed from the representative table.

    Raises
    ------
    TypeError / ValueError for codes that do not match ``config`` (:func:`check_codes`) or ``rotation``.
    """
    check_codes(codes, config)
    if not isinstance(rotation, HeadRotation):
        raise TypeError(f"rotation must be a HeadRotation, got {type(rotation).__name__}")
    return rotation.unrotate(decode_rotated(codes, config))


def decode_reference(codes: KVCodes, rotation: HeadRotation, config: KVQuantConfig) -> torch.Tensor:
    """The same through ``coset.quant.decode`` (slow; the oracle of the tests)."""
    B, H, L, K, M = codes.idx.shape
    bits = (codes.idx.to(torch.int32).unsqueeze(-1) >> torch.arange(BLOCK, device=codes.idx.device)) & 1
    b = bits.to(torch.uint8)  # (B,H,L,K,M,8)
    T = unpack_t(codes.t, config, K)
    u = decode(b, config=config.quant_config(), T=T, dtype=torch.float64)
    y = u.reshape(B, H, L, K * BLOCK) * scale_values(codes.scale, torch.float64).unsqueeze(-1)
    return rotation.unrotate(y.to(torch.float32))
