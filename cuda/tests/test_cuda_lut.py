"""The native LUT scoring ops (CUDA only) against an independent float64 reference (coset.lut is not imported).

The CPU LUT kernels were removed (coset.lut's PyTorch path is faster on the CPU); the kernel tests run on a GPU
and are skipped without one; the CPU tests check that the ops refuse CPU tensors and are never selected there.
"""

from __future__ import annotations

import pytest
import torch

import coset.cuda as cc
from coset.cuda import _ops
from coset.quant.backend import select_backend

gpu = pytest.mark.skipif(not cc.cuda_available(), reason="the LUT kernels run on CUDA only; no GPU here")


def _one(ix, sx, tables, q):
    return _ops.lut_one_sided(ix.cuda(), sx.cuda(), tables.cuda(), q).cpu()


def _two(ix, sx, iy, sy, lut, q):
    return _ops.lut_two_sided(ix.cuda(), sx.cuda(), iy.cuda(), sy.cuda(), lut.cuda(), q).cpu()


def ref_one_sided(ix, sx, tables, q):
    """float64: scores[r, j] = sum_k sx[r,k] sum_m q^m tables[j, k, ix[r,k,m]]; also sum of |terms|."""
    n, K, M = ix.shape
    t64 = tables.double()
    g = t64[:, torch.arange(K).view(1, K, 1), ix.long()]  # (m, n, K, M)
    w = torch.tensor([float(q**m) for m in range(M)], dtype=torch.float64)
    terms = g * w * sx.double().unsqueeze(-1)
    return terms.sum((-1, -2)).T, terms.abs().sum((-1, -2)).T


def ref_two_sided(ix, sx, iy, sy, lut, q):
    n, K, M = ix.shape
    lut64 = lut.long()
    a = ix.long().view(n, 1, K, M, 1)
    b = iy.long().view(1, -1, K, 1, M)
    vals = lut64[a, b]  # (n, m, K, M, M), exact integers
    w = torch.tensor([q**m for m in range(M)], dtype=torch.int64)
    inner = (vals * w.view(M, 1) * w.view(1, M)).sum((-1, -2))  # exact int64
    s = sx.double().view(n, 1, K) * sy.double().view(1, -1, K)
    terms = s * inner.double()
    return terms.sum(-1), terms.abs().sum(-1)


def _close(out, ref, absum, rel):
    assert out.dtype == torch.float32
    err = (out.double() - ref).abs()
    bound = 2.0**-24 * ref.abs() + rel * absum + 1e-30
    assert bool((err <= bound).all()), f"max err {float(err.max())}, max bound {float(bound.max())}"


@gpu
@pytest.mark.parametrize("q,d,M,K", [(4, 2, 2, 7), (4, 4, 2, 16), (2, 8, 4, 3), (3, 4, 3, 5), (16, 2, 1, 9)])
def test_cuda_lut_one_sided(q, d, M, K):
    g = torch.Generator().manual_seed(q * 100 + d * 10 + M)
    Q = q**d
    n, m = 123, 37
    ix = torch.randint(0, Q, (n, K, M), generator=g, dtype=torch.int32)
    sx = torch.rand(n, K, generator=g) * 2 + 0.01
    tables = torch.randn(m, K, Q, generator=g) * 5
    out = _one(ix, sx, tables, q)
    ref, absum = ref_one_sided(ix, sx, tables, q)
    assert out.shape == (n, m)
    _close(out, ref, absum, 1e-12)


@gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("q,d,M,K", [(4, 2, 2, 7), (4, 4, 2, 16), (2, 8, 4, 3), (3, 4, 3, 5)])
def test_cuda_lut_two_sided(dtype, q, d, M, K):
    g = torch.Generator().manual_seed(q * 100 + d * 10 + M + 7)
    Q = q**d
    n, m = 61, 45
    hi = {torch.int8: 127, torch.int16: 3000, torch.int32: 100000}[dtype]
    lut = torch.randint(-hi, hi + 1, (Q, Q), generator=g).to(dtype)
    ix = torch.randint(0, Q, (n, K, M), generator=g, dtype=torch.int32)
    iy = torch.randint(0, Q, (m, K, M), generator=g, dtype=torch.int32)
    sx = torch.rand(n, K, generator=g) + 0.1
    sy = torch.rand(m, K, generator=g) + 0.1
    out = _two(ix, sx, iy, sy, lut, q)
    ref, absum = ref_two_sided(ix, sx, iy, sy, lut, q)
    _close(out, ref, absum, 1e-12)


