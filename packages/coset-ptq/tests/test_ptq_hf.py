"""transformers integration: from_pretrained after ``import coset.ptq.hf``; loud failure without it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coset.ptq.serialize import quantized_layers, save_quantized  # noqa: E402


def _sibling(name):
    # --import-mode=importlib: test files are not importable by name; load the shared builders by path.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_coset_ptq_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_s = _sibling("test_ptq_serialize")
IDS, quantize_by_hand, tiny_bert, tiny_llama = _s.IDS, _s.quantize_by_hand, _s.tiny_bert, _s.tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, build in (("llama", tiny_llama), ("bert", tiny_bert)):
        model = quantize_by_hand(build(), base_seed=100)
        d = tmp_path_factory.mktemp(name)
        save_quantized(model, d)
        out[name] = (d, model)
    return out


def test_auto_model_for_causal_lm_returns_the_compressed_model(saved):
    import coset.ptq.hf  # noqa: F401

    d, model = saved["llama"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))
    assert loaded.is_quantized and loaded.quantization_method == "coset"
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_auto_model_bert(saved):
    import coset.ptq.hf  # noqa: F401

    d, model = saved["bert"]
    loaded = transformers.AutoModel.from_pretrained(str(d))
    assert len(quantized_layers(loaded)) == len(quantized_layers(model)) > 0
    with torch.no_grad():
        assert torch.equal(loaded(IDS).last_hidden_state, model(IDS).last_hidden_state)


def test_registration_survives_reimport_and_reload():
    import coset.ptq.hf as hf

    importlib.reload(hf)  # a second register_* would raise ValueError in transformers
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["coset"].__name__ == "CosetQuantizationConfig"
    assert AUTO_QUANTIZER_MAPPING["coset"].__name__ == "CosetHfQuantizer"


def test_config_rejects_other_format_version():
    import coset.ptq.hf as hf

    with pytest.raises(ValueError, match="format_version"):
        hf.CosetQuantizationConfig(layers={"a": {}}, format_version=99)
    with pytest.raises(ValueError, match="layers"):
        hf.CosetQuantizationConfig(layers={})


@pytest.mark.slow
def test_plain_transformers_load_fails_loudly(saved):
    """Without ``import coset.ptq.hf`` transformers only warns about quant_method "coset"; the load must still fail."""
    code = textwrap.dedent(f"""
        import sys, transformers
        failed = 0
        for auto, d in (("AutoModelForCausalLM", {str(saved["llama"][0])!r}), ("AutoModel", {str(saved["bert"][0])!r})):
            try:
                getattr(transformers, auto).from_pretrained(d)
                print("LOADED", auto)
            except Exception as e:
                print("RAISED", type(e).__name__, auto, str(e)[:500])
                failed += 1
        assert "coset.ptq.hf" not in sys.modules and "coset.ptq" not in sys.modules
        sys.exit(10 + failed)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 12, out
    assert "LOADED" not in r.stdout and r.stdout.count("RAISED RuntimeError") == 2
    assert "mismatch" in out.lower()
    assert "coset" in r.stderr  # transformers' "Unknown quantization type" warning names the method
    # the reports name the packed-label keys that do not fit an nn.Linear weight
    assert "self_attn.q_proj.weight" in out and "attention.self.query.weight" in out
