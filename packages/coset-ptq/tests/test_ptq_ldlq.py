import logging

import pytest
import torch

from coset.ptq.ldlq import block_ldl, cholesky_with_retry, damp, ldlq, proxy_loss
from coset.ptq.scalar import _quant, gptq_scalar, group_params


def _spd(n, seed, N=None):
    g = torch.Generator().manual_seed(seed)
    N = N or 3 * n
    # correlated inputs with a spread of scales, like real activations
    A = torch.randn(n, n, dtype=torch.float64, generator=g) / n**0.5 + torch.eye(n, dtype=torch.float64)
    X = torch.randn(N, n, dtype=torch.float64, generator=g) @ A * torch.rand(n, dtype=torch.float64, generator=g)
    return X.t() @ X / N


def test_damp_dead_columns_and_once():
    H = _spd(16, 0)
    H[3, :] = 0
    H[:, 3] = 0
    Hd, dead = damp(H, 0.05)
    assert dead.tolist() == [i == 3 for i in range(16)]
    mean = (torch.diagonal(H).sum() + 1) / 16
    assert torch.isclose(Hd[3, 3], 1 + 0.05 * mean)
    assert torch.allclose(Hd - torch.diag(torch.diagonal(Hd)), H - torch.diag(torch.diagonal(H)))
    for bad in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="damping"):
            damp(H, bad)


def test_cholesky_retry_ladder_logs(caplog):
    H = torch.ones(8, 8, dtype=torch.float64)  # rank 1: not positive definite
    with caplog.at_level(logging.WARNING, logger="coset.ptq.ldlq"):
        C, extra = cholesky_with_retry(H)
    assert extra > 0
    assert any("Cholesky" in r.message for r in caplog.records)
    Hr = H + extra * torch.eye(8, dtype=torch.float64)
    assert torch.allclose(C @ C.t(), Hr)


@pytest.mark.parametrize("b", [1, 2, 4, 8])
def test_block_ldl_reconstructs(b):
    H, _ = damp(_spd(64, b), 0.01)
    L, D = block_ldl(H, b)
    assert D.shape == (64 // b, b, b)
    assert torch.allclose(L @ torch.block_diag(*D) @ L.t(), H, atol=1e-12)
    nb = 64 // b
    Lb = L.reshape(nb, b, nb, b)
    for i in range(nb):
        assert torch.equal(Lb[i, :, i, :], torch.eye(b, dtype=torch.float64))
        assert torch.count_nonzero(Lb[i, :, i + 1 :, :]) == 0
    assert torch.allclose(D, D.transpose(-1, -2))
    with pytest.raises(ValueError):
        block_ldl(H, 5)


def _scalar_quantizer(W, bits=3):
    s, z = group_params(W.float(), bits, True)

    def qb(t, k):
        lv, wq = _quant(t, s, z, bits)
        return wq.double(), lv

    return qb


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ldlq_b1_equals_gptq(seed):
    n = 48
    H, _ = damp(_spd(n, seed), 0.01)
    W = torch.randn(20, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    res = ldlq(W, H, _scalar_quantizer(W), 1, buffer_cols=16)
    # the reverse LDLQ sweep is GPTQ on the reversed column order
    Wg, _ = gptq_scalar(W.flip(1), H.flip(0).flip(1), 3, -1, True, blocksize=8, damped=True)
    assert torch.allclose(res.W_hat, Wg.flip(1).double(), atol=1e-6)
    assert res.proxy == pytest.approx(proxy_loss(W, res.W_hat, H))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("b", [1, 4, 8])
def test_ldlq_beats_round_to_nearest(seed, b):
    n = 64
    H, _ = damp(_spd(n, 10 + seed), 0.01)
    W = torch.randn(32, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    qb = _scalar_quantizer(W)
    res = ldlq(W, H, qb, b, buffer_cols=16)
    rtn = qb(W, 0)[0]
    assert res.proxy <= proxy_loss(W, rtn, H)


def test_buffering_does_not_change_the_result():
    n = 64
    H, _ = damp(_spd(n, 5), 0.01)
    W = torch.randn(16, n, dtype=torch.float64)
    qb = _scalar_quantizer(W)
    a = ldlq(W, H, qb, 4, buffer_cols=8)
    c = ldlq(W, H, qb, 4, buffer_cols=1000)
    assert torch.allclose(a.W_hat, c.W_hat, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_refinement_never_increases_proxy(seed):
    n = 64
    H, _ = damp(_spd(n, 20 + seed), 0.01)
    W = torch.randn(24, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    res = ldlq(W, H, _scalar_quantizer(W, 2), 4, tune_iters=4)
    tr = res.proxy_trace
    assert len(tr) == 5
    assert all(b <= a + 1e-12 for a, b in zip(tr, tr[1:], strict=False))
    assert res.proxy == pytest.approx(proxy_loss(W, res.W_hat, H))


def test_ldlq_codes_follow_rows_in_refinement():
    n = 32
    H, _ = damp(_spd(n, 3), 0.01)
    W = torch.randn(8, n, dtype=torch.float64)
    s, z = group_params(W.float(), 2, True)
    res = ldlq(W, H, _scalar_quantizer(W, 2), 4, tune_iters=2)
    for k, lv in enumerate(res.codes):
        assert torch.allclose(s.double()[:, None] * (lv.double() - 2), res.W_hat[:, 4 * k : 4 * k + 4])


def test_ldlq_bad_input():
    H = torch.eye(8, dtype=torch.float64)
    W = torch.zeros(2, 8)
    qb = lambda t, k: (t, None)  # noqa: E731
    with pytest.raises(ValueError):
        ldlq(W, torch.eye(4), qb, 1)
    with pytest.raises(ValueError):
        ldlq(W, H, qb, 3)
    with pytest.raises(ValueError):
        ldlq(W, H, qb, 1, tune_iters=-1)
