"""Issue 11 for coset.nn: no silent wrong result and no internal error on a public entry point; the quantizer
submodules' public API; version-1 files still load."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from coset.nn import (
    ClampWarning,
    HNLQWeightQuantizer,
    QATConfig,
    QConv2d,
    QLinear,
    load_compressed,
    quantize_model,
    save_compressed,
)
from coset.quant import QuantizationConfig

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ version 1
def _v1_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 5))


def _v1_configs():
    return {"0": QATConfig(), "2": QATConfig(activation=QuantizationConfig(), granularity="per_tensor")}


def _assert_v1_output(y: torch.Tensor, ref_y: torch.Tensor) -> None:
    # The fixture's outputs were computed by torch's conv / linear on another CPU: their float32 sums run in an
    # ISA-dependent order (1-ulp differences, 6e-8, in 20 of the 30 outputs on an AVX-512 Xeon). A weight that
    # decoded to another lattice point moves an output by its step (>= 0.019 here) times an input entry, so 1e-6
    # tells a changed code from summation order.
    torch.testing.assert_close(y, ref_y, rtol=0.0, atol=1e-6)


def test_nn_v1_compressed_checkpoint_still_loads_to_the_same_codes():
    ref = load_file(DATA / "v1_reference.safetensors")
    with safe_open(str(DATA / "v1_compressed.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "coset-nn-compressed/1"
    m = load_compressed(_v1_net(), DATA / "v1_compressed.safetensors").eval()
    with torch.no_grad():
        _assert_v1_output(m(ref["x"]), ref["y"])


def test_nn_v1_state_dict_still_loads_to_the_same_codes():
    ref = load_file(DATA / "v1_reference.safetensors")
    sd = load_file(DATA / "v1_state_dict.safetensors")
    assert "0.w_labels" in sd and "2.act_beta" in sd  # really the old layout
    m = _v1_net()
    quantize_model(m, _v1_configs())
    m.load_state_dict(sd, strict=True)
    m.eval()
    with torch.no_grad():
        _assert_v1_output(m(ref["x"]), ref["y"])
    # and it is saved again in the version-2 layout
    keys = set(m.state_dict())
    assert "0.weight_quantizer.labels" in keys and "2.activation_quantizer.beta" in keys and "0.w_labels" not in keys


def test_nn_v1_state_dict_with_labels_out_of_range_is_refused():
    sd = load_file(DATA / "v1_state_dict.safetensors")
    sd["0.w_labels"] = torch.full_like(sd["0.w_labels"], 7)  # >= q = 4
    m = _v1_net()
    quantize_model(m, _v1_configs())
    with pytest.raises(ValueError, match="labels >= q=4"):
        m.load_state_dict(sd)


# ------------------------------------------------------------------------------------------ class 3
def _trained_layer(cfg, n_in=16, n_out=6):
    q = QLinear(n_in, n_out, qconfig=cfg)
    q(torch.randn(3, n_in))
    return q


@pytest.mark.parametrize(
    "other, field",
    [
        (QATConfig(weight=QuantizationConfig(q=8)), "q"),
        (QATConfig(weight=QuantizationConfig(alpha=0.5)), "alpha"),
        (QATConfig(weight=QuantizationConfig(center=True)), "center"),
        (QATConfig(weight=QuantizationConfig(lattice_type="Z2")), "lattice_type"),
    ],
)
def test_nn_state_dict_under_another_code_is_refused(other, field):
    sd = _trained_layer(QATConfig()).state_dict()
    dst = QLinear(16, 6, qconfig=other)
    with pytest.raises(ValueError, match=f"another code.*{field}"):
        dst.load_state_dict(sd)
    # the same code (other QAT options) loads, and decodes to the same weight
    same = QLinear(16, 6, qconfig=QATConfig(ste="clipped", beta_scale=2.0))
    same.load_state_dict(sd)
    src = _trained_layer(QATConfig())
    same.load_state_dict(src.state_dict())
    assert torch.equal(same.eval().quantized_weight(), src.eval().quantized_weight())


def test_nn_state_dict_with_wrong_dtype_or_nonfinite_beta_is_refused():
    sd = _trained_layer(QATConfig()).state_dict()
    bad = dict(sd)
    bad["weight_quantizer.beta"] = torch.full_like(sd["weight_quantizer.beta"], float("nan"))
    with pytest.raises(ValueError, match="beta must hold finite"):
        QLinear(16, 6).load_state_dict(bad)
    bad = dict(sd)
    bad["weight_quantizer.labels"] = sd["weight_quantizer.labels"].float()
    with pytest.raises(ValueError, match="labels has dtype"):
        QLinear(16, 6).load_state_dict(bad)
    bad = dict(sd)
    bad["weight_quantizer.T"] = sd["weight_quantizer.T"][:, :2]
    with pytest.raises(ValueError, match="T has shape"):
        QLinear(16, 6).load_state_dict(bad)


# ------------------------------------------------------------------------------------------ class 4
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # the same module object used twice

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_nn_quantize_model_converts_every_use_of_a_shared_module():
    m = _Tied()
    rep = quantize_model(m)
    assert isinstance(m.a, QLinear) and m.a is m.b
    assert rep.names == ["a"] and rep.layers[0].aliases == ("b",)
    assert "shared: also b" in str(rep)
    # different treatment at the two uses is refused, and nothing is converted
    m2 = _Tied()
    with pytest.raises(ValueError, match="'a' and 'b'"):
        quantize_model(m2, exclude="b")
    assert type(m2.a) is nn.Linear and type(m2.b) is nn.Linear


def test_nn_shared_module_checkpoint_roundtrip(tmp_path):
    m = _Tied()
    quantize_model(m)
    x = torch.randn(4, 8)
    m.eval()
    y = m(x)
    save_compressed(m, tmp_path / "t.safetensors")
    m2 = load_compressed(_Tied(), tmp_path / "t.safetensors").eval()
    assert m2.a is m2.b and isinstance(m2.b, QLinear)
    assert torch.equal(m2(x), y)
    from coset.nn import dequantize_model

    dequantize_model(m2)
    assert type(m2.a) is nn.Linear and m2.a is m2.b


# ------------------------------------------------------------------------------------------ class 5 / 8
def _saved(tmp_path):
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    quantize_model(m)
    m(torch.randn(2, 8))
    p = tmp_path / "m.safetensors"
    save_compressed(m, p)
    return p


def _rewrite(p, out, tensors=None, meta=None):
    with safe_open(str(p), framework="pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(ts)
    if meta:
        meta(md)
    save_file(ts, str(out), metadata=md)
    return out


def _net():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_nn_checkpoint_nonfinite_beta_is_refused(tmp_path):
    p = _saved(tmp_path)

    def nan_beta(ts):
        ts["0.beta"] = torch.full_like(ts["0.beta"], float("nan"))

    bad = _rewrite(p, tmp_path / "b.safetensors", tensors=nan_beta)
    with pytest.raises(ValueError, match=r"b\.safetensors.*layer '0'.*betas must be finite"):
        load_compressed(_net(), bad)

    def inf_bias(ts):
        ts["2.bias"] = torch.full_like(ts["2.bias"], float("inf"))

    bad = _rewrite(p, tmp_path / "c.safetensors", tensors=inf_bias)
    with pytest.raises(ValueError, match="'2.bias' holds NaN or Inf"):
        load_compressed(_net(), bad)


def test_nn_checkpoint_damaged_files_raise_naming_file_and_tensor(tmp_path):
    p = _saved(tmp_path)
    raw = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        load_compressed(_net(), tmp_path / "trunc.safetensors")
    (tmp_path / "hdr.safetensors").write_bytes(b"\xff" * 8 + raw[8:])
    with pytest.raises(ValueError, match="hdr.safetensors"):
        load_compressed(_net(), tmp_path / "hdr.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_compressed(_net(), tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        load_compressed(_net(), tmp_path)

    bad = _rewrite(p, tmp_path / "miss.safetensors", tensors=lambda ts: ts.pop("2.labels"))
    with pytest.raises(ValueError, match=r"miss\.safetensors.*layer '2'.*'labels'"):
        load_compressed(_net(), bad)

    def short(ts):
        ts["0.labels"] = ts["0.labels"][:-1].clone()

    bad = _rewrite(p, tmp_path / "short.safetensors", tensors=short)
    with pytest.raises(ValueError, match=r"short\.safetensors.*layer '0'.*labels"):
        load_compressed(_net(), bad)

    bad = _rewrite(p, tmp_path / "nometa.safetensors", meta=lambda md: md.pop("configs"))
    with pytest.raises(ValueError, match=r"nometa\.safetensors.*'configs'"):
        load_compressed(_net(), bad)

    def bad_index(md):
        layers = json.loads(md["layers"])
        layers["0"]["config"] = 5
        md["layers"] = json.dumps(layers)

    bad = _rewrite(p, tmp_path / "cfg.safetensors", meta=bad_index)
    with pytest.raises(ValueError, match=r"cfg\.safetensors.*layer '0'.*config index 5"):
        load_compressed(_net(), bad)

    def bad_config(md):
        md["configs"] = json.dumps([{"granularity": "nope"}])

    bad = _rewrite(p, tmp_path / "cfg2.safetensors", meta=bad_config)
    with pytest.raises(ValueError, match=r"cfg2\.safetensors.*invalid config"):
        load_compressed(_net(), bad)

    def wrong_bias(ts):
        ts["0.bias"] = torch.zeros(7)

    bad = _rewrite(p, tmp_path / "shape.safetensors", tensors=wrong_bias)
    with pytest.raises(ValueError, match=r"(?s)shape\.safetensors.*0\.bias"):
        load_compressed(_net(), bad)


def test_nn_load_compressed_old_argument_order_warns(tmp_path):
    p = _saved(tmp_path)
    with pytest.warns(DeprecationWarning, match="load_compressed"):
        m = load_compressed(p, _net())
    assert isinstance(m[0], QLinear)
    with pytest.raises(TypeError, match="path"):
        load_compressed(_net(), 3)


# ------------------------------------------------------------------------------------------ class 6
def _outlier_layer():
    # one weight ~ 200 std (~ 32 row rms): the paper's alpha = 1/3 ramp with the cap of 10 steps (2^(10/3) ~ 10x)
    # cannot reach it, so its block is clamped (issue 11, class 6)
    m = nn.Sequential(nn.Linear(1024, 4))
    with torch.no_grad():
        m[0].weight[1, 0] = 200.0 * m[0].weight.std()
    quantize_model(m, QATConfig(weight=QuantizationConfig(alpha=1 / 3, max_scaling_iterations=10)))
    return m


def test_nn_clamp_warns_once_per_layer_and_is_counted_separately():
    m = _outlier_layer()
    with pytest.warns(ClampWarning, match=r"layer 0: 1 of 1024 weight blocks were clamped"):
        m(torch.randn(2, 1024))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(2, 1024))  # once per layer
    st = m[0].stats()
    assert st["clamped_blocks"] == 1 and st["weight_clamp_rate"] == 1 / 1024
    assert st["overloaded_blocks"] >= st["clamped_blocks"]
    assert st["clamped_blocks_total"] == 2
    # the clamp mask persists in the state and in compressed checkpoints
    q2 = QLinear(1024, 4, qconfig=m[0].qconfig)
    q2.load_state_dict(m[0].state_dict())
    assert q2.stats()["clamped_blocks"] == 1


def test_nn_clamp_mask_survives_compressed_checkpoint(tmp_path):
    m = _outlier_layer()
    with pytest.warns(ClampWarning):
        save_compressed(m, tmp_path / "c.safetensors")
    m2 = load_compressed(nn.Sequential(nn.Linear(1024, 4)), tmp_path / "c.safetensors")
    assert m2[0].stats()["clamped_blocks"] == 1


# ------------------------------------------------------------------------------------------ code/scale seam
def test_nn_qatconfig_refuses_a_beta_it_would_ignore():
    with pytest.raises(ValueError, match="weight.beta=0.2 would be ignored"):
        QATConfig(weight=QuantizationConfig(beta=0.2))
    with pytest.raises(ValueError, match="weight.beta"):
        QATConfig(weight=QuantizationConfig(beta=0.2), granularity="per_tensor")
    assert QATConfig(weight=QuantizationConfig(beta=0.2), granularity="fixed").weight.beta == 0.2
    with pytest.raises(ValueError, match="activation.beta"):
        QATConfig(activation=QuantizationConfig(beta=0.5))


# ------------------------------------------------------------------------------------------ quantizer API
def test_nn_weight_quantizer_codes_load_codes_stats():
    src = QLinear(10, 3).eval()
    src(torch.randn(2, 10))
    labels, T, betas = src.weight_quantizer.codes()
    assert labels.shape == (3, 3, 2, 4) and T.shape == (3, 3) and betas.shape == (3,)
    dst = QLinear(10, 3).eval()
    dst.weight_quantizer.load_codes(labels, T, betas)
    assert torch.equal(dst.weight_quantizer.dequantize(), src.quantized_weight())
    x = torch.randn(4, 10)
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    assert torch.equal(dst(x), src(x))  # loaded codes are used as they are
    st = dst.weight_quantizer.stats()
    assert st["blocks"] == 9 and 0 <= st["weight_overload_rate"] <= 1
    wq = dst.weight_quantizer
    with pytest.raises(ValueError, match="labels must lie"):
        wq.load_codes(torch.full_like(labels, 4), T, betas)
    with pytest.raises(ValueError, match="betas must be finite"):
        wq.load_codes(labels, T, torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match="T must be"):
        wq.load_codes(labels, T.long(), betas)
    with pytest.raises(ValueError, match="no weight code"):
        HNLQWeightQuantizer(QATConfig(), (3, 10)).codes()
    assert math.isnan(HNLQWeightQuantizer(QATConfig(), (3, 10)).stats()["weight_overload_rate"])


def test_nn_conv_layer_forward_is_the_composition():
    qc = QConv2d(3, 4, 3, qconfig=QATConfig(activation=QuantizationConfig())).eval()
    x = torch.randn(2, 3, 6, 6)
    y = qc(x)
    w = qc.weight_quantizer(qc.weight)
    xa = qc.activation_quantizer(x)
    assert torch.equal(y, torch.nn.functional.conv2d(xa, w, qc.bias))


# ------------------------------------------------------------------------------------------ class 1
def test_nn_huge_weights_and_inputs_do_not_overflow_the_beta():
    # w*w overflows float32 for |w| > 1.8e19: the rms (and so beta) used to become inf and the weight decoded
    # to garbage; the rms is now taken scaled by the largest magnitude
    q = QLinear(8, 2).eval()
    with torch.no_grad():
        q.weight.copy_(torch.randn(2, 8) * 1e30)
    w = q.quantized_weight().double()
    ref = q.weight.detach().double()
    assert bool(torch.isfinite(q.weight_quantizer.beta).all())
    assert float((w - ref).norm() / ref.norm()) < 0.2
    qa = QLinear(8, 2, qconfig=QATConfig(weight=None, activation=QuantizationConfig())).eval()
    x = torch.randn(3, 8) * 1e25
    xq = qa.activation_quantizer(x).double()
    assert float((xq - x.double()).norm() / x.double().norm()) < 0.2


def test_nn_from_dict_and_model_type_errors_are_clear():
    with pytest.raises(ValueError, match="unknown weight"):
        QATConfig.from_dict({"weight": {"qq": 3}})
    with pytest.raises(TypeError, match="weight must be a dict"):
        QATConfig.from_dict({"weight": 3})
    from coset.nn import quantized_layers, set_quantization_enabled

    with pytest.raises(TypeError, match="model"):
        quantized_layers("model")
    with pytest.raises(TypeError, match="model"):
        set_quantization_enabled([], True)
