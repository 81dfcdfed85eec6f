"""All-in bits per weight: one number from a saved directory and from the in-memory model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from coset.ptq.bits import bits_per_weight
from coset.ptq.codes import LinearCodes, Rotation
from coset.ptq.layers import HNLQLinear
from coset.ptq.serialize import save_quantized
from coset.quant import QuantizationConfig, encode

pytest.importorskip("safetensors")


def _layer(m, n, cfg, *, scale_mul=3.0, per_row=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    rin, rout = Rotation(n, 10 + seed), Rotation(m, 20 + seed)
    Wt = rout.apply(rin.apply(W).t()).t()
    s = Wt.pow(2).mean(dim=1).sqrt() if per_row else Wt.pow(2).mean().sqrt()
    s = s / scale_mul
    b, T = encode((Wt / (s[:, None] if per_row else s)).reshape(m, n // cfg.dim, cfg.dim), config=cfg)
    return HNLQLinear.from_codes(LinearCodes(cfg, b, T, s.float(), rin, rout, n, m), torch.zeros(m))


E8 = QuantizationConfig(lattice_type="E8", q=4, M=2, beta=1.0)
E8_2 = QuantizationConfig(lattice_type="E8", q=4, M=1, beta=1.0, center=True)


def test_directory_and_memory_give_the_same_bytes(tmp_path):
    model = nn.Sequential(
        _layer(48, 96, E8, scale_mul=8.0), nn.ReLU(), _layer(32, 48, E8_2, per_row=False, seed=1), nn.LayerNorm(32)
    )
    save_quantized(model, tmp_path)
    a, b = bits_per_weight(model), bits_per_weight(tmp_path)
    assert a.nbytes == b.nbytes and a.all_in == b.all_in and a.nominal == b.nominal
    assert a.layers.keys() == b.layers.keys() == {"0", "2"}
    assert a.weights == 48 * 96 + 32 * 48
    assert a.nominal == pytest.approx((4.0 * 48 * 96 + 2.0 * 32 * 48) / a.weights)
    assert a.all_in > a.nominal
    # the counted bytes are a part of the actual file: no more than the file minus the float tensors
    hdr_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    hdr = json.loads((tmp_path / "model.safetensors").read_bytes()[8 : 8 + hdr_len])
    data = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in hdr.items() if k != "__metadata__"}
    counted_data = sum(
        v
        for k, v in data.items()
        if k.split(".")[1] in ("weight", "weight_T", "scale", "rot_in_seed", "rot_out_seed")
        and k.split(".")[0] in ("0", "2")
    )
    assert counted_data < a.nbytes < counted_data + 2 * 2048  # data plus a bounded header/spec overhead


def test_large_layer_approaches_nominal_and_t_costs_bits():
    # No overload (T = 0 everywhere): all-in -> nominal as the layer grows.
    big = _layer(256, 1024, E8, scale_mul=1.0, per_row=False)
    r = bits_per_weight(big)
    assert int(big.codes()[1].max()) == 0
    # labels are exactly 4 bits/weight; scale, seeds, header entries and the layer spec add < 1 KiB per layer
    assert r.nbytes - 256 * 1024 // 2 == pytest.approx(
        bits_per_weight(_layer(8, 16, E8, scale_mul=1.0, per_row=False)).nbytes - 8 * 16 // 2, abs=40
    )  # only digits differ
    assert 4.0 < r.all_in < 4.0 + 8 * 1024 / (256 * 1024)
    # Overload (T > 0) must show up in the all-in figure.
    over = _layer(256, 1024, E8, scale_mul=12.0, per_row=False)
    assert int(over.codes()[1].max()) > 0
    assert bits_per_weight(over).all_in > r.all_in + 0.01


def test_bad_source(tmp_path):
    with pytest.raises(TypeError, match="source"):
        bits_per_weight(3)
    with pytest.raises(ValueError, match="no HNLQLinear"):
        bits_per_weight(nn.Linear(8, 8))
    with pytest.raises(OSError, match="config.json"):
        bits_per_weight(tmp_path)
