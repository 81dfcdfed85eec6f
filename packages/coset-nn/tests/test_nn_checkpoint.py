"""Compressed checkpoints: exact round trip, size = rate + side information, errors."""

import pytest
import torch
from torch import nn

from coset.nn import QATConfig, load_compressed, quantize_model, save_compressed
from coset.quant import QuantizationConfig, codes_nbytes, pack_codes, packed_nbytes

D4 = QuantizationConfig()


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
        nn.LayerNorm(10),
    )


def _trained(cfg):
    torch.manual_seed(0)
    m = _net()
    quantize_model(m, cfg)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.randn(16, 3, 4, 4)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    m.eval()
    return m, x


@pytest.mark.parametrize(
    "cfg",
    [
        QATConfig(),
        QATConfig(activation=D4, quantize_every=2, granularity="per_tensor"),
        QATConfig(weight=QuantizationConfig(lattice_type="E8", q=8, M=1, beta=0.01), granularity="fixed"),
    ],
)
def test_nn_compressed_roundtrip_exact(tmp_path, cfg):
    m, x = _trained(cfg)
    y = m(x)
    rep = save_compressed(m, tmp_path / "m.safetensors")
    # into a float model of the same architecture: layers are swapped with the stored configs
    m2 = load_compressed(_net(), tmp_path / "m.safetensors")
    m2.eval()
    assert torch.equal(m2(x), y)
    for n in ("0", "3", "5"):
        assert m2.get_submodule(n).qconfig == cfg
        assert torch.equal(m2.get_submodule(n).weight, m.get_submodule(n).weight_quantizer.qweight)
    # into an already quantized model
    m3 = _net()
    quantize_model(m3, cfg)
    load_compressed(m3, tmp_path / "m.safetensors").eval()
    assert torch.equal(m3(x), y)
    # it keeps training from the decoded weights
    m3.train()
    m3(x).sum().backward()
    assert m3[3].weight.grad is not None
    assert rep.num_quantized_weights == 16 * 27 + 256 * 128 + 128 * 10


def test_nn_compressed_size_matches_rate(tmp_path):
    m, _ = _trained(QATConfig())
    rep = save_compressed(m, tmp_path / "m.safetensors")
    nb = {"0": (16, 7), "3": (128, 64), "5": (10, 32)}
    labels = sum(packed_nbytes(c * b * 2 * 4, 4) for c, b in nb.values())
    assert rep.label_bytes == labels
    # T bytes: exactly what pack_codes makes of each layer's T (its one rule for storing T)
    T_bytes = 0
    for n in nb:
        tensors, _ = pack_codes(*m.get_submodule(n).codes()[:2], QATConfig().weight)
        T_bytes += codes_nbytes(tensors) - tensors["labels"].numel()
    assert rep.T_bytes == T_bytes
    assert rep.beta_bytes == 4 * (16 + 128 + 10)
    n = rep.num_quantized_weights
    # 4 bits/weight of labels (+ padding of the conv rows: 28/27) and T side information < 1 bit/weight
    assert 4.0 <= rep.label_bits_per_weight < 4.01
    assert rep.label_bits_per_weight < rep.effective_bits_per_weight < 4.0 + 1.0 + 0.2
    expected_file = labels + T_bytes + rep.beta_bytes + rep.other_bytes + rep.metadata_bytes
    # safetensors adds a JSON header (names, shapes, offsets) on top of our metadata
    assert expected_file <= rep.file_bytes < expected_file + 2048
    float_bytes = 4 * n
    assert rep.file_bytes < float_bytes / 5


def test_nn_compressed_errors(tmp_path):
    m, _ = _trained(QATConfig())
    p = tmp_path / "m.safetensors"
    save_compressed(m, p)
    with pytest.raises(ValueError, match="config"):
        other = _net()
        quantize_model(other, QATConfig(ste="clipped"))
        load_compressed(other, p)
    with pytest.raises(ValueError, match="not found"):
        load_compressed(nn.Sequential(), p)
    with pytest.raises(ValueError, match="conv2d"):
        load_compressed(nn.Sequential(nn.Linear(3, 3)), p)
    with pytest.raises(ValueError, match="shape"):
        bad = _net()
        bad[5] = nn.Linear(128, 11)
        bad[6] = nn.LayerNorm(11)
        load_compressed(bad, p)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a coset-nn"):
        load_compressed(_net(), tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="model"):
        save_compressed("model", p)
