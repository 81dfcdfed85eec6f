"""``quantize_rows``: per-row scaled quantization of a matrix in zero-padded d-blocks (the reference)."""

import pytest
import torch

from coset.quant import QuantizationConfig, quantize, quantize_rows


def test_rows_equal_per_row_quantize():
    """Row r is beta_r * quantize(x[r] / beta_r) on its own zero-padded blocks, padding stripped."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x = torch.randn(6, 10, generator=g)
    betas = torch.rand(6, generator=g) + 0.1
    out, T, clamped = quantize_rows(x, betas, cfg, backend="torch", return_info=True)
    assert out.shape == (6, 10) and T.shape == (6, 3) and clamped.shape == (6, 3)
    for r in range(6):
        row = torch.cat([x[r], torch.zeros(2)]).reshape(3, 4) / betas[r]
        want, Tr, cr = quantize(row, cfg, backend="torch", return_info=True)
        assert torch.equal(out[r], (want * betas[r]).reshape(-1)[:10])
        assert torch.equal(T[r], Tr) and torch.equal(clamped[r], cr)


def test_rows_without_betas_is_quantize_of_the_blocks():
    g = torch.Generator().manual_seed(1)
    cfg = QuantizationConfig(lattice_type="E8", q=2, M=3, beta=0.5)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    out = quantize_rows(x, None, cfg, backend="torch")
    assert out.dtype == torch.float64
    assert torch.equal(out, quantize(x.reshape(5, 2, 8), cfg, backend="torch").reshape(5, 16))


def test_rows_argument_errors():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize_rows([[1.0] * 8])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        quantize_rows(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(R, k\)"):
        quantize_rows(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"betas must have shape \(3,\)"):
        quantize_rows(x, torch.ones(4))
    with pytest.raises(TypeError, match="betas"):
        quantize_rows(x, torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rows(x, torch.tensor([1.0, 0.0, 1.0]), backend="torch")
