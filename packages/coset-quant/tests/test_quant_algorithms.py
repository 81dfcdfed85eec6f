"""Algorithms 1/2 of HNLQ against the paper's oracles (research/paper.md §2-§5, §12): telescoping identity,
constellation, sandwich bound, overload ramp, clamp policy, dither."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coset.lattice import get_lattice
from coset.quant import (
    OverloadError,
    QuantizationConfig,
    coset_representative,
    decode,
    decode_lattice_units,
    encode,
    encode_layers,
    quantize,
    sample_dither,
)

NAMES = ["Z2", "D4", "E8"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def v_norm(x: torch.Tensor, L) -> torch.Tensor:
    """Gauge of the Voronoi cell, ||x||_V = max_v 2<x,v>/<v,v> over the relevant (minimal) vectors."""
    mv = torch.from_numpy(L.minimal_vectors())
    return (2 * x @ mv.T / (mv * mv).sum(-1)).max(-1).values


# --------------------------------------------------------------------------- labels, shapes, dtypes
@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    q=st.integers(2, 16),
    M=st.integers(1, 4),
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_quant_labels_shapes_dtypes(name, q, M, lead, dtype, seed, scale):
    cfg = QuantizationConfig(name, q, M, beta=0.3, alpha=1 / 3, max_scaling_iterations=20)
    d = cfg.dim
    x = (torch.randn(*lead, d, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)
    b, T = encode(x, config=cfg)
    assert b.dtype == torch.uint8 and b.shape == (*lead, M, d)
    assert T.dtype == torch.uint8 and T.shape == tuple(lead)
    if b.numel():
        assert int(b.max()) < q
        assert int(T.max()) <= cfg.max_scaling_iterations
    xh = decode(b, config=cfg, T=T, dtype=dtype)
    assert xh.dtype == dtype and xh.shape == x.shape
    xq = quantize(x, config=cfg)
    assert xq.dtype == dtype and torch.equal(xq, xh)
    assert bool(torch.isfinite(xq.double()).all())


# --------------------------------------------------------------------------- telescoping identity
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("q", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_quant_telescoping_identity(name, q, M):
    """decode(encode(x)) == Q(x) - q^M top for every x; == Q(x) exactly when there is no overload."""
    L = get_lattice(name)
    n = 1500
    g = _gen(q * 10 + M)
    # Gaussian points around the code's size, lattice points, and points G b / q on Voronoi boundaries
    x = torch.cat([
        torch.randn(n, L.dim, generator=g, dtype=torch.float64) * (q**M / 4),
        L.points64(torch.randint(-(q**M), q**M + 1, (n, L.dim), generator=g)) / 2,
        L.points64(torch.randint(-(q**M), q**M + 1, (n, L.dim), generator=g)) / q,
    ])
    b, top = encode_layers(x, L, q, M)
    assert b.dtype == torch.uint8 and int(b.max()) < q
    xh = decode_lattice_units(b, L, q)
    Qx = L.closest_point(x)
    assert torch.equal(xh, Qx - q**M * top)
    ovl = (top != 0).any(-1)
    assert 0 < int((~ovl).sum())
    assert torch.equal(xh[~ovl], Qx[~ovl])
    # the public API in lattice units gives the same thing on the vectors with T == 0
    cfg = QuantizationConfig(name, q, M, disable_scaling=True, max_scaling_iterations=0, overload_policy="clamp")
    b2, T2 = encode(x, config=cfg)
    assert torch.equal(b2[~ovl], b[~ovl])
    assert torch.equal(decode(b2, config=cfg, T=T2, dtype=torch.float64)[~ovl], Qx[~ovl])


def test_quant_tie_offset_needed_for_identity():
    """Without the tie offset the identity fails for even q on E8 (paper.md §7.4): the test above can fail."""
    L = get_lattice("E8")
    x = L.points64(torch.randint(-16, 17, (4000, 8), generator=_gen(0))) / 2
    b, top = encode_layers(x, L, 4, 2, tie_dither=False)
    xh = decode_lattice_units(b, L, 4, tie_dither=False)
    assert not torch.equal(xh, L.closest_point(x, tie_dither=False) - 16 * top)


@pytest.mark.parametrize("name,q,M", [("D4", 4, 3), ("E8", 3, 2), ("Z2", 4, 3), ("E8", 2, 4)])
def test_quant_successive_refinement(name, q, M):
    """Without overload the top layers alone decode to q^k lambda_k (paper.md §3)."""
    L = get_lattice(name)
    x = torch.randn(3000, L.dim, generator=_gen(1), dtype=torch.float64) * q**M / 8
    b, top = encode_layers(x, L, q, M)
    ok = ~(top != 0).any(-1)
    lam, g = [], x
    for _ in range(M):
        g = L.closest_point(g)
        lam.append(g)
        g = g / q
    for k in range(M):
        part = decode_lattice_units(b[:, k:, :], L, q) * q**k
        assert torch.equal(part[ok], q**k * lam[k][ok])


@pytest.mark.parametrize("name", NAMES)
def test_quant_scaled_reconstruction_is_scaled_lattice_point(name):
    """With scaling, x_hat = s_T Q(x / s_T) where s_T = beta 2^(alpha T) is the first scale without overload."""
    cfg = QuantizationConfig(name, 4, 2, beta=0.2, alpha=1 / 3, max_scaling_iterations=30)
    L = cfg.lattice
    x = torch.randn(5000, L.dim, generator=_gen(2), dtype=torch.float64)
    xh, T, cl = quantize(x, config=cfg, return_info=True)
    assert not bool(cl.any())
    s = torch.tensor(cfg.scales, dtype=torch.float64)[T.long()].unsqueeze(-1)
    assert torch.allclose(xh, s * L.closest_point(x / s), rtol=1e-14, atol=0)
    # the error is bounded by the covering radius at that scale
    err = ((x - xh) ** 2).sum(-1).sqrt()
    assert bool((err <= s.squeeze(-1) * L.covering_radius * (1 + 1e-12)).all())


# --------------------------------------------------------------------------- idempotence
@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), q=st.integers(2, 16), M=st.integers(1, 3), seed=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_quant_idempotence(name, q, M, seed, dtype):
    cfg = QuantizationConfig(name, q, M, beta=1.0, alpha=1 / 3, max_scaling_iterations=12)
    L = cfg.lattice
    x = (torch.randn(400, L.dim, generator=_gen(seed), dtype=torch.float64) * q**M / 8).to(dtype)
    x1, T1, _ = quantize(x, config=cfg, return_info=True)
    keep = T1 == 0  # no overload
    assert int(keep.sum()) > 0
    x2, T2, _ = quantize(x1[keep], config=cfg, return_info=True)
    assert torch.equal(x2, x1[keep]) and int(T2.max()) == 0


# --------------------------------------------------------------------------- constellation and sandwich
def _all_labels(q, d, M):
    single = torch.tensor(list(itertools.product(range(q), repeat=d)), dtype=torch.uint8)  # (q^d, d)
    idx = torch.tensor(list(itertools.product(range(q**d), repeat=M)))  # (q^dM, M)
    return single[idx]  # (q^dM, M, d)


@pytest.mark.parametrize("name,q,M", [("Z2", 4, 2), ("D4", 3, 2), ("Z2", 3, 3), ("D4", 2, 3), ("E8", 2, 2)])
def test_quant_constellation_size_and_reencode(name, q, M):
    L = get_lattice(name)
    d = L.dim
    b = _all_labels(q, d, M)
    C = decode_lattice_units(b, L, q)
    assert len(torch.unique(C, dim=0)) == q ** (d * M)
    b2, top = encode_layers(C, L, q, M)
    assert not bool((top != 0).any()), "a constellation point overloads"
    assert torch.equal(b2, b), "a constellation point does not re-encode to its own labels"
    # A_q = L ∩ qV has q^d points inside qV, and C lies within q^M (1 + r) V (outer bound, attained)
    A = coset_representative(_all_labels(q, d, 1)[:, 0], L, q)
    assert len(torch.unique(A, dim=0)) == q**d
    assert float(v_norm(A, L).max()) <= q + 1e-9
    r = (1 - q ** (1 - M)) / (q - 1)
    assert float(v_norm(C, L).max()) <= q**M * (1 + r) + 1e-9


@pytest.mark.parametrize("name,q,M", [("Z2", 4, 2), ("D4", 4, 2), ("D4", 3, 3), ("E8", 4, 2), ("Z2", 3, 4)])
def test_quant_sandwich_bound(name, q, M):
    """||lambda||_V < q^M (1 - r) => no overload; no overload => ||lambda||_V <= q^M (1 + r)."""
    L = get_lattice(name)
    r = (1 - q ** (1 - M)) / (q - 1)
    u = (torch.rand(60000, L.dim, generator=_gen(3), dtype=torch.float64) * 2 - 1) * q**M * (1 + r) * 1.2
    lam = L.closest_point(torch.cat([u, u[:20000] * (1 - r) / (1 + r) / 2]))  # plenty of inner points too
    _, top = encode_layers(lam, L, q, M)
    ovl = (top != 0).any(-1)
    vn = v_norm(lam, L)
    # interior of q^M (1 - r) V: on its boundary the half-open tie rule may or may not overload (paper.md §13.6)
    inner = vn < q**M * (1 - r) - 1e-9
    assert int(inner.sum()) > 0 and int(ovl.sum()) > 0
    assert not bool((ovl & inner).any())
    assert float(vn[~ovl].max()) <= q**M * (1 + r) + 1e-9


# --------------------------------------------------------------------------- overload ramp and policies
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dither", [False, True])
def test_quant_overload_ramp_is_minimal(name, dither):
    cfg = QuantizationConfig(name, 4, 2, beta=0.15, alpha=1 / 3, max_scaling_iterations=40, with_dither=dither,
                             dither_seed=11)
    L = cfg.lattice
    x = torch.randn(3000, L.dim, generator=_gen(4), dtype=torch.float64) * torch.exp(
        torch.randn(3000, 1, generator=_gen(5), dtype=torch.float64))
    b, T, cl = encode(x, config=cfg, return_clamped=True)
    assert not bool(cl.any())
    assert int((T > 0).sum()) > 100 and int((T == 0).sum()) > 100
    z = sample_dither(x.shape[0], L, cfg.dither_seed) if dither else torch.zeros_like(x)
    scales = torch.tensor(cfg.scales, dtype=torch.float64)
    # at step T the vector does not overload and its labels are Algorithm 1's at that scale
    bt, top = encode_layers(x / scales[T.long()].unsqueeze(-1) + z, L, 4, 2)
    assert not bool((top != 0).any()) and torch.equal(bt, b)
    # at step T - 1 it does overload
    pos = T > 0
    _, top1 = encode_layers(x[pos] / scales[T[pos].long() - 1].unsqueeze(-1) + z[pos], L, 4, 2)
    assert bool((top1 != 0).any(-1).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dither", [False, True])
def test_quant_clamp_policy(name, dither):
    cap = 3
    cfg = QuantizationConfig(name, 4, 2, beta=0.2, alpha=1.0, max_scaling_iterations=cap, with_dither=dither)
    L = cfg.lattice
    g = _gen(6)
    small = torch.randn(200, L.dim, generator=g, dtype=torch.float64) * 0.1
    huge = torch.randn(200, L.dim, generator=g, dtype=torch.float64) * 1e6
    x = torch.cat([small, huge, torch.full((1, L.dim), 1e30, dtype=torch.float64)])
    b, T, cl = encode(x, config=cfg, return_clamped=True)
    assert not bool(cl[:200].any())
    assert bool(cl[200:].all()) and bool((T[200:] == cap).all())
    xh = decode(b, config=cfg, T=T, dtype=torch.float64)
    assert bool(torch.isfinite(xh).all())
    s = cfg.scales[cap]
    q, M = 4, 2
    r = (1 - q ** (1 - M)) / (q - 1)
    radius = s * (L.packing_radius * q**M * (1 - r) + (L.covering_radius if dither else 0.0))
    nrm = (xh[200:] ** 2).sum(-1).sqrt()
    assert bool((nrm <= radius * (1 + 1e-9)).all())
    # clamped radially: the reconstruction points the way of the input
    cos = (xh[200:-1] * x[200:-1]).sum(-1) / (nrm[:-1] * (x[200:-1] ** 2).sum(-1).sqrt())
    assert float(cos.min()) > 0.9
    # quantize agrees with encode + decode, and float32 inputs give the same labels
    assert torch.equal(quantize(x, config=cfg), xh)
    b32, T32 = encode(x[:400].float(), config=cfg)
    assert torch.equal(T32, encode(x[:400].float().double(), config=cfg)[1])


def test_quant_error_policy_raises():
    cfg = QuantizationConfig("D4", 4, 2, beta=0.2, alpha=1.0, max_scaling_iterations=2, overload_policy="error")
    x = torch.randn(10, 4, generator=_gen(7)) * 0.1
    encode(x, config=cfg)  # fine
    x[3] *= 1e6
    with pytest.raises(OverloadError, match="overload"):
        encode(x, config=cfg)
    with pytest.raises(OverloadError):
        quantize(x, config=cfg)
    assert issubclass(OverloadError, ValueError)


def test_quant_disable_overload_protection_wraps_around():
    cfg = QuantizationConfig("D4", 4, 2, beta=1.0, disable_scaling=True, disable_overload_protection=True)
    L = cfg.lattice
    x = torch.randn(2000, 4, generator=_gen(8), dtype=torch.float64) * 10
    b, T, cl = encode(x, config=cfg, return_clamped=True)
    assert int(T.max()) == 0 and not bool(cl.any())
    _, top = encode_layers(x, L, 4, 2)
    assert bool((top != 0).any())
    assert torch.equal(decode(b, config=cfg, dtype=torch.float64), L.closest_point(x) - 16 * top)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quant_non_finite_inputs_raise(bad):
    cfg = QuantizationConfig("E8", 4, 2)
    x = torch.zeros(5, 8)
    x[2, 3] = bad
    for fn in (lambda: encode(x, config=cfg), lambda: quantize(x, config=cfg)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn()


def test_quant_bad_inputs_raise():
    cfg = QuantizationConfig("D4", 4, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        encode([[0.0] * 4], config=cfg)
    with pytest.raises(TypeError, match="floating"):
        encode(torch.zeros(3, 4, dtype=torch.int32), config=cfg)
    with pytest.raises(ValueError, match="last dimension"):
        quantize(torch.zeros(3, 5), config=cfg)
    with pytest.raises(TypeError, match="config"):
        encode(torch.zeros(3, 4), config={"q": 4})
    with pytest.raises(TypeError, match="lattice"):
        encode(torch.zeros(3, 4), lattice="D4", config=cfg)
    b, T = encode(torch.zeros(3, 4), config=cfg)
    with pytest.raises(ValueError, match=r"labels in b must lie in \[0, q=4\)"):
        decode(b + 4, config=cfg, T=T)
    with pytest.raises(TypeError, match="b must be an integer"):
        decode(b.float(), config=cfg, T=T)
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        decode(b.tolist(), config=cfg, T=T)
    with pytest.raises(ValueError, match="b must have shape"):
        decode(b[..., :3], config=cfg, T=T)
    with pytest.raises(ValueError, match="T must have shape"):
        decode(b, config=cfg, T=T[:2])
    with pytest.raises(ValueError, match="T must lie"):
        decode(b, config=cfg, T=T + cfg.max_scaling_iterations + 1)
    with pytest.raises(TypeError, match="T must be an integer"):
        decode(b, config=cfg, T=T.float())
    with pytest.raises(TypeError, match="backend"):
        encode(torch.zeros(3, 4), config=cfg, backend=None)
    with pytest.raises(ValueError, match="unknown backend"):
        encode(torch.zeros(3, 4), config=cfg, backend="nope")


def test_quant_lattice_is_keyword_only_and_must_match_config():
    """One argument order: ``(x|b, config, [T], *, lattice=...)``; a lattice other than the config's is refused."""
    from coset.quant import Quantizer, modq_sum_report

    cfg = QuantizationConfig("D4", 4, 2)
    x = torch.randn(5, 4, generator=_gen(3))
    with pytest.raises(TypeError):
        encode(x, get_lattice("D4"), cfg)  # the old positional order
    b, T = encode(x, cfg, lattice=get_lattice("d4"))  # same lattice by name (case-insensitive): fine
    assert torch.equal(decode(b, cfg, T, lattice=get_lattice("D4")), decode(b, cfg, T))
    assert torch.equal(quantize(x, cfg, lattice=get_lattice("D4")), quantize(x, cfg))
    assert torch.equal(Quantizer(cfg, lattice=get_lattice("D4")).quantize(x), quantize(x, cfg))
    assert torch.equal(quantize(x, QuantizationConfig("d4", 4, 2), lattice=get_lattice("D4")), quantize(x, cfg))
    z8 = get_lattice("Z4")
    for call in (
        lambda: encode(x, cfg, lattice=z8),
        lambda: decode(b, cfg, T, lattice=z8),
        lambda: quantize(x, cfg, lattice=z8),
        lambda: Quantizer(cfg, lattice=z8),
        lambda: modq_sum_report([b], cfg, lattice=z8),
    ):
        with pytest.raises(ValueError, match=r"lattice 'Z4' disagrees with config.lattice_type='D4'"):
            call()


