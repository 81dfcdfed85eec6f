"""Closest-point quantizers Q_L of Z^n, D_n and E8 against brute force, the Voronoi-relevant vectors and
translation equivariance at ties (research/paper.md §7, §12 oracle 1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coset.lattice import D4Lattice, DnLattice, E8Lattice, Z2Lattice, ZnLattice, get_lattice

LATTICES = {
    "Z2": Z2Lattice(),
    "Z3": ZnLattice(3),
    "D4": D4Lattice(),
    "D5": DnLattice(5),
    "D6": DnLattice(6),
    "E8": E8Lattice(),
}
ALL = list(LATTICES)


# --------------------------------------------------------------------------- brute force (independent of the library)
def _box(x: np.ndarray) -> np.ndarray:
    """All points of the {floor, ceil}^d box around each row of x: (N, 2^d, d)."""
    lo = np.floor(x)
    d = x.shape[-1]
    corners = np.array(list(itertools.product((0.0, 1.0), repeat=d)))  # (2^d, d)
    return lo[:, None, :] + corners[None]


def _argmin_dist(x: np.ndarray, cand: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = ((x[:, None, :] - cand) ** 2).sum(-1)
    dist = np.where(valid, dist, np.inf)
    k = dist.argmin(1)
    return cand[np.arange(len(x)), k], dist[np.arange(len(x)), k]


def brute_force(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest point of Z^n / D_n / E8 by exhaustive search of the integer boxes of each coset.

    For non-integer coordinates the closest point of Z^n and D_n lies in the {floor, ceil}^d box, and the one of
    E8 = D8 u (D8 + 1/2) lies in the D8 box of x or the D8 box of x - 1/2 shifted back."""
    if name.startswith("Z"):
        c = _box(x)
        return _argmin_dist(x, c, np.ones(c.shape[:2], bool))
    if name.startswith("D"):
        c = _box(x)
        return _argmin_dist(x, c, (c.sum(-1) % 2) == 0)
    assert name == "E8"
    c0 = _box(x)
    c1 = _box(x - 0.5) + 0.5
    c = np.concatenate([c0, c1], axis=1)
    valid = np.concatenate([(c0.sum(-1) % 2) == 0, ((c1 - 0.5).sum(-1) % 2) == 0], axis=1)
    return _argmin_dist(x, c, valid)


def relevant_vectors(name: str) -> np.ndarray:
    """Voronoi-relevant vectors written out independently of the library (Z^n: +-e_i; D_n, E8: minimal vectors)."""
    L = LATTICES[name]
    d = L.dim
    if name.startswith("Z"):
        e = np.eye(d)
        return np.concatenate([e, -e])
    v = []
    for i, j in itertools.combinations(range(d), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            e = np.zeros(d)
            e[i], e[j] = si, sj
            v.append(e)
    if name == "E8":
        for s in itertools.product((0.5, -0.5), repeat=8):
            if sum(t < 0 for t in s) % 2 == 0:
                v.append(np.array(s))
    return np.array(v)


def random_lattice_points(L, n: int, rng: np.random.Generator, r: int = 50) -> torch.Tensor:
    z = torch.from_numpy(rng.integers(-r, r + 1, size=(n, L.dim)).astype(np.float64))
    return L.points64(z)


def boundary_points(name: str, rng: np.random.Generator, n: int = 400) -> torch.Tensor:
    """Points on Voronoi boundaries: midpoints lambda + v/2 (v relevant), deep holes, and G b / q for even q."""
    L = LATTICES[name]
    rv = relevant_vectors(name)
    lam = random_lattice_points(L, n, rng, r=5).numpy()
    mids = lam + rv[rng.integers(0, len(rv), size=n)] / 2.0
    holes = {
        "Z": [np.full(L.dim, 0.5)],
        "D": [np.eye(L.dim)[0], np.full(L.dim, 0.5)],
        "E": [np.eye(8)[0], np.array([1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0]) / 2.0],
    }[name[0]]
    holes = np.array(holes)
    hp = lam[: len(holes) * 20].reshape(-1, 1, L.dim) + holes[None]
    pts = [mids, hp.reshape(-1, L.dim)]
    for q in (2, 4, 6, 8):
        b = rng.integers(-3 * q, 3 * q + 1, size=(n, L.dim)).astype(np.float64)
        pts.append(L.points64(torch.from_numpy(b)).numpy() / q)
    return torch.from_numpy(np.concatenate(pts))


def voronoi_check(name: str, x: torch.Tensor, y: torch.Tensor, tol: float = 0.0) -> int:
    """Number of rows for which some neighbour y + v (v Voronoi-relevant) is strictly closer to x than y."""
    rv = torch.from_numpy(relevant_vectors(name))
    d0 = ((x - y) ** 2).sum(-1)
    dn = ((x[:, None, :] - (y[:, None, :] + rv[None])) ** 2).sum(-1).min(1).values
    return int((dn < d0 - tol).sum())


# --------------------------------------------------------------------------- brute force on random inputs
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 10.0, 1e3])
def test_lattice_nearest_point_matches_brute_force(name, scale):
    L = LATTICES[name]
    rng = np.random.default_rng(hash((name, scale)) % 2**32)
    x = rng.normal(size=(1500, L.dim)) * scale + rng.uniform(-3, 3, size=(1, L.dim))
    y = L.closest_point(torch.from_numpy(x)).numpy()
    yb, db = brute_force(name, x)
    dy = ((x - y) ** 2).sum(-1)
    # the distances agree, and for generic inputs the nearest point is unique, so the points agree too
    np.testing.assert_allclose(dy, db, rtol=1e-12, atol=1e-12)
    assert np.array_equal(y, yb)


