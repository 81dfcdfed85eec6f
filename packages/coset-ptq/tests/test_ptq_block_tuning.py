"""coset.ptq.block_tuning.tune_block_: what it moves, the held-out rule, bad input (the driver: test_ptq_calib)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coset.ptq.block_tuning import BlockTuneConfig, tune_block_


def _toy(seed=0):
    """Two linears in a row; the first is 'quantized' (rounded), the second is free."""
    g = torch.Generator().manual_seed(seed)
    block = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False))
    ref = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        for m in (0, 2):
            w = torch.randn(16, 16, generator=g) / 4
            ref[m].weight.copy_(w)
            block[m].weight.copy_(w)
        block[0].weight.copy_(torch.round(block[0].weight * 4) / 4)
    xs = [torch.randn(32, 16, generator=g) for _ in range(6)]
    with torch.no_grad():
        targets = [ref(x) for x in xs]
    return block, xs, targets


def _loss(block, xs, targets, i):
    with torch.no_grad():
        out = block(xs[i])
    return float((out - targets[i]).pow(2).sum() / targets[i].pow(2).sum())


def test_tune_block_lowers_the_held_out_error_and_moves_only_params():
    block, xs, targets = _toy()
    first = block[0].weight.detach().clone()
    flags = [p.requires_grad for p in block.parameters()]
    before = _loss(block, xs, targets, 5)
    rep = tune_block_(block, lambda i: block(xs[i]), targets, [block[2].weight], BlockTuneConfig(epochs=20, lr=1e-2))
    assert rep["kept"] is True
    assert rep["holdout_before"] == pytest.approx(before, rel=1e-6)
    assert rep["holdout_after"] == pytest.approx(_loss(block, xs, targets, 5), rel=1e-6)
    assert rep["holdout_after"] < 0.8 * before  # the free layer absorbs part of the rounding error
    assert torch.equal(block[0].weight, first)  # not in params: untouched
    assert [p.requires_grad for p in block.parameters()] == flags
    assert all(p.grad is None for p in block.parameters())


def test_tune_block_restores_the_weights_when_the_held_out_error_rises():
    block, xs, targets = _toy(1)
    w = block[2].weight.detach().clone()
    rep = tune_block_(block, lambda i: block(xs[i]), targets, [block[2].weight], BlockTuneConfig(epochs=3, lr=1e3))
    assert rep["kept"] is False and not rep["holdout_after"] < rep["holdout_before"]
    assert torch.equal(block[2].weight, w)


def test_tune_block_bad_input():
    block, xs, targets = _toy()
    run = lambda i: block(xs[i])  # noqa: E731
    with pytest.raises(TypeError, match="config"):
        tune_block_(block, run, targets, [block[2].weight], {"lr": 1e-3})
    with pytest.raises(ValueError, match="at least 2"):
        tune_block_(block, run, targets[:1], [block[2].weight], BlockTuneConfig())
    with pytest.raises(ValueError, match="params must be parameters of block"):
        tune_block_(block, run, targets, [nn.Parameter(torch.zeros(2))], BlockTuneConfig())
    for bad in (dict(epochs=0), dict(epochs=1.5), dict(lr=0.0), dict(lr=float("nan")), dict(target="x")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BlockTuneConfig(**bad)
