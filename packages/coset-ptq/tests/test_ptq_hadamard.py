import math

import pytest
import torch

from coset.ptq.hadamard import (
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
    paley_hadamard,
)


@pytest.mark.parametrize("K", [12, 20, 28, 36, 44, 60, 68, 76, 84, 108])
def test_paley_is_hadamard(K):
    H = paley_hadamard(K)
    assert set(H.unique().tolist()) == {-1, 1}
    assert torch.equal(H @ H.t(), K * torch.eye(K, dtype=torch.int64))


@pytest.mark.parametrize(
    "n,ks,P",
    [
        (1, (), 1),
        (2, (), 2),
        (64, (), 64),
        (12, (12,), 1),
        (192, (12,), 16),
        (384, (12,), 32),
        (576, (36,), 16),
        (1536, (12,), 128),
        (1360, (20, 68), 1),
    ],
)
def test_factors_of_real_widths(n, ks, P):
    assert hadamard_factors(n) == (ks, P)
    assert math.prod(ks) * P == n


@pytest.mark.parametrize("n", [3, 6, 10, 18, 9 * 2])
def test_unsupported_orders_raise(n):
    assert not is_supported(n)
    with pytest.raises(ValueError, match="no Hadamard transform"):
        hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("n", [1, 2, 8, 12, 24, 96, 192, 384, 576, 1360])
def test_matches_dense_kronecker_and_is_orthonormal(n):
    Hn = hadamard_matrix(n)
    assert torch.allclose(Hn @ Hn.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert torch.allclose(y, x @ Hn.t(), atol=1e-12)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ Hn, atol=1e-12)
    # exact inverse, norm preserved
    assert torch.allclose(hadamard_transform(y, transpose=True), x, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-10)


def test_dense_sylvester_entries():
    H4 = hadamard_matrix(4) * 2
    assert torch.equal(
        H4, torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    )


def test_float32_and_bad_input():
    x = torch.randn(4, 384)
    assert hadamard_transform(x).dtype == torch.float32
    with pytest.raises(TypeError):
        hadamard_transform(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        hadamard_factors(0)
