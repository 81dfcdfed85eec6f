"""The float32 + integer fast path (csrc/fast_quant.h) equals the float64 reference bit for bit.

The path serves float32 D4/D8/E8 with q a power of two, tie offset on, no dither or centring and overload
protection on; it certifies layer 0 in float32 (vectors near a decision boundary are redone in float64) and
runs every later layer in exact integers. These tests hit ties, boundaries, the beta ramp, the clamp, the
error policy and the decode table, and compare against backend="torch" with torch.equal.
"""

import pytest
import torch

from coset.cuda import _C
from coset.quant import OverloadError, QuantizationConfig, decode, encode, quantize, quantize_rows


def _inputs(d: int, q: int, beta: float, n: int = 6000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    # boundary classes in lattice units: half-integers, multiples of 1/(2q), lattice points / q, large values
    u = torch.randint(-4 * q * q, 4 * q * q, (n, d), generator=g).to(torch.float32)
    x[: n // 4] = (u[: n // 4] / (2 * q)) * beta
    x[n // 4 : n // 2] = (u[n // 4 : n // 2] / 2) * beta
    x[n // 2 : n // 2 + n // 8] *= 6.0  # T > 0
    x[-16:] *= 1e4  # clamps past the cap
    return x


@pytest.mark.parametrize("lat", ["D4", "D8", "E8"])
@pytest.mark.parametrize("q,M", [(2, 1), (2, 3), (4, 2), (4, 3), (8, 2)])
def test_fast_path_equals_reference(lat, q, M):
    assert _C.fast_path_enabled()
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.3, max_scaling_iterations=4)
    x = _inputs(cfg.dim, q, cfg.beta)
    xn, Tn, cn = quantize(x, config=cfg, backend="native", return_info=True)
    xt, Tt, ct = quantize(x, config=cfg, backend="torch", return_info=True)
    assert torch.equal(xn, xt) and torch.equal(Tn, Tt) and torch.equal(cn, ct)
    assert bool((Tt > 0).any()) and bool(ct.any())  # the ramp and the clamp were exercised
    bn, Ten = encode(x, config=cfg, backend="native")
    bt, Tet = encode(x, config=cfg, backend="torch")
    assert torch.equal(bn, bt) and torch.equal(Ten, Tet)
    assert torch.equal(decode(bt, config=cfg, T=Tet, backend="native"), decode(bt, config=cfg, T=Tet, backend="torch"))


@pytest.mark.parametrize("q,M", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2)])
def test_d4_last_layer_test_on_every_point_of_the_box(q, M):
    # D4 decides the last layer's overload in closed form (fast_quant.h d4_outside: the two largest |lambda_k|
    # against the 24-cell's facets, eps ranks on the boundary): feed every D4 point of a box larger than the
    # code, at lattice points (every exact tie on the boundary of qV included), at T = 0 only, so that test
    # alone decides inside / clamped; M = 2 scales the box by q
    cfg = QuantizationConfig(lattice_type="D4", q=q, M=M, beta=0.25, max_scaling_iterations=0)
    r = (q + 2) * q ** (M - 1)
    g = torch.arange(-r, r + 1, dtype=torch.float32)
    pts = torch.cartesian_prod(g, g, g, g)
    pts = pts[pts.sum(1).remainder(2) == 0]  # D4
    x = pts * 0.25
    xn, Tn, cn = quantize(x, config=cfg, backend="native", return_info=True)
    xt, Tt, ct = quantize(x, config=cfg, backend="torch", return_info=True)
    assert torch.equal(xn, xt) and torch.equal(cn, ct)
    assert int((~ct).sum()) == q ** (4 * M)  # every codeword once: the code has q^(Md) points
    bn, _ = encode(x, config=cfg, backend="native")
    bt, _ = encode(x, config=cfg, backend="torch")
    assert torch.equal(bn, bt)
    n = x.shape[0] // 8 * 8  # rows of 8 whole blocks: the packed path of the QAT kernel
    rows = quantize_rows(x[:n].reshape(-1, 32), None, cfg, backend="native", return_info=True)
    assert torch.equal(rows[0].reshape(-1, 4), xt[:n]) and torch.equal(rows[2].reshape(-1), ct[:n])


@pytest.mark.parametrize("q,M", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2)])
def test_d8_last_layer_test_around_the_boundary(q, M):
    # the same closed form for D8 (2n = 16 eps ranks): random D8 points (rounded Gaussians of about the code's
    # size), so that many sit exactly on the boundary of q^M V (pairs with |lambda_i| + |lambda_j| = q at M = 1)
    cfg = QuantizationConfig(lattice_type="D8", q=q, M=M, beta=0.25, max_scaling_iterations=0)
    g = torch.Generator().manual_seed(q * 10 + M)
    pts = (torch.randn(200_000, 8, generator=g) * (0.3 * q**M)).round().to(torch.int64)
    pts[:, 0] += pts.sum(1).remainder(2)  # even sum: D8
    x = pts.to(torch.float32) * 0.25
    xn, Tn, cn = quantize(x, config=cfg, backend="native", return_info=True)
    xt, Tt, ct = quantize(x, config=cfg, backend="torch", return_info=True)
    assert torch.equal(xn, xt) and torch.equal(cn, ct)
    assert 0.05 < float(ct.float().mean()) < 0.95  # both outcomes
    bn, _ = encode(x, config=cfg, backend="native")
    bt, _ = encode(x, config=cfg, backend="torch")
    assert torch.equal(bn, bt)


