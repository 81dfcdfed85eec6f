"""pack_codes / unpack_codes: the one packed-code format (round trip, the T coding rule, corrupted inputs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coset.quant import (
    CODES_FORMAT,
    QuantizationConfig,
    codes_nbytes,
    encode,
    pack_codes,
    pack_labels,
    unpack_codes,
    unpack_labels,
)


def _codes(cfg: QuantizationConfig, lead: tuple, T_kind: str, seed: int, p: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, cfg.q, (*lead, cfg.M, cfg.dim), generator=g, dtype=torch.int64).to(torch.uint8)
    cap = cfg.max_scaling_iterations
    if T_kind == "zero" or cap == 0:
        T = torch.zeros(lead, dtype=torch.uint8)
    elif T_kind == "sparse":
        mask = torch.rand(lead, generator=g) < p
        T = (torch.randint(1, cap + 1, lead, generator=g) * mask).to(torch.uint8)
    else:
        T = torch.randint(0, cap + 1, lead, generator=g).to(torch.uint8)
    return b, T


def _json_round_trip(tensors, meta):
    return {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))


@settings(max_examples=60, deadline=None)
@given(
    lattice=st.sampled_from(["Z2", "D4", "E8"]),
    q=st.integers(2, 16),
    M=st.integers(1, 4),
    cap=st.integers(0, 64),
    lead=st.lists(st.integers(0, 7), min_size=0, max_size=3),
    kind=st.sampled_from(["zero", "sparse", "dense"]),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_quant_codes_round_trip(lattice, q, M, cap, lead, kind, p, seed):
    cfg = QuantizationConfig(lattice, q, M, max_scaling_iterations=cap)
    b, T = _codes(cfg, tuple(lead), kind, seed, p)
    tensors, meta = pack_codes(b, T, cfg)
    assert meta["format"] == CODES_FORMAT and meta["shape"] == list(lead)
    assert all(t.dtype == torch.uint8 and t.ndim == 1 for t in tensors.values())
    tensors, meta = _json_round_trip(tensors, meta)
    b2, T2 = unpack_codes(tensors, meta, cfg)
    assert torch.equal(b2, b) and torch.equal(T2, T)
    assert b2.dtype == torch.uint8 and T2.dtype == torch.uint8
    b3, T3 = unpack_codes(tensors, meta)  # the meta alone suffices
    assert torch.equal(b3, b) and torch.equal(T3, T)
    # the coding chosen is the smallest of the admissible ones
    n = math.prod(lead)
    tmax = int(T.max()) if n else 0
    label_bytes = math.ceil(n * M * cfg.dim * (q - 1).bit_length() / 8)
    if tmax == 0:
        assert meta["T_coding"] == "zero" and codes_nbytes(tensors) == label_bytes
    else:
        c = int((T > 0).sum())
        vals = math.ceil(c * (tmax - 1).bit_length() / 8)
        low = max(0, math.floor(math.log2(n / c)))  # Elias-Fano: low bits + a unary bit vector of the highs
        sizes = {
            "dense": math.ceil(n * tmax.bit_length() / 8),
            "sparse": math.ceil(c * (n - 1).bit_length() / 8) + vals,
            "elias_fano": math.ceil(c * low / 8) + math.ceil((c + (n - 1) // 2**low + 1) / 8) + vals,
        }
        assert codes_nbytes(tensors) == label_bytes + min(sizes.values())
        assert meta["T_coding"] == min(sizes, key=sizes.__getitem__)


def test_quant_codes_each_coding_is_chosen_when_smallest():
    cfg = QuantizationConfig("D4", 4, 2, max_scaling_iterations=10)
    n = 1000
    b = torch.zeros(n, 2, 4, dtype=torch.uint8)
    # all zero: no T bytes at all
    t, m = pack_codes(b, None, cfg)
    assert m["T_coding"] == "zero" and set(t) == {"labels"} and codes_nbytes(t) == n * 2 * 4 * 2 // 8
    # three blocks with T = 1: 3 indices of 10 bits (4 bytes), no values: far below 1000 bits dense
    T = torch.zeros(n, dtype=torch.uint8)
    T[[5, 17, 999]] = 1
    t, m = pack_codes(b, T, cfg)
    assert m["T_coding"] == "sparse" and set(t) == {"labels", "T_index"}
    assert t["T_index"].numel() == 4 and m["T_index_bits"] == 10 and m["T_value_bits"] == 0
    # sparse values with T up to 5: 3 bits of (T - 1) each
    T[17] = 5
    t, m = pack_codes(b, T, cfg)
    assert m["T_coding"] == "sparse" and m["T_value_bits"] == 3 and t["T_value"].numel() == 2
    assert torch.equal(unpack_codes(t, m, cfg)[1], T)
    # half the blocks overloaded: dense (1 bit each = 125 bytes) beats 500 indices of 10 bits
    T = (torch.arange(n) % 2).to(torch.uint8)
    t, m = pack_codes(b, T, cfg)
    assert m["T_coding"] == "dense" and m["T_bits"] == 1 and t["T"].numel() == 125
    assert torch.equal(unpack_codes(t, m, cfg)[1], T)


def test_quant_codes_elias_fano_is_small_for_rare_overload():
    """The PTQ budget: 1% of 4-dim blocks with T = 1 costs < 0.025 bit per weight in a 384x1536 layer
    (Elias-Fano: ~8.6 bits per overloaded block; the plain 18-bit index list would cost 0.045)."""
    cfg = QuantizationConfig("D4", 4, 2, max_scaling_iterations=10)
    n = 384 * 1536 // 4
    T = torch.zeros(n, dtype=torch.uint8)
    T[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 100]] = 1
    t, m = pack_codes(torch.zeros(n, 2, 4, dtype=torch.uint8), T, cfg)
    t_bits = 8 * (codes_nbytes(t) - t["labels"].numel())
    assert m["T_coding"] == "elias_fano" and set(t) == {"labels", "T_low", "T_high"} and m["T_low_bits"] == 6
    assert t_bits / (n * 4) < 0.025
    assert torch.equal(unpack_codes(t, m, cfg)[1], T)


@pytest.mark.parametrize("n, count", [(1, 1), (2, 1), (7, 3), (64, 1), (64, 2), (1000, 1), (1000, 31), (4096, 4096)])
def test_quant_codes_elias_fano_edges_against_brute_force(n, count):
    """Elias-Fano at the edges (one block, every block, powers of two): indices decoded exactly, and the
    high-part bit vector equals the definition built by a Python loop."""
    from coset.quant.codes import _unpack_elias_fano
    from coset.quant.packing import unpack_uint

    g = torch.Generator().manual_seed(n * 7 + count)
    idx = torch.randperm(n, generator=g)[:count].sort().values
    low = max(0, math.floor(math.log2(n / count)))
    bits = [0] * (count + (n - 1) // 2**low + 1)
    for i, v in enumerate(idx.tolist()):
        bits[v // 2**low + i] = 1
    T = torch.zeros(n, dtype=torch.uint8)
    T[idx] = 1
    cfg = QuantizationConfig("D4", 4, 1)
    meta = {"T_low_bits": low}
    tensors = {"T_high": _bits_le(bits)}
    if low:
        tensors["T_low"] = _uints_le([v % 2**low for v in idx.tolist()], low)
    assert torch.equal(_unpack_elias_fano(tensors, meta, n, count), idx)
    assert unpack_uint(tensors["T_high"], 1, len(bits)).tolist() == bits
    b = torch.zeros(n, 1, 4, dtype=torch.uint8)
    t, m = pack_codes(b, T, cfg)
    assert torch.equal(unpack_codes(t, m, cfg)[1], T)


def _bits_le(bits: list) -> torch.Tensor:
    """Little-endian bit vector, written byte by byte (independent of pack_uint)."""
    out = [0] * math.ceil(len(bits) / 8)
    for i, v in enumerate(bits):
        out[i // 8] |= v << (i % 8)
    return torch.tensor(out, dtype=torch.uint8)


def _uints_le(vals: list, k: int) -> torch.Tensor:
    return _bits_le([(v >> j) & 1 for v in vals for j in range(k)])


def _packed_ef():
    cfg = QuantizationConfig("D4", 4, 1, max_scaling_iterations=10)
    n = 5000
    T = torch.zeros(n, dtype=torch.uint8)
    T[[3, 50, 120, 121, 2047, 4999]] = torch.tensor([10, 1, 2, 1, 1, 3], dtype=torch.uint8)
    return cfg, torch.zeros(n, 1, 4, dtype=torch.uint8), T


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda t, m: m.update(T_low_bits=m["T_low_bits"] - 1), "T_low_bits"),
        (lambda t, m: t.update(T_high=t["T_high"][:-1]), "'T_high' must be flat"),
        (lambda t, m: t.update(T_high=t["T_high"] | 0x80), "exactly T_count=6 set bits"),
        (lambda t, m: t.update(T_high=t["T_high"] * 0), "exactly T_count=6 set bits"),
        (lambda t, m: t.update(T_low=t["T_low"] * 0), "strictly increasing"),
        (lambda t, m: t.pop("T_low"), "missing 'T_low'"),
        (lambda t, m: m.update(T_count=7), "T_low_bits|must be flat"),
    ],
)
def test_quant_codes_unpack_refuses_corrupted_elias_fano(corrupt, match):
    cfg, b, T = _packed_ef()
    tensors, meta = pack_codes(b, T, cfg)
    assert meta["T_coding"] == "elias_fano" and torch.equal(unpack_codes(tensors, meta, cfg)[1], T)
    corrupt(tensors, meta)
    with pytest.raises(ValueError, match=match):
        unpack_codes(tensors, meta, cfg)


def test_quant_codes_restricted_codings():
    """A wire format with a fixed coding field (coset.dist) can exclude Elias-Fano: the smallest allowed wins."""
    cfg, b, T = _packed_ef()
    assert pack_codes(b, T, cfg)[1]["T_coding"] == "elias_fano"
    t, m = pack_codes(b, T, cfg, codings=("zero", "dense", "sparse"))
    assert m["T_coding"] == "sparse" and torch.equal(unpack_codes(t, m, cfg)[1], T)
    t, m = pack_codes(b, T, cfg, codings=("zero", "dense"))
    assert m["T_coding"] == "dense" and torch.equal(unpack_codes(t, m, cfg)[1], T)
    for bad in (("zero", "sparse"), ["zero", "dense"], ("zero", "dense", "rle")):
        with pytest.raises(ValueError, match="codings"):
            pack_codes(b, T, cfg, codings=bad)


def test_quant_codes_pack_refuses_bad_input():
    cfg = QuantizationConfig("D4", 4, 2)
    b = torch.zeros(3, 2, 4, dtype=torch.uint8)
    T = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="config"):
        pack_codes(b, T, None)
    with pytest.raises(TypeError, match="b must be an integer tensor"):
        pack_codes(b.float(), T, cfg)
    with pytest.raises(ValueError, match="b must have shape"):
        pack_codes(b[..., :3], T, cfg)
    with pytest.raises(ValueError, match="T must have shape"):
        pack_codes(b, T[:2], cfg)
    with pytest.raises(TypeError, match="T must be an integer tensor"):
        pack_codes(b, T.float(), cfg)
    with pytest.raises(ValueError, match="T must lie in"):
        pack_codes(b, T + cfg.max_scaling_iterations + 1, cfg)
    with pytest.raises(ValueError, match="labels must lie"):
        pack_codes(b + 4, T, cfg)


def _packed():
    cfg = QuantizationConfig("D4", 5, 2)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    b, _ = encode(x, cfg.replace(beta=0.3))
    T = torch.zeros(200, dtype=torch.uint8)
    T[[3, 50, 120]] = torch.tensor([10, 1, 2], dtype=torch.uint8)  # values > 1: a 'T_value' tensor
    return cfg, b, T


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda t, m: m.update(format="coset-codes/0"), "format"),
        (lambda t, m: m.pop("q"), "missing the key 'q'"),
        (lambda t, m: m.update(q="5"), r"meta\['q'\] must be an int"),
        (lambda t, m: m.update(shape=[40, -1]), r"meta\['shape'\]"),
        (lambda t, m: m.update(shape=[41]), "'labels' must be flat with"),
        (lambda t, m: m.update(T_coding="rle"), "T_coding"),
        (lambda t, m: m.update(lattice=None), r"meta\['lattice'\]"),
        (lambda t, m: t.pop("labels"), "missing 'labels'"),
        (lambda t, m: t.update(labels=t["labels"][:-1]), "'labels' must be flat with"),
        (lambda t, m: t.update(labels=t["labels"].to(torch.int16)), "'labels' must be a uint8 tensor"),
        (lambda t, m: t.update(labels=torch.full_like(t["labels"], 255)), "labels >= q=5"),
        (lambda t, m: t.update(extra=torch.zeros(1, dtype=torch.uint8)), "unexpected codes tensor 'extra'"),
        (lambda t, m: m.update(T_count=m["T_count"] + 1), "'T_index' must be flat"),
        (lambda t, m: t.update(T_index=t["T_index"].flip(0)), "strictly increasing"),
        (lambda t, m: m.update(T_coding="elias_fano", T_low_bits=6), "missing 'T_high'|unexpected"),
        (lambda t, m: m.update(T_index_bits=9), "T_index_bits"),
        (lambda t, m: m.update(max_T=3), "exceeds meta\\['max_T'\\]=3"),
        (lambda t, m: m.update(max_T=21), r"exceeds config.max_scaling_iterations"),
        (lambda t, m: m.update(q=4), r"meta\['q'\]=4 does not match config.q=5"),
        (lambda t, m: m.update(lattice="E8"), "does not match config.lattice_type"),
    ],
)
def test_quant_codes_unpack_refuses_corrupted_input(corrupt, match):
    cfg, b, T = _packed()
    tensors, meta = pack_codes(b, T, cfg)
    assert meta["T_coding"] == "sparse"
    corrupt(tensors, meta)
    with pytest.raises(ValueError, match=match):
        unpack_codes(tensors, meta, cfg)


def test_quant_codes_unpack_dense_out_of_range_and_types():
    cfg = QuantizationConfig("D4", 4, 2, max_scaling_iterations=4)
    b = torch.zeros(6, 2, 4, dtype=torch.uint8)
    T = torch.tensor([0, 1, 2, 3, 4, 1], dtype=torch.uint8)
    tensors, meta = pack_codes(b, T, cfg)
    assert meta["T_coding"] == "dense" and meta["T_bits"] == 3
    bad = dict(tensors, T=torch.full_like(tensors["T"], 0xFF))  # T = 7 > max_T = 4
    with pytest.raises(ValueError, match="exceeds meta"):
        unpack_codes(bad, meta, cfg)
    with pytest.raises(TypeError, match="tensors must be a dict"):
        unpack_codes([tensors], meta)
    with pytest.raises(TypeError, match="meta must be a dict"):
        unpack_codes(tensors, "meta")
    with pytest.raises(TypeError, match="config must be"):
        unpack_codes(tensors, meta, "D4")
    with pytest.raises(TypeError, match=r"tensors\['x'\]"):
        codes_nbytes({"x": 3})


def test_quant_unpack_labels_refuses_corrupted_bytes_and_shapes():
    """Issue 11 class 10: labels >= q from damaged bytes and degenerate shapes are refused at the source."""
    packed = pack_labels(torch.tensor([0, 1, 2, 4, 3]), 5)
    with pytest.raises(ValueError, match="labels >= q=5"):
        unpack_labels(torch.full_like(packed, 0xFF), 5, (5,))
    with pytest.raises(ValueError, match="non-negative ints"):
        unpack_labels(packed, 5, (5, -1))
    with pytest.raises(TypeError, match="shape must be a sequence"):
        unpack_labels(packed, 5, 5)
    assert torch.equal(unpack_labels(packed, 5, (5,)), torch.tensor([0, 1, 2, 4, 3], dtype=torch.uint8))
