"""label_index / index_labels: base-q digits, little-endian, and their round trip."""

import itertools

import pytest
import torch

from coset.lut import index_labels, label_index


@pytest.mark.parametrize("q,d", [(2, 8), (3, 4), (4, 4), (4, 2), (16, 2), (5, 3)])
def test_lut_index_roundtrip_is_bijection(q, d):
    idx = torch.arange(q**d)
    b = index_labels(idx, q, d)
    assert b.shape == (q**d, d) and b.dtype == torch.uint8
    assert int(b.max()) == q - 1 and int(b.min()) == 0
    assert torch.equal(label_index(b, q), idx)
    # every label appears exactly once
    assert len({tuple(r) for r in b.tolist()}) == q**d


def test_lut_index_matches_python_digits_little_endian():
    q, d = 4, 4
    for digits in itertools.islice(itertools.product(range(q), repeat=d), 0, None, 7):
        want = sum(v * q**i for i, v in enumerate(digits))
        assert int(label_index(torch.tensor(digits, dtype=torch.uint8), q)) == want
    # little-endian: the first coordinate is the least significant digit
    assert int(label_index(torch.tensor([1, 0, 0, 0]), 4)) == 1
    assert int(label_index(torch.tensor([0, 0, 0, 1]), 4)) == 64


def test_lut_index_leading_dims_and_dtypes():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 3, (5, 2, 3, 4), generator=g)
    for dt in (torch.uint8, torch.int32, torch.int64):
        idx = label_index(b.to(dt), 3)
        assert idx.shape == (5, 2, 3) and idx.dtype == torch.int64
        assert torch.equal(index_labels(idx, 3, 4).long(), b)


def test_lut_index_bad_inputs():
    with pytest.raises(TypeError, match="b must be"):
        label_index([0, 1], 2)
    with pytest.raises(TypeError, match="integer"):
        label_index(torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"\[0, q=4\)"):
        label_index(torch.tensor([0, 4, 1, 1]), 4)
    with pytest.raises(ValueError, match=r"\[0, q=4\)"):
        label_index(torch.tensor([0, -1, 1, 1]), 4)
    with pytest.raises(ValueError, match="q must be"):
        label_index(torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="idx must lie"):
        index_labels(torch.tensor([256]), 4, 4)
    with pytest.raises(ValueError, match="idx must lie"):
        index_labels(torch.tensor([-1]), 4, 4)
    with pytest.raises(TypeError, match="idx must be an integer"):
        index_labels(torch.tensor([1.0]), 4, 4)
    with pytest.raises(ValueError, match="int64"):
        label_index(torch.zeros(70, dtype=torch.uint8), 2)
