"""Single-process pieces of the HNLQ gradient hooks: payload layout, the modular (summable) code, bytes.

Nothing here talks to a process group, so every function can be tested on one process. The hooks in
:mod:`coset.dist.hooks` call these around one collective each.

Two payloads
------------
* **allgather** (:func:`encode_payload` / :func:`decode_payload`): one rank's bucket ``x`` (n,), in float32,
  is divided (in float32) by its RMS ``rho`` (a float32 number, from the float64 sum of squares of
  :func:`sum_squares`, whose fixed order the native codec repeats) and encoded with HNLQ (blocks of d, zero
  padding stripped on decode). The codes are
  stored with :func:`coset.quant.pack_codes` (coset's one packed-code format). The payload is one uint8
  tensor: ``[labels | T tensors of the chosen T coding, zero-padded to the T section | rho (float32) |
  code word (int32)]``. The T section is as long as the largest T coding can be (every T at
  ``bit_length(max_scaling_iterations)`` bits), so the payload size depends only on (n, config): every rank's
  payload has the same size and ``all_gather`` needs no size exchange. The code word carries the non-finite
  flag and the fields of the pack_codes metadata that are not implied by (n, config).
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
from coset.lattice.validate import check_int
from coset.quant import (
    CODES_FORMAT,
    QuantizationConfig,
    decode,
    encode,
    from_blocks,
    from_flat_code,
    pack_codes,
    packed_nbytes,
    sample_dither,
    to_blocks,
    to_flat_code,
    unpack_codes,
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
    "sum_squares",
    "ring_allreduce_bytes",
    "allgather_bytes",
    "rank_seed",
]

#: Relative safety margin of the modular no-overload bound (covers float64 rounding and the 1e-9 tie offset).
MODULAR_MARGIN = 0.99


# ----------------------------------------------------------------------------------------------- bytes
def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of an ``nbytes`` buffer: ``2 (W-1)/W * nbytes`` (rounded up)."""
    check_int("world_size", world_size, 1)
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
    header_bytes: int = 8  # rho (float32) + code word (int32)

    @property
    def nbytes(self) -> int:
        return self.label_bytes + self.t_bytes + self.header_bytes


_CODINGS = ("zero", "dense", "sparse")
_COUNT_BITS = 25  # the code word: flag (1 bit) | T coding (2) | T bit width (4) | sparse count (25)


