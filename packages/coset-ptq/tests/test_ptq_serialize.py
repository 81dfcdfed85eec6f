"""save_quantized / load_quantized: identical outputs after the round trip; bad directories are refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from coset.ptq.codes import LinearCodes, Rotation
from coset.ptq.layers import HNLQLinear
from coset.ptq.serialize import load_quantized, quantized_layers, save_quantized
from coset.quant import QuantizationConfig, encode

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CFG = QuantizationConfig(lattice_type="E8", q=4, M=2, beta=1.0)


def quantize_by_hand(model: nn.Module, cfg=CFG, skip=("lm_head",), base_seed=0) -> nn.Module:
    """Replace every nn.Linear (except ``skip``) by an HNLQLinear of a rotated, per-row-scaled RTN code."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] not in skip]
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        W = lin.weight.detach().double()
        m, n = W.shape
        rin, rout = Rotation(n, base_seed + 2 * i), Rotation(m, base_seed + 2 * i + 1)
        Wt = rout.apply(rin.apply(W).t()).t()
        s = Wt.pow(2).mean(dim=1).sqrt() / 3.0
        s = s.clamp_min(1e-8)
        b, T = encode((Wt / s[:, None]).reshape(m, n // cfg.dim, cfg.dim), config=cfg)
        codes = LinearCodes(cfg, b, T, s.float(), rin, rout, n, m)
        q = HNLQLinear.from_codes(codes, None if lin.bias is None else lin.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def tiny_llama():
    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(c).eval()


def tiny_bert():
    torch.manual_seed(0)
    c = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return transformers.BertModel(c).eval()


def plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False), nn.LayerNorm(16))


IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = quantize_by_hand(tiny_llama())
    with torch.no_grad():
        ref = model(IDS).logits
    d = tmp_path_factory.mktemp("llama")
    save_quantized(model, d)
    return d, model, ref


def test_llama_round_trip_identical_logits(llama_dir):
    d, model, ref = llama_dir
    assert len(quantized_layers(model)) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    loaded = load_quantized(d)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "coset"
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_bert_round_trip_identical_hidden_states(tmp_path):
    model = quantize_by_hand(tiny_bert())
    with torch.no_grad():
        ref = model(IDS).last_hidden_state
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).last_hidden_state, ref)


def test_plain_torch_round_trip_with_factory(tmp_path):
    model = quantize_by_hand(plain_model())
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = model(x)
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="model_factory"):
        load_quantized(tmp_path)
    loaded = load_quantized(tmp_path, plain_model)
    assert isinstance(loaded[0], HNLQLinear) and isinstance(loaded[2], HNLQLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_tokenizer_files_written(tmp_path):
    class Tok:
        def save_pretrained(self, d):
            (tmp_path / "tokenizer.json").write_text("{}")

    save_quantized(quantize_by_hand(plain_model()), tmp_path, tokenizer=Tok())
    assert (tmp_path / "tokenizer.json").is_file()


def test_save_refuses_a_model_without_hnlq_layers(tmp_path):
    with pytest.raises(ValueError, match="no HNLQLinear"):
        save_quantized(plain_model(), tmp_path)
    with pytest.raises(TypeError, match="nn.Module"):
        save_quantized("model", tmp_path)


# ---------------------------------------------------------------------- refusals
def _saved_plain(tmp_path):
    save_quantized(quantize_by_hand(plain_model()), tmp_path)
    return tmp_path


def _rewrite(d, edit):
    """Rewrite model.safetensors through ``edit(tensors)`` and re-record its size and hash (a consistent file)."""
    from coset.ptq.serialize import _sha256

    st = d / "model.safetensors"
    tensors = safetensors_torch.load_file(str(st))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(st))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["files"]["model.safetensors"] = {"bytes": st.stat().st_size, "sha256": _sha256(st)}
    (d / "config.json").write_text(json.dumps(cfg))


def test_refuses_missing_directory_and_non_coset_directory(tmp_path):
    with pytest.raises(OSError, match="not a directory"):
        load_quantized(tmp_path / "nope", plain_model)
    with pytest.raises(OSError, match="config.json"):
        load_quantized(tmp_path, plain_model)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a coset model"):
        load_quantized(tmp_path, plain_model)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_quantized(tmp_path, plain_model)


def test_refuses_missing_weights_file(tmp_path):
    d = _saved_plain(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        load_quantized(d, plain_model)


def test_refuses_truncated_file(tmp_path):
    d = _saved_plain(tmp_path)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_quantized(d, plain_model)
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_quantized(d, plain_model, verify=False)  # the header check alone also catches it


def test_refuses_damaged_file(tmp_path):
    d = _saved_plain(tmp_path)
    st = d / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-3] ^= 0xFF
    st.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors.*damaged"):
        load_quantized(d, plain_model)
    raw[20] = ord("#")  # inside the JSON header
    st.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors.*damaged"):
        load_quantized(d, plain_model, verify=False)


def test_refuses_missing_key(tmp_path):
    d = _saved_plain(tmp_path)
    _rewrite(d, lambda t: t.pop("2.scale"))
    with pytest.raises(ValueError, match="model.safetensors.*missing key '2.scale'"):
        load_quantized(d, plain_model)
    d2 = tmp_path / "b"
    save_quantized(quantize_by_hand(plain_model()), d2)
    _rewrite(d2, lambda t: t.pop("3.weight"))  # a float (non-quantized) tensor
    with pytest.raises(ValueError, match="(?s)model.safetensors.*3.weight"):
        load_quantized(d2, plain_model)


def test_refuses_wrong_shape(tmp_path):
    d = _saved_plain(tmp_path)
    _rewrite(d, lambda t: t.__setitem__("0.scale", torch.ones(3)))
    with pytest.raises(ValueError, match="model.safetensors.*0.scale"):
        load_quantized(d, plain_model)
    d2 = tmp_path / "b"
    save_quantized(quantize_by_hand(plain_model()), d2)
    _rewrite(d2, lambda t: t.__setitem__("3.bias", torch.ones(3)))
    with pytest.raises(ValueError, match="(?s)model.safetensors.*3.bias"):
        load_quantized(d2, plain_model)


def test_refuses_factory_model_of_other_shape(tmp_path):
    d = _saved_plain(tmp_path)
    with pytest.raises(ValueError, match="module '0'"):
        load_quantized(
            d, lambda: nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 16, bias=False), nn.LayerNorm(16))
        )
