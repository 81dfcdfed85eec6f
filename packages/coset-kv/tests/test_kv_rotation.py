import pytest
import torch

from coset.kv import HeadRotation, fwht


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_is_the_normalized_sylvester_hadamard(n):
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(n).T, atol=1e-12)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)


def test_rotation_is_orthogonal_and_per_head():
    r = HeadRotation(3, 64, seed=5)
    R = r.matrix.double()
    for h in range(3):
        assert torch.allclose(R[h] @ R[h].T, torch.eye(64, dtype=torch.float64), atol=1e-6)
        # R = H diag(s) with s = +-1
        assert torch.allclose(R[h], sylvester(64) @ torch.diag(r.signs[h]), atol=1e-6)
    assert not torch.equal(r.signs[0], r.signs[1])
    x = torch.randn(2, 3, 7, 64)
    y = torch.randn(2, 3, 7, 64)
    assert torch.allclose(r.unrotate(r.rotate(x)), x, atol=1e-5)
    assert torch.allclose((r.rotate(x) * r.rotate(y)).sum(-1), (x * y).sum(-1), atol=1e-4)
    assert torch.equal(HeadRotation(3, 64, seed=5).signs, r.signs)


def test_rotation_spreads_a_spike():
    r = HeadRotation(1, 64, seed=0)
    x = torch.zeros(1, 1, 1, 64)
    x[..., 3] = 8.0
    assert torch.allclose(r.rotate(x).abs(), torch.full((1, 1, 1, 64), 1.0), atol=1e-6)


@pytest.mark.parametrize(
    "args, exc",
    [((3, 48, 0), ValueError), ((0, 64, 0), ValueError), ((3, 64, -1), ValueError), ((3.0, 64, 0), TypeError)],
)
def test_rotation_bad_arguments(args, exc):
    with pytest.raises(exc):
        HeadRotation(*args)


def test_rotation_bad_input_shapes():
    r = HeadRotation(3, 64)
    with pytest.raises(ValueError, match="num_heads=3"):
        r.rotate(torch.randn(1, 2, 4, 64))
    with pytest.raises(TypeError):
        r.rotate(torch.zeros(1, 3, 4, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(3, 6))
