"""Per-layer rate allocation: optimality against brute force, budget, Fisher estimates against closed forms."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from coset.ptq.allocate import allocate_rates, fisher_costs, fisher_diagonal

RATES = (2, 3, 4)


def _instance(seed: int, layers: int = 5):
    g = torch.Generator().manual_seed(seed)
    cost, nbytes = {}, {}
    for i in range(layers):
        size = int(torch.randint(50, 400, (1,), generator=g))
        side = int(torch.randint(0, 30, (1,), generator=g))
        sens = float(torch.rand((), generator=g) * 10 + 0.1)
        # distortion ~ 4^-r with noise, so hulls are sometimes not convex
        noise = 1 + 0.6 * torch.rand(len(RATES), generator=g)
        cost[f"l{i}"] = {r: sens * size * 4.0**-r * float(noise[k]) for k, r in enumerate(RATES)}
        nbytes[f"l{i}"] = {r: size * r // 8 + side for r in RATES}
    return cost, nbytes


def _brute(cost, nbytes, budget):
    names = list(cost)
    best = None
    for combo in itertools.product(RATES, repeat=len(names)):
        b = sum(nbytes[n][r] for n, r in zip(names, combo, strict=True))
        if b > budget:
            continue
        c = sum(cost[n][r] for n, r in zip(names, combo, strict=True))
        if best is None or c < best[0]:
            best = (c, dict(zip(names, combo, strict=True)))
    return best


def _total(table, alloc):
    return sum(table[n][r] for n, r in alloc.items())


@pytest.mark.parametrize("seed", range(12))
def test_optimal_at_lagrangian_budgets(seed):
    """At the byte totals of the Lagrangian solutions (argmin cost + λ·bytes per layer) the allocation is the
    exact optimum found by enumerating all rate combinations."""
    cost, nbytes = _instance(seed)
    for lam in (0.0, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 10.0):
        lag = {n: min(RATES, key=lambda r, n=n: (cost[n][r] + lam * nbytes[n][r], nbytes[n][r])) for n in cost}
        budget = _total(nbytes, lag)
        alloc = allocate_rates(cost, nbytes, budget)
        assert _total(nbytes, alloc) <= budget
        opt, _ = _brute(cost, nbytes, budget)
        assert _total(cost, alloc) == pytest.approx(opt, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_any_budget_within_and_no_worse_than_uniform(seed):
    cost, nbytes = _instance(seed + 100)
    lo = sum(min(v.values()) for v in nbytes.values())
    hi = sum(max(v.values()) for v in nbytes.values())
    for budget in torch.linspace(lo, hi, 9).round().long().tolist():
        alloc = allocate_rates(cost, nbytes, budget)
        assert _total(nbytes, alloc) <= budget
        opt, _ = _brute(cost, nbytes, budget)
        assert _total(cost, alloc) >= opt - 1e-12
        for r in RATES:  # a uniform allocation that fits is never better
            uni = dict.fromkeys(cost, r)
            if _total(nbytes, uni) <= budget:
                assert _total(cost, alloc) <= _total(cost, uni) + 1e-12


def test_extremes_and_dominated_rates():
    cost = {"a": {2: 5.0, 3: 2.0, 4: 1.0}, "b": {2: 3.0, 3: 3.0, 4: 0.5}}
    nbytes = {"a": {2: 10, 3: 15, 4: 20}, "b": {2: 10, 3: 15, 4: 20}}
    assert allocate_rates(cost, nbytes, 20) == {"a": 2, "b": 2}
    assert allocate_rates(cost, nbytes, 40) == {"a": 4, "b": 4}
    # b's rate 3 costs bytes without lowering its cost: never chosen; a's steps drop 0.6 and 0.2 per byte,
    # b's 2 -> 4 0.25 per byte but needs 10 bytes at once
    assert allocate_rates(cost, nbytes, 25) == {"a": 3, "b": 2}
    assert allocate_rates(cost, nbytes, 30) == {"a": 4, "b": 2}
    assert allocate_rates(cost, nbytes, 35) == {"a": 3, "b": 4}


def test_errors():
    cost = {"a": {2: 1.0, 3: 0.5}}
    nbytes = {"a": {2: 10, 3: 15}}
    with pytest.raises(ValueError, match="budget"):
        allocate_rates(cost, nbytes, 9)
    with pytest.raises(ValueError, match="budget"):
        allocate_rates(cost, nbytes, float("nan"))
    with pytest.raises(ValueError, match="same rates"):
        allocate_rates(cost, {"a": {2: 10, 4: 20}}, 30)
    with pytest.raises(ValueError, match="same layers"):
        allocate_rates(cost, {"b": {2: 10, 3: 15}}, 30)
    with pytest.raises(ValueError, match="cost"):
        allocate_rates({"a": {2: float("nan"), 3: 0.5}}, nbytes, 30)
    with pytest.raises(ValueError, match="nbytes"):
        allocate_rates(cost, {"a": {2: 10.5, 3: 15}}, 30)
    with pytest.raises(ValueError, match="cost"):
        allocate_rates({}, {}, 30)


class _TinyLM(nn.Module):
    """Embedding -> linear -> logits (so the Fisher of the head has a closed form)."""

    def __init__(self, vocab: int = 6, dim: int = 4, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.head.weight.copy_(torch.randn(classes, dim, generator=g))

    def forward(self, input_ids):
        return {"logits": self.head(self.emb(input_ids))}


class _TinyEncoder(_TinyLM):
    def forward(self, input_ids):
        return {"last_hidden_state": self.head(self.emb(input_ids))}


@pytest.mark.slow
def test_fisher_matches_closed_form_for_logits():
    """z = W x, labels from softmax(z): E[g gᵀ] diagonal is p_i (1 − p_i) x_j², averaged over positions.
    (Batches of one position: the cross terms of a summed batch gradient have mean 0 but add variance.)"""
    model = _TinyLM()
    ids = torch.randint(0, 6, (8000, 1), generator=torch.Generator().manual_seed(1))
    F = fisher_diagonal(model, list(ids.split(1)), ["head"], seed=3)["head"]
    with torch.no_grad():
        x = model.emb(ids).reshape(-1, 4)
        p = torch.softmax(model.head(x), -1)
        exact = ((p * (1 - p)).T @ x.pow(2)) / x.shape[0]
    assert F.shape == exact.shape
    # entries are noisy (one sampled label per position); sums over rows / columns are tight
    assert torch.allclose(F.sum(0), exact.sum(0), rtol=0.06)
    assert torch.allclose(F.sum(1), exact.sum(1), rtol=0.15)
    assert not torch.allclose(F.sum(1), 2 * exact.sum(1), rtol=0.15)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_fisher_matches_closed_form_for_hidden_states():
    """y = W x with unit Gaussian noise: E[g²]_ij = x_j² averaged over positions (for every row i)."""
    model = _TinyEncoder()
    model.emb.weight.requires_grad_(False)
    ids = torch.randint(0, 6, (4000, 1), generator=torch.Generator().manual_seed(2))
    F = fisher_diagonal(model, list(ids.split(1)), ["head"], seed=4)["head"]
    with torch.no_grad():
        x2 = model.emb(ids).reshape(-1, 4).pow(2).mean(0)
    assert torch.allclose(F, x2.expand_as(F), rtol=0.1)
    assert not model.emb.weight.requires_grad and model.head.weight.requires_grad


def test_fisher_costs_and_errors():
    W = torch.ones(2, 3)
    F = torch.full((2, 3), 2.0)
    c = fisher_costs({"l": F}, {"l": W}, {2: {"l": W + 0.5}, 4: {"l": W}})
    assert c == {"l": {2: pytest.approx(0.5 * 2.0 * 0.25 * 6), 4: 0.0}}
    with pytest.raises(ValueError, match="shape"):
        fisher_costs({"l": F}, {"l": W}, {2: {"l": torch.ones(3, 2)}})
    with pytest.raises(ValueError, match="no entry"):
        fisher_costs({"l": F}, {"l": W}, {2: {}})
    with pytest.raises(ValueError, match="names"):
        fisher_diagonal(_TinyLM(), [torch.zeros(1, 2, dtype=torch.long)], [])
    with pytest.raises(ValueError, match="empty"):
        fisher_diagonal(_TinyLM(), [], ["head"])
    with pytest.raises(ValueError, match="seed"):
        fisher_diagonal(_TinyLM(), [], ["head"], seed=-1)


@pytest.mark.slow
def test_plan_rates_on_a_tiny_llama(llama, calib_ids):
    """The plan meets the bit target, predicts no more loss than any uniform rate that fits, and installs
    compressed modules with the chosen codes."""
    from coset.ptq.allocate import plan_rates
    from coset.ptq.bits import bits_per_weight
    from coset.ptq.layers import HNLQLinear

    rows = [b[i : i + 1] for b in calib_ids for i in range(b.shape[0])]
    plan = plan_rates(llama, calib_ids, 5.0, fisher_batches=rows)  # tiny layers: ~2 b/w of spec
    assert plan.all_in_bits <= 5.0
    assert set(plan.histogram()) <= {2, 3, 4} and sum(plan.histogram().values()) == 14
    for r, kl in plan.uniform_kl.items():
        assert plan.predicted_kl <= kl + 1e-12, r
    assert 2 in plan.uniform_kl and 4 not in plan.uniform_kl  # 2-bit fits 5.0 all-in, 4-bit does not
    # costs fall with the rate on every layer (more bits, less error)
    assert all(c[2] > c[4] for c in plan.cost.values())
    x = calib_ids[0]
    with torch.no_grad():
        before = llama(input_ids=x).logits
    plan.install_(llama)
    q = {n: m.spec.code.q for n, m in llama.named_modules() if isinstance(m, HNLQLinear)}
    assert q == {n: {2: 4, 3: 8, 4: 16}[r] for n, r in plan.rates.items()}
    assert bits_per_weight(llama).all_in == pytest.approx(plan.all_in_bits, rel=1e-12)  # the saved bytes
    with torch.no_grad():
        after = llama(input_ids=x).logits
    assert not torch.equal(before, after) and torch.isfinite(after).all()


def test_plan_rates_errors(llama, calib_ids):
    from coset.ptq.allocate import plan_rates

    with pytest.raises(ValueError, match="target_bits"):
        plan_rates(llama, calib_ids, 0)
    with pytest.raises(ValueError, match="rates"):
        plan_rates(llama, calib_ids, 3.0, rates=(2, 5))
    with pytest.raises(ValueError, match="HNLQ"):
        plan_rates(llama, calib_ids, 3.0, method="gptq")
    with pytest.raises(ValueError, match="no budget fits"):
        plan_rates(llama, calib_ids, 1.5, names=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="no Hessian"):
        plan_rates(llama, calib_ids, 3.0, names=["nope"], hessians={})
