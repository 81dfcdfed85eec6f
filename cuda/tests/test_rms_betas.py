"""Rms betas computed natively (in the call that quantizes the rows) equal coset.quant.rms_betas bit for bit.

The native code sums each row's squares (float64, the order coset.quant.rms fixes) and quantizes the row with
that beta: the float64 sums, the float32 betas and the quantized rows are compared with the PyTorch reference,
per row and per tensor, padded rows, 1 and 3 threads, the fast path off, and bad input.
"""

import pytest
import torch

from coset.cuda import _C, _ops
from coset.quant import QuantizationConfig, RmsBetas, quantize_rows, rms_betas
from coset.quant.rms import row_sumsq


def _x(R: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # many binades per row: any other order of the float64 additions would round differently somewhere
    x = torch.randn(R, k, generator=g) * torch.exp(3 * torch.randn(R, k, generator=g))
    x[0] = 0.0  # beta 1
    return x


@pytest.mark.parametrize("k", [1, 5, 16, 37, 1024, 4099])
def test_native_row_sumsq_equals_reference(k):
    x = _x(40, k, k)
    assert torch.equal(_ops.row_sumsq(x), row_sumsq(x))


@pytest.mark.parametrize("per_row", [True, False])
def test_native_rms_betas_equal_reference(per_row):
    x = _x(33, 333, 1)
    spec = RmsBetas(2.7, per_row=per_row)
    assert torch.equal(_ops.rms_betas(x, spec).to(torch.float64), rms_betas(x, spec))


@pytest.mark.parametrize("lat,q,M", [("D4", 4, 2), ("E8", 2, 3), ("D8", 4, 1)])
@pytest.mark.parametrize("k", [1024, 37])
@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_rows_rms_equals_reference(lat, q, M, k, per_row):
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, max_scaling_iterations=6)
    g = torch.Generator().manual_seed(k + M)
    x = torch.randn(64, k, generator=g) * (torch.rand(64, 1, generator=g) + 0.1)
    x[5] = 0.0
    x[7, :3] *= 200.0  # T > 0 in a row whose beta the outliers raise
    spec = RmsBetas(0.37, per_row=per_row)
    nat = quantize_rows(x, spec, cfg, backend="native", return_info=True)
    ref = quantize_rows(x, spec, cfg, backend="torch", return_info=True)
    assert all(torch.equal(a, b) for a, b in zip(nat, ref, strict=True))
    assert nat[3].dtype == torch.float64 and bool((nat[1] > 0).any())
    if not per_row:
        assert bool((nat[3] == nat[3][0]).all())


def test_quantize_rows_rms_threads_out_and_switch_give_same_bits():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x = _x(300, 1024, 7) * 1e-3
    spec = RmsBetas(3.0)
    n0 = _ops.get_num_threads()
    out = (torch.empty(300, 1024), torch.empty(300, 256, dtype=torch.uint8), torch.empty(300, 256, dtype=torch.bool))
    try:
        _ops.set_num_threads(1)
        a = quantize_rows(x, spec, cfg, backend="native", return_info=True)
        _ops.set_num_threads(3)
        b = quantize_rows(x, spec, cfg, backend="native", return_info=True, out=out)
        assert b[0] is out[0] and b[1] is out[1] and b[2] is out[2]
        _C.set_fast_path(False)  # the composition of the float64 kernels, with the natively computed betas
        c = quantize_rows(x, spec, cfg, backend="native", return_info=True)
    finally:
        _C.set_fast_path(True)
        _ops.set_num_threads(n0)
    ref = quantize_rows(x, spec, cfg, backend="torch", return_info=True)
    for got in (a, b, c):
        assert all(torch.equal(u, v) for u, v in zip(got, ref, strict=True))


def test_quantize_rows_rms_bad_input():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    for per_row in (True, False):
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_rows(x, RmsBetas(1.0, per_row=per_row), cfg, backend="native")
    big = torch.full((2, 8), 3e38)
    with pytest.raises(ValueError, match="overflows float32"):
        quantize_rows(big, RmsBetas(4.0), cfg, backend="native")
    empty = quantize_rows(torch.empty(0, 8), RmsBetas(1.0), cfg, backend="native", return_info=True)
    assert empty[0].shape == (0, 8) and empty[3].shape == (0,)


def test_layer0_constant_margin_on_exact_scales():
    """A power-of-two scale table (beta 1, alpha 1: the QAT rows) takes layer 0's constant margin, another one
    (beta 0.7, alpha 1/3) the relative one: both equal the reference on the boundary classes of the code."""
    g = torch.Generator().manual_seed(4)
    for cfg in (
        QuantizationConfig(lattice_type="D4", q=4, M=2, max_scaling_iterations=4),
        QuantizationConfig(lattice_type="E8", q=4, M=2, max_scaling_iterations=4),
        QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.7, alpha=1 / 3, max_scaling_iterations=4),
    ):
        s = cfg.beta
        n = 4096 * cfg.dim
        u = torch.randint(-64, 64, (n,), generator=g).to(torch.float32)
        x = torch.cat(
            [
                u / 8 * s,  # multiples of 1/(2q): rounding ties and exact argmax ties
                (u + 0.5) * s,  # half-integers
                (u / 2 + torch.randn(n, generator=g) * 1e-6) * s,  # just off the ties
                torch.randn(n, generator=g) * 6 * s,  # T > 0
            ]
        ).reshape(-1, 64)
        nat = quantize_rows(x, None, cfg, backend="native", return_info=True)
        ref = quantize_rows(x, None, cfg, backend="torch", return_info=True)
        assert all(torch.equal(a, b) for a, b in zip(nat, ref, strict=True))
