"""LUT paths with centred codes (``config.center=True``, x̂ = s (P - c)) against decode-then-dot/matmul in
float64: Z2 (q = 2 and 4), D4, E8 (q = 2), M = 1..3, codes with T > 0; every registered backend."""

import pytest
import torch

from coset.lut import (
    EncodedMatrix,
    lut_inner_product,
    lut_inner_product_one_sided,
    lut_linear,
    lut_matmul,
    lut_matmul_one_sided,
    matmul,
)
from coset.quant import QuantizationConfig, decode, encode, from_blocks
from coset.quant import backend as qbackend

CASES = [("Z2", 2), ("Z2", 4), ("D4", 4), ("E8", 2)]


def _cpu_backends(op: str) -> list[str]:
    """Backends that run ``op`` on CPU tensors ("torch" always; coset-cuda's native one-sided GEMV on CPU, its
    two-sided kernel only on CUDA tensors)."""
    probe = torch.zeros(1, dtype=torch.int32)
    return [
        b
        for b in qbackend.available_backends()
        if b == "torch" or qbackend.get_backend(b).supports(op, probe, None, None)
    ]


BACKENDS = _cpu_backends("lut_one_sided")
TWO_SIDED = _cpu_backends("lut_two_sided")


def _mat(n, k, seed):
    """Rows with log-normal per-block magnitudes, so the codes mix T = 0 and T > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    return x * torch.exp(1.2 * torch.randn(n, k, generator=g, dtype=torch.float64))


def _cfg(name, q, M, **kw):
    return QuantizationConfig(lattice_type=name, q=q, M=M, beta=kw.pop("beta", 0.3), alpha=0.5, center=True, **kw)


def _dense(E: EncodedMatrix, center=None) -> torch.Tensor:
    """coset.quant.decode in float64 with the padding stripped (center=False gives the uncentred s P)."""
    cfg = E.config if center is None else E.config.replace(center=center)
    return from_blocks(decode(E.labels, config=cfg, T=E.T, dtype=torch.float64), E.pad)


def _close(got, ref, absref, rel=4e-6):
    """float32 result vs float64 reference, within float32 rounding of the sum of |terms| (incl. s P terms)."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref).abs()
    bound = rel * absref + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())


def _absref(X, Y):
    """|terms| of the LUT sum: the centred products and the uncentred s P terms the kernels accumulate."""
    a = [_dense(X).abs(), _dense(X, False).abs()]
    b = [_dense(Y).abs(), _dense(Y, False).abs()] if isinstance(Y, EncodedMatrix) else [Y.abs()]
    return sum(u @ v.T for u in a for v in b)


