"""coset.quant.rd: rate-distortion evaluation against published scalar-quantizer constants and paper.md §9/§14."""

from __future__ import annotations

import math

import pytest
import torch

from coset.quant import QuantizationConfig
from coset.quant.rd import (
    entropy_bits,
    gaussian_data,
    hnlq_rd,
    scalar_rd,
    uniform_scalar_quantize,
)


def test_quant_rd_entropy_and_data():
    assert entropy_bits(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(2.0)
    assert entropy_bits(torch.zeros(10, dtype=torch.uint8)) == 0.0
    assert entropy_bits(torch.tensor([0, 0, 0, 1])) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert entropy_bits(torch.zeros(0, dtype=torch.int64)) == 0.0
    with pytest.raises(TypeError, match="T must be"):
        entropy_bits(torch.zeros(3))
    a, b = gaussian_data(1000, 3), gaussian_data(1000, 3)
    assert torch.equal(a, b) and a.dtype == torch.float32 and not torch.equal(a, gaussian_data(1000, 4))
    with pytest.raises(ValueError, match="n must be"):
        gaussian_data(0)
    with pytest.raises(ValueError, match="seed must be"):
        gaussian_data(10, -1)


def test_quant_rd_uniform_scalar_quantizer_levels():
    x = torch.linspace(-10, 10, 100001)
    for bits in (1, 2, 3, 4):
        y = uniform_scalar_quantize(x, bits, 0.5)
        levels = torch.unique(y)
        assert len(levels) == 2**bits
        assert torch.equal(levels, -levels.flip(0))  # symmetric mid-rise
        assert float((y - x).abs()[x.abs() < 0.5 * 2 ** (bits - 1)].max()) <= 0.25 + 1e-6  # granular error <= step/2


def test_quant_rd_scalar_matches_max_1960():
    """Optimal uniform quantizers of N(0,1) (Max 1960): 2 bit step 0.996 MSE 0.1188; 4 bit step 0.335 MSE 0.01154."""
    s2 = scalar_rd(2, n=1 << 16, seed=0)
    assert s2["uniform"]["step"] == pytest.approx(0.996, rel=0.03)
    assert s2["uniform"]["mse"] == pytest.approx(0.1188, rel=0.03)
    s4 = scalar_rd(4, n=1 << 16, seed=0)
    assert s4["uniform"]["step"] == pytest.approx(0.3352, rel=0.03)
    assert s4["uniform"]["mse"] == pytest.approx(0.01154, rel=0.03)
    assert s4["uniform"]["snr_db"] == pytest.approx(10 * math.log10(1 / 0.01154), abs=0.15)
    # torch's fake quantization is mid-tread with 2^b levels (asymmetric): never better than the mid-rise one
    for s in (s2, s4):
        assert s["fake_quant"]["mse"] >= s["uniform"]["mse"] * 0.999
    # the searched step is a local minimum
    x = gaussian_data(1 << 14, 1)
    s = scalar_rd(3, x=x)
    st = s["uniform"]["step"]
    mse = lambda h: float(((uniform_scalar_quantize(x, 3, h) - x) ** 2).double().mean())  # noqa: E731
    assert s["uniform"]["mse"] == pytest.approx(mse(st))
    assert mse(st * 1.03) >= s["uniform"]["mse"] and mse(st / 1.03) >= s["uniform"]["mse"]
    fq = torch.fake_quantize_per_tensor_affine(x, s["fake_quant"]["step"], 4, 0, 7)
    assert s["fake_quant"]["mse"] == pytest.approx(float(((fq - x) ** 2).double().mean()))
    with pytest.raises(ValueError, match="bits"):
        scalar_rd(0)
    with pytest.raises(TypeError, match="x must be"):
        scalar_rd(2, x=[1.0, 2.0])


def test_quant_rd_hnlq_d4_matches_paper():
    """paper.md §9/§14: D4, q=4, M=2, alpha=1/3: best beta ~0.19-0.20, MSE ~5.3e-3-5.5e-3, f ~2.03-2.08."""
    r = hnlq_rd("D4", 4, 2, n=1 << 14, seed=0, return_grid=True, max_scaling_iterations=12)
    assert 0.18 < r["beta"] < 0.22 and not r["beta_grid_edge"]
    assert 4.8e-3 < r["mse"] < 6.0e-3
    assert 1.85 < r["f"] < 2.3
    assert 0.9 < r["H_T"] < 1.5
    assert r["rate_nominal"] == 4.0
    assert r["rate_effective"] == pytest.approx(4.0 + r["H_T"] / 4)
    assert r["snr_db"] == pytest.approx(10 * math.log10(float(gaussian_data(1 << 14, 0).double().var()) / r["mse"]))
    assert r["snr_rate_adjusted_db"] == pytest.approx(r["snr_db"] - 20 * math.log10(2) * r["H_T"] / 4)
    assert r["f"] == pytest.approx(r["mse"] / 2 ** (-2 * r["rate_effective"]))
    assert r["f"] == min(g["f"] for g in r["grid"])
    assert len(r["grid"]) == 50
    # beats the best 4-bit uniform scalar quantizer on the same data even after paying for H(T)
    s = scalar_rd(4, n=1 << 14, seed=0)
    assert r["snr_rate_adjusted_db"] > s["uniform"]["snr_db"]
    # the MSE objective takes the smallest MSE of the same grid
    m = hnlq_rd(
        "D4",
        4,
        2,
        n=1 << 14,
        seed=0,
        objective="mse",
        return_grid=True,
        max_scaling_iterations=12,
        betas=[g["beta"] for g in r["grid"][::5]],
    )
    assert m["mse"] == min(g["mse"] for g in m["grid"]) <= r["mse"]


def test_quant_rd_centering_fixes_q2():
    """For q = 2 the constellation is one-sided, so uncentred HNLQ is poor on symmetric data; centring it by
    its centroid (``config.center``) recovers a normal SNR. Same result on every backend."""
    kw = dict(n=1 << 13, seed=2, betas=[0.15, 0.2, 0.25, 0.3, 0.45])
    plain = hnlq_rd("D4", 2, 4, **kw)
    cent = hnlq_rd("D4", 2, 4, center=True, **kw)
    assert plain["snr_db"] < 8.0
    assert cent["snr_db"] > 18.0
    ref = hnlq_rd("D4", 2, 4, center=True, backend="torch", **kw)
    assert ref["mse"] == cent["mse"] and ref["H_T"] == cent["H_T"]


def test_quant_rd_errors():
    with pytest.raises(ValueError, match="objective"):
        hnlq_rd("D4", 4, 2, n=64, objective="snr")
    with pytest.raises(ValueError, match="betas"):
        hnlq_rd("D4", 4, 2, n=64, betas=[])
    with pytest.raises(ValueError, match="betas"):
        hnlq_rd("D4", 4, 2, n=64, betas=[0.1, -1.0])
    with pytest.raises(ValueError, match="max_scaling_iterations"):
        hnlq_rd("D4", 4, 2, n=64, max_scaling_iterations=-1)
    with pytest.raises(ValueError, match="q must be"):
        hnlq_rd("D4", 1, 2, n=64)
    with pytest.raises(ValueError, match="disable_scaling"):
        hnlq_rd(n=64, config=QuantizationConfig(disable_scaling=True))
    with pytest.raises(TypeError, match="center"):
        hnlq_rd(n=64, center=1)
    with pytest.raises(TypeError, match="config"):
        hnlq_rd(config="D4")
    with pytest.raises(ValueError, match="at least d"):
        hnlq_rd("E8", 4, 2, x=torch.zeros(5))
    with pytest.raises(TypeError, match="x must be"):
        hnlq_rd("E8", 4, 2, x=torch.zeros(16, dtype=torch.int64))
    # a config is honoured (alpha=None keeps its alpha)
    r = hnlq_rd(n=256, config=QuantizationConfig("Z2", 3, 2, alpha=0.5), alpha=None, betas=[0.3])
    assert (r["lattice"], r["q"], r["M"], r["alpha"], r["beta"]) == ("Z2", 3, 2, 0.5, 0.3)