@gpu
def test_cuda_lut_two_sided_large_inner_sum_is_exact():
    """q = 16, M = 4: the weights reach 16^6, beyond what float32 adds exactly; the integer sum is exact."""
    q, M, K = 16, 4, 2
    Q = q
    lut = torch.randint(-100, 101, (Q, Q), generator=torch.Generator().manual_seed(0)).to(torch.int16)
    ix = torch.randint(0, Q, (5, K, M), dtype=torch.int32)
    iy = torch.randint(0, Q, (6, K, M), dtype=torch.int32)
    ones_x, ones_y = torch.ones(5, K), torch.ones(6, K)
    out = _two(ix, ones_x, iy, ones_y, lut, q)
    ref, _ = ref_two_sided(ix, ones_x, iy, ones_y, lut, q)
    assert torch.equal(out, ref.float())  # one rounding of an exact integer


@gpu
def test_cuda_lut_matches_decoded_inner_products():
    """End to end with real codes: <x_hat, y> and <x_hat, y_hat> from labels equal the decoded dot products."""
    from coset.quant import QuantizationConfig, coset_representative, decode, encode

    cfg = QuantizationConfig("D4", q=4, M=2, beta=0.3)
    L, q, d = cfg.lattice, 4, 4
    K = 6
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, K, d, generator=g)
    y = torch.randn(30, K, d, generator=g)
    bx, Tx = encode(x, config=cfg)
    by, Ty = encode(y, config=cfg)
    xh = decode(bx, config=cfg, T=Tx, dtype=torch.float64)
    yh = decode(by, config=cfg, T=Ty, dtype=torch.float64)
    digits = torch.tensor([q**i for i in range(d)])
    ix = (bx.long() * digits).sum(-1).to(torch.int32)  # (n, K, M)
    iy = (by.long() * digits).sum(-1).to(torch.int32)
    scales = torch.tensor(cfg.scales, dtype=torch.float64)
    sx, sy = scales[Tx.long()].float(), scales[Ty.long()].float()
    allb = torch.stack(torch.meshgrid(*[torch.arange(q)] * d, indexing="ij"), -1).flip(-1).reshape(-1, d)
    A = coset_representative(allb, L, q)  # (Q, d): a_i with i = sum b_i q^i
    assert torch.equal((allb * digits).sum(-1), torch.arange(q**d))
    lut = (A @ A.T).round().to(torch.int8)
    two = _two(ix, sx, iy, sy, lut, q)
    ref2 = torch.einsum("nkd,mkd->nm", xh, yh)
    assert torch.allclose(two.double(), ref2, rtol=1e-5, atol=1e-5)
    tables = torch.einsum("qd,mkd->mkq", A, y.double()).float()  # (m, K, Q)
    one = _one(ix, sx, tables, q)
    ref1 = torch.einsum("nkd,mkd->nm", xh, y.double())
    assert torch.allclose(one.double(), ref1, rtol=1e-5, atol=1e-5)


