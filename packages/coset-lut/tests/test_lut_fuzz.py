"""Fuzz the public API of coset.lut: random configs, shapes (broadcasting or not), label values and queries.
Every call either raises a documented exception (TypeError / ValueError with a message) or returns what
decoding and multiplying in float64 gives."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coset.lut import (
    EncodedMatrix,
    index_labels,
    label_index,
    lut_inner_product,
    lut_inner_product_one_sided,
    lut_matmul,
    lut_matmul_one_sided,
)
from coset.quant import QuantizationConfig, decode

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _documented(e: BaseException) -> None:
    assert isinstance(e, (TypeError, ValueError)), f"undocumented {type(e).__name__}: {e}"
    assert str(e)


def _cfg(name, q, M, center, dither):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationConfig(name, q, M, beta=0.3, center=center, with_dither=dither)


@FUZZ
@given(
    names=st.tuples(st.sampled_from(["Z2", "z2", "D4", "d4"]), st.sampled_from(["Z2", "z2", "D4", "d4"])),
    q=st.sampled_from([2, 3, 4]),
    Ms=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    center=st.booleans(),
    dither=st.booleans(),
    lx=st.lists(st.integers(1, 3), max_size=2),
    ly=st.lists(st.integers(1, 3), max_size=2),
    lab_hi=st.integers(0, 6),
    label_dtype=st.sampled_from([torch.uint8, torch.int64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_lut_fuzz_inner_products(names, q, Ms, center, dither, lx, ly, lab_hi, label_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cx = _cfg(names[0], q, Ms[0], center, dither)
    cy = _cfg(names[1], q, Ms[1], center, False)
    d = cx.dim
    bx = torch.randint(0, lab_hi + 1, (*lx, Ms[0], d), generator=g).to(label_dtype)
    by = torch.randint(0, lab_hi + 1, (*ly, Ms[1], cy.dim), generator=g).to(label_dtype)
    y = torch.randn(*ly, d, generator=g, dtype=torch.float64)
    try:
        got = lut_inner_product(bx, by, cx, config_y=cy)
    except Exception as e:  # noqa: BLE001 - the property under test
        _documented(e)
    else:
        ref = (decode(bx, cx, dtype=torch.float64) * decode(by, cy, dtype=torch.float64)).sum(-1)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    try:
        got1 = lut_inner_product_one_sided(bx, y, cx)
    except Exception as e:  # noqa: BLE001
        _documented(e)
    else:
        ref1 = (decode(bx, cx, dtype=torch.float64) * y).sum(-1)
        torch.testing.assert_close(got1.double(), ref1, rtol=1e-10, atol=1e-10)


@FUZZ
@given(
    q=st.one_of(st.integers(-1, 6), st.just(2.0)),
    d=st.one_of(st.integers(-1, 5), st.just(True)),
    shape=st.lists(st.integers(0, 3), max_size=2),
    hi=st.integers(0, 700),
    seed=st.integers(0, 2**16),
)
def test_lut_fuzz_index(q, d, shape, hi, seed):
    g = torch.Generator().manual_seed(seed)
    try:
        idx = torch.randint(0, hi + 1, tuple(shape), generator=g)
        b = index_labels(idx, q, d)
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    assert b.shape == (*shape, d) and torch.equal(label_index(b, q), idx)


@FUZZ
@given(
    n=st.integers(0, 4), m=st.integers(0, 4), k=st.integers(0, 9), k2=st.integers(0, 9),
    special=st.sampled_from([None, "nan"]), seed=st.integers(0, 2**16),
)
def test_lut_fuzz_matmul(n, m, k, k2, special, seed):
    g = torch.Generator().manual_seed(seed)
    c = _cfg("D4", 4, 2, False, False)
    W = torch.randn(n, k, generator=g)
    Y = torch.randn(m, k2, generator=g)
    if special and Y.numel():
        Y.view(-1)[0] = float("nan")
    try:
        X = EncodedMatrix.from_dense(W, c)
        out = lut_matmul_one_sided(X, Y)
        two = lut_matmul(X, EncodedMatrix.from_dense(Y, c))
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    ref = X.dequantize(torch.float64) @ Y.double().T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert two.shape == (n, m)