def test_fast_path_switch_gives_same_bits():
    cfg = QuantizationConfig(lattice_type="E8", q=4, M=2, beta=0.25)
    x = _inputs(8, 4, 0.25, seed=3)
    a = quantize(x, config=cfg, backend="native")
    _C.set_fast_path(False)
    try:
        b = quantize(x, config=cfg, backend="native")
    finally:
        _C.set_fast_path(True)
    assert torch.equal(a, b)


def test_fast_path_error_policy():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25, max_scaling_iterations=1, overload_policy="error")
    x = torch.full((16, 4), 1e4)
    with pytest.raises(OverloadError):
        quantize(x, config=cfg, backend="native")


def test_decode_rejects_bad_labels():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    b = torch.zeros(3, 2, 4, dtype=torch.uint8)
    b[1, 0, 2] = 4
    with pytest.raises(ValueError):
        decode(b, config=cfg, backend="native")


def test_decode_range_checks_survive_the_uint8_cast():
    # uint8 labels are range-checked by the kernel alone (validates_labels); wider integer labels are checked in
    # Python first, since 257 would wrap to the valid label 1 in the cast
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    b = torch.zeros(3, 2, 4, dtype=torch.int64)
    b[2, 1, 0] = 257
    with pytest.raises(ValueError, match="labels in b"):
        decode(b, config=cfg, backend="native")
    with pytest.raises(ValueError, match="T must lie"):
        decode(b.clamp(max=3), config=cfg, T=torch.tensor([0, 256 + 1, 0]), backend="native")
    bu = b.clamp(max=3).to(torch.uint8)
    bu[0, 0, 3] = 9
    with pytest.raises(ValueError, match="labels in b"):
        decode(bu, config=cfg, backend="native")
    with pytest.raises(ValueError, match="T must lie"):
        decode(bu.clamp(max=3), config=cfg, T=torch.tensor([0, 99, 0], dtype=torch.uint8), backend="native")


@pytest.mark.parametrize("lat", ["D4", "D8", "E8"])
@pytest.mark.parametrize("q,M,beta", [(4, 2, 0.25), (2, 4, 0.5), (16, 1, 0.125), (4, 3, 0.3)])
def test_decode_table_path_equals_reference(lat, q, M, beta):
    # beta a power of two: every scales[t] / h is a float32 value, so the decoder multiplies in float32 (one
    # rounding of the exact product); beta = 0.3 takes the float64 lanes. Random labels cover every index.
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=beta, max_scaling_iterations=6)
    g = torch.Generator().manual_seed(q * 10 + M)
    n = 5000
    b = torch.randint(0, q, (n, M, cfg.dim), generator=g, dtype=torch.uint8)
    T = torch.randint(0, 7, (n,), generator=g, dtype=torch.uint8)
    yn = decode(b, config=cfg, T=T, backend="native")
    yt = decode(b, config=cfg, T=T, backend="torch")
    assert torch.equal(yn, yt)
    x = _inputs(cfg.dim, q, beta, seed=q + M)
    bt, Tt = encode(x, config=cfg, backend="torch")
    assert torch.equal(decode(bt, config=cfg, T=Tt, backend="native"), decode(bt, config=cfg, T=Tt, backend="torch"))


