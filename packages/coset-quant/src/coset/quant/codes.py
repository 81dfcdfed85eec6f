"""One packed format for HNLQ codes ``(b, T)``: :func:`pack_codes` / :func:`unpack_codes`.

Every serialiser of coset (checkpoints, ``coset compress``, gradient payloads, PTQ) stores codes through this
pair, so the on-disk rule for T lives here and can change in one place.

Tensors (all flat uint8, little-endian bit streams as in :func:`coset.quant.pack_labels`):

* ``"labels"``: the labels, ``ceil(log2 q)`` bits each, row-major over ``(*shape, M, d)``.
* T, coded per call in whichever of four ways takes the fewest bytes (ties go to the earlier one):

  - ``"zero"``: every T is 0; no tensor at all.
  - ``"dense"``: ``"T"`` holds every T with ``T_bits = ceil(log2(max T + 1))`` bits.
  - ``"sparse"``: ``"T_index"`` holds the flat (row-major) indices of the ``T_count`` blocks with T > 0, in
    increasing order, ``T_index_bits = ceil(log2 n)`` bits each (n blocks); ``"T_value"`` holds ``T - 1`` of
    those blocks with ``T_value_bits = ceil(log2 max T)`` bits (no tensor when every nonzero T is 1).

  - ``"elias_fano"``: the same increasing indices in Elias–Fano form (Elias 1974; Fano 1971): with
    ``l = T_low_bits = floor(log2(n / T_count))``, ``"T_low"`` holds each index's low ``l`` bits and ``"T_high"``
    is a bit vector of ``T_count + ((n - 1) >> l) + 1`` bits with bit ``(index >> l) + i`` set for the i-th index;
    ``"T_value"`` as in ``"sparse"``.

  With T mostly 0 (the usual case once beta is calibrated) the sparse form costs
  ``T_count * (log2 n + T_value_bits)`` bits instead of ``n`` bits or more, and Elias–Fano at most
  ``T_count * (2 + log2(n / T_count) + T_value_bits) + 1`` bits: 7 instead of 16 index bits per overloaded
  block at the ~3% overload rates of calibrated codes on 2^16-block layers.

``meta`` is a JSON-serialisable dict: ``format`` (:data:`CODES_FORMAT`), ``shape`` (leading shape of the codes),
``q``, ``M``, ``d``, ``lattice``, ``max_T`` (the config's cap, the largest admissible T), ``T_coding`` and the
widths/counts above.
"""

from __future__ import annotations

import math

import torch

from .config import QuantizationConfig
from .packing import pack_labels, pack_uint, packed_nbytes, unpack_labels, unpack_uint

__all__ = ["CODES_FORMAT", "CODE_TENSORS", "T_CODINGS", "pack_codes", "unpack_codes", "codes_nbytes", "t_coding_nbytes"]

#: Format tag written into (and required from) ``meta["format"]``.
CODES_FORMAT = "coset-codes/1"
#: The T codings, in tie-breaking order.
T_CODINGS = ("zero", "dense", "sparse", "elias_fano")
#: Every tensor name :func:`pack_codes` can emit (serialisers store them under ``<layer>.<name>``).
CODE_TENSORS = ("labels", "T", "T_index", "T_low", "T_high", "T_value")


def _width(v: int) -> int:
    """Bits needed for the values 0..v."""
    return int(v).bit_length()


