"""Fuzz the public API of coset.quant: random configs, shapes, dtypes, magnitudes and bytes. Every call either
raises a documented exception (TypeError / ValueError, with a message) or returns a result that satisfies the
package's invariants (shapes, label and T ranges, finite reconstructions, exact round trips)."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coset.quant import (
    QuantizationConfig,
    decode,
    encode,
    pack_codes,
    pack_labels,
    quantize,
    unpack_codes,
    unpack_labels,
)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.uint8, torch.bool]


def _documented(e: BaseException) -> None:
    assert isinstance(e, (TypeError, ValueError)), f"undocumented {type(e).__name__}: {e}"
    assert str(e), "an error without a message"


def _config(draw):
    fields = dict(
        lattice_type=draw(st.sampled_from(["Z2", "D4", "E8", "d4", "Z3", "X9", 4])),
        q=draw(st.one_of(st.integers(0, 20), st.just(4.0), st.just(True))),
        M=draw(st.integers(0, 5)),
        beta=draw(st.one_of(st.floats(1e-310, 1e305), st.just(float("nan")), st.just(0.0), st.just(-1.0))),
        alpha=draw(st.one_of(st.floats(0.01, 80.0), st.just(float("inf")))),
        max_scaling_iterations=draw(st.integers(-1, 70)),
        with_dither=draw(st.booleans()),
        center=draw(st.booleans()),
        overload_policy=draw(st.sampled_from(["clamp", "error", "wrap"])),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationConfig(**fields)


@st.composite
def configs(draw):
    try:
        return _config(draw)
    except (TypeError, ValueError) as e:
        _documented(e)
        return None


@FUZZ
@given(
    cfg=configs(),
    lead=st.lists(st.integers(0, 5), max_size=3),
    dlast=st.integers(0, 9),
    dtype=st.sampled_from(DTYPES),
    log_mag=st.floats(-30, 300),
    special=st.sampled_from([None, "nan", "inf", "-inf"]),
    seed=st.integers(0, 2**16),
)
def test_quant_fuzz_encode_decode_quantize(cfg, lead, dlast, dtype, log_mag, special, seed):
    if cfg is None:
        return
    g = torch.Generator().manual_seed(seed)
    d = cfg.dim if dlast == 0 else dlast
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64) * 10.0**log_mag
    if special is not None and x.numel():
        x.view(-1)[0] = float(special)
    x = x.to(dtype) if dtype != torch.bool else x > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            b, T, cl = encode(x, cfg, return_clamped=True)
        except Exception as e:  # noqa: BLE001 - the property under test
            _documented(e)
            return
        assert b.shape == (*lead, cfg.M, cfg.dim) and b.dtype == torch.uint8
        assert T.shape == tuple(lead) and cl.shape == tuple(lead)
        if b.numel():
            assert int(b.max()) < cfg.q and int(T.max()) <= cfg.max_scaling_iterations
        xh = decode(b, cfg, T, dtype=torch.float64)
        assert xh.shape == x.shape and bool(torch.isfinite(xh).all())
        xq = quantize(x, cfg)
        assert xq.shape == x.shape and xq.dtype == x.dtype
        if x.dtype == torch.float64:
            assert torch.equal(xq, xh)
        # the packed form round-trips exactly
        tensors, meta = pack_codes(b, T, cfg)
        b2, T2 = unpack_codes(tensors, meta, cfg)
        assert torch.equal(b2, b) and torch.equal(T2, T)


@FUZZ
@given(
    q=st.one_of(st.integers(-1, 300), st.just(2.5)),
    shape=st.lists(st.integers(-1, 6), max_size=3),
    nbytes=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_quant_fuzz_unpack_labels_random_bytes(q, shape, nbytes, seed):
    raw = torch.randint(0, 256, (nbytes,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    try:
        out = unpack_labels(raw.to(torch.uint8), q, shape)
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    assert tuple(out.shape) == tuple(shape) and out.dtype == torch.uint8
    if out.numel():
        assert int(out.max()) < q
    assert torch.equal(unpack_labels(pack_labels(out, q), q, shape), out)


@FUZZ
@given(
    n=st.integers(0, 30),
    cap=st.integers(0, 12),
    p=st.floats(0, 1),
    flip=st.integers(0, 200),
    key=st.sampled_from(["labels", "T", "T_index", "T_value", None]),
    meta_key=st.sampled_from(["shape", "q", "M", "d", "max_T", "T_bits", "T_count", "T_index_bits", None]),
    meta_val=st.one_of(st.integers(-3, 300), st.just("x"), st.just(None), st.lists(st.integers(-1, 9), max_size=2)),
    seed=st.integers(0, 2**16),
)
def test_quant_fuzz_unpack_codes_corrupted(n, cap, p, flip, key, meta_key, meta_val, seed):
    cfg = QuantizationConfig("D4", 5, 2, max_scaling_iterations=cap)
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 5, (n, 2, 4), generator=g).to(torch.uint8)
    T = ((torch.rand(n, generator=g) < p) * torch.randint(0, cap + 1, (n,), generator=g)).to(torch.uint8)
    tensors, meta = pack_codes(b, T, cfg)
    if key in tensors and tensors[key].numel():
        t = tensors[key].clone()
        t[flip % t.numel()] ^= 0xFF
        tensors[key] = t
    if meta_key is not None:
        meta[meta_key] = meta_val
    try:
        b2, T2 = unpack_codes(tensors, meta, cfg)
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    # accepted: still valid codes of the config
    assert b2.shape[-2:] == (2, 4) and T2.shape == b2.shape[:-2]
    if b2.numel():
        assert int(b2.max()) < 5
    if T2.numel():
        assert int(T2.max()) <= cap