def payload_layout(numel: int, config: QuantizationConfig) -> PayloadLayout:
    """Layout of the allgather payload of ``numel`` gradient values under ``config``.

    Raises
    ------
    TypeError for a config that is not a QuantizationConfig; ValueError for a negative or non-int ``numel`` or a
    bucket of ``2^25`` blocks or more.
    """
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    check_int("numel", numel, 0)
    d = config.dim
    nb = -(-numel // d)
    if nb >= 1 << _COUNT_BITS:
        raise ValueError(f"a bucket of {numel} values ({nb} blocks) is too large for one payload; lower bucket_cap_mb")
    pad = nb * d - numel
    return PayloadLayout(
        numel=numel,
        n_blocks=nb,
        pad=pad,
        label_bytes=packed_nbytes(nb * config.M * d, config.q),
        # the largest T section pack_codes can produce: dense at full width (zero and sparse are never larger)
        t_bytes=math.ceil(nb * config.max_scaling_iterations.bit_length() / 8),
    )


def _code_word(meta: dict, nonfinite: bool) -> int:
    coding = meta["T_coding"]
    bits = {"zero": 0, "dense": meta.get("T_bits", 0), "sparse": meta.get("T_value_bits", 0)}[coding]
    count = meta.get("T_count", 0)
    return int(nonfinite) | (_CODINGS.index(coding) << 1) | (bits << 3) | (count << 7)


def _codes_meta(word: int, n_blocks: int, config: QuantizationConfig) -> dict:
    """The pack_codes metadata of a payload, from (n, config) and its code word."""
    coding = _CODINGS[(word >> 1) & 3] if (word >> 1) & 3 < 3 else "invalid"
    bits, count = (word >> 3) & 15, word >> 7
    meta = {"format": CODES_FORMAT, "shape": [n_blocks], "q": config.q, "M": config.M, "d": config.dim,
            "lattice": config.lattice_type, "max_T": config.max_scaling_iterations, "T_coding": coding}
    if coding == "dense":
        meta["T_bits"] = bits
    elif coding == "sparse":
        meta.update(T_count=count, T_index_bits=max(n_blocks - 1, 0).bit_length(), T_value_bits=bits)
    return meta


def _t_tensors(meta: dict, n_blocks: int) -> list[tuple[str, int]]:
    """``(key, bytes)`` of the T tensors of a coding, in payload order."""
    coding = meta["T_coding"]
    if coding == "dense":
        return [("T", math.ceil(n_blocks * meta["T_bits"] / 8))]
    if coding == "sparse":
        c = meta["T_count"]
        out = [("T_index", math.ceil(c * meta["T_index_bits"] / 8))]
        if meta["T_value_bits"]:
            out.append(("T_value", math.ceil(c * meta["T_value_bits"] / 8)))
        return out
    return []


_SEGMENT = 1 << 16  # sum_squares: values per segment (the native codec's threads take whole segments)


def sum_squares(x: torch.Tensor) -> float:
    """Sum of squares of a float32 vector in float64, in one fixed order (the native codec's).

    Every square of a float32 is exact in float64; the sums are then ordered as follows: segments of 2^16
    values; in each, four lanes (value ``i`` goes to lane ``i mod 4``) summed left to right and combined as
    ``(l0 + l1) + (l2 + l3)``; the segments summed left to right. ``torch.cumsum`` adds sequentially, so this
    is bit-for-bit the C++ loop, on any number of threads.

    Parameters
    ----------
    x : (n,) float32
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.dtype != torch.float32:
        raise TypeError("x must be a 1-D float32 tensor")
    n = x.numel()
    if n == 0:
        return 0.0
    nseg = -(-n // _SEGMENT)
    sq = torch.zeros(nseg * _SEGMENT, dtype=torch.float64, device=x.device)
    sq[:n] = x.to(torch.float64).square()
    lanes = torch.cumsum(sq.view(nseg, _SEGMENT // 4, 4), dim=1)[:, -1, :]
    parts = (lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])
    return float(torch.cumsum(parts, dim=0)[-1])


def encode_payload(x: torch.Tensor, config: QuantizationConfig) -> tuple[torch.Tensor, dict]:
    """Encode one rank's flat bucket into its allgather payload.

    Parameters
    ----------
    x : (n,) float tensor, coded as float32 (the gradients' wire precision: larger values, as NaN/Inf, are
        flagged non-finite)
    config : QuantizationConfig; ``beta`` is in units of the bucket RMS (x is divided by its RMS first)

    Returns
    -------
    payload : (payload_layout(n, config).nbytes,) uint8
    info : dict with ``rho`` (float, the float32 RMS the payload carries), ``nonfinite`` (bool), ``T``
        ((n_blocks,) uint8), ``clamped`` ((n_blocks,) bool). A non-finite ``x`` is not encoded: the payload
        carries zero labels and the flag.

    Raises
    ------
    TypeError if ``x`` is not a 1-D floating tensor; ValueError for a bucket too large for one payload.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or not x.dtype.is_floating_point:
        raise TypeError("x must be a 1-D floating tensor")
    lay = payload_layout(x.numel(), config)
    x32 = x.detach().to(torch.float32)
    nonfinite = bool(x32.numel()) and not bool(torch.isfinite(x32).all())
    rho = 1.0
    if not nonfinite and x32.numel():
        # float32 rho: what the header carries, so sender and receivers scale by the same number
        r = float(torch.tensor(math.sqrt(sum_squares(x32.cpu()) / x32.numel()), dtype=torch.float32))
        rho = r if r > 0 else 1.0
    if nonfinite or lay.n_blocks == 0:
        b = torch.zeros((lay.n_blocks, config.M, config.dim), dtype=torch.uint8, device=x.device)
        T = torch.zeros(lay.n_blocks, dtype=torch.uint8, device=x.device)
        clamped = torch.zeros(lay.n_blocks, dtype=torch.bool, device=x.device)
    else:
        # divided in float32 (as the native codec does), then coset.quant's codes of those floats
        xn = x32 / torch.tensor(rho, dtype=torch.float32, device=x.device)
        blocks, _ = to_blocks(xn, config.dim)
        b, T, clamped = encode(blocks, config=config, return_clamped=True)
    tensors, meta = pack_codes(b, T, config, codings=_CODINGS)  # the code word has room for these three
    t_parts = [tensors[k] for k, _ in _t_tensors(meta, lay.n_blocks)]
    t_len = sum(int(t.numel()) for t in t_parts)
    assert t_len <= lay.t_bytes  # pack_codes never exceeds the dense coding at full width
    filler = torch.zeros(lay.t_bytes - t_len, dtype=torch.uint8)
    word = torch.tensor([_code_word(meta, nonfinite)], dtype=torch.int32)
    header = torch.cat([torch.tensor([rho], dtype=torch.float32).view(torch.uint8), word.view(torch.uint8)])
    payload = torch.cat([tensors["labels"], *t_parts, filler, header]).to(x.device)
    assert payload.numel() == lay.nbytes
    return payload, {"rho": rho, "nonfinite": nonfinite, "T": T, "clamped": clamped}


def decode_payload(payload: torch.Tensor, numel: int, config: QuantizationConfig) -> tuple[torch.Tensor, bool]:
    """Decode an allgather payload back to ``(n,)`` float64 values (padding stripped).

    Returns
    -------
    x_hat : (numel,) float64
    nonfinite : bool, the sender's non-finite flag (``x_hat`` is then meaningless zeros)

    Raises
    ------
    ValueError for a payload of the wrong dtype or size, or damaged contents (code word, labels, T, rho).
    """
    lay = payload_layout(numel, config)
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.numel() != lay.nbytes:
        raise ValueError(f"payload must be a uint8 tensor of {lay.nbytes} bytes for numel={numel}")
    flat = payload.reshape(-1).cpu()
    header = flat[lay.nbytes - 8 :].clone()
    rho = float(header[:4].view(torch.float32))
    word = int(header[4:].view(torch.int32))
    flag = bool(word & 1)
    if lay.n_blocks == 0:
        return torch.zeros(0, dtype=torch.float64, device=payload.device), flag
    if not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"payload is damaged: rho={rho} must be finite and > 0")
    meta = _codes_meta(word, lay.n_blocks, config)
    tensors = {"labels": flat[: lay.label_bytes]}
    o = lay.label_bytes
    try:
        parts = _t_tensors(meta, lay.n_blocks)
    except KeyError:
        raise ValueError(f"payload is damaged: bad code word {word:#x}") from None
    for key, nbytes in parts:
        tensors[key] = flat[o : o + nbytes]
        o += nbytes
    if o > lay.label_bytes + lay.t_bytes:
        raise ValueError(f"payload is damaged: its code word {word:#x} describes more T bytes than a payload holds")
    b, T = unpack_codes(tensors, meta, config)
    xb = decode(b.to(payload.device), config=config, T=T.to(payload.device), dtype=torch.float64)
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
    check_int("world_size", world_size, 1)
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
    """Pack flat codes ``(n,)`` int in ``[0, modulus)`` into the summable buffer of ``packing``.

    Raises
    ------
    TypeError for non-integer codes or a packing that is not a :class:`SumPacking`; ValueError for codes outside
    ``[0, modulus)`` (they would spill into the neighbouring fields of the sum).
    """
    if not isinstance(packing, SumPacking):
        raise TypeError(f"packing must be a SumPacking, got {type(packing).__name__}")
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise TypeError("codes must be an integer tensor")
    c = codes.reshape(-1).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= packing.modulus):
        raise ValueError(f"codes must lie in [0, modulus={packing.modulus})")
    if packing.kind == "uint8":
        return c.to(torch.uint8)
    f, w = packing.fields, packing.width
    pad = (-c.numel()) % f
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    shifts = torch.arange(f, device=c.device, dtype=torch.int64) * w
    return (c.reshape(-1, f) << shifts).sum(-1)


