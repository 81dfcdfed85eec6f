"""coset.ptq.api: PTQConfig validation and quantize_ end to end on tiny random models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from coset.ptq.api import PTQConfig, calibration_batches, quantize_
from coset.ptq.block_tuning import BlockTuneConfig
from coset.ptq.hnlq_block import MethodConfig
from coset.ptq.layers import HNLQLinear


def calib(n=8, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, t), generator=g)


def cfg(**kw):
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 4)
    return PTQConfig(**kw)


@pytest.mark.parametrize(
    "kw, exc, word",
    [
        (dict(nsamples=0), ValueError, "nsamples"),
        (dict(seqlen=-3), ValueError, "seqlen"),
        (dict(batch_size=True), ValueError, "batch_size"),
        (dict(skip=[""]), ValueError, "skip"),
        (dict(skip=[3]), ValueError, "skip"),
        (dict(sequential="yes"), TypeError, "sequential"),
        (dict(sequential=False, true_sequential=True), ValueError, "true_sequential"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(asymmetric="yes"), TypeError, "asymmetric"),
        (dict(sequential=False, asymmetric=True), ValueError, "asymmetric"),
        (dict(method="hnlq_ldlq"), TypeError, "method"),
        (dict(block_tune={"epochs": 1}), TypeError, "block_tune"),
        (dict(sequential=False, block_tune=BlockTuneConfig()), ValueError, "block_tune"),
    ],
)
def test_config_validation(kw, exc, word):
    with pytest.raises(exc, match=word):
        PTQConfig(**kw)


def test_config_is_frozen_and_seed_reaches_the_method():
    c = PTQConfig(seed=7, skip="lm_head")
    assert c.method.seed == 7 and c.skip == ("lm_head",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.nsamples = 3  # type: ignore[misc]
    assert c.skipped("model.lm_head") and not c.skipped("model.layers.0.mlp.up_proj")
    assert PTQConfig(skip=("*.mlp.*",)).skipped("model.layers.0.mlp.up_proj")


def test_hnlq_ldlq_installs_compressed_modules_equal_to_w_hat(llama):
    """compress=True swaps in HNLQLinear; the compressed model computes what the W_hat model computes."""
    mc = MethodConfig(method="hnlq_ldlq", lattice="E8", q=4, M=2)
    plain = copy.deepcopy(llama)
    rep = quantize_(llama, calib(), cfg(method=mc))
    rep2 = quantize_(plain, calib(), cfg(method=mc, compress=False))
    lins = [n for n, m in llama.named_modules() if isinstance(m, HNLQLinear)]
    assert len(lins) == 14 and len(rep.layers) == 14 and rep.skipped == []
    assert not any(isinstance(m, HNLQLinear) for m in plain.modules())
    assert all(isinstance(llama.get_submodule(n), HNLQLinear) for n in lins)
    assert isinstance(llama.lm_head, nn.Linear)
    x = calib(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=x).logits, plain(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    # report: bytes-based all-in bits above the label rate (scales, T, metadata), per-layer metrics
    assert rep.nominal_bits == pytest.approx(4.0)
    assert rep.all_in_bits > 4.0 and rep.nbytes * 8 == pytest.approx(rep.all_in_bits * rep.n_weights)
    assert rep.n_weights == sum(r["shape"][0] * r["shape"][1] for r in rep.layers)
    assert sum(r["nbytes"] for r in rep.layers) == rep.nbytes
    assert 0 < rep.rel_proxy_mean < 0.1 and rep.wall_s > 0 and rep.peak_rss_mb > 0
    assert rep2.rel_proxy_mean == pytest.approx(rep.rel_proxy_mean)
    assert "all-in" in rep.summary()


def test_scalar_baseline_writes_w_hat_and_counts_bytes(llama):
    ref = copy.deepcopy(llama)
    rep = quantize_(llama, calib(), cfg(method=MethodConfig(method="rtn", bits=4, group_size=-1)))
    assert not any(isinstance(m, HNLQLinear) for m in llama.modules())
    # per-channel sym int4: 4 bits + one fp16 scale per row
    expect = sum(r["shape"][0] * (4 * r["shape"][1] + 16) for r in rep.layers) / rep.n_weights
    assert rep.all_in_bits == pytest.approx(expect)
    q = llama.model.layers[0].self_attn.q_proj.weight
    w = ref.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, w)
    assert max(len(torch.unique(row)) for row in q) <= 16  # at most 2^4 levels per row


def test_skip_and_non_sequential(llama):
    ref = copy.deepcopy(llama)
    rep = quantize_(
        llama,
        calib(),
        cfg(method=MethodConfig(method="hnlq_rot", lattice="D4", q=4, M=1), skip=("*mlp*",), sequential=False),
    )
    assert len(rep.skipped) == 6 and len(rep.layers) == 8
    assert all("mlp" not in r["name"] for r in rep.layers)
    assert torch.equal(llama.model.layers[1].mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight)
    assert isinstance(llama.model.layers[1].self_attn.v_proj, HNLQLinear)


def test_bert_works(bert):
    rep = quantize_(bert, calib(), cfg(method=MethodConfig(method="gptq", bits=3, group_size=32)))
    assert len(rep.layers) == 12 and rep.layers[0]["name"].startswith("encoder.layer.0.")


def test_sequential_gptq_not_worse_than_rtn_on_the_proxy(llama):
    """GPTQ minimizes the proxy layer by layer; with the same Hessians it never loses to RTN in total."""
    r_rtn = quantize_(copy.deepcopy(llama), calib(16), cfg(method=MethodConfig(method="rtn", bits=3), sequential=False))
    r_gptq = quantize_(
        copy.deepcopy(llama), calib(16), cfg(method=MethodConfig(method="gptq", bits=3), sequential=False)
    )
    assert r_gptq.rel_proxy_mean < r_rtn.rel_proxy_mean


def test_asymmetric_reaches_the_driver(llama):
    """asymmetric=True: block 0 (float inputs, no drift) gets the symmetric run's W_hat, later blocks not (the
    driver's correction itself is tested in test_ptq_calib)."""
    mc = MethodConfig(method="hnlq_ldlq", lattice="E8", q=4, M=1)
    sym, asym = copy.deepcopy(llama), copy.deepcopy(llama)
    quantize_(sym, calib(16), cfg(method=mc, compress=False))
    quantize_(asym, calib(16), cfg(method=mc, compress=False, asymmetric=True))
    w = lambda m, b: m.model.layers[b].self_attn.q_proj.weight  # noqa: E731
    d = lambda b: (w(sym, b) - w(asym, b)).abs().max() / w(sym, b).abs().max()  # noqa: E731
    assert d(0) == 0 and d(1) > 1e-2