@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_center_dequantize_is_decode(name, q, M):
    c = _cfg(name, q, M)
    k = 5 * c.dim + 1
    X = EncodedMatrix.from_dense(_mat(19, k, 1), c)
    assert bool((X.T > 0).any()) and bool((X.T == 0).any())
    for dt in (torch.float64, torch.float32):
        ref = from_blocks(decode(X.labels, config=c, T=X.T, dtype=dt), X.pad)
        assert torch.equal(X.dequantize(dt), ref)
    # the offset really is applied: uncentred decode differs by s c per block
    assert not torch.equal(_dense(X), _dense(X, False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_center_matmuls_match_decode_then_matmul(backend, name, q, M):
    c = _cfg(name, q, M)
    k = 4 * c.dim + 3 if c.dim > 2 else 9  # padded last block
    X = EncodedMatrix.from_dense(_mat(23, k, 2), c)
    Y = EncodedMatrix.from_dense(_mat(17, k, 3), c.replace(beta=0.7 * c.beta))
    assert bool((X.T > 0).any())
    Yf = _mat(11, k, 4)
    Xh, Yh = _dense(X), _dense(Y)
    two = backend if backend in TWO_SIDED else "torch"
    _close(lut_matmul(X, Y, backend=two), Xh @ Yh.T, _absref(X, Y))
    _close(lut_matmul(Y, X, backend=two), Yh @ Xh.T, _absref(Y, X))
    _close(lut_matmul_one_sided(X, Yf, backend=backend), Xh @ Yf.T, _absref(X, Yf))
    _close(lut_matmul_one_sided(X, Yf[0], backend=backend), Xh @ Yf[0], _absref(X, Yf[:1])[:, 0])
    b = torch.randn(23, dtype=torch.float64)
    got = lut_linear(Yf.float(), X, b.float(), backend=backend)
    torch.testing.assert_close(got.double(), Yf @ Xh.T + b, rtol=0, atol=float(4e-6 * _absref(X, Yf).max() + 1e-5))


@pytest.mark.parametrize("name,q", CASES)
def test_lut_center_mixed_and_different_M(name, q):
    """X centred and Y not (or with another M, hence another offset): each side's own offset is used."""
    c = _cfg(name, q, 2)
    k = 3 * c.dim
    X = EncodedMatrix.from_dense(_mat(13, k, 5), c)
    for cy in (c.replace(center=False), c.replace(M=3, beta=0.2), c.replace(M=1)):
        Y = EncodedMatrix.from_dense(_mat(9, k, 6), cy)
        Xh, Yh = _dense(X), _dense(Y)
        _close(lut_matmul(X, Y, backend="torch"), Xh @ Yh.T, _absref(X, Y))
        _close(lut_matmul(Y, X, backend="torch"), Yh @ Xh.T, _absref(Y, X))


def test_lut_center_chunked_one_sided(monkeypatch):
    c = _cfg("D4", 4, 2)
    X = EncodedMatrix.from_dense(_mat(7, 12, 7), c)
    Y = _mat(9, 12, 8)
    full = lut_matmul_one_sided(X, Y, backend="torch")
    monkeypatch.setattr(matmul, "_TABLE_BYTES", 1)  # one query per chunk (the m = 1 kernel path)
    chunked = lut_matmul_one_sided(X, Y, backend="torch")
    _close(chunked, _dense(X) @ Y.T, _absref(X, Y))
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-4)


def test_lut_center_linear_gradient_is_dense_gradient():
    c = _cfg("D4", 2, 3)
    W = EncodedMatrix.from_dense(_mat(6, 10, 9), c)
    x = _mat(5, 10, 10).float().requires_grad_(True)
    lut_linear(x, W).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ W.dequantize().T).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_center_inner_products_match_decode(name, q, M):
    c = _cfg(name, q, M)
    d = c.dim
    g = torch.Generator().manual_seed(M + 10 * q)
    x = torch.randn(300, d, generator=g, dtype=torch.float64) * torch.exp(
        1.5 * torch.randn(300, 1, generator=g, dtype=torch.float64)
    )
    y = torch.randn(300, d, generator=g, dtype=torch.float64)
    bx, Tx = encode(x, config=c)
    assert bool((Tx > 0).any()) and bool((Tx == 0).any())
    xh = decode(bx, config=c, T=Tx, dtype=torch.float64)
    for cy in (c.replace(beta=0.5), c.replace(center=False), c.replace(M=max(1, M - 1))):
        by, Ty = encode(y, config=cy)
        yh = decode(by, config=cy, T=Ty, dtype=torch.float64)
        got = lut_inner_product(bx, by, c, Tx, Ty, config_y=cy)
        torch.testing.assert_close(got, (xh * yh).sum(-1), rtol=1e-12, atol=1e-9)
    got1 = lut_inner_product_one_sided(bx, y, c, Tx)
    torch.testing.assert_close(got1, (xh * y).sum(-1), rtol=1e-12, atol=1e-9)
    # broadcasting: one query against all blocks
    got2 = lut_inner_product_one_sided(bx, y[0], c, Tx)
    torch.testing.assert_close(got2, xh @ y[0], rtol=1e-12, atol=1e-9)


def test_lut_center_still_refuses_random_dither():
    c = _cfg("D4", 4, 2).replace(with_dither=True)
    b = torch.zeros(3, 2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="with_dither"):
        lut_inner_product(b, b, c)
    with pytest.raises(ValueError, match="with_dither"):
        lut_inner_product_one_sided(b, torch.zeros(3, 4), c)
    with pytest.raises(ValueError, match="with_dither"):
        EncodedMatrix.from_dense(torch.zeros(2, 8), c)
