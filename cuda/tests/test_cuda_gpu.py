"""GPU kernels vs the PyTorch CPU reference (skipped without a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

import coset.cuda as cc
from coset.quant import QuantizationConfig, decode, encode, quantize

pytestmark = pytest.mark.skipif(not cc.cuda_available(), reason="no GPU (or built without CUDA)")


@pytest.mark.parametrize("name,q,M", list(itertools.product(("Z2", "D4", "E8"), (2, 3, 4, 16), (1, 2, 4))))
def test_cuda_gpu_parity(name, q, M):
    d = QuantizationConfig(name).dim
    g = torch.Generator().manual_seed(q * 10 + M)
    x64 = torch.cat([torch.randn(4000, d, generator=g, dtype=torch.float64) * s for s in (0.3, 3.0, 1e4)])
    for dtype, dither in itertools.product((torch.float32, torch.float64), (False, True)):
        cfg = QuantizationConfig(name, q=q, M=M, beta=0.25, max_scaling_iterations=4, with_dither=dither)
        x = x64.to(dtype)
        b_r, T_r, c_r = encode(x, config=cfg, backend="torch", return_clamped=True)
        b_g, T_g, c_g = encode(x.cuda(), config=cfg, backend="native", return_clamped=True)
        assert torch.equal(b_r, b_g.cpu()) and torch.equal(T_r, T_g.cpu()) and torch.equal(c_r, c_g.cpu())
        d_r = decode(b_r, config=cfg, T=T_r, dtype=dtype, backend="torch")
        d_g = decode(b_r.cuda(), config=cfg, T=T_r.cuda(), dtype=dtype, backend="native")
        assert torch.equal(d_r, d_g.cpu())
        xh_r = quantize(x, config=cfg, backend="torch")
        xh_g = quantize(x.cuda(), config=cfg, backend="native")
        assert torch.equal(xh_r, xh_g.cpu())


def test_cuda_gpu_add_modq():
    from coset.cuda import _ops

    a = torch.randint(0, 4, (1000,), dtype=torch.uint8)
    assert torch.equal(_ops.add_modq(a, a, 4), _ops.add_modq(a.cuda(), a.cuda(), 4).cpu())


@pytest.mark.parametrize("lat,q,M", [("D4", 4, 2), ("E8", 2, 4), ("E8", 4, 2)])
@pytest.mark.parametrize("B", [1, 5, 8])
def test_cuda_gpu_lut_gemv_equals_reference(lat, q, M, B):
    from coset.cuda.lut_gemv import CodedWeight, gemv_reference, lut_gemv

    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25)
    g = torch.Generator().manual_seed(B)
    CW = CodedWeight.from_dense(torch.randn(300, 1000, generator=g) * 2, cfg)
    x = torch.randn(B, 1000, generator=g)
    for method in ["codebook", "tables"] if q**cfg.dim <= 256 else ["codebook"]:
        y = lut_gemv(x.cuda(), CW.to("cuda"), method=method).cpu()
        assert torch.equal(y, gemv_reference(x, CW, method))
