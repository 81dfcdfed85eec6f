"""Blockwise LUT inner products against decode-then-dot (float64), Z2 / D4 / E8, M = 1..3, T > 0."""

import pytest
import torch

from coset.lattice import get_lattice
from coset.quant import QuantizationConfig, decode, encode
from coset.lut import build_two_sided_lut, lut_inner_product, lut_inner_product_one_sided

CASES = [("Z2", 4), ("D4", 4), ("D4", 3), ("E8", 2)]


def _data(shape, d, seed):
    """Gaussian blocks with log-normal per-block magnitudes: a mix of T = 0 and T > 0 blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    return x * torch.exp(1.5 * torch.randn(*shape, 1, generator=g, dtype=torch.float64))


def _cfg(name, q, M, **kw):
    return QuantizationConfig(lattice_type=name, q=q, M=M, beta=kw.pop("beta", 0.25), alpha=0.5, **kw)


@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_inner_product_two_sided_matches_decode(name, q, M):
    c = _cfg(name, q, M)
    d = c.dim
    x, y = _data((200,), d, 1), _data((200,), d, 2)
    bx, Tx = encode(x, config=c)
    by, Ty = encode(y, config=c)
    assert bool((Tx > 0).any()) and bool((Tx == 0).any())  # overload scaling exercised
    ref = (decode(bx, config=c, T=Tx, dtype=torch.float64) * decode(by, config=c, T=Ty, dtype=torch.float64)).sum(-1)
    got = lut_inner_product(bx, by, c, Tx, Ty)
    assert got.dtype == torch.float64 and got.shape == (200,)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    # the integer part is exact: with T = 0 and beta = 1 the result equals <G-points> exactly
    c1 = c.replace(beta=1.0)
    bx1, Tx1 = encode(x[:50] / 8, config=c1)
    by1, Ty1 = encode(y[:50] / 8, config=c1)
    m = (Tx1 == 0) & (Ty1 == 0)
    assert int(m.sum()) >= 5
    ref1 = (decode(bx1, config=c1, T=Tx1, dtype=torch.float64) * decode(by1, config=c1, T=Ty1, dtype=torch.float64)).sum(-1)
    assert torch.equal(lut_inner_product(bx1, by1, c1, Tx1, Ty1)[m], ref1[m])


@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_inner_product_one_sided_matches_decode(name, q, M):
    c = _cfg(name, q, M)
    x, y = _data((150,), c.dim, 3), _data((150,), c.dim, 4)
    bx, Tx = encode(x, config=c)
    assert bool((Tx > 0).any())
    ref = (decode(bx, config=c, T=Tx, dtype=torch.float64) * y).sum(-1)
    got = lut_inner_product_one_sided(bx, y, c, Tx)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-10)
    got32 = lut_inner_product_one_sided(bx, y.float(), c, Tx)
    assert got32.dtype == torch.float32
    scale = (decode(bx, config=c, T=Tx, dtype=torch.float64).abs() * y.abs()).sum(-1)
    assert bool(((got32.double() - ref).abs() <= 1e-6 * scale + 1e-6).all())


def test_lut_inner_product_broadcast_blocks_and_mixed_configs():
    cx = _cfg("D4", 4, 2)
    cy = cx.replace(M=3, beta=0.1, alpha=1.0)
    x = _data((6, 1, 5), 4, 5)  # 6 vectors of 5 blocks vs 7 vectors of 5 blocks -> (6, 7, 5)
    y = _data((1, 7, 5), 4, 6)
    bx, Tx = encode(x, config=cx)
    by, Ty = encode(y, config=cy)
    got = lut_inner_product(bx, by, cx, Tx, Ty, config_y=cy).sum(-1)
    xh = decode(bx, config=cx, T=Tx, dtype=torch.float64)
    yh = decode(by, config=cy, T=Ty, dtype=torch.float64)
    ref = torch.einsum("akd,bkd->ab", xh[:, 0], yh[0])
    assert got.shape == (6, 7)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-10)
    # explicit lut argument and T=None (all zero)
    lut = build_two_sided_lut(cx.lattice, 4)
    g = lut_inner_product(bx, bx, cx, lut=lut)
    xh0 = decode(bx, config=cx, dtype=torch.float64)
    assert torch.allclose(g, (xh0 * xh0).sum(-1), rtol=1e-12)
    assert bool((g >= 0).all())  # a squared norm


def test_lut_inner_product_rejects_dither_and_bad_inputs():
    c = _cfg("D4", 4, 2)
    b, T = encode(_data((4,), 4, 7), config=c)
    with pytest.raises(ValueError, match="with_dither"):
        lut_inner_product(b, b, c.replace(with_dither=True))
    with pytest.raises(ValueError, match="with_dither"):
        lut_inner_product_one_sided(b, torch.zeros(4, 4), c.replace(with_dither=True))
    with pytest.raises(TypeError, match="config must be a QuantizationConfig"):
        lut_inner_product(b, b, None)
    with pytest.raises(ValueError, match=r"bx must have shape \(\.\.\., M=2, d=4\)"):
        lut_inner_product(b[..., :3], b, c)
    with pytest.raises(ValueError, match=r"by must have shape"):
        lut_inner_product(b, b[:, :1], c)
    with pytest.raises(TypeError, match="bx must be an integer"):
        lut_inner_product(b.float(), b, c)
    with pytest.raises(ValueError, match=r"labels in bx must lie in \[0, q=4\)"):
        lut_inner_product(b + 4, b, c)
    with pytest.raises(ValueError, match="Tx must have shape"):
        lut_inner_product(b, b, c, T[:2])
    with pytest.raises(ValueError, match="Ty must lie"):
        lut_inner_product(b, b, c, T, T + 100)
    with pytest.raises(ValueError, match="config and config_y must share lattice_type, q and with_tie_dither"):
        lut_inner_product(b, b, c, config_y=c.replace(q=3))
    with pytest.raises(ValueError, match="lut was built for"):
        lut_inner_product(b, b, c, lut=build_two_sided_lut(get_lattice("D4"), 3))
    with pytest.raises(TypeError, match="lut must be a TwoSidedLUT"):
        lut_inner_product(b, b, c, lut=torch.zeros(256, 256))
    with pytest.raises(ValueError, match="no elementwise LUT kernel"):
        lut_inner_product(b, b, c, backend="cuda")
    with pytest.raises(ValueError, match=r"y must have last dimension d=4"):
        lut_inner_product_one_sided(b, torch.zeros(4, 3), c)
