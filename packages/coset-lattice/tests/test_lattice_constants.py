"""Generators, published constants (paper.md §7.5, §8) and input validation of coset.lattice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coset.lattice import (
    LATTICE_NAMES,
    D4Lattice,
    DnLattice,
    E8Lattice,
    Lattice,
    Z2Lattice,
    ZnLattice,
    get_lattice,
    tie_offset,
)

# published normalized second moments (Conway & Sloane, SPLAG ch. 21; paper.md §8)
NSM = {"Z2": 1 / 12, "D4": 0.0766032, "E8": 0.0716821}
SIGMA2 = {"Z2": 1 / 12, "D4": 13 / 120, "E8": 929 / 12960}


# --------------------------------------------------------------------------- generators
def test_lattice_generators_match_paper():
    d4 = np.array([[-1, 1, 0, 0], [-1, -1, 1, 0], [0, 0, -1, 1], [0, 0, 0, -1]], float)
    d4_inv = np.array([[-0.5, -0.5, -0.5, -0.5], [0.5, -0.5, -0.5, -0.5], [0, 0, -1, -1], [0, 0, 0, -1]])
    assert np.array_equal(get_lattice("D4").G.numpy(), d4)
    assert np.array_equal(get_lattice("D4").G_inv.numpy(), d4_inv)
    e8_inv = np.array(
        [
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -3.5],
            [0, 1, 1, 1, 1, 1, 1, -6],
            [0, 0, 1, 1, 1, 1, 1, -5],
            [0, 0, 0, 1, 1, 1, 1, -4],
            [0, 0, 0, 0, 1, 1, 1, -3],
            [0, 0, 0, 0, 0, 1, 1, -2],
            [0, 0, 0, 0, 0, 0, 1, -1],
            [0, 0, 0, 0, 0, 0, 0, 2],
        ]
    )
    G = get_lattice("E8").G.numpy()
    assert np.array_equal(G[:, 0], 2 * np.eye(8)[0])
    for j in range(1, 7):
        assert np.array_equal(G[:, j], np.eye(8)[j] - np.eye(8)[j - 1])
    assert np.array_equal(G[:, 7], np.full(8, 0.5))
    np.testing.assert_allclose(get_lattice("E8").G_inv.numpy(), e8_inv, atol=1e-12)
    assert np.array_equal(get_lattice("Z2").G.numpy(), np.eye(2))


@pytest.mark.parametrize(
    "L,det",
    [
        (Z2Lattice(), 1.0),
        (ZnLattice(5), 1.0),
        (D4Lattice(), 2.0),
        (DnLattice(3), 2.0),
        (DnLattice(7), 2.0),
        (E8Lattice(), 1.0),
    ],
)
def test_lattice_determinant_and_inverse(L, det):
    G, Gi = L.G, L.G_inv
    assert G.dtype == torch.float64 and G.shape == (L.dim, L.dim)
    assert abs(abs(float(torch.linalg.det(G))) - det) < 1e-9
    assert L.volume == pytest.approx(det, abs=1e-9)
    eye = torch.eye(L.dim, dtype=torch.float64)
    torch.testing.assert_close(G @ Gi, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(Gi @ G, eye, atol=1e-12, rtol=0)
    # G^-1 is dyadic for these lattices: integer coordinates are computed exactly
    assert torch.equal(Gi * 2, torch.round(Gi * 2))
    # the returned matrices are copies: mutating them does not corrupt the lattice
    G[0, 0] = 123.0
    assert L.G[0, 0] != 123.0


@pytest.mark.parametrize("name,count", [("Z2", 4), ("D4", 24), ("E8", 240)])
def test_lattice_minimal_vectors(name, count):
    L = get_lattice(name)
    mv = L.minimal_vectors()
    assert mv.shape == (count, L.dim)
    assert len({tuple(v) for v in mv}) == count
    mvt = torch.from_numpy(mv)
    c = L.coords64(mvt)
    assert torch.equal(L.points64(c), mvt), "minimal vectors are not lattice points"
    norms = (mvt**2).sum(-1)
    assert torch.allclose(norms, norms[0].expand_as(norms))
    # nothing shorter: the closest point of any half minimal vector is 0 or the vector itself
    assert L.packing_radius == pytest.approx(math.sqrt(float(norms[0])) / 2)


@pytest.mark.parametrize(
    "name,rho,rcov", [("Z2", 0.5, math.sqrt(2) / 2), ("D4", 1 / math.sqrt(2), 1.0), ("E8", 1 / math.sqrt(2), 1.0)]
)
def test_lattice_packing_and_covering_radius(name, rho, rcov):
    L = get_lattice(name)
    assert L.packing_radius == pytest.approx(rho)
    assert L.covering_radius == pytest.approx(rcov)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100000, L.dim, generator=g, dtype=torch.float64) * 20 - 10
    dist = ((x - L.closest_point(x)) ** 2).sum(-1).sqrt()
    assert float(dist.max()) <= rcov + 1e-9  # covering radius is an upper bound
    assert float(dist.max()) > 0.8 * rcov  # ... and roughly attained
    # a deep hole sits exactly at the covering radius
    hole = torch.full((L.dim,), 0.5, dtype=torch.float64) if name == "Z2" else torch.eye(L.dim, dtype=torch.float64)[0]
    assert float(((hole - L.closest_point(hole)) ** 2).sum().sqrt()) == pytest.approx(rcov)


# --------------------------------------------------------------------------- second moment by Monte Carlo
@pytest.mark.parametrize("name", ["Z2", "D4", "E8"])
def test_lattice_nsm_monte_carlo(name):
    """x = G u with u ~ Unif[0,1)^d is uniform on a fundamental domain, so x - Q(x) ~ Unif(V)."""
    L = get_lattice(name)
    assert L.nsm == pytest.approx(NSM[name], rel=1e-5)
    assert L.second_moment == pytest.approx(SIGMA2[name], rel=1e-5)
    g = torch.Generator().manual_seed(7)
    n = 400_000
    x = L.points64(torch.rand(n, L.dim, generator=g, dtype=torch.float64)) + 17.0
    e = x - L.closest_point(x)
    sq = (e**2).sum(-1) / L.dim
    sigma2 = float(sq.mean())
    se = float(sq.std()) / math.sqrt(n)
    nsm = sigma2 / L.volume ** (2 / L.dim)
    assert abs(nsm - NSM[name]) / NSM[name] < 0.01
    assert abs(sigma2 - L.second_moment) < 5 * se  # much tighter than 1%
    assert float(e.mean(0).abs().max()) < 0.01  # the cell is symmetric


def test_lattice_dn_second_moment_formula():
    """sigma^2(D_n) = 1/12 + 1/(2n(n+1)); check D3 (fcc, 1/8) and D5 by Monte Carlo."""
    for n in (3, 5):
        L = DnLattice(n)
        s2 = 1 / 12 + 1 / (2 * n * (n + 1))
        assert L.second_moment == pytest.approx(s2)
        g = torch.Generator().manual_seed(n)
        x = L.points64(torch.rand(200_000, n, generator=g, dtype=torch.float64))
        mc = float(((x - L.closest_point(x)) ** 2).sum(-1).mean()) / n
        assert mc == pytest.approx(s2, rel=0.01)
    assert DnLattice(3).second_moment == pytest.approx(1 / 8)


# --------------------------------------------------------------------------- tie offset
def test_lattice_tie_offset_is_generic_and_tiny():
    for d in (1, 2, 4, 8, 16):
        e = tie_offset(d)
        assert e.shape == (d,) and e.dtype == np.float64
        assert np.linalg.norm(e) == pytest.approx(1e-9)
        assert np.all(e != 0)
        if d > 1:
            assert len(set(np.abs(e))) == d  # no two coordinates equal in size: no facet direction
    assert np.array_equal(tie_offset(4), tie_offset(4))  # deterministic, the kernels reproduce it


# --------------------------------------------------------------------------- registry and constructors
def test_lattice_registry():
    assert LATTICE_NAMES == ("Z2", "D4", "E8")
    assert get_lattice("d4") is get_lattice("D4")
    assert isinstance(get_lattice("E8"), E8Lattice)
    assert get_lattice("Z7").dim == 7 and isinstance(get_lattice("Z7"), ZnLattice)
    assert get_lattice("D6").dim == 6 and isinstance(get_lattice("D6"), DnLattice)
    for bad in ("E7", "A2", "", "D", "Z0x", "D2"):
        with pytest.raises(ValueError):
            get_lattice(bad)
    with pytest.raises(TypeError, match="name"):
        get_lattice(4)
    assert "D4" in repr(get_lattice("D4"))


def test_lattice_constructor_errors():
    with pytest.raises(ValueError, match="n >= 3"):
        DnLattice(2)
    with pytest.raises(ValueError, match="n >= 1"):
        ZnLattice(0)
    with pytest.raises(TypeError, match="n must be an int"):
        ZnLattice(2.0)
    with pytest.raises(TypeError, match="n must be an int"):
        DnLattice(True)
    with pytest.raises(ValueError, match="square"):
        Lattice("bad", np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-singular"):
        Lattice("bad", np.ones((2, 2)))


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name", ["Z2", "D4", "E8"])
def test_lattice_bad_inputs_raise_clearly(name):
    L = get_lattice(name)
    d = L.dim
    with pytest.raises(ValueError, match="last dimension"):
        L.closest_point(torch.zeros(3, d + 1))
    with pytest.raises(ValueError, match="last dimension"):
        L.closest_point(torch.tensor(1.0))
    x = torch.zeros(3, d)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        L.closest_point(x)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        L.closest_point(x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        L.closest_point([0.0] * d)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        L.closest_point(np.zeros((2, d)))
    with pytest.raises(TypeError, match="floating"):
        L.closest_point(torch.zeros(2, d, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        L.closest_point(torch.zeros(2, d, dtype=torch.bool))
    with pytest.raises(TypeError, match="points"):
        L.coords([0.0] * d)
    with pytest.raises(ValueError, match="points"):
        L.coords(torch.zeros(2, d + 2))


def test_lattice_coords_round_trip():
    for name in ("Z2", "D4", "E8"):
        L = get_lattice(name)
        z = torch.randint(-1000, 1000, (500, L.dim))
        p = L.points64(z)
        assert torch.equal(L.coords(p), z)
        assert L.coords(p).dtype == torch.int64
        assert torch.equal(L.coords(p.float()), z)  # float32 holds these points exactly