def unpack_sum_fields(buf: torch.Tensor, n: int, packing: SumPacking) -> torch.Tensor:
    """Inverse of :func:`pack_sum_fields` applied to a *sum* of buffers: ``(n,)`` int64 codes mod ``modulus``.

    Raises
    ------
    TypeError for a packing that is not a :class:`SumPacking` or a buffer of the wrong dtype; ValueError for a
    buffer too short for ``n`` codes.
    """
    if not isinstance(packing, SumPacking):
        raise TypeError(f"packing must be a SumPacking, got {type(packing).__name__}")
    want = torch.uint8 if packing.kind == "uint8" else torch.int64
    if not isinstance(buf, torch.Tensor) or buf.dtype != want:
        raise TypeError(f"buf must be a {want} tensor for a {packing.kind} packing")
    check_int("n", n, 0)
    if buf.numel() * packing.fields < n:
        raise ValueError(f"buf holds {buf.numel() * packing.fields} codes, fewer than n={n}")
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
    check_int("blocks_per_chunk", blocks_per_chunk, 1)
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
    (n_chunks,) float64 scales, float32 values rounded up (1.0 where ``norm_sum`` is 0: all blocks are zero
    there)
    """
    budget = modular_margin(lattice, q, M, world_size, dithered)
    if budget <= 0:
        raise ValueError(
            f"modular mode: q^M={q**M} is too small for world_size={world_size} on {lattice.name} "
            f"(0.99 * packing radius * q^M must exceed W * covering radius{' * 2 with dither' if dithered else ''}); "
            "raise q or M"
        )
    s = norm_sum.to(torch.float64) / budget
    # rounded up to float32 (a larger scale keeps the guarantee): the native codec then forms lam * s in float32,
    # which is exact in float64 for these scales, so both paths give the same floats
    f = s.to(torch.float32)
    f = torch.where(f.to(torch.float64) < s, torch.nextafter(f, torch.tensor(float("inf"))), f)
    s = torch.where(torch.isfinite(f), f.to(torch.float64), s)
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

    Raises
    ------
    ValueError for ``blocks_per_chunk`` < 1 or ``scales`` that are not one finite value > 0 per chunk (a zero or
    NaN scale would turn the codes into garbage).
    """
    check_int("blocks_per_chunk", blocks_per_chunk, 1)
    blocks, _ = to_blocks(x.to(torch.float64), lattice.dim)
    n_chunks = -(-blocks.shape[0] // blocks_per_chunk)
    if not isinstance(scales, torch.Tensor) or scales.ndim != 1 or scales.numel() != n_chunks:
        raise ValueError(f"scales must be a 1-D tensor of {n_chunks} entries (one per chunk)")
    if n_chunks and not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError("scales must be finite and > 0")
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