# --------------------------------------------------------------------------- dither
def test_quant_sample_dither_uniform_on_voronoi_cell():
    for name in NAMES:
        L = get_lattice(name)
        z = sample_dither(100_000, L, seed=3)
        assert z.dtype == torch.float64 and z.shape == (100_000, L.dim)
        assert torch.equal(L.closest_point(z), torch.zeros_like(z))  # inside V
        assert torch.equal(z, sample_dither(100_000, L, seed=3))  # reproducible
        assert not torch.equal(z[:10], sample_dither(10, L, seed=4))
        sq = (z**2).sum(-1) / L.dim
        assert abs(float(sq.mean()) - L.second_moment) < 5 * float(sq.std()) / math.sqrt(len(sq))
        assert float(z.mean(0).abs().max()) < 5 * float(z.std(0).max()) / math.sqrt(len(z))
    with pytest.raises(ValueError, match="n must be"):
        sample_dither(-1, get_lattice("D4"), 0)


@pytest.mark.parametrize("name", NAMES)
def test_quant_dither_makes_error_unbiased_and_independent(name):
    """Subtractive dither without overload: x - x_hat ~ Unif(beta V), independent of x (crypto lemma)."""
    L = get_lattice(name)
    beta = 0.5
    cfg = QuantizationConfig(name, 8, 2, beta=beta, alpha=1 / 3, with_dither=True, dither_seed=5)
    n = 40_000
    # one fixed vector repeated: each row gets its own dither, so the mean of x_hat estimates E[x_hat | x]
    x0 = torch.randn(1, L.dim, generator=_gen(9), dtype=torch.float64).expand(n, L.dim).contiguous()
    xh, T, _ = quantize(x0, config=cfg, return_info=True)
    assert int(T.max()) == 0
    e = x0 - xh
    se = e.std(0) / math.sqrt(n)
    assert bool((e.mean(0).abs() < 5 * se).all()), "dithered reconstruction is biased"
    sq = (e**2).sum(-1) / L.dim
    target = beta**2 * L.second_moment
    assert abs(float(sq.mean()) - target) < 5 * float(sq.std()) / math.sqrt(n)
    # without dither the same x always gives the same (biased) reconstruction
    xh_nd = quantize(x0[:10], config=cfg.replace(with_dither=False))
    assert bool((xh_nd == xh_nd[0]).all()) and not torch.allclose(xh_nd[0], x0[0], atol=1e-3)
    # Gaussian data: error uncorrelated with x and its second moment beta^2 sigma^2(L), as for the fixed x
    x = torch.randn(n, L.dim, generator=_gen(10), dtype=torch.float64)
    xh, T, _ = quantize(x, config=cfg, return_info=True)
    assert int(T.max()) == 0
    e = x - xh
    corr = ((e - e.mean(0)) * (x - x.mean(0))).mean(0) / (e.std(0) * x.std(0))
    assert float(corr.abs().max()) < 5 / math.sqrt(n)
    sq = (e**2).sum(-1) / L.dim
    assert abs(float(sq.mean()) - target) < 5 * float(sq.std()) / math.sqrt(n)
    big = (x**2).sum(-1) > L.dim  # second moment the same for large and small x
    for part in (sq[big], sq[~big]):
        assert abs(float(part.mean()) - target) < 5 * float(part.std()) / math.sqrt(len(part))


def test_quant_dither_decode_regenerates_same_dither():
    cfg = QuantizationConfig("E8", 4, 2, beta=0.3, alpha=1 / 3, with_dither=True, dither_seed=123)
    x = torch.randn(7, 3, 8, generator=_gen(11))
    b, T = encode(x, config=cfg)
    assert torch.equal(decode(b, config=cfg, T=T), quantize(x, config=cfg))
    # decoding with another seed gives something else: the dither is really subtracted
    assert not torch.equal(decode(b, config=cfg.replace(dither_seed=124), T=T), quantize(x, config=cfg))