@pytest.mark.parametrize("lat", ["D8", "E8"])
@pytest.mark.parametrize("q,beta", [(8, 0.3), (16, 0.125), (16, 0.7)])
def test_decode_one_layer_without_table_equals_reference(lat, q, beta):
    # q^d > 65536 and M = 1 (the PTQ 4-bit code E8 q=16): no representative table; the DDP codec's float32 +
    # integer modular decoder (labels = flat codes mod q) serves it, near-tie blocks redone in float64. Random
    # labels reach every coset, encoded inputs include overloaded blocks; a bad label still raises.
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=1, beta=beta, max_scaling_iterations=6)
    g = torch.Generator().manual_seed(q + int(beta * 10))
    b = torch.randint(0, q, (20000, 1, cfg.dim), generator=g, dtype=torch.uint8)
    T = torch.randint(0, 7, (20000,), generator=g, dtype=torch.uint8)
    assert torch.equal(decode(b, config=cfg, T=T, backend="native"), decode(b, config=cfg, T=T, backend="torch"))
    x = torch.randn(6000, cfg.dim, generator=g) * 3
    x[:300] *= 20
    bt, Tt = encode(x, config=cfg, backend="torch")
    assert int(Tt.max()) > 0
    assert torch.equal(decode(bt, config=cfg, T=Tt, backend="native"), decode(bt, config=cfg, T=Tt, backend="torch"))
    b[7, 0, 3] = q
    with pytest.raises(ValueError):
        decode(b, config=cfg, T=T, backend="native")


@pytest.mark.parametrize("lat", ["D4", "D8", "E8"])
@pytest.mark.parametrize("q,M", [(2, 3), (4, 2), (8, 2)])
def test_quantize_one_lane_equals_reference(lat, q, M):
    # fast_quant.h's quantize_one (the CUDA kernel's per-thread body) run on the CPU, one vector at a time
    from coset.cuda import _ops
    from coset.quant import quantize as qz

    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.3, max_scaling_iterations=4)
    x = _inputs(cfg.dim, q, cfg.beta, n=3000, seed=q * M)
    kind, d, G, Gi, eps, q_, M_, scales, rad, _ = _ops._consts(cfg.lattice, cfg, False)
    out = torch.empty_like(x)
    T = torch.empty(x.shape[0], dtype=torch.uint8)
    cl = torch.empty(x.shape[0], dtype=torch.bool)
    err = _C.quantize_lanes1_cpu(
        kind, d, G, Gi, eps, q_, M_, scales, rad, x.data_ptr(), x.shape[0], out.data_ptr(), T.data_ptr(), cl.data_ptr()
    )
    assert err == 0
    xt, Tt, ct = qz(x, config=cfg, backend="torch", return_info=True)
    assert torch.equal(out, xt) and torch.equal(T, Tt) and torch.equal(cl, ct)
    assert bool((Tt > 0).any()) and bool(ct.any())


@pytest.mark.parametrize("lat", ["D4", "D8", "E8"])
@pytest.mark.parametrize("q,M,beta", [(4, 2, 0.25), (2, 3, 0.5), (8, 2, 2.0**-7)])
def test_fast_quantize_float32_product_equals_reference(lat, q, M, beta):
    # beta a power of two: the output product runs in float32 (scales[t] is a float32 value), incl. the ramp
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=beta, max_scaling_iterations=4)
    x = _inputs(cfg.dim, q, beta, seed=M)
    xn, Tn, cn = quantize(x, config=cfg, backend="native", return_info=True)
    xt, Tt, ct = quantize(x, config=cfg, backend="torch", return_info=True)
    assert torch.equal(xn, xt) and torch.equal(Tn, Tt) and torch.equal(cn, ct)
    assert bool((Tt > 0).any())