def test_block_tune_reaches_the_driver(llama):
    """block_tune: one report per (block, group before the last); the first group of block 0 is quantized before
    any tuning, so it equals the true-sequential run's; a kept tuning changed a later group's weights."""
    mc = MethodConfig(method="hnlq_ldlq", lattice="E8", q=4, M=1)
    ts, bt = copy.deepcopy(llama), copy.deepcopy(llama)
    quantize_(ts, calib(16), cfg(method=mc, compress=False, true_sequential=True))
    rep = quantize_(bt, calib(16), cfg(method=mc, compress=False, block_tune=BlockTuneConfig(epochs=2, lr=1e-3)))
    assert sorted(rep.block_tuning) == [f"model.layers.{b}:{g}" for b in range(2) for g in range(3)]
    kept = [k for k, r in rep.block_tuning.items() if r["kept"]]
    assert kept, rep.block_tuning
    assert all(rep.block_tuning[k]["holdout_after"] < rep.block_tuning[k]["holdout_before"] for k in kept)
    w = lambda m, b, n: getattr(m.model.layers[b].self_attn, n).weight  # noqa: E731
    assert torch.equal(w(ts, 0, "q_proj"), w(bt, 0, "q_proj"))
    assert "model.layers.0:0" in kept  # deterministic on CPU: the first tuning of block 0 helps
    assert not torch.equal(w(ts, 0, "o_proj"), w(bt, 0, "o_proj"))