@gpu
def test_cuda_lut_registry_and_bad_inputs():
    ix = torch.zeros(3, 2, 2, dtype=torch.int32)
    sx = torch.ones(3, 2)
    tables = torch.ones(4, 2, 16)
    be = select_backend("native", "lut_one_sided", ix.cuda(), None, None)
    assert isinstance(be, cc.NativeBackend)
    out = be.lut_one_sided(ix.cuda(), sx.cuda(), tables.cuda(), 4).cpu()
    assert torch.equal(out, torch.full((3, 4), 10.0))  # 2 blocks * (1 + 4)
    with pytest.raises(TypeError, match="ix"):
        _one(ix.long(), sx, tables, 4)
    with pytest.raises(ValueError, match="sx"):
        _one(ix, sx[:2], tables, 4)
    with pytest.raises(ValueError, match="ix"):
        _one(ix + 16, sx, tables, 4)  # index out of range: never read out of bounds
    with pytest.raises(ValueError, match="q"):
        _one(ix, sx, tables, 1)
    with pytest.raises(ValueError, match="K"):
        _one(ix, sx, torch.ones(4, 3, 16), 4)
    lut = torch.ones(16, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="lut"):
        _two(ix, sx, ix, sx, lut.float(), 4)
    with pytest.raises(ValueError, match="iy"):
        _two(ix, sx, ix - 1, sx, lut, 4)
    with pytest.raises(ValueError, match="iy"):
        _two(ix, sx, torch.zeros(3, 2, 3, dtype=torch.int32), sx, lut, 4)
    assert _two(ix[:0], sx[:0], ix, sx, lut, 4).shape == (0, 3)


@gpu
def test_cuda_lut_two_sided_int64_path():
    """int32 LUT entries near 2^30 with q=16, M=4: inner sums beyond 2^53 take the int64 accumulator."""
    g = torch.Generator().manual_seed(5)
    q, M, K, Q = 16, 4, 3, 16
    lut = torch.randint(-(2**30), 2**30, (Q, Q), generator=g, dtype=torch.int64).to(torch.int32)
    ix = torch.randint(0, Q, (9, K, M), generator=g, dtype=torch.int32)
    iy = torch.randint(0, Q, (11, K, M), generator=g, dtype=torch.int32)
    sx, sy = torch.rand(9, K, generator=g) + 0.5, torch.rand(11, K, generator=g) + 0.5
    out = _two(ix, sx, iy, sy, lut, q)
    ref, absum = ref_two_sided(ix, sx, iy, sy, lut, q)
    assert float(absum.max()) > 2.0**53  # really beyond float64's exact integers
    _close(out, ref, absum, 1e-15)


@gpu
def test_cuda_lut_query_chunking():
    """Large K * Q forces the kernels to process the queries in several chunks."""
    g = torch.Generator().manual_seed(6)
    q, M, K, Q = 4, 2, 600, 4096
    ix = torch.randint(0, Q, (20, K, M), generator=g, dtype=torch.int32)
    iy = torch.randint(0, Q, (7, K, M), generator=g, dtype=torch.int32)
    sx, sy = torch.rand(20, K, generator=g), torch.rand(7, K, generator=g)
    lut = torch.randint(-20, 21, (Q, Q), generator=g).to(torch.int8)
    out = _two(ix, sx, iy, sy, lut, q)
    ref, absum = ref_two_sided(ix, sx, iy, sy, lut, q)
    _close(out, ref, absum, 1e-12)
    tables = torch.randn(5, K, Q, generator=g)
    out1 = _one(ix, sx, tables, q)
    ref1, absum1 = ref_one_sided(ix, sx, tables, q)
    _close(out1, ref1, absum1, 1e-12)


def test_cuda_lut_ops_refuse_cpu_tensors_and_are_never_selected_there():
    """The CPU LUT kernels are gone: "auto" takes coset.lut's PyTorch path on the CPU, naming the native backend
    is refused by the registry, and the wrappers refuse CPU tensors; encode/decode/quantize stay native."""
    from coset.quant import QuantizationConfig

    ix = torch.zeros(4, 2, 2, dtype=torch.int32)
    sx = torch.ones(4, 2)
    assert select_backend("auto", "lut_one_sided", ix, None, None) is None
    assert select_backend("auto", "lut_two_sided", ix, None, None) is None
    # lut_one_sided runs on the CPU through the GEMV kernel (lut_gemv.h) when asked for by name
    assert select_backend("native", "lut_one_sided", ix, None, None) is not None
    assert torch.equal(_ops.lut_one_sided(ix, sx, torch.ones(3, 2, 16), 4), torch.full((4, 3), 10.0))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        _ops.lut_two_sided(ix, sx, ix, sx, torch.ones(16, 16, dtype=torch.int8), 4)
    cfg = QuantizationConfig("D4", 4, 2)
    x = torch.zeros(3, 4)
    assert select_backend("auto", "quantize", x, cfg.lattice, cfg) is not None
