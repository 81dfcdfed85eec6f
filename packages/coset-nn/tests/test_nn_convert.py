"""quantize_model / dequantize_model: selection, per-layer configs, report, undo."""

import pytest
import torch
from torch import nn

from coset.nn import (
    QATConfig,
    QConv1d,
    QConv2d,
    QLinear,
    dequantize_model,
    quantize_model,
    quantized_layers,
)
from coset.quant import QuantizationConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 1))
        self.c1 = nn.Conv2d(8, 8, 1)
        self.head = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))
        self.norm = nn.LayerNorm(5)


def test_nn_quantize_model_swaps_and_reports():
    torch.manual_seed(0)
    m = Net()
    params = {n: p for n, p in m.named_parameters()}
    rep = quantize_model(m)
    assert rep.names == ["features.0", "features.2", "c1", "head.0", "head.2"]
    assert isinstance(m.features[0], QConv2d) and isinstance(m.features[2], QConv1d)
    assert isinstance(m.head[0], QLinear) and isinstance(m.norm, nn.LayerNorm)
    # the same Parameter objects: an optimizer built before the swap still trains them
    for n, p in m.named_parameters():
        assert p is params[n]
    r0 = rep.layers[0]
    assert r0.kind == "conv2d" and r0.weight_shape == (8, 3, 3, 3) and r0.pad == 1
    # bits/weight: 7 blocks * (16 label + T bits at full width) + 8 float32 betas per 8*27 weights
    t_bits = QATConfig().weight.max_scaling_iterations.bit_length()
    assert r0.bits_per_weight == pytest.approx((8 * 7 * (16 + t_bits) + 32 * 8) / (8 * 27))
    assert rep.num_weights == sum(p.numel() for n, p in params.items() if n.endswith("weight") and "norm" not in n)
    assert "features.0" in str(rep)
    # a second call skips what is already quantized
    rep2 = quantize_model(m)
    assert rep2.layers == () and rep2.skipped["head.0"] == "already quantized"


def test_nn_quantize_model_include_exclude_and_per_layer_configs():
    m = Net()
    rep = quantize_model(m, include="head.*", exclude=["head.2"])
    assert rep.names == ["head.0"] and rep.skipped["head.2"] == "excluded" and rep.skipped["c1"] == "not included"
    m = Net()
    rep = quantize_model(m, exclude=lambda name, mod: isinstance(mod, nn.Conv1d))
    assert "features.2" not in rep.names and isinstance(m.features[2], nn.Conv1d)
    m = Net()
    e8 = QATConfig(weight=QuantizationConfig(lattice_type="E8", q=2, M=2))
    rep = quantize_model(m, {"head.2": None, "head.*": e8, "features.0": QATConfig(ste="clipped")})
    assert rep.names == ["features.0", "head.0"]
    assert m.head[0].qconfig is e8 and m.features[0].qconfig.ste == "clipped"
    assert rep.skipped["head.2"] == "config is None" and rep.skipped["c1"] == "no config"
    t_bits = QATConfig().weight.max_scaling_iterations.bit_length()
    assert rep.layers[1].bits_per_weight == pytest.approx((16 * 2 * (16 + t_bits) + 32 * 16) / 160)


def test_nn_quantize_model_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        quantize_model("net")
    with pytest.raises(TypeError, match="config"):
        quantize_model(Net(), QuantizationConfig())
    with pytest.raises(TypeError, match="config"):
        quantize_model(Net(), {"head.*": QuantizationConfig()})
    with pytest.raises(TypeError, match="include"):
        quantize_model(Net(), include=3)
    with pytest.raises(ValueError, match="container"):
        quantize_model(nn.Linear(4, 4))


def test_nn_dequantize_model_undoes_and_exports():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Conv1d(1, 2, 3))
    x = torch.randn(4, 12)
    params = [p for p in m.parameters()]
    quantize_model(m)
    m.eval()
    yq = m[0](x)
    names = dequantize_model(m)
    assert names == ["0", "2"] and type(m[0]) is nn.Linear and type(m[2]) is nn.Conv1d
    assert all(a is b for a, b in zip(m.parameters(), params, strict=True))
    assert not quantized_layers(m)
    # export with the quantized weights: a plain float model reproducing the quantized forward
    quantize_model(m)
    m.eval()
    yq = m[0](x)
    dequantize_model(m, use_quantized=True)
    assert type(m[0]) is nn.Linear and torch.equal(m[0](x), yq)
