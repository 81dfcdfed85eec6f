"""Bit-for-bit parity of the native CPU kernels with the PyTorch reference of coset.quant.

Every test compares labels, T, clamped and reconstructions with ``backend="torch"`` using torch.equal (exact
equality, including the float rounding of the reconstructions), on random, overloaded/clamped and boundary
inputs (lattice points, midpoints, points G b / q), for a grid of lattices, q, M, dtypes, with and without
the random dither.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import coset.cuda as cc
from coset.cuda import _ops
from coset.lattice import get_lattice
from coset.quant import OverloadError, QuantizationConfig, decode, encode, quantize
from coset.quant.backend import select_backend
from coset.quant.dither import sample_dither

LATTICES = ("Z2", "D4", "E8")
QS = (2, 3, 4, 5, 8, 16)
MS = (1, 2, 3, 4)


def _inputs(name: str, q: int, M: int, beta: float, seed: int) -> torch.Tensor:
    """float64 test vectors: Gaussian at several scales (T > 0 and clamping) and boundary points."""
    L = get_lattice(name)
    d = L.dim
    g = torch.Generator().manual_seed(seed)
    G = L.G
    n = 96
    rnd = torch.randn(n, d, generator=g, dtype=torch.float64)
    scales = torch.tensor([0.1, 1.0, 3.0, 30.0, 1e3, 1e6], dtype=torch.float64)
    rnd = rnd * scales[torch.arange(n) % len(scales)].unsqueeze(1)
    # boundary points in lattice units, times beta (beta is a power of two in the boundary tests)
    z1 = torch.randint(-2 * q**M, 2 * q**M + 1, (n, d), generator=g).double()
    z2 = torch.randint(-2 * q**M, 2 * q**M + 1, (n, d), generator=g).double()
    pts = z1 @ G.T  # lattice points, some of them beyond the code (overload)
    mids = 0.5 * (z1 @ G.T + z2 @ G.T)  # midpoints: on Voronoi facets or deep holes
    bq = torch.randint(0, q, (n, d), generator=g).double()
    gbq = (bq @ G.T) / q  # G b / q: ties of the decoder's Q(G b / q)
    lam_q = (z1 @ G.T) / q ** torch.randint(1, M + 1, (n, 1), generator=g)  # lambda / q^m
    halves = torch.floor(rnd.clamp(-50, 50)) + 0.5  # coordinate ties of Z^n / D_n rounding
    small = torch.tensor([[0.0] * d, [0.5] * d, [-0.5] * d, [1e-300] * d], dtype=torch.float64)
    return torch.cat([rnd, beta * torch.cat([pts, mids, gbq, lam_q, halves, small])])


def _assert_parity(x: torch.Tensor, cfg: QuantizationConfig, what: str) -> None:
    b_r, T_r, c_r = encode(x, config=cfg, backend="torch", return_clamped=True)
    b_n, T_n, c_n = encode(x, config=cfg, backend="native", return_clamped=True)
    assert torch.equal(b_r, b_n), f"labels differ ({what}): {(b_r != b_n).any(-1).any(-1).sum()} vectors"
    assert torch.equal(T_r, T_n), f"T differs ({what})"
    assert torch.equal(c_r, c_n), f"clamped differs ({what})"
    for dt in {x.dtype, torch.float32}:
        d_r = decode(b_r, config=cfg, T=T_r, dtype=dt, backend="torch")
        d_n = decode(b_r, config=cfg, T=T_r, dtype=dt, backend="native")
        assert torch.equal(d_r, d_n), f"decode differs ({what}, {dt})"
    xh_r, T2_r, c2_r = quantize(x, config=cfg, backend="torch", return_info=True)
    xh_n, T2_n, c2_n = quantize(x, config=cfg, backend="native", return_info=True)
    assert xh_n.dtype == x.dtype
    assert torch.equal(xh_r, xh_n), f"quantize differs ({what}): {(xh_r != xh_n).any(-1).sum()} vectors"
    assert torch.equal(T2_r, T2_n) and torch.equal(c2_r, c2_n)


@pytest.mark.parametrize("name,q,M", list(itertools.product(LATTICES, QS, MS)))
def test_cuda_parity_grid(name, q, M):
    beta = 0.25  # a power of two: x = beta * boundary point divides back exactly
    x64 = _inputs(name, q, M, beta, seed=1000 * q + 10 * M + len(name))
    seen_t = seen_clamp = False
    for dtype, dither in itertools.product((torch.float32, torch.float64), (False, True)):
        cfg = QuantizationConfig(name, q=q, M=M, beta=beta, max_scaling_iterations=4, with_dither=dither)
        x = x64.to(dtype)
        _assert_parity(x, cfg, f"{name} q={q} M={M} {dtype} dither={dither}")
        _, T, cl = quantize(x, config=cfg, backend="native", return_info=True)
        seen_t |= bool((T > 0).any())
        seen_clamp |= bool(cl.any())
    # the inputs really exercise the overload ramp and the clamp
    assert seen_t and seen_clamp


@pytest.mark.parametrize("name", LATTICES)
def test_cuda_parity_calibrated_beta(name):
    """Gaussian data with a non-dyadic beta (0.3) and alpha (0.7): the scale table is not exact."""
    x = torch.randn(6000, get_lattice(name).dim, generator=torch.Generator().manual_seed(7))
    for dither in (False, True):
        cfg = QuantizationConfig(name, q=4, M=2, beta=0.3, alpha=0.7, with_dither=dither)
        _assert_parity(x, cfg, f"{name} beta=0.3 dither={dither}")


@pytest.mark.parametrize("name", ["Z1", "Z3", "Z8", "Z16", "D3", "D5", "D8", "D16"])
def test_cuda_parity_other_dims(name):
    d = get_lattice(name).dim
    g = torch.Generator().manual_seed(d)
    x = torch.cat([torch.randn(1000, d, generator=g) * 2, torch.randint(-9, 10, (300, d), generator=g) * 0.125])
    for q, M in ((2, 3), (3, 2), (4, 2)):
        cfg = QuantizationConfig(name, q=q, M=M, beta=0.125, max_scaling_iterations=3)
        _assert_parity(x, cfg, f"{name} q={q} M={M}")


@pytest.mark.parametrize("name", LATTICES)
def test_cuda_parity_options(name):
    """No tie offset, no overload protection (labels kept when overloaded), disable_scaling, cap 0."""
    d = get_lattice(name).dim
    x = torch.randn(1500, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    x[:300] = torch.round(x[:300] * 2) / 2  # ties
    for kw in (
        dict(with_tie_dither=False),
        dict(disable_overload_protection=True),
        dict(disable_overload_protection=True, with_dither=True),
        dict(disable_scaling=True),
        dict(max_scaling_iterations=0),
        dict(max_scaling_iterations=0, with_dither=True),
    ):
        cfg = QuantizationConfig(name, q=3, M=2, beta=0.5, **kw)
        _assert_parity(x, cfg, f"{name} {kw}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_parity_half_inputs(dtype):
    x = (torch.randn(5000, 4, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    cfg = QuantizationConfig("D4", q=4, M=2, beta=0.3, max_scaling_iterations=2)
    _assert_parity(x, cfg, str(dtype))
    for dt in (torch.float16, torch.bfloat16):
        b, T = encode(x, config=cfg, backend="torch")
        assert torch.equal(
            decode(b, config=cfg, T=T, dtype=dt, backend="torch"),
            decode(b, config=cfg, T=T, dtype=dt, backend="native"),
        )


def test_cuda_parity_leading_dims_and_empty():
    cfg = QuantizationConfig("E8", q=4, M=2, beta=0.3)
    x = torch.randn(3, 5, 7, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quantize(x, config=cfg, backend="torch"), quantize(x, config=cfg, backend="native"))
    xs = x.transpose(0, 1)  # non-contiguous input
    assert torch.equal(quantize(xs, config=cfg, backend="torch"), quantize(xs, config=cfg, backend="native"))
    e = torch.empty(0, 8)
    b, T = encode(e, config=cfg, backend="native")
    assert b.shape == (0, 2, 8) and T.shape == (0,)
    assert quantize(e, config=cfg, backend="native").shape == (0, 8)


def test_cuda_overload_error_policy_matches_reference():
    cfg = QuantizationConfig("D4", q=2, M=1, beta=0.1, max_scaling_iterations=1, overload_policy="error")
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(1)) * 100
    with pytest.raises(OverloadError) as e_ref:
        encode(x, config=cfg, backend="torch")
    with pytest.raises(OverloadError) as e_nat:
        encode(x, config=cfg, backend="native")
    assert str(e_ref.value) == str(e_nat.value)
    with pytest.raises(OverloadError):
        quantize(x, config=cfg, backend="native")
    ok = torch.zeros(10, 4)
    assert torch.equal(encode(ok, config=cfg, backend="native")[0], encode(ok, config=cfg, backend="torch")[0])


def test_cuda_auto_selects_native(monkeypatch):
    cfg = QuantizationConfig("D4", q=4, M=2, beta=0.3)
    x = torch.randn(100, 4)
    be = select_backend("auto", "encode", x, cfg.lattice, cfg)
    assert isinstance(be, cc.NativeBackend)
    calls = []
    for op in ("encode", "decode", "quantize"):
        orig = getattr(cc.NativeBackend, op)
        monkeypatch.setattr(cc.NativeBackend, op, lambda self, *a, _o=orig, _n=op: (calls.append(_n), _o(self, *a))[1])
    b, T = encode(x, config=cfg)
    decode(b, config=cfg, T=T)
    quantize(x, config=cfg)
    assert calls == ["encode", "decode", "quantize"]
    # unsupported: a tensor on the meta device falls back to the reference
    assert select_backend("auto", "encode", x.to("meta"), cfg.lattice, cfg) is None


def test_cuda_dither_regenerated_identically():
    """Native decode with the dither of the same seed inverts native encode like the reference."""
    cfg = QuantizationConfig("E8", q=4, M=2, beta=0.3, with_dither=True, dither_seed=42)
    x = torch.randn(2000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    z = sample_dither(2000, cfg.lattice, 42)
    b, T, cl = _ops.encode(x, cfg.lattice, cfg, z)
    xh = _ops.decode(b, T, cfg.lattice, cfg, z, torch.float64)
    assert torch.equal(xh, _ops.quantize(x, cfg.lattice, cfg, z)[0])
    # no overload: the error lies in the scaled Voronoi cell, |err| <= covering radius * scale
    err = (xh - x).norm(dim=-1) / torch.tensor(cfg.scales, dtype=torch.float64)[T.long()]
    assert float(err.max()) <= cfg.lattice.covering_radius + 1e-9


def test_cuda_bad_inputs():
    cfg = QuantizationConfig("D4", q=4, M=2)
    L = cfg.lattice
    with pytest.raises(TypeError, match="x"):
        _ops.encode([1.0, 2.0], L, cfg)
    with pytest.raises(TypeError, match="x"):
        _ops.encode(torch.zeros(3, 4, dtype=torch.int32), L, cfg)
    with pytest.raises(ValueError, match="x"):
        _ops.encode(torch.zeros(3, 5), L, cfg)
    with pytest.raises(ValueError, match="dither"):
        _ops.encode(torch.zeros(3, 4), L, cfg, torch.zeros(3, 4))  # float32 dither
    with pytest.raises(ValueError, match="b"):
        _ops.decode(torch.zeros(3, 2, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.uint8), L, cfg)
    with pytest.raises(ValueError, match="labels"):
        _ops.decode(torch.full((3, 2, 4), 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), L, cfg)
    with pytest.raises(ValueError, match="T"):
        _ops.decode(torch.zeros(3, 2, 4, dtype=torch.uint8), torch.full((3,), 99, dtype=torch.uint8), L, cfg)
    with pytest.raises(ValueError, match="lattice"):
        _ops.encode(torch.zeros(3, 17), get_lattice("Z17"), cfg.replace(lattice_type="Z17"))
    with pytest.raises(TypeError, match="config"):
        _ops.encode(torch.zeros(3, 4), L, None)
    with pytest.raises(ValueError, match="n"):
        cc.set_num_threads(0)
    # non-finite input is rejected by coset.quant before any kernel runs
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[float("nan"), 0, 0, 0]]), config=cfg, backend="native")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_cuda_wrappers_refuse_what_coset_quant_refuses(bad):
    """Issue 11 class 2: called directly, the native wrappers used to return zeros flagged as clamped for NaN/Inf.
    Now they raise the same ValueError (same message) as coset.quant for NaN, Inf and |x| > beta 2^900."""
    cfg = QuantizationConfig("D4", q=4, M=2)
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1, 2] = bad
    with pytest.raises(ValueError) as ref:
        encode(x, config=cfg, backend="torch")
    for fn in (
        lambda: _ops.encode(x, cfg.lattice, cfg),
        lambda: _ops.quantize(x, cfg.lattice, cfg),
        lambda: encode(x, config=cfg, backend="native"),
        lambda: quantize(x, config=cfg, backend="native"),
    ):
        with pytest.raises(ValueError) as got:
            fn()
        assert str(got.value) == str(ref.value)


def test_cuda_decode_to_int_dtype_refused_like_the_reference():
    cfg = QuantizationConfig("D4", q=4, M=2)
    b = torch.zeros(3, 2, 4, dtype=torch.uint8)
    T = torch.zeros(3, dtype=torch.uint8)
    for dt in (torch.int32, torch.int64, torch.uint8):
        with pytest.raises(TypeError, match="dtype must be a floating dtype"):
            _ops.decode(b, T, cfg.lattice, cfg, None, dt)
        for be in ("torch", "native"):
            with pytest.raises(TypeError, match="dtype must be a floating dtype"):
                decode(b, config=cfg, T=T, dtype=dt, backend=be)


@pytest.mark.parametrize("name", ["Z2", "D4", "E8"])
def test_cuda_parity_huge_inputs_clamp_without_overflow(name):
    """Issue 11 class 1: |u| > 2^500 takes the scaled norm in both implementations (bit-identical); 1e200 is
    clamped along its direction, not to the origin."""
    cfg = QuantizationConfig(name, q=4, M=2, max_scaling_iterations=5)
    d = cfg.dim
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, d, generator=g, dtype=torch.float64) * torch.logspace(0, 260, 64, dtype=torch.float64)[:, None]
    _assert_parity(x, cfg, f"{name} huge")
    xh = quantize(x, config=cfg, backend="native")
    assert bool(torch.isfinite(xh).all()) and bool((xh[8:].norm(dim=-1) > 0).all())  # rows 8.. are >= 1e32


def test_cuda_thread_count_does_not_change_results():
    cfg = QuantizationConfig("E8", q=5, M=3, beta=0.2)
    x = torch.randn(50000, 8, generator=torch.Generator().manual_seed(2))
    n0 = cc.get_num_threads()
    try:
        cc.set_num_threads(1)
        a = _ops.quantize(x, cfg.lattice, cfg)
        cc.set_num_threads(3)
        b = _ops.quantize(x, cfg.lattice, cfg)
    finally:
        cc.set_num_threads(n0)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=False))


def test_cuda_add_modq_matches_reference():
    from coset.quant import add_modq

    g = torch.Generator().manual_seed(4)
    for q in (2, 3, 4, 5, 8, 16):
        a = torch.randint(0, q, (1000, 2, 4), generator=g, dtype=torch.uint8)
        b = torch.randint(0, q, (1000, 2, 4), generator=g, dtype=torch.uint8)
        assert torch.equal(_ops.add_modq(a, b, q), add_modq(a, b, q))
    with pytest.raises(ValueError, match="q"):
        _ops.add_modq(a, b, 17)
    with pytest.raises(ValueError, match="labels"):
        _ops.add_modq(a, b, 4)
    with pytest.raises(ValueError, match="shape"):
        _ops.add_modq(a, b[:1], 16)


def test_cuda_decode_rejects_bad_T_dtypes_and_values():
    cfg = QuantizationConfig("D4", q=4, M=2, max_scaling_iterations=3)
    b = torch.zeros(5, 2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="T must lie"):
        _ops.decode(b, torch.tensor([0, 0, -1, 0, 0]), cfg.lattice, cfg)
    with pytest.raises(ValueError, match="T must lie"):
        _ops.decode(b, torch.tensor([0, 0, 4, 0, 0]), cfg.lattice, cfg)
    with pytest.raises(ValueError, match="T must lie"):
        _ops.decode(b, torch.tensor([0, 0, 4, 0, 0], dtype=torch.uint8), cfg.lattice, cfg)
    bl = b.clone()
    bl[3, 1, 2] = 4
    with pytest.raises(ValueError, match=r"labels in b must lie in \[0, q=4\)"):
        _ops.decode(bl, torch.zeros(5, dtype=torch.uint8), cfg.lattice, cfg)
    ok = _ops.decode(b, torch.tensor([0, 1, 2, 3, 3]), cfg.lattice, cfg)
    assert torch.equal(ok, torch.zeros(5, 4))  # label 0 in every layer is the origin


@pytest.mark.parametrize("name,q,M", [("Z2", 2, 4), ("D4", 2, 3), ("D4", 4, 2), ("E8", 2, 2), ("E8", 3, 2)])
def test_cuda_parity_centered(name, q, M):
    """config.center: coset.quant passes the offset c inside the dither tensor and widens the clamp radius."""
    x64 = _inputs(name, q, M, 0.25, seed=77 + q + M)
    for dtype, dither in itertools.product((torch.float32, torch.float64), (False, True)):
        cfg = QuantizationConfig(name, q=q, M=M, beta=0.25, max_scaling_iterations=3, with_dither=dither, center=True)
        _assert_parity(x64.to(dtype), cfg, f"{name} q={q} M={M} center {dtype} dither={dither}")
        _, _, cl = quantize(x64, config=cfg, backend="native", return_info=True)
        assert bool(cl.any())
