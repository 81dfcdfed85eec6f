"""The score-error-optimal key transform: the matrix geometric mean of the key and query second moments,
checked against its closed-form optimum, its stationarity condition, the diagonal case and random perturbations;
its float16 low-rank storage against the optimum."""

import itertools

import pytest
import torch

from coset.kv import KeyTransform, key_transform, score_error_factor
from coset.kv.key_transform import geometric_mean_p


def spd(d, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    w = torch.exp(spread * torch.randn(d, generator=g, dtype=torch.float64))
    return q @ torch.diag(w) @ q.T


def sqrtm(s):
    w, v = torch.linalg.eigh(s)
    return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T


@pytest.mark.parametrize("d", [8, 64])
def test_geometric_mean_reaches_the_closed_form_minimum_and_is_stationary(d):
    sk, sq = spd(d, 0), spd(d, 1)
    p = geometric_mean_p(sk, sq, ridge=1e-12)
    t = sqrtm(p)
    # the minimum of tr(P Sk) tr(P^-1 Sq) over SPD P is tr((Sk^1/2 Sq Sk^1/2)^1/2)^2
    h = sqrtm(sk)
    best = torch.trace(sqrtm(h @ sq @ h)) ** 2
    f = float(score_error_factor(sk, sq, t))
    assert f == pytest.approx(float(best), rel=1e-6)
    # stationarity: P Sk P = c Sq
    lhs = p @ sk @ p
    c = torch.trace(lhs) / torch.trace(sq)
    assert torch.allclose(lhs, c * sq, rtol=1e-6, atol=1e-9 * float(lhs.abs().max()))
    # no random perturbation of T does better; it beats the best diagonal, which beats the identity
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        pert = t + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64) * t.abs().mean()
        assert float(score_error_factor(sk, sq, pert)) >= f * (1 - 1e-9)
    diag = (torch.diagonal(sq) / torch.diagonal(sk)).pow(0.25)  # the per-channel optimum (1 / key scale)
    assert f < float(score_error_factor(sk, sq, diag)) < float(score_error_factor(sk, sq, None))


@pytest.mark.parametrize("d", [8, 64])
def test_stored_transform_is_near_optimal_and_rank_trades_bytes_for_error(d):
    sk, sq = spd(d, 3), spd(d, 4)
    h = sqrtm(sk)
    best = float(torch.trace(sqrtm(h @ sq @ h)) ** 2)
    full = key_transform(sk, sq, ridge=1e-12, rank=None)
    assert full.rank == d and full.vectors.dtype == torch.float16 and full.nbytes == 2 * d * (d + 1)
    assert float(score_error_factor(sk, sq, full)) == pytest.approx(best, rel=1e-2)  # float16 rounding only
    errs = [float(score_error_factor(sk, sq, key_transform(sk, sq, rank=r))) for r in (1, d // 4, d // 2, d)]
    assert all(a >= b * (1 - 1e-3) for a, b in itertools.pairwise(errs)), errs  # more directions, less
    assert errs[0] < float(score_error_factor(sk, sq, None))
    # T keeps the median eigen-direction at gain 1 (scale is irrelevant to the code)
    assert float(full.gains.float().log().abs().min()) < 1e-3


def test_diagonal_moments_give_the_per_channel_scales():
    ek = torch.tensor([4.0, 1.0, 0.25, 9.0], dtype=torch.float64)
    eq = torch.tensor([1.0, 2.0, 8.0, 0.5], dtype=torch.float64)
    t = key_transform(torch.diag(ek), torch.diag(eq), ridge=1e-12, rank=None).matrix().to(torch.float64)
    want = (eq / ek).pow(0.25)  # T = diag(1 / s) with the key scales s = (E k^2 / E q^2)^1/4, up to scale
    assert torch.allclose(torch.diag(t) / torch.diag(t)[0], want / want[0], rtol=2e-3)
    assert torch.allclose(t, torch.diag(torch.diag(t)), atol=2e-3)


def test_batched_over_heads_and_ridge_bounds_unseen_directions():
    sk = torch.stack([spd(16, s) for s in range(3)])
    sq = torch.stack([spd(16, 10 + s) for s in range(3)])
    t = key_transform(sk, sq, rank=4)
    assert t.vectors.shape == (3, 16, 4) and t.gains.shape == (3, 4) and t.matrix().shape == (3, 16, 16)
    for h in range(3):
        one = key_transform(sk[h], sq[h], rank=4)
        assert torch.allclose(t.matrix()[h], one.matrix(), atol=1e-3)
    # a query direction never seen (rank-deficient moment): the ridge keeps T finite and well conditioned
    sq0 = sq[0].clone()
    sq0[:, 0] = sq0[0, :] = 0.0
    t0 = key_transform(sk[0], sq0, ridge=1e-3, rank=None).matrix()
    assert bool(torch.isfinite(t0).all()) and float(torch.linalg.cond(t0.double())) < 1e6


def test_bad_inputs():
    s = torch.eye(4)
    with pytest.raises(TypeError, match="sigma_k"):
        key_transform(s.to(torch.int64), s)
    with pytest.raises(ValueError, match="sigma_q"):
        key_transform(s, torch.ones(4, 3))
    with pytest.raises(ValueError, match="differ"):
        key_transform(s, torch.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        key_transform(s, torch.full((4, 4), float("nan")))
    for bad in (0.0, 1.0, -1e-3, True):
        with pytest.raises(ValueError, match="ridge"):
            key_transform(s, s, ridge=bad)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="rank"):
            key_transform(s, s, rank=bad)
    with pytest.raises(TypeError, match="gains"):
        KeyTransform(torch.ones(4, 2, dtype=torch.float16), torch.ones(2))


def test_key_transform_degenerate_inputs_raise_documented_errors():
    # regression (fuzz): D = 0 raised IndexError, an overflowing gain a message about KeyTransform's fields,
    # and score_error_factor a raw linalg/RuntimeError/AttributeError for singular or mis-shaped transforms
    with pytest.raises(ValueError, match="D >= 1"):
        key_transform(torch.zeros(0, 0), torch.zeros(0, 0))
    sk = torch.diag(torch.tensor([1e30] + [0.0] * 7))
    sq = torch.diag(torch.tensor([0.0] * 7 + [1e30]))
    with pytest.raises(ValueError, match="ridge"):
        key_transform(sk, sq, ridge=1e-300, rank=2)
    eye = torch.eye(8)
    for t, exc in ((torch.zeros(8), ValueError), (torch.ones(3), ValueError), ("x", TypeError)):
        with pytest.raises(exc):
            score_error_factor(eye, eye, t)
    assert float(score_error_factor(eye, eye, torch.ones(8, dtype=torch.int64))) == 64.0