@pytest.mark.parametrize("name", ALL)
def test_lattice_no_relevant_neighbour_strictly_closer_random(name):
    L = LATTICES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, L.dim, generator=g, dtype=torch.float64) * 4
    y = L.closest_point(x)
    assert voronoi_check(name, x, y) == 0
    # the bare Conway & Sloane rule (no tie offset) gives the same point away from ties
    assert torch.equal(L.closest_point(x, tie_dither=False), y)


@pytest.mark.parametrize("name", ALL)
def test_lattice_boundary_points_get_a_nearest_point(name):
    """On Voronoi boundaries several lattice points are equally near; the one returned must be one of them."""
    L = LATTICES[name]
    x = boundary_points(name, np.random.default_rng(2))
    for tie in (True, False):
        y = L.closest_point(x, tie_dither=tie)
        # within the tie offset (norm 1e-9) of being nearest; ties are exact here, so tolerance ~ 2*|x|*1e-9
        tol = 1e-7
        assert voronoi_check(name, x, y, tol=tol) == 0
        _, db = brute_force(name, x.numpy() + 1e-7 * np.random.default_rng(0).normal(size=x.shape))
        # brute force of a generic perturbation finds the same minimal distance (up to the perturbation)
        dy = ((x - y) ** 2).sum(-1).numpy()
        np.testing.assert_allclose(dy, db, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_lattice_output_is_in_lattice_and_idempotent(name):
    L = LATTICES[name]
    g = torch.Generator().manual_seed(3)
    x = torch.cat(
        [
            torch.randn(5000, L.dim, generator=g, dtype=torch.float64) * 10,
            boundary_points(name, np.random.default_rng(3)),
        ]
    )
    y = L.closest_point(x)
    c = y @ L.G_inv.T
    assert torch.equal(c, torch.round(c)), "G^-1 Q(x) is not integral"
    assert torch.equal(L.points64(L.coords(y)), y)
    assert torch.equal(L.closest_point(y), y)
    assert torch.equal(L.closest_point(y, tie_dither=False), y)


# --------------------------------------------------------------------------- translation equivariance at ties
@pytest.mark.parametrize("name", ALL)
def test_lattice_translation_consistency_at_ties(name):
    """Q(x + l) == Q(x) + l exactly for lattice points l, with x on Voronoi boundaries (paper.md §7.4)."""
    L = LATTICES[name]
    rng = np.random.default_rng(4)
    x = boundary_points(name, rng)
    n = x.shape[0]
    for _ in range(3):
        lam = random_lattice_points(L, n, rng, r=50)
        assert torch.equal(L.closest_point(x + lam), L.closest_point(x) + lam)


def test_lattice_bare_rule_is_not_translation_consistent_for_e8():
    """Sanity check that the boundary points really are ties: without the tie offset E8 is not equivariant
    (D8 wins ties against D8 + 1/2, which is not invariant under adding a D8 + 1/2 lattice vector)."""
    L = LATTICES["E8"]
    rng = np.random.default_rng(5)
    x = boundary_points("E8", rng)
    lam = random_lattice_points(L, x.shape[0], rng, r=50)
    bad = (L.closest_point(x + lam, tie_dither=False) != L.closest_point(x, tie_dither=False) + lam).any(-1)
    assert int(bad.sum()) > 0
    good = (L.closest_point(x + lam) != L.closest_point(x) + lam).any(-1)
    assert int(good.sum()) == 0


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(ALL),
    b=st.lists(st.integers(-40, 40), min_size=8, max_size=8),
    l=st.lists(st.integers(-1000, 1000), min_size=8, max_size=8),
    q=st.sampled_from([2, 4, 6, 8, 16]),
)
def test_lattice_translation_consistency_hypothesis(name, b, l, q):
    L = LATTICES[name]
    d = L.dim
    x = L.points64(torch.tensor(b[:d], dtype=torch.float64)) / q
    lam = L.points64(torch.tensor(l[:d], dtype=torch.float64))
    y = L.closest_point(x)
    assert torch.equal(L.closest_point(x + lam), y + lam)
    assert voronoi_check(name, x[None], y[None], tol=1e-7) == 0


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(ALL),
    xs=st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=8, max_size=8),
)
def test_lattice_nearest_point_hypothesis(name, xs):
    L = LATTICES[name]
    x = torch.tensor(xs[: L.dim], dtype=torch.float64)
    y = L.closest_point(x)
    assert voronoi_check(name, x[None], y[None], tol=1e-6) == 0
    c = L.G_inv @ y
    assert torch.equal(c, torch.round(c))


# --------------------------------------------------------------------------- dtypes and shapes
@pytest.mark.parametrize("name", ["Z2", "D4", "E8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_lattice_dtypes_and_leading_dims(name, dtype):
    L = get_lattice(name)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 5, 7, L.dim, generator=g) * 3).to(dtype)
    y = L.closest_point(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = L.closest_point(x.to(torch.float64).reshape(-1, L.dim)).reshape(x.shape)
    assert torch.equal(y.to(torch.float64), ref)  # lattice points of this size are exact in every dtype
    assert L.closest_point(x[0, 0, 0]).shape == (L.dim,)  # a single vector
    assert L.closest_point(x[:0]).shape == (0, 5, 7, L.dim)  # empty batch


def test_lattice_non_contiguous_input():
    L = get_lattice("E8")
    x = torch.randn(16, 8, dtype=torch.float64) * 3
    xt = x.t().contiguous().t()  # same values, transposed strides
    assert not xt.is_contiguous()
    assert torch.equal(L.closest_point(xt), L.closest_point(x))
