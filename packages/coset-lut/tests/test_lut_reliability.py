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
