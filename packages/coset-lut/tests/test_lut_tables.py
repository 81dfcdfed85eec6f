"""Two- and one-sided tables against brute force, published ranges, dtype, budget and cache."""

import numpy as np
import pytest
import torch

from coset.lattice import Lattice, get_lattice
from coset.quant import coset_representative
from coset.lut import (
    TwoSidedLUT,
    build_one_sided_lut,
    build_two_sided_lut,
    index_labels,
    representative_table,
)


def _brute_rep(lat, q, labels):
    """a(b) = G b - q Q(G b / q), one label at a time through coset.quant (no batching, no table)."""
    return torch.stack([coset_representative(b, lat, q) for b in labels])


@pytest.mark.parametrize("name,q", [("Z2", 4), ("D4", 4), ("D4", 3), ("E8", 2), ("D4", 2)])
def test_lut_representatives_are_distinct_coset_leaders(name, q):
    lat = get_lattice(name)
    d = lat.dim
    a = representative_table(lat, q)
    assert a.shape == (q**d, d) and a.dtype == torch.float64
    labels = index_labels(torch.arange(q**d), q, d)
    # a(b) is a lattice point congruent to G b modulo qL: coords(a) = b (mod q)
    z = lat.coords(a)
    assert torch.equal(torch.remainder(z, q), labels.long())
    assert torch.allclose(lat.points64(z), a)
    # distinct (|A_q| = q^d) and inside qV: Q(a / q) = 0
    assert len({tuple(r) for r in a.tolist()}) == q**d
    assert torch.all(lat.closest_point(a / q) == 0)


@pytest.mark.parametrize(
    "name,q,lo,hi,dtype",
    [("D4", 4, -9, 16, torch.int8), ("E8", 2, -1, 4, torch.int8), ("Z2", 4, -4, 8, torch.int8)],
)
def test_lut_two_sided_published_ranges_and_brute_force(name, q, lo, hi, dtype):
    lat = get_lattice(name)
    lut = build_two_sided_lut(lat, q)
    Q = q**lat.dim
    assert isinstance(lut, TwoSidedLUT)
    assert lut.table.shape == (Q, Q) and lut.table.dtype == dtype
    assert (lut.min, lut.max) == (lo, hi)  # paper.md §6, observed ranges
    assert lut.nbytes == Q * Q * lut.table.element_size() and lut.num_entries == Q * Q
    assert torch.equal(lut.table, lut.table.T)
    # brute force on a random subset of pairs (full check for the small tables)
    g = torch.Generator().manual_seed(1)
    n = min(Q * Q, 3000)
    i = torch.randint(0, Q, (n,), generator=g)
    j = torch.randint(0, Q, (n,), generator=g)
    ai = _brute_rep(lat, q, index_labels(i, q, lat.dim))
    aj = _brute_rep(lat, q, index_labels(j, q, lat.dim))
    want = (ai * aj).sum(-1)
    assert torch.equal(lut.table[i, j].to(torch.float64), want)


def test_lut_two_sided_full_brute_force_z2():
    lat, q = get_lattice("Z2"), 3
    lut = build_two_sided_lut(lat, q)
    labels = index_labels(torch.arange(9), q, 2)
    a = _brute_rep(lat, q, labels)
    for i in range(9):
        for j in range(9):
            assert int(lut.table[i, j]) == float(a[i] @ a[j])


def test_lut_two_sided_dtype_grows_with_range():
    lut = build_two_sided_lut(get_lattice("Z2"), 16)  # entries up to 2 * 8^2 = 128 > int8
    assert lut.table.dtype == torch.int16
    assert lut.max == 128


def test_lut_two_sided_budget_error_names_size():
    with pytest.raises(ValueError, match="4294967296"):
        build_two_sided_lut(get_lattice("E8"), 4)
    with pytest.raises(ValueError, match="65536 entries"):
        build_two_sided_lut(get_lattice("D4"), 4, max_entries=65535)
    assert build_two_sided_lut(get_lattice("D4"), 4, max_entries=65536).num_entries == 65536


def test_lut_two_sided_is_cached_per_lattice_and_q():
    a = build_two_sided_lut(get_lattice("D4"), 4)
    assert build_two_sided_lut(get_lattice("D4"), 4) is a
    assert build_two_sided_lut(get_lattice("D4"), 3) is not a
    assert build_two_sided_lut(get_lattice("D4"), 4, tie_dither=False) is not a


def test_lut_two_sided_bad_inputs():
    with pytest.raises(TypeError, match="lattice"):
        build_two_sided_lut("D4", 4)
    with pytest.raises(ValueError, match="q must be"):
        build_two_sided_lut(get_lattice("D4"), 1)
    with pytest.raises(ValueError, match="max_entries"):
        build_two_sided_lut(get_lattice("D4"), 4, max_entries=0)


class _HalfZ2(Lattice):
    """(1/2) Z^2 scaled by sqrt(3): a non-integral lattice, to check the float fallback of the table."""

    nsm = 1 / 12

    def __init__(self):
        super().__init__("HalfZ2", np.sqrt(3) / 2 * np.eye(2))

    def _closest_point_raw(self, x):
        s = np.sqrt(3) / 2
        return torch.round(x / s) * s


def test_lut_two_sided_non_integral_lattice_stays_float():
    lat = _HalfZ2()
    lut = build_two_sided_lut(lat, 4)
    assert lut.table.dtype == torch.float64
    a = representative_table(lat, 4)
    assert torch.allclose(lut.table, a @ a.T)


@pytest.mark.parametrize("name,q", [("D4", 4), ("E8", 2), ("Z2", 5)])
def test_lut_one_sided_tables(name, q):
    lat = get_lattice(name)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(3, 5, lat.dim, generator=g, dtype=torch.float64)
    t = build_one_sided_lut(y, lat, q)
    Q = q**lat.dim
    assert t.shape == (3, 5, Q) and t.dtype == torch.float64
    i = torch.randint(0, Q, (40,), generator=g)
    a = _brute_rep(lat, q, index_labels(i, q, lat.dim))  # (40, d)
    want = torch.einsum("abd,nd->abn", y, a)
    assert torch.allclose(t[..., i], want, rtol=0, atol=1e-12)
    t32 = build_one_sided_lut(y.float(), lat, q)
    assert t32.dtype == torch.float32
    assert torch.allclose(t32.double(), t, rtol=1e-6, atol=1e-5)


def test_lut_one_sided_bad_inputs():
    lat = get_lattice("D4")
    with pytest.raises(ValueError, match=r"y must have last dimension d=4"):
        build_one_sided_lut(torch.zeros(3, 5), lat, 4)
    with pytest.raises(TypeError, match="y must be a floating"):
        build_one_sided_lut(torch.zeros(3, 4, dtype=torch.int64), lat, 4)
    with pytest.raises(ValueError, match="NaN"):
        build_one_sided_lut(torch.tensor([[0.0, float("nan"), 0, 0]]), lat, 4)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        build_one_sided_lut([[0.0] * 4], lat, 4)
