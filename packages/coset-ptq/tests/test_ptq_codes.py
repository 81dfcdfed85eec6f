import pytest
import torch

from coset.ptq.codes import LinearCodes, Rotation
from coset.quant import QuantizationConfig, encode


def test_rotation_orthogonal_and_inverse():
    r = Rotation(576, 123)
    R = r.matrix()
    assert torch.allclose(R @ R.t(), torch.eye(576, dtype=torch.float64), atol=1e-12)
    x = torch.randn(7, 576, dtype=torch.float64)
    assert torch.allclose(r.apply(x), x @ R.t(), atol=1e-12)
    assert torch.allclose(r.inverse(r.apply(x)), x, atol=1e-12)
    # the signs are a function of the seed only
    assert torch.equal(Rotation(576, 123).signs(), r.signs())
    assert not torch.equal(Rotation(576, 124).signs(), r.signs())


def test_rotation_validation():
    with pytest.raises(ValueError):
        Rotation(6, 0)
    with pytest.raises(ValueError):
        Rotation(8, -1)
    with pytest.raises(ValueError, match="last dimension"):
        Rotation(8, 0).apply(torch.zeros(3, 16))


def test_linear_codes_dequantize_undoes_rotations():
    m, n = 24, 32
    code = QuantizationConfig(lattice_type="E8", q=4, M=2, beta=1.0)
    ro, ri = Rotation(m, 1), Rotation(n, 2)
    Wt = torch.randn(m, n // 8, 8, dtype=torch.float64)
    b, T = encode(Wt, config=code)
    scale = torch.rand(m) + 0.5
    codes = LinearCodes(code, b, T, scale, ri, ro, n, m)
    rot = codes.rotated(torch.float64)
    W = codes.dequantize(torch.float64)
    # W = Uᵀ W̃ V  <=>  U W Vᵀ = W̃
    assert torch.allclose(ro.matrix() @ W @ ri.matrix().t(), rot, atol=1e-10)
    with pytest.raises(ValueError, match="labels"):
        LinearCodes(code, b[:, :2], T, scale, ri, ro, n, m)
    with pytest.raises(ValueError, match="scale"):
        LinearCodes(code, b, T, torch.ones(3), ri, ro, n, m)
