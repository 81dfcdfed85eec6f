"""coset.quant.rms: the automatic betas ``float32(scale * rms)`` and their fixed-order sum of squares.

The order is the specification (a kernel that quantizes the rows computes the same floats while it reads
them): checked here against a plain Python loop written from the module docstring, and through
``quantize_rows(x, RmsBetas(...))`` against the composition with the betas passed in.
"""

import math

import pytest
import torch

from coset.quant import QuantizationConfig, RmsBetas, quantize_rows, rms_betas
from coset.quant.rms import row_sumsq


def _sumsq_loop(values: list[float]) -> float:
    """The docstring's order, in Python floats (IEEE float64, no fused operations)."""
    lanes = [0.0] * 16
    for i, v in enumerate(values):
        lanes[i % 16] = lanes[i % 16] + v * v
    s = [(lanes[j] + lanes[4 + j]) + (lanes[8 + j] + lanes[12 + j]) for j in range(4)]
    return (s[0] + s[2]) + (s[1] + s[3])


@pytest.mark.parametrize("k", [1, 15, 16, 17, 100, 1024])
def test_row_sumsq_is_the_documented_order(k):
    g = torch.Generator().manual_seed(k)
    # magnitudes spread over many binades, so that another order of the additions rounds differently
    x = torch.randn(6, k, generator=g) * torch.exp(4 * torch.randn(6, k, generator=g))
    got = row_sumsq(x)
    assert got.dtype == torch.float64
    for r in range(6):
        assert float(got[r]) == _sumsq_loop([float(v) for v in x[r].tolist()])


def test_row_sumsq_chunks_keep_the_order():
    # more lane steps than one cumsum chunk (4096 x 16 values): the running sums carry across chunks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16 * 4096 + 40, generator=g) * torch.exp(3 * torch.randn(1, 16 * 4096 + 40, generator=g))
    assert float(row_sumsq(x)[0]) == _sumsq_loop([float(v) for v in x[0].tolist()])


def test_rms_betas_values_and_zero_rows():
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    b = rms_betas(x, RmsBetas(2.0))
    assert b.dtype == torch.float64 and b.shape == (3,)
    # rms = 5 / 2, 0 (beta 1), 1
    assert b.tolist() == [5.0, 1.0, 2.0]
    one = rms_betas(x, RmsBetas(2.0, per_row=False))
    want = float(torch.tensor(2.0 * math.sqrt(29.0) / math.sqrt(12.0), dtype=torch.float32))
    assert one.shape == (3,) and one.tolist() == [want] * 3
    # float32-rounded values
    y = torch.randn(5, 7)
    v = rms_betas(y, RmsBetas(0.123))
    assert torch.equal(v, v.to(torch.float32).to(torch.float64))


def test_rms_betas_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        rms_betas(torch.tensor([[1.0, float("nan")]]), RmsBetas(1.0))
    with pytest.raises(ValueError, match="overflows float32"):
        rms_betas(torch.full((1, 4), 3e38), RmsBetas(4.0))
    with pytest.raises(TypeError, match="RmsBetas"):
        rms_betas(torch.ones(2, 2), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rms_betas(torch.ones(4), RmsBetas(1.0))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            RmsBetas(bad)
    with pytest.raises(TypeError, match="per_row"):
        RmsBetas(1.0, per_row=1)  # type: ignore[arg-type]


def test_rms_betas_float64_overflow_falls_back_to_scaled_rms():
    x = torch.tensor([[1e200, -1e200, 0.0, 0.0]], dtype=torch.float64)  # the float64 squares overflow
    b = rms_betas(x, RmsBetas(1e-190))
    assert math.isfinite(float(b[0]))
    assert float(b[0]) == float(torch.tensor(1e200 * math.sqrt(0.5) * 1e-190, dtype=torch.float32))


@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_rows_with_rms_betas_is_the_composition(per_row):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 37, generator=g) * torch.rand(9, 1, generator=g)
    x[3] = 0.0
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    spec = RmsBetas(3.1, per_row=per_row)
    res, T, clamped, betas = quantize_rows(x, spec, cfg, backend="torch", return_info=True)
    assert torch.equal(betas, rms_betas(x, spec))
    want = quantize_rows(x, betas, cfg, backend="torch", return_info=True)
    assert all(torch.equal(a, b) for a, b in zip((res, T, clamped), want, strict=True))
    res2, betas2 = quantize_rows(x, spec, cfg, backend="torch")
    assert torch.equal(res2, res) and torch.equal(betas2, betas)
