import pytest
import torch

from coset.ptq.ldlq import damp, proxy_loss
from coset.ptq.scalar import ScalarCodes, gptq_scalar, rtn_scalar
from coset.quant import pack_labels


def _q4_1_matrix(m, n, seed):
    """A weight matrix as GGUF Q4_1 stores it: per 32-group fp16 scale d and min m, levels 0..15 (both ends
    used, as the Q4_1 quantizer's min/max do), dequantized in float32 as ``d * q + m``."""
    g = torch.Generator().manual_seed(seed)
    G = n // 32
    d = (torch.rand(m, G, generator=g) * 0.01 + 1e-4).to(torch.float16)
    mn = (torch.randn(m, G, generator=g) * 0.05).to(torch.float16)
    q = torch.randint(0, 16, (m, G, 32), generator=g)
    q[:, :, 0] = 0
    q[:, :, 1] = 15
    q = q[:, :, torch.randperm(32, generator=g)]
    W = d.float()[:, :, None] * q.float() + mn.float()[:, :, None]
    return W.reshape(m, n), q.reshape(m, n), d, mn


@pytest.mark.parametrize("seed", [0, 1])
def test_asym_group32_reproduces_q4_1_exactly(seed):
    W, q, d, mn = _q4_1_matrix(64, 256, seed)
    W_hat, codes = rtn_scalar(W, 4, 32, sym=False)
    assert torch.equal(W_hat, W)
    assert torch.equal(codes.ints.long(), q)
    assert torch.equal(codes.scales, d) and torch.equal(codes.zeros, mn)
    assert torch.equal(codes.dequantize(), W)
    # 4 bits/weight of packed levels + fp16 scale and min per 32 weights = 5 bits/weight
    assert codes.nbytes() == pack_labels(codes.ints, 16).numel() + 4 * 64 * 8
    assert codes.nbytes() * 8 / W.numel() == 5.0


def test_rtn_levels_and_error_bound():
    W = torch.randn(32, 128)
    for sym in (True, False):
        for g in (-1, 64):
            W_hat, c = rtn_scalar(W, 3, g, sym)
            assert int(c.ints.max()) <= 7
            assert torch.equal(c.dequantize(), W_hat)
            s = c.scales.float()[:, c.group_index()]
            if sym:  # the top level clips: error <= s inside [-4s, 3s]
                inside = (W >= -4 * s) & (W <= 3 * s)
                assert bool(((W - W_hat).abs()[inside] <= s[inside] / 2 + 1e-6).all())
            else:
                assert bool(((W - W_hat).abs() <= s / 2 + 1e-3 * s + 1e-6).all())
    with pytest.raises(ValueError):
        rtn_scalar(W, 0)
    with pytest.raises(ValueError):
        rtn_scalar(W, 4, 0)


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, generator=g) / n**0.5 + torch.eye(n, dtype=torch.float64)
    X = torch.randn(4 * n, n, dtype=torch.float64, generator=g) @ A
    return X.t() @ X / (4 * n)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("group,sym,act", [(-1, True, False), (32, False, False), (32, True, True), (-1, False, True)])
def test_gptq_beats_rtn_and_codes_match(seed, group, sym, act):
    n = 128
    H = _spd(n, seed)
    W = torch.randn(48, n, generator=torch.Generator().manual_seed(seed))
    Wg, c = gptq_scalar(W, H, 3, group, sym, act, blocksize=48)
    Wr, _ = rtn_scalar(W, 3, group, sym)
    Hd, _ = damp(H, 0.01)
    assert proxy_loss(W, Wg, Hd) < proxy_loss(W, Wr, Hd)
    assert torch.equal(c.dequantize(), Wg)
    assert (c.perm is not None) == act


def test_gptq_dead_column_and_perm_cost():
    n = 64
    H = _spd(n, 0)
    H[5, :] = 0
    H[:, 5] = 0
    W = torch.randn(16, n)
    Wg, c = gptq_scalar(W, H, 4, 16, True, True)
    assert torch.isfinite(Wg).all()
    assert Wg[:, 5].abs().max() == 0  # dead input: weight zeroed (GPTQ)
    assert c.nbytes() == 16 * n // 2 + 2 * 16 * 4 + 2 * n


def test_scalar_codes_validation():
    with pytest.raises(ValueError):
        ScalarCodes(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 3, dtype=torch.float16), None, 4, 4)


def test_clip_search_never_increases_rounding_error():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 128, generator=g) ** 3  # heavy tails: clipping pays
    for sym in (True, False):
        for bits in (2, 3, 4):
            a, _ = rtn_scalar(W, bits, 32, sym)
            b, c = rtn_scalar(W, bits, 32, sym, clip_search=True)
            ea = (a - W).pow(2).reshape(64, 4, 32).sum(-1)
            eb = (b - W).pow(2).reshape(64, 4, 32).sum(-1)
            assert bool((eb <= ea * (1 + 1e-6) + 1e-12).all())
            assert float(eb.sum()) < float(ea.sum())
            assert torch.equal(c.dequantize(), b)
