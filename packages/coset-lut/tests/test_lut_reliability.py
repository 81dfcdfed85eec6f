"""Issue 11 class 11 in coset.lut: lattice names are case-insensitive between operands; leading dims that do not
broadcast give a ValueError naming the arguments (each test failed before its fix)."""

from __future__ import annotations

import pytest
import torch

from coset.lut import EncodedMatrix, lut_inner_product, lut_inner_product_one_sided, lut_matmul
from coset.quant import QuantizationConfig, decode, encode


def _x(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lut_lattice_names_are_case_insensitive_between_operands():
    lo, up = QuantizationConfig("d4", 4, 2, beta=0.3), QuantizationConfig("D4", 4, 2, beta=0.3)
    bx, Tx = encode(_x((20, 4), 0), lo)
    by, Ty = encode(_x((20, 4), 1), up)
    got = lut_inner_product(bx, by, lo, Tx, Ty, config_y=up)
    ref = (decode(bx, lo, Tx, dtype=torch.float64) * decode(by, up, Ty, dtype=torch.float64)).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    X = EncodedMatrix.from_dense(_x((5, 8), 2).float(), lo)
    Y = EncodedMatrix.from_dense(_x((3, 8), 3).float(), up)
    assert torch.equal(lut_matmul(X, Y), lut_matmul(X, EncodedMatrix.from_dense(_x((3, 8), 3).float(), lo)))
    with pytest.raises(ValueError, match="must share lattice_type, q and with_tie_dither"):
        lut_matmul(X, EncodedMatrix.from_dense(_x((3, 8), 3).float(), QuantizationConfig("Z4", 4, 2)))


def test_lut_non_broadcasting_leading_dims_name_the_arguments():
    c = QuantizationConfig("D4", 4, 2, beta=0.3)
    bx, Tx = encode(_x((5, 4), 0), c)
    by, Ty = encode(_x((3, 4), 1), c)
    with pytest.raises(ValueError, match=r"leading dims of bx \(5,\) and by \(3,\) do not broadcast"):
        lut_inner_product(bx, by, c, Tx, Ty)
    with pytest.raises(ValueError, match=r"leading dims of bx \(5,\) and y \(3,\) do not broadcast"):
        lut_inner_product_one_sided(bx, _x((3, 4), 2), c, Tx)
    # broadcasting shapes still work
    assert lut_inner_product(bx[:, None], by[None], c, Tx[:, None], Ty[None]).shape == (5, 3)
    assert lut_inner_product_one_sided(bx[:, None], _x((3, 4), 2), c, Tx[:, None]).shape == (5, 3)


def test_one_sided_kernel_interface_rejects_mismatched_shapes():
    """The lut_one_sided interface checks its shapes (a mismatch was a raw reshape RuntimeError inside), for the
    PyTorch reference and for the dispatcher alike, and still scores matching arguments."""
    from coset.lut import kernels

    ix = torch.randint(0, 16, (5, 4, 2), dtype=torch.int32)
    sx, tables = torch.rand(5, 4), torch.randn(3, 4, 16)
    want = kernels.torch_one_sided(ix, sx, tables, 4)
    brute = sum(sx[:, k, None] * sum(4**mm * tables[:, k, ix[:, k, mm].long()].T for mm in range(2)) for k in range(4))
    assert torch.allclose(want, brute, rtol=1e-5, atol=1e-5)
    for f in (kernels.torch_one_sided, kernels.one_sided_scores):
        with pytest.raises(ValueError, match="shapes do not match"):
            f(ix, torch.rand(5, 2), tables, 4)
        with pytest.raises(ValueError, match="shapes do not match"):
            f(ix, sx, torch.randn(3, 5, 16), 4)
        with pytest.raises(ValueError, match="3-d"):
            f(ix[0], sx, tables, 4)
        with pytest.raises(TypeError, match="tables"):
            f(ix, sx, [[0.0]], 4)
