import dataclasses

import pytest

from coset.nn import QATConfig, QConv2d, QLinear
from coset.quant import QuantizationConfig


@pytest.mark.parametrize(
    "kw, exc, word",
    [
        ({"weight": "D4"}, TypeError, "weight"),
        ({"activation": 3}, TypeError, "activation"),
        ({"granularity": "per_row"}, ValueError, "granularity"),
        ({"beta_scale": 0.0}, ValueError, "beta_scale"),
        ({"beta_scale": float("nan")}, ValueError, "beta_scale"),
        ({"act_beta_scale": -1.0}, ValueError, "act_beta_scale"),
        ({"act_momentum": 1.5}, ValueError, "act_momentum"),
        ({"ste": "tanh"}, ValueError, "ste"),
        ({"quantize_every": 0}, ValueError, "quantize_every"),
        ({"quantize_every": 2.0}, TypeError, "quantize_every"),
        ({"quantize_every": True}, TypeError, "quantize_every"),
        ({"use_lut": 1}, TypeError, "use_lut"),
        ({"use_lut": True, "weight": None}, ValueError, "use_lut"),
        ({"use_lut": True, "weight": QuantizationConfig(with_dither=True)}, ValueError, "dither"),
        ({"backend": ""}, TypeError, "backend"),
    ],
)
def test_nn_bad_config_raises_naming_field(kw, exc, word):
    with pytest.raises(exc, match=word):
        QATConfig(**kw)


def test_nn_config_frozen_and_roundtrip():
    c = QATConfig(activation=QuantizationConfig(lattice_type="E8", q=2, M=3), ste="smooth", quantize_every=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ste = "identity"  # frozen
    d = c.to_dict()
    assert d["activation"]["lattice_type"] == "E8"
    assert QATConfig.from_dict(d) == c
    assert QATConfig.from_dict(QATConfig(weight=None).to_dict()) == QATConfig(weight=None)
    with pytest.raises(ValueError, match="unknown"):
        QATConfig.from_dict({**d, "bogus": 1})
    assert c.replace(ste="clipped").ste == "clipped"
    assert not QATConfig(weight=None).enabled and c.enabled


def test_nn_layer_rejects_bad_qconfig_and_lut_conv():
    with pytest.raises(TypeError, match="qconfig"):
        QLinear(4, 4, qconfig=QuantizationConfig())
    with pytest.raises(ValueError, match="groups=1"):
        QConv2d(4, 4, 3, groups=2, qconfig=QATConfig(use_lut=True))
