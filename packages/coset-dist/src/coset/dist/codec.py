"""Single-process pieces of the HNLQ gradient hooks: payload layout, the modular (summable) code, bytes.

Nothing here talks to a process group, so every function can be tested on one process. The hooks in
:mod:`coset.dist.hooks` call these around one collective each.

Two payloads
------------
* **allgather** (:func:`encode_payload` / :func:`decode_payload`): one rank's bucket ``x`` (n,) is divided
  by its RMS ``rho`` and encoded with HNLQ (blocks of d, zero padding stripped on decode). The payload is one
  uint8 tensor: ``[labels bit-packed at ceil(log2 q) bits | T bit-packed at ceil(log2(T_max+1)) bits |
  rho (float32) | non-finite flag (float32)]``. Its size depends only on (n, config), so every rank's payload
  has the same size and ``all_gather`` needs no size exchange.
* **modular** (:func:`modular_scales`, :func:`modular_encode`, :func:`modular_decode`,
  :func:`pack_sum_fields` / :func:`unpack_sum_fields`): the lattice point ``lam = Q_L(x / s + z)`` of every
  d-block is sent as its flat code ``c = G^{-1} lam mod q^M``. Flat codes are linear, so the sum of the
  ranks' codes mod q^M is the flat code of the sum of their points, and :func:`modular_decode` returns that sum
  exactly as long as it lies strictly inside ``q^M V``. :func:`modular_scales` picks the shared scale ``s``
  (per chunk of blocks) that guarantees it (see its docstring for the bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coset.lattice import Lattice
from coset.quant import (
    QuantizationConfig,
    decode,
    encode,
    from_blocks,
    from_flat_code,
    pack_labels,
    packed_nbytes,
    sample_dither,
    to_blocks,
    to_flat_code,
    unpack_labels,
)

__all__ = [
    "PayloadLayout",
    "payload_layout",
    "encode_payload",
    "decode_payload",
    "SumPacking",
    "choose_sum_packing",
    "pack_sum_fields",
    "unpack_sum_fields",
    "modular_margin",
    "modular_scales",
    "modular_encode",
    "modular_decode",
    "chunk_block_norms",
    "ring_allreduce_bytes",
    "allgather_bytes",
    "rank_seed",
]

#: Relative safety margin of the modular no-overload bound (covers float64 rounding and the 1e-9 tie offset).
MODULAR_MARGIN = 0.99


# ----------------------------------------------------------------------------------------------- bytes
def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of an ``nbytes`` buffer: ``2 (W-1)/W * nbytes`` (rounded up)."""
    return math.ceil(2 * (world_size - 1) * nbytes / world_size)


def allgather_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-gather of ``nbytes`` per rank: ``(W-1) * nbytes``."""
    return (world_size - 1) * nbytes


def rank_seed(seed: int, *parts: int) -> int:
    """A reproducible 63-bit seed derived from ``seed`` and integers (step, bucket index, rank)."""
    h = int(seed) & 0x7FFFFFFFFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + 1442695040888963407 + int(p)) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


# ------------------------------------------------------------------------------------ allgather payload
@dataclass(frozen=True)
class PayloadLayout:
    """Byte layout of one rank's allgather payload for a bucket of ``numel`` values."""

    numel: int
    n_blocks: int
    pad: int
    label_bytes: int
    t_bytes: int
    header_bytes: int = 8  # rho (float32) + non-finite flag (float32)

    @property
    def nbytes(self) -> int:
        return self.label_bytes + self.t_bytes + self.header_bytes


def _t_modulus(config: QuantizationConfig) -> int:
    return max(2, config.max_scaling_iterations + 1)