def test_bad_input(llama):
    with pytest.raises(ValueError, match="calib is empty"):
        quantize_(llama, [], cfg())
    with pytest.raises(ValueError, match="calib must be an integer tensor"):
        quantize_(llama, torch.randn(4, 8), cfg())
    with pytest.raises(ValueError, match="calib"):
        quantize_(llama, "some text", cfg())
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()), calib(), cfg())
    with pytest.raises(ValueError, match="all skipped"):
        quantize_(llama, calib(), cfg(skip=("model",)))
    with pytest.raises(TypeError, match="config"):
        quantize_(llama, calib(), {"method": "rtn"})


def test_calibration_batches(tiny_tokenizer):
    texts = ["some calibration text, repeated. "] * 50
    b = calibration_batches(tiny_tokenizer, texts, PTQConfig(nsamples=10, seqlen=20, batch_size=4))
    assert [t.shape for t in b] == [(4, 20), (4, 20), (2, 20)]


def test_layer_methods_validation(llama):
    q8 = MethodConfig.for_bits(3)
    with pytest.raises(TypeError, match="layer_methods"):
        PTQConfig(layer_methods=[("a", q8)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="layer_methods"):
        PTQConfig(layer_methods={"a": "q8"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="layer_methods"):
        PTQConfig(layer_methods={"": q8})
    with pytest.raises(ValueError, match="both HNLQ"):
        PTQConfig(layer_methods={"a": MethodConfig(method="rtn", bits=3)})
    c = PTQConfig(layer_methods={"a": q8}, seed=5)
    assert c.method_for("a").seed == 5 and c.method_for("a").q == 8 and c.method_for("b") is c.method
    with pytest.raises(TypeError):
        c.layer_methods["b"] = q8  # type: ignore[index]  # read-only view: the config stays frozen
    with pytest.raises(ValueError, match="not quantized linears"):
        quantize_(llama, calib(), cfg(layer_methods={"model.layers.0.mlp.nope": q8}))
    with pytest.raises(ValueError, match="not quantized linears"):
        quantize_(llama, calib(), cfg(layer_methods={"lm_head": q8}))


@pytest.mark.slow
def test_layer_methods_mixed_precision(llama):
    """Overridden layers get their own code; the bytes and the nominal rate follow the per-layer codes."""
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    over = {names[0]: MethodConfig.for_bits(2), names[1]: MethodConfig.for_bits(3)}
    rep = quantize_(llama, calib(), cfg(method=MethodConfig.for_bits(4), layer_methods=over, sequential=False))
    qs = {n: m.spec.code.q for n, m in llama.named_modules() if isinstance(m, HNLQLinear)}
    assert qs[names[0]] == 4 and qs[names[1]] == 8
    assert {q for n, q in qs.items() if n not in names} == {16}
    nw = {r["name"]: r["shape"][0] * r["shape"][1] for r in rep.layers}
    label_bits = {n: 2 if n == names[0] else 3 if n == names[1] else 4 for n in nw}
    assert rep.nominal_bits == pytest.approx(sum(label_bits[n] * k for n, k in nw.items()) / sum(nw.values()))
    assert sum(r["nbytes"] for r in rep.layers) == rep.nbytes


def test_layer_methods_scalar_nominal_bits(llama):
    name = "model.layers.0.self_attn.q_proj"
    rep = quantize_(
        llama,
        calib(),
        cfg(method=MethodConfig(method="rtn", bits=4), layer_methods={name: MethodConfig(method="rtn", bits=2)}),
    )
    nw = {r["name"]: r["shape"][0] * r["shape"][1] for r in rep.layers}
    assert rep.nominal_bits == pytest.approx(sum((2 if n == name else 4) * k for n, k in nw.items()) / sum(nw.values()))
    w = llama.get_submodule(name).weight
    assert max(len(torch.unique(row)) for row in w) <= 4
