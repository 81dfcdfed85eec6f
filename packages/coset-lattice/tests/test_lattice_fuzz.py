"""Fuzz the public API of coset.lattice: random names, shapes, dtypes, magnitudes and arguments. Every call either
raises a documented exception (TypeError / ValueError with a message) or returns lattice points with the input's
shape and dtype (idempotent, integer coordinates)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coset.lattice import DnLattice, ZnLattice, get_lattice
from coset.lattice.validate import check_float_tensor, check_int, check_int_tensor, check_pos, check_q

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64]


def _documented(e: BaseException) -> None:
    assert isinstance(e, (TypeError, ValueError)), f"undocumented {type(e).__name__}: {e}"
    assert str(e)


@FUZZ
@given(
    name=st.one_of(st.sampled_from(["Z2", "d4", " E8 ", "Z1", "D3", "D2", "Z0", "D16", "Q4", "", "E7"]), st.integers()),
    lead=st.lists(st.integers(0, 4), max_size=3),
    dlast=st.integers(0, 9),
    dtype=st.sampled_from(DTYPES),
    log_mag=st.floats(-20, 20),
    special=st.sampled_from([None, "nan", "inf"]),
    tie=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lattice_fuzz_closest_point(name, lead, dlast, dtype, log_mag, special, tie, seed):
    try:
        L = get_lattice(name)
    except Exception as e:  # noqa: BLE001 - the property under test
        _documented(e)
        return
    d = L.dim if dlast == 0 else dlast
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10.0**log_mag
    if special and x.numel():
        x.view(-1)[0] = float(special)
    x = x.to(dtype) if dtype is not torch.bool else x > 0
    try:
        y = L.closest_point(x, tie_dither=tie)
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    y64 = y.to(torch.float64)
    if x.dtype == torch.float64 and bool(torch.isfinite(y64).all()):
        z = L.coords(y64)
        assert torch.equal(L.points64(z), y64)  # a lattice point
        assert torch.equal(L.closest_point(y64, tie_dither=tie), y64)  # idempotent


@FUZZ
@given(n=st.one_of(st.integers(-2, 20), st.just(3.0), st.just(True), st.just("4")))
def test_lattice_fuzz_constructors(n):
    for cls, lo in ((ZnLattice, 1), (DnLattice, 3)):
        try:
            L = cls(n)
        except Exception as e:  # noqa: BLE001
            _documented(e)
            continue
        assert L.dim == n >= lo and L.G.shape == (n, n)


VALUES = st.one_of(
    st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=2),
    st.none(), st.just(torch.zeros(2, 4)), st.just(torch.zeros(2, 4, dtype=torch.int32)),
)


@FUZZ
@given(v=VALUES, lo=st.one_of(st.none(), st.integers(-3, 3)), hi=st.one_of(st.none(), st.integers(0, 300)))
def test_lattice_fuzz_validate(v, lo, hi):
    """The shared checks accept exactly what they document and raise TypeError/ValueError naming 'v' otherwise."""
    for fn in (lambda: check_int("v", v, lo, hi), lambda: check_pos("v", v), lambda: check_q(v, 256, "v"),
               lambda: check_float_tensor("v", v, 4), lambda: check_int_tensor("v", v)):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            _documented(e)
            assert str(e).startswith("v ")