def payload_layout(numel: int, config: QuantizationConfig) -> PayloadLayout:
    """Layout of the allgather payload of ``numel`` gradient values under ``config``."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    d = config.dim
    nb = -(-numel // d)
    pad = nb * d - numel
    return PayloadLayout(
        numel=numel,
        n_blocks=nb,
        pad=pad,
        label_bytes=packed_nbytes(nb * config.M * d, config.q),
        t_bytes=packed_nbytes(nb, _t_modulus(config)),
    )


def encode_payload(x: torch.Tensor, config: QuantizationConfig) -> tuple[torch.Tensor, dict]:
    """Encode one rank's flat bucket into its allgather payload.

    Parameters
    ----------
    x : (n,) float tensor (any float dtype; computed in float64)
    config : QuantizationConfig; ``beta`` is in units of the bucket RMS (x is divided by its RMS first)

    Returns
    -------
    payload : (payload_layout(n, config).nbytes,) uint8
    info : dict with ``rho`` (float), ``nonfinite`` (bool), ``T`` ((n_blocks,) uint8), ``clamped``
        ((n_blocks,) bool). A non-finite ``x`` is not encoded: the payload carries zero labels and the flag.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or not x.dtype.is_floating_point:
        raise TypeError("x must be a 1-D floating tensor")
    lay = payload_layout(x.numel(), config)
    x64 = x.detach().to(torch.float64)
    nonfinite = bool(x64.numel()) and not bool(torch.isfinite(x64).all())
    rho = 1.0
    if not nonfinite and x64.numel():
        r = float(torch.sqrt(torch.mean(x64 * x64)))
        rho = r if r > 0 else 1.0
    if nonfinite or lay.n_blocks == 0:
        b = torch.zeros((lay.n_blocks, config.M, config.dim), dtype=torch.uint8, device=x.device)
        T = torch.zeros(lay.n_blocks, dtype=torch.uint8, device=x.device)
        clamped = torch.zeros(lay.n_blocks, dtype=torch.bool, device=x.device)
    else:
        blocks, _ = to_blocks(x64 / rho, config.dim)
        b, T, clamped = encode(blocks, config=config, return_clamped=True)
    header = torch.tensor([rho, 1.0 if nonfinite else 0.0], dtype=torch.float32, device=x.device)
    parts = [pack_labels(b, config.q), pack_labels(T, _t_modulus(config)), header.view(torch.uint8)]
    payload = torch.cat(parts)
    assert payload.numel() == lay.nbytes
    return payload, {"rho": rho, "nonfinite": nonfinite, "T": T, "clamped": clamped}


def decode_payload(payload: torch.Tensor, numel: int, config: QuantizationConfig) -> tuple[torch.Tensor, bool]:
    """Decode an allgather payload back to ``(n,)`` float64 values (padding stripped).

    Returns
    -------
    x_hat : (numel,) float64
    nonfinite : bool, the sender's non-finite flag (``x_hat`` is then meaningless zeros)
    """
    lay = payload_layout(numel, config)
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.numel() != lay.nbytes:
        raise ValueError(f"payload must be a uint8 tensor of {lay.nbytes} bytes for numel={numel}")
    o = 0
    b = unpack_labels(payload[o : o + lay.label_bytes], config.q, (lay.n_blocks, config.M, config.dim))
    o += lay.label_bytes
    T = unpack_labels(payload[o : o + lay.t_bytes], _t_modulus(config), (lay.n_blocks,))
    o += lay.t_bytes
    header = payload[o : o + 8].clone().view(torch.float32).to(torch.float64)
    rho, flag = float(header[0]), bool(header[1] != 0)
    if lay.n_blocks == 0:
        return torch.zeros(0, dtype=torch.float64, device=payload.device), flag
    xb = decode(b, config, T, dtype=torch.float64)
    return from_blocks(xb * rho, lay.pad), flag


