"""``QuantizationConfig.center``: the constellation offset, the encode/decode identity with the offset, the
centred constellation's mean, the q = 2 SNR finding, clamping with the offset and backend parity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import coset.quant._core as core_mod
from coset.lattice import get_lattice
from coset.quant import (
    QuantizationConfig,
    Quantizer,
    constellation_offset,
    decode,
    decode_lattice_units,
    encode,
    encode_layers,
    quantize,
    sample_dither,
)
from coset.quant.calibrate import beta_min
from coset.quant.rd import gaussian_data


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _enumerate_constellation(name, q, M, tie=True):
    """Brute force: every label tuple of M layers, decoded without scaling (float64, exact)."""
    L = get_lattice(name)
    labels = torch.tensor(list(itertools.product(range(q), repeat=L.dim * M)), dtype=torch.uint8)
    return decode_lattice_units(labels.reshape(-1, M, L.dim), L, q, tie)


# --------------------------------------------------------------------------- the offset itself
@pytest.mark.parametrize(
    "name,q,M", [("Z2", 2, 4), ("Z2", 4, 2), ("Z2", 3, 2), ("D4", 3, 2), ("D4", 2, 3), ("D4", 4, 2), ("E8", 2, 2)]
)
def test_center_offset_is_the_brute_force_centroid(name, q, M):
    L = get_lattice(name)
    c = constellation_offset(L, q, M)
    assert c.dtype == torch.float64 and c.shape == (L.dim,)
    C = _enumerate_constellation(name, q, M)
    torch.testing.assert_close(c, C.mean(0), rtol=0, atol=1e-9)
    if q % 2 and name.startswith("Z"):
        assert float(c.abs().max()) < 1e-9  # odd q on Z^n: no lattice point on the boundary of qV, A_q symmetric
    if name == "D4":
        assert float(c.abs().max()) > 0.1  # D4 has points of L/q on the boundary of V even for odd q
    if name == "Z2" and q == 2:
        assert torch.equal(c.abs(), torch.full((2,), 7.5, dtype=torch.float64))  # {0..15} per coordinate
    assert constellation_offset(L, q, M) is c  # cached


def test_center_offset_tie_rule_and_cache_keys():
    L = get_lattice("D4")
    a, b = constellation_offset(L, 4, 2, True), constellation_offset(L, 4, 2, False)
    torch.testing.assert_close(b, _enumerate_constellation("D4", 4, 2, tie=False).mean(0), rtol=0, atol=1e-9)
    assert constellation_offset(L, 4, 3) is not a
    torch.testing.assert_close(constellation_offset(L, 4, 3), a * (4**3 - 1) / (4**2 - 1), rtol=1e-12, atol=0)


def test_center_offset_large_qd_is_a_deterministic_estimate():
    """E8 q=8: q^d = 2^24 > 2^20 labels, so mean(A_q) is estimated from a fixed-seed sample."""
    L = get_lattice("E8")
    c = constellation_offset(L, 8, 2)
    core_mod._offsets.clear()
    c2 = constellation_offset(L, 8, 2)
    assert torch.equal(c, c2) and c is not c2
    # independent sample of A_8 (different generator): the estimate is within a few standard errors
    lab = torch.randint(0, 8, (1 << 16, 8), generator=_gen(123))
    from coset.quant import coset_representative

    a = coset_representative(lab, L, 8)
    se = a.std(0) / math.sqrt(a.shape[0])
    scale = (8**2 - 1) / 7
    assert bool(((c / scale - a.mean(0)).abs() <= 6 * se + 1e-3).all())
    # and the estimate centres the constellation up to that error: |mean| << q^M
    lab2 = torch.randint(0, 8, (1 << 14, 2, 8), generator=_gen(7)).to(torch.uint8)
    cfg = QuantizationConfig("E8", 8, 2, disable_scaling=True, center=True)
    mean = decode(lab2, config=cfg, dtype=torch.float64).mean(0)
    assert float(mean.abs().max()) < 0.02 * 8**2


def test_center_offset_errors():
    L = get_lattice("D4")
    with pytest.raises(TypeError, match="lattice"):
        constellation_offset("D4", 4, 2)
    with pytest.raises(ValueError, match="q must be"):
        constellation_offset(L, 1, 2)
    with pytest.raises(ValueError, match="M must be"):
        constellation_offset(L, 4, 0)
    with pytest.raises(TypeError, match="tie_dither"):
        constellation_offset(L, 4, 2, 1)
    with pytest.raises(TypeError, match="center"):
        QuantizationConfig(center=1)
    assert QuantizationConfig().center is False


# --------------------------------------------------------------------------- the encode/decode identity
@pytest.mark.parametrize("name", ["Z2", "D4", "E8"])
@pytest.mark.parametrize("q", [2, 3, 4])
def test_center_decode_encode_is_shifted_nearest_point(name, q):
    """With center=True and beta=1: decode(encode(x)) = Q_L(x + c) - c exactly, for every vector with T = 0."""
    L = get_lattice(name)
    M = 3
    cfg = QuantizationConfig(name, q, M, beta=1.0, center=True, max_scaling_iterations=4)
    c = constellation_offset(L, q, M)
    x = torch.randn(4000, L.dim, generator=_gen(q), dtype=torch.float64) * (0.15 * q**M)
    b, T = encode(x, config=cfg, backend="torch")
    xh = decode(b, config=cfg, T=T, dtype=torch.float64, backend="torch")
    ref = L.closest_point64(x + c) - c
    ok = T == 0
    assert int(ok.sum()) > 1000
    assert torch.equal(xh[ok], ref[ok])
    # quantize and Quantizer agree with decode(encode(.))
    assert torch.equal(quantize(x, config=cfg, backend="torch"), xh)
    assert torch.equal(Quantizer(cfg, backend="torch").quantize(x), xh)


def test_center_with_random_dither_identity():
    L = get_lattice("D4")
    cfg = QuantizationConfig("D4", 4, 2, beta=1.0, center=True, with_dither=True, dither_seed=5)
    c = constellation_offset(L, 4, 2)
    x = torch.randn(2000, 4, generator=_gen(1), dtype=torch.float64) * 1.5
    b, T = encode(x, config=cfg, backend="torch")
    xh = decode(b, config=cfg, T=T, dtype=torch.float64, backend="torch")
    z = sample_dither(2000, L, 5)
    ok = T == 0
    assert int(ok.sum()) > 1000
    assert torch.equal(xh[ok], (L.closest_point64(x + (z + c)) - (z + c))[ok])


@pytest.mark.parametrize("name,q,M", [("Z2", 2, 4), ("D4", 2, 3), ("D4", 4, 2), ("E8", 2, 2), ("Z2", 3, 3)])
def test_center_constellation_mean_is_zero(name, q, M):
    """Decoding every label tuple with center=True gives a constellation with mean ~0 (vs ||c|| without)."""
    L = get_lattice(name)
    labels = torch.tensor(list(itertools.product(range(q), repeat=L.dim * M)), dtype=torch.uint8).reshape(-1, M, L.dim)
    on = decode(labels, config=QuantizationConfig(name, q, M, disable_scaling=True, center=True), dtype=torch.float64)
    off = decode(labels, config=QuantizationConfig(name, q, M, disable_scaling=True), dtype=torch.float64)
    assert float(on.mean(0).abs().max()) < 1e-9 * q**M
    torch.testing.assert_close(off - on, constellation_offset(L, q, M).expand_as(on), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Z2", "D4"])
def test_center_q2_snr_finding(name):
    """q=2, M=4 on N(0,1) at the rate-aware beta grid of rd.py: ~2 dB uncentred, > 15 dB centred."""
    L = get_lattice(name)
    x = gaussian_data(1 << 14, 3).double().reshape(-1, L.dim)
    snr = {}
    for center in (False, True):
        cfg = QuantizationConfig(name, 2, 4, alpha=1 / 3, max_scaling_iterations=30, center=center)
        b0 = beta_min(cfg, 1.0)
        best = math.inf
        for k in range(-10, 40, 3):
            xh = quantize(x, config=cfg.replace(beta=b0 * (1 + 0.05 * k)))
            best = min(best, float(((xh - x) ** 2).mean()))
        snr[center] = 10 * math.log10(float(x.var()) / best)
    assert snr[False] < 5.0
    assert snr[True] > 15.0


# --------------------------------------------------------------------------- clamping
@pytest.mark.parametrize("name,q,M", [("Z2", 4, 2), ("D4", 4, 2), ("E8", 4, 2), ("D4", 3, 3), ("Z2", 3, 2)])
@pytest.mark.parametrize("dither", [False, True])
def test_center_clamp_never_overloads(name, q, M, dither):
    """Vectors past the cap are shrunk into the ball of radius rad (sandwich bound minus ||c||); re-encoding
    the clamped vector plus the offset (and dither) in float64 never overloads and gives the same labels."""
    L = get_lattice(name)
    cfg = QuantizationConfig(name, q, M, beta=0.05, alpha=1.0, max_scaling_iterations=2, center=True,
                             with_dither=dither, dither_seed=3)
    c = constellation_offset(L, q, M)
    r = (1 - q ** (1 - M)) / (q - 1)
    rad = 0.99 * (L.packing_radius * q**M * (1 - r) - L.covering_radius * (2 if dither else 1)
                  - float(c.norm()))
    assert rad > 0
    x = torch.randn(3000, L.dim, generator=_gen(11), dtype=torch.float64) * 50.0
    b, T, cl = encode(x, config=cfg, return_clamped=True, backend="torch")
    assert int(cl.sum()) > 100 and bool((T[cl] == 2).all())
    u = x[cl] / cfg.scales[2]
    nrm = u.norm(dim=-1, keepdim=True)
    u = u * torch.clamp(rad / nrm, max=1.0)
    z = sample_dither(3000, L, 3)[cl] if dither else 0.0
    g = u + c + z
    bb, top = encode_layers(g, L, q, M)
    assert bool((top == 0).all())  # no overload
    assert torch.equal(bb, b[cl])
    xh = decode(b, config=cfg, T=T, dtype=torch.float64, backend="torch")
    ref = (L.closest_point64(g) - c - z) * cfg.scales[2]
    torch.testing.assert_close(xh[cl], ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name,q,M", [("Z2", 2, 4), ("D4", 2, 3), ("E8", 2, 2)])
@pytest.mark.parametrize("dither", [False, True])
def test_center_clamp_with_no_safe_ball_goes_to_the_origin(name, q, M, dither):
    """When ||c|| exceeds the sandwich radius (q=2 always) the clamp radius is <= 0: clamped vectors are
    encoded as g = c (+ z), i.e. reconstructed near 0 (within R_cov, 2 R_cov with dither), without overload."""
    from coset.quant._core import clamp_radius

    L = get_lattice(name)
    cfg = QuantizationConfig(name, q, M, beta=0.05, max_scaling_iterations=1, center=True, with_dither=dither)
    assert clamp_radius(L, cfg, True) <= 0
    x = torch.randn(2000, L.dim, generator=_gen(4), dtype=torch.float64) * 100.0
    b, T, cl = encode(x, config=cfg, return_clamped=True, backend="torch")
    assert bool(cl.all())
    c = constellation_offset(L, q, M)
    z = sample_dither(2000, L, 0) if dither else torch.zeros(2000, L.dim, dtype=torch.float64)
    bb, top = encode_layers(c + z, L, q, M)
    assert bool((top == 0).all()) and torch.equal(bb, b)
    xh = decode(b, config=cfg, T=T, dtype=torch.float64, backend="torch") / cfg.scales[1]
    assert float(xh.norm(dim=-1).max()) <= L.covering_radius * (2 if dither else 1) + 1e-9
