"""Short QAT runs on real offline data (MNIST-1D, digits): accuracy well above chance and close to FP32;
the main job's files; torch.compile (inductor) of a QLinear model, forward and backward.

The full-budget comparison (30 epochs, gap <= 2 points) is benchmarks/bench_qat.py; these runs use a few
epochs, so "close" is 5 points here.
"""

import json

import pytest
import torch
from torch import nn

from coset.cli.data import load_digits, load_mnist1d
from coset.cli.qat_job import run_main_job, run_qat_comparison
from coset.nn import QATConfig, QConv2d, QLinear


def _check(res, chance, fp32_min, close):
    v = res["variants"]
    assert v["fp32"]["final_test_acc"] >= fp32_min
    for name in ("qat_w", "qat_wa"):
        acc = v[name]["final_test_acc"]
        assert acc >= 4 * chance, f"{name}: {acc}% is not well above chance"
        assert abs(v["fp32"]["final_test_acc"] - acc) <= close, f"{name}: {acc}% vs fp32 {v['fp32']['final_test_acc']}%"
        comp = v[name]["compressed"]
        assert 4.0 <= comp["label_bits_per_weight"] < 4.9  # 4 bits/weight + padding of short rows
        assert v[name]["size_bytes"] < v["fp32"]["size_bytes"] / 3
        assert 0.0 < v[name]["weight_overload_rate"] < 0.6
    assert v["qat_wa"]["act_overload_rate"] > 0
    # the curves are per epoch
    assert len(v["qat_w"]["curves"]["test_acc"]) == res["epochs"]


@pytest.mark.slow
def test_integration_qat_mnist1d_short():
    res = run_qat_comparison(
        "mnist1d", epochs=8, seed=0, progress=False, variants=("fp32", "qat_w", "qat_wa"), data=load_mnist1d()
    )
    _check(res, chance=10.0, fp32_min=60.0, close=5.0)


@pytest.mark.slow
def test_integration_qat_digits_short():
    res = run_qat_comparison("digits", epochs=10, seed=0, progress=False, data=load_digits())
    _check(res, chance=10.0, fp32_min=90.0, close=3.0)
    assert res["variants"]["ptq_w"]["final_test_acc"] > 80.0


@pytest.mark.slow
def test_integration_qat_main_job_writes_files(tmp_path):
    res = run_main_job(epochs=1, seed=0, progress=False, out_dir=tmp_path)
    assert set(res["variants"]) == {"fp32", "ptq_w", "qat_w", "qat_wa"}
    png = tmp_path / "qat_mnist1d.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads((tmp_path / "qat_mnist1d.json").read_text())
    assert loaded["variants"]["qat_w"]["final_test_acc"] == res["variants"]["qat_w"]["final_test_acc"]
    assert (tmp_path / "qat_mnist1d_qat_w.safetensors").stat().st_size == res["variants"]["qat_w"]["size_bytes"]
    with pytest.raises(ValueError, match="dataset"):
        run_qat_comparison("cifar10")


@pytest.mark.slow
def test_integration_qat_torch_compile_inductor():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        QConv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), QLinear(4 * 6 * 6, 10, qconfig=QATConfig(ste="clipped"))
    )
    x = torch.randn(3, 2, 6, 6)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)