def _ef_low_bits(n: int, count: int) -> int:
    """Elias–Fano's low-part width ``floor(log2(n / count))`` (0 when count >= n/2)."""
    return max((n // count).bit_length() - 1, 0) if count else 0


def t_coding_nbytes(n: int, count: int, tmax: int) -> dict[str, int]:
    """Bytes of T under each coding that can represent it: ``{coding: bytes}`` in :data:`T_CODINGS` order.

    Parameters
    ----------
    n : number of blocks (T values); count : how many of them are > 0; tmax : the largest T
    """
    for name, v in (("n", n), ("count", count), ("tmax", tmax)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if count > n or (count == 0) != (tmax == 0):
        raise ValueError(f"inconsistent T statistics: n={n}, count={count}, tmax={tmax}")
    if tmax == 0:
        return {"zero": 0}
    vals = math.ceil(count * _width(tmax - 1) / 8)
    low = _ef_low_bits(n, count)
    return {
        "dense": math.ceil(n * _width(tmax) / 8),
        "sparse": math.ceil(count * _width(n - 1) / 8) + vals,
        "elias_fano": math.ceil(count * low / 8) + math.ceil((count + ((n - 1) >> low) + 1) / 8) + vals,
    }


def codes_nbytes(tensors: dict) -> int:
    """Total bytes of the tensors of a dict (e.g. the output of :func:`pack_codes`)."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of tensors, got {type(tensors).__name__}")
    total = 0
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{k!r}] must be a torch.Tensor, got {type(t).__name__}")
        total += t.numel() * t.element_size()
    return total


def _check_int_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def pack_codes(
    b: torch.Tensor, T: torch.Tensor | None, config: QuantizationConfig, *, codings: tuple[str, ...] = T_CODINGS
) -> tuple[dict[str, torch.Tensor], dict]:
    """Pack HNLQ codes into flat uint8 tensors plus JSON-serialisable metadata.

    Parameters
    ----------
    b : (..., M, d) integer labels in [0, q)
    T : (...) integer scale steps in [0, max_scaling_iterations], or None (all zero)
    config : the QuantizationConfig the codes were made with
    codings : the T codings allowed (a subset of :data:`T_CODINGS` holding "zero" and "dense", e.g. a wire
        format with a fixed coding field); the smallest of them is chosen

    Returns
    -------
    tensors : dict of flat CPU uint8 tensors, keys among ``"labels"``, ``"T"``, ``"T_index"``, ``"T_value"``
    meta : dict (see the module docstring); ``meta["T_coding"]`` is the coding chosen

    Raises
    ------
    TypeError for a non-integer ``b``/``T`` or a config that is not a QuantizationConfig; ValueError for shapes
    that do not match the config or values outside their ranges.
    """
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if not isinstance(codings, tuple) or not {"zero", "dense"} <= set(codings) <= set(T_CODINGS):
        raise ValueError(f"codings must be a tuple of T_CODINGS holding 'zero' and 'dense', got {codings!r}")
    _check_int_tensor("b", b)
    M, d, q = config.M, config.dim, config.q
    if b.ndim < 2 or b.shape[-2] != M or b.shape[-1] != d:
        raise ValueError(f"b must have shape (..., M={M}, d={d}), got {tuple(b.shape)}")
    lead = tuple(b.shape[:-2])
    n = math.prod(lead)
    if T is None:
        T = torch.zeros(lead, dtype=torch.uint8)
    _check_int_tensor("T", T)
    if tuple(T.shape) != lead:
        raise ValueError(f"T must have shape {lead} (the leading shape of b), got {tuple(T.shape)}")
    cap = config.max_scaling_iterations
    Tf = T.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if n and (int(Tf.min()) < 0 or int(Tf.max()) > cap):
        raise ValueError(f"T must lie in [0, max_scaling_iterations={cap}]")
    tensors = {"labels": pack_labels(b.detach().cpu(), q)}  # validates 0 <= b < q
    meta: dict = {
        "format": CODES_FORMAT,
        "shape": list(lead),
        "q": q,
        "M": M,
        "d": d,
        "lattice": config.lattice_type,
        "max_T": cap,
    }
    tmax = int(Tf.max()) if n else 0
    if tmax == 0:
        meta["T_coding"] = "zero"
        return tensors, meta
    nz = torch.nonzero(Tf, as_tuple=True)[0]
    count = int(nz.numel())
    sizes = {k: v for k, v in t_coding_nbytes(n, count, tmax).items() if k in codings}
    coding = min(sizes, key=sizes.__getitem__)  # dicts keep T_CODINGS order: ties go to the earlier coding
    val_bits = _width(tmax - 1)
    if coding == "dense":
        tensors["T"] = pack_uint(Tf, _width(tmax))
        meta.update(T_coding="dense", T_bits=_width(tmax))
        return tensors, meta
    if coding == "sparse":
        idx_bits = _width(n - 1)
        tensors["T_index"] = pack_uint(nz, idx_bits)
        meta.update(T_coding="sparse", T_count=count, T_index_bits=idx_bits, T_value_bits=val_bits)
    else:
        low = _ef_low_bits(n, count)
        if low:
            tensors["T_low"] = pack_uint(nz & ((1 << low) - 1), low)
        high = torch.zeros(count + ((n - 1) >> low) + 1, dtype=torch.int64)
        high[(nz >> low) + torch.arange(count)] = 1
        tensors["T_high"] = pack_uint(high, 1)
        meta.update(T_coding="elias_fano", T_count=count, T_low_bits=low, T_value_bits=val_bits)
    if val_bits:
        tensors["T_value"] = pack_uint(Tf[nz] - 1, val_bits)
    return tensors, meta


def _meta_int(meta: dict, key: str, lo: int, hi: int) -> int:
    if key not in meta:
        raise ValueError(f"codes meta is missing the key {key!r}")
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"codes meta[{key!r}] must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _tensor(tensors: dict, key: str, nbytes: int) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"codes tensors are missing {key!r}")
    t = tensors[key]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"codes tensor {key!r} must be a uint8 tensor, got {got}")
    if t.ndim != 1 or t.numel() != nbytes:
        raise ValueError(f"codes tensor {key!r} must be flat with {nbytes} bytes, got shape {tuple(t.shape)}")
    return t


def _unpack_elias_fano(tensors: dict, meta: dict, n: int, count: int) -> torch.Tensor:
    """The increasing block indices of an ``"elias_fano"`` T (see the module docstring), validated."""
    low = _meta_int(meta, "T_low_bits", 0, 62)
    if low != _ef_low_bits(n, count):
        raise ValueError(f"codes meta['T_low_bits']={low} does not match {count} of {n} blocks")
    if not low and "T_low" in tensors:
        raise ValueError("unexpected codes tensor 'T_low' with meta['T_low_bits'] = 0")
    lo = unpack_uint(_tensor(tensors, "T_low", math.ceil(count * low / 8)), low, count) if low else 0
    nbits = count + ((n - 1) >> low) + 1
    ones = torch.nonzero(unpack_uint(_tensor(tensors, "T_high", math.ceil(nbits / 8)), 1, nbits))[:, 0]
    if ones.numel() != count or int(unpack_uint(tensors["T_high"], 1, 8 * tensors["T_high"].numel()).sum()) != count:
        raise ValueError(f"codes tensor 'T_high' must hold exactly T_count={count} set bits")
    return ((ones - torch.arange(count)) << low) | lo


def unpack_codes(
    tensors: dict, meta: dict, config: QuantizationConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_codes`, validating everything it reads.

    Parameters
    ----------
    tensors, meta : as returned by :func:`pack_codes` (e.g. after a safetensors/JSON round trip)
    config : optional; when given, the codes must have been made with the same lattice, q, M and a cap
        ``max_T`` no larger than ``config.max_scaling_iterations``

    Returns
    -------
    b : (*meta["shape"], M, d) uint8 labels in [0, q)
    T : (*meta["shape"]) uint8 in [0, max_T]

    Raises
    ------
    TypeError if ``tensors``/``meta`` are not dicts; ValueError naming the key or tensor for an unknown format
    or T coding, a missing/ill-typed key, a tensor of the wrong dtype or byte count, an unexpected tensor,
    labels ``>= q``, sparse indices that are not increasing or out of range, T outside ``[0, max_T]``, or a
    mismatch with ``config``.
    """
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of tensors, got {type(tensors).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if meta.get("format") != CODES_FORMAT:
        raise ValueError(f"codes meta['format'] must be {CODES_FORMAT!r}, got {meta.get('format')!r}")
    q = _meta_int(meta, "q", 2, 256)
    M = _meta_int(meta, "M", 1, 64)
    d = _meta_int(meta, "d", 1, 1 << 16)
    cap = _meta_int(meta, "max_T", 0, 255)
    shape = meta.get("shape")
    if not isinstance(shape, (list, tuple)) or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape
    ):
        raise ValueError(f"codes meta['shape'] must be a list of non-negative ints, got {shape!r}")
    lead = tuple(shape)
    lattice = meta.get("lattice")
    if not isinstance(lattice, str):
        raise ValueError(f"codes meta['lattice'] must be a str, got {lattice!r}")
    if config is not None:
        if not isinstance(config, QuantizationConfig):
            raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
        want = {"q": config.q, "M": config.M, "d": config.dim}
        for k, v in want.items():
            if meta[k] != v:
                raise ValueError(f"codes meta[{k!r}]={meta[k]} does not match config.{k if k != 'd' else 'dim'}={v}")
        if lattice.strip().upper() != config.lattice_type.strip().upper():
            raise ValueError(
                f"codes meta['lattice']={lattice!r} does not match config.lattice_type={config.lattice_type!r}"
            )
        if cap > config.max_scaling_iterations:
            raise ValueError(
                f"codes meta['max_T']={cap} exceeds config.max_scaling_iterations={config.max_scaling_iterations}"
            )
    coding = meta.get("T_coding")
    if coding not in T_CODINGS:
        raise ValueError(f"codes meta['T_coding'] must be one of {T_CODINGS}, got {coding!r}")
    n = math.prod(lead)
    expected = {
        "zero": {"labels"},
        "dense": {"labels", "T"},
        "sparse": {"labels", "T_index", "T_value"},
        "elias_fano": {"labels", "T_low", "T_high", "T_value"},
    }[coding]
    extra = sorted(set(tensors) - expected, key=str)
    if extra:
        raise ValueError(f"unexpected codes tensor {extra[0]!r} for T_coding={coding!r}")
    b = unpack_labels(_tensor(tensors, "labels", packed_nbytes(n * M * d, q)), q, (*lead, M, d))
    if coding == "zero":
        T = torch.zeros(n, dtype=torch.int64)
    elif coding == "dense":
        t_bits = _meta_int(meta, "T_bits", 1, 8)
        T = unpack_uint(_tensor(tensors, "T", math.ceil(n * t_bits / 8)), t_bits, n)
    else:
        count = _meta_int(meta, "T_count", 0, n)
        if coding == "sparse":
            ib = _meta_int(meta, "T_index_bits", 0, 62)
            if ib != _width(max(n - 1, 0)):
                raise ValueError(
                    f"codes meta['T_index_bits']={ib} does not match {n} blocks (expected {_width(max(n - 1, 0))})"
                )
            idx = unpack_uint(_tensor(tensors, "T_index", math.ceil(count * ib / 8)), ib, count)
        else:
            idx = _unpack_elias_fano(tensors, meta, n, count)
        vb = _meta_int(meta, "T_value_bits", 0, 8)
        if vb:
            val = unpack_uint(_tensor(tensors, "T_value", math.ceil(count * vb / 8)), vb, count) + 1
        else:
            if "T_value" in tensors:
                raise ValueError("unexpected codes tensor 'T_value' with meta['T_value_bits'] = 0")
            val = torch.ones(count, dtype=torch.int64)
        if count and (int(idx.max()) >= n or (count > 1 and not bool((idx[1:] > idx[:-1]).all()))):
            raise ValueError("codes T indices must be strictly increasing block indices < number of blocks")
        T = torch.zeros(n, dtype=torch.int64)
        T[idx] = val
    if n and int(T.max()) > cap:
        raise ValueError(f"codes T exceeds meta['max_T']={cap}: the tensors are corrupted")
    return b, T.to(torch.uint8).reshape(lead)