# ------------------------------------------------------------------------------------- modular code
@dataclass(frozen=True)
class SumPacking:
    """How flat codes travel through ``all_reduce(SUM)``.

    ``kind="uint8"``: one code per byte; gloo wraps the sum mod 256, a multiple of ``modulus``.
    ``kind="int64"``: ``fields`` codes per int64 word, ``width`` bits each, with ``ceil(log2 W)`` guard bits
    so the sum of W codes never carries into the next field (and the word never overflows).
    """

    kind: str
    modulus: int
    world_size: int
    width: int = 8
    fields: int = 1

    def nbytes(self, n_codes: int) -> int:
        if self.kind == "uint8":
            return n_codes
        return 8 * (-(-n_codes // self.fields))


def choose_sum_packing(modulus: int, world_size: int, kind: str = "auto") -> SumPacking:
    """Pick the densest exact packing of codes in ``[0, modulus)`` summed over ``world_size`` ranks.

    ``kind``: "auto" (fewest bytes), "uint8" (needs ``modulus | 256``) or "int64" (guard-bit fields).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if kind not in ("auto", "uint8", "int64"):
        raise ValueError(f"code_packing must be 'auto', 'uint8' or 'int64', got {kind!r}")
    k = (modulus - 1).bit_length()
    width = k + (world_size - 1).bit_length()  # W codes < 2^k sum to < 2^width
    fields = 63 // width if width <= 63 else 0
    cands = []
    if kind in ("auto", "uint8") and 256 % modulus == 0:
        cands.append(SumPacking("uint8", modulus, world_size))
    if kind in ("auto", "int64") and fields >= 1:
        cands.append(SumPacking("int64", modulus, world_size, width, fields))
    if not cands:
        raise ValueError(
            f"code_packing={kind!r} cannot carry codes mod {modulus} summed over {world_size} ranks "
            "(uint8 needs q^M to divide 256)"
        )
    return min(cands, key=lambda p: (p.nbytes(840), p.kind != "uint8"))


def pack_sum_fields(codes: torch.Tensor, packing: SumPacking) -> torch.Tensor:
    """Pack flat codes ``(n,)`` int in ``[0, modulus)`` into the summable buffer of ``packing``."""
    c = codes.reshape(-1).to(torch.int64)
    if packing.kind == "uint8":
        return c.to(torch.uint8)
    f, w = packing.fields, packing.width
    pad = (-c.numel()) % f
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    shifts = torch.arange(f, device=c.device, dtype=torch.int64) * w
    return (c.reshape(-1, f) << shifts).sum(-1)


def unpack_sum_fields(buf: torch.Tensor, n: int, packing: SumPacking) -> torch.Tensor:
    """Inverse of :func:`pack_sum_fields` applied to a *sum* of buffers: ``(n,)`` int64 codes mod ``modulus``."""
    if packing.kind == "uint8":
        return torch.remainder(buf.reshape(-1)[:n].to(torch.int64), packing.modulus)
    f, w = packing.fields, packing.width
    shifts = torch.arange(f, device=buf.device, dtype=torch.int64) * w
    fields = (buf.reshape(-1, 1) >> shifts) & ((1 << w) - 1)
    return torch.remainder(fields.reshape(-1)[:n], packing.modulus)


def modular_margin(lattice: Lattice, q: int, M: int, world_size: int, dithered: bool) -> float:
    """Lattice-unit budget ``0.99 rho q^M - W R_eff`` left for the ranks' scaled inputs (must be > 0).

    ``rho`` is the packing radius, ``R_eff`` the covering radius (twice it with dither).
    """
    reff = lattice.covering_radius * (2.0 if dithered else 1.0)
    return MODULAR_MARGIN * lattice.packing_radius * q**M - world_size * reff


def chunk_block_norms(x: torch.Tensor, d: int, blocks_per_chunk: int) -> torch.Tensor:
    """Largest Euclidean norm of a d-block in each chunk of ``blocks_per_chunk`` blocks (float64).

    Parameters
    ----------
    x : (n,) float tensor
    Returns
    -------
    (ceil(ceil(n/d) / blocks_per_chunk),) float64
    """
    blocks, _ = to_blocks(x.to(torch.float64), d)
    nrm = torch.linalg.vector_norm(blocks, dim=-1)
    pad = (-nrm.numel()) % blocks_per_chunk
    if pad:
        nrm = torch.cat([nrm, nrm.new_zeros(pad)])
    return nrm.reshape(-1, blocks_per_chunk).amax(-1) if nrm.numel() else nrm


def modular_scales(
    norm_sum: torch.Tensor, lattice: Lattice, q: int, M: int, world_size: int, dithered: bool
) -> torch.Tensor:
    """Shared per-chunk scales that make the sum over ranks overload-free.

    For a block ``x_r`` of rank r, ``lam_r = Q_L(x_r / s + z_r)`` satisfies
    ``||lam_r|| <= ||x_r|| / s + R_eff`` (``R_eff`` = covering radius, doubled with dither since
    ``||z_r|| <= R_cov``). Hence ``||sum_r lam_r|| <= (sum_r max-norm_r) / s + W R_eff``. Choosing
    ``s = norm_sum / (0.99 rho q^M - W R_eff)`` keeps the sum strictly inside the ball of radius
    ``0.99 rho q^M``, which lies inside ``q^M V`` (``rho`` = packing radius), so the flat code of the sum
    decodes to the sum exactly.

    Parameters
    ----------
    norm_sum : (n_chunks,) float64, per chunk the sum over ranks of each rank's largest block norm
    Returns
    -------
    (n_chunks,) float64 scales (1.0 where ``norm_sum`` is 0: all blocks are zero there)
    """
    budget = modular_margin(lattice, q, M, world_size, dithered)
    if budget <= 0:
        raise ValueError(
            f"modular mode: q^M={q**M} is too small for world_size={world_size} on {lattice.name} "
            f"(0.99 * packing radius * q^M must exceed W * covering radius{' * 2 with dither' if dithered else ''}); "
            "raise q or M"
        )
    s = norm_sum.to(torch.float64) / budget
    return torch.where(s > 0, s, torch.ones_like(s))


def _expand_chunks(scales: torch.Tensor, n_blocks: int, blocks_per_chunk: int) -> torch.Tensor:
    return scales.repeat_interleave(blocks_per_chunk)[:n_blocks]


def modular_encode(
    x: torch.Tensor,
    scales: torch.Tensor,
    lattice: Lattice,
    modulus: int,
    blocks_per_chunk: int,
    dither: torch.Tensor | None = None,
    tie_dither: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lattice points and flat codes of one rank's bucket under the shared scales.

    Parameters
    ----------
    x : (n,) float tensor
    scales : (n_chunks,) float64 from :func:`modular_scales`
    dither : (n_blocks, d) float64 or None
    Returns
    -------
    codes : (n_blocks * d,) int64 in ``[0, modulus)``, ``G^{-1} lam mod modulus``
    lam : (n_blocks, d) float64 lattice points ``Q_L(x_block / s + z)``
    """
    blocks, _ = to_blocks(x.to(torch.float64), lattice.dim)
    s = _expand_chunks(scales, blocks.shape[0], blocks_per_chunk).unsqueeze(-1)
    g = blocks / s
    if dither is not None:
        g = g + dither
    lam = lattice.closest_point64(g, tie_dither)
    return to_flat_code(lam, lattice, modulus).reshape(-1), lam


def modular_decode(
    code_sum: torch.Tensor, lattice: Lattice, modulus: int, tie_dither: bool = True
) -> torch.Tensor:
    """The lattice point ``sum_r lam_r`` from the summed flat codes ``(n_blocks * d,)`` (float64 ``(n_blocks, d)``)."""
    c = torch.remainder(code_sum.to(torch.int64), modulus).reshape(-1, lattice.dim)
    return from_flat_code(c, lattice, modulus, tie_dither)


def modular_dither(n_blocks: int, lattice: Lattice, seed: int, device) -> torch.Tensor:
    """Subtractive dither of one rank for one bucket and step, ``(n_blocks, d)`` float64."""
    return sample_dither(n_blocks, lattice, seed, device)
