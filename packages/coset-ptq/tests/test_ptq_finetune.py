"""coset.ptq.finetune: end-to-end tuning of norms and per-layer gains, at no cost in bits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from coset.ptq.api import PTQConfig, quantize_
from coset.ptq.bits import bits_per_weight
from coset.ptq.finetune import FinetuneConfig, clone_reference, finetune_
from coset.ptq.hnlq_block import MethodConfig
from coset.ptq.layers import HNLQLinear
from coset.ptq.serialize import load_quantized, save_quantized


def batches(n=6, t=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (2, t), generator=g) for _ in range(n)]


def quantized(model, bits=2):
    ref = clone_reference(model)
    cfg = PTQConfig(method=MethodConfig.for_bits(bits), progress=False, batch_size=4)
    quantize_(model, torch.cat(batches(4, seed=1)), cfg)
    return model, ref


def assert_round_trip(model, path, batch):
    """save_quantized + load_quantized give the same logits."""
    save_quantized(model, path)
    loaded = load_quantized(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, model(input_ids=batch).logits)


def kl(model, ref, data):
    with torch.no_grad():
        tot = 0.0
        for b in data:
            lq = F.log_softmax(model(input_ids=b).logits.flatten(0, -2), -1)
            lp = F.log_softmax(ref(input_ids=b).logits.flatten(0, -2), -1)
            tot += float(F.kl_div(lq, lp, log_target=True, reduction="batchmean"))
    return tot / len(data)


@pytest.mark.parametrize(
    "kw, exc, word",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(holdout=True), ValueError, "holdout"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(norms="yes"), TypeError, "norms"),
        (dict(norms=False, scales=False), ValueError, "norms"),
        (dict(head_lr=-1e-5), ValueError, "head_lr"),
        (dict(head="yes"), TypeError, "head"),
        (dict(code_lr=0), ValueError, "code_lr"),
        (dict(code_every=0), ValueError, "code_every"),
        (dict(codes=1), TypeError, "codes"),
        (dict(gains="channel"), ValueError, "gains"),
        (dict(schedule="linear"), ValueError, "schedule"),
    ],
)
def test_config_validation(kw, exc, word):
    with pytest.raises(exc, match=word):
        FinetuneConfig(**kw)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_sets_the_learning_rate_of_every_step(llama, monkeypatch, schedule):
    model, ref = quantized(llama)
    seen: list[float] = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    finetune_(model, ref, batches(), FinetuneConfig(steps=5, lr=1e-2, holdout=2, schedule=schedule))
    want = [1e-2 * (0.5 + 0.5 * math.cos(math.pi * t / 5)) if schedule == "cosine" else 1e-2 for t in range(5)]
    assert seen == pytest.approx(want, rel=1e-12)


@pytest.mark.slow
def test_tuning_lowers_held_out_kl_without_touching_codes_or_bits(llama, tmp_path):
    model, ref = quantized(llama)
    data = batches()
    kl_q = kl(model, ref, data[-2:])
    with torch.no_grad():  # mis-scale the codes: a loss the per-layer gains can undo exactly
        for m in model.modules():
            if isinstance(m, HNLQLinear):
                m.scale.mul_(0.6)
    packed = {
        n: {k: v.clone() for k, v in m.packed_tensors().items()}
        for n, m in model.named_modules()
        if isinstance(m, HNLQLinear)
    }
    bits0 = bits_per_weight(model).nbytes
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" not in n}
    scales0 = {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, HNLQLinear)}
    kl0 = kl(model, ref, data[-2:])

    rep = finetune_(model, ref, data, FinetuneConfig(steps=30, lr=5e-2, holdout=2))

    # the report's held-out loss is the KL of the folded model (gains folded exactly into the scales)
    assert rep.objective == "kl" and rep.kept and rep.n_gains == 14
    assert rep.holdout_before == pytest.approx(kl0, rel=1e-5)
    assert rep.holdout_after == pytest.approx(kl(model, ref, data[-2:]), rel=1e-4)
    assert rep.holdout_before > 1.5 * kl_q and rep.holdout_after < kl_q  # the mis-scaling undone, and more
    # codes, bytes and every non-norm parameter unchanged; scales moved; no hooks or caches left behind
    for n, m in model.named_modules():
        if isinstance(m, HNLQLinear):
            for k, v in m.packed_tensors().items():
                assert torch.equal(v, packed[n][k]), (n, k)
            assert not m._forward_hooks and m._w_cache is None and not m.cache_weight
    assert any(not torch.equal(m.scale, scales0[n]) for n, m in model.named_modules() if isinstance(m, HNLQLinear))
    assert bits_per_weight(model).nbytes == bits0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not p.requires_grad for p in ref.parameters())
    # the tuned scales and norms survive save / load
    assert_round_trip(model, tmp_path, data[0])


def test_no_gain_leaves_the_model_exactly_as_it_was(llama):
    """A model equal to its reference has held-out loss 0: tuning cannot lower it, so nothing changes."""
    model, ref = llama, clone_reference(llama)
    before = copy.deepcopy(model.state_dict())
    lins = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    rep = finetune_(model, ref, batches(), FinetuneConfig(steps=3, lr=1e-2), layers=lins)
    assert rep.holdout_before == pytest.approx(0.0, abs=1e-6) and not rep.kept
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_encoder_objective_is_hidden_state_mse(bert):
    ref = clone_reference(bert)
    model = copy.deepcopy(bert)
    with torch.no_grad():  # a crude perturbation the gains and norms can partly undo
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "encoder" in n:
                m.weight.mul_(0.8)
    lins = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
    rep = finetune_(model, ref, batches(), FinetuneConfig(steps=30, lr=2e-2), layers=lins)
    assert rep.objective == "mse" and rep.kept and rep.holdout_after < 0.8 * rep.holdout_before


def test_bad_input(llama):
    ref = clone_reference(llama)
    with pytest.raises(ValueError, match="reference"):
        finetune_(llama, llama, batches())
    with pytest.raises(ValueError, match="holdout"):
        finetune_(llama, ref, batches(2), FinetuneConfig(holdout=2))
    with pytest.raises(ValueError, match="layers"):
        finetune_(llama, ref, batches(), layers=["model.nope"])
    with pytest.raises(ValueError, match="LongTensor"):
        finetune_(llama, ref, [torch.zeros(2, 4)] * 4)
    with pytest.raises(TypeError, match="config"):
        finetune_(llama, ref, batches(), config={"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        finetune_("llama", ref, batches())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nothing to tune"):
        finetune_(llama, ref, batches(), FinetuneConfig(norms=False))  # no HNLQLinear and no layers given


@pytest.mark.slow
def test_an_exception_leaves_the_model_unchanged(llama):
    """A non-finite loss aborts the tuning with FloatingPointError; norms, weights and hooks are as before."""
    ref = clone_reference(llama)
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    before = copy.deepcopy(model.state_dict())
    lins = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    # a huge learning rate sends the gains to inf within a few steps
    with pytest.raises(FloatingPointError, match="non-finite"):
        finetune_(model, ref, batches(), FinetuneConfig(steps=40, lr=1e3), layers=lins)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_row_gains_are_stored_as_float16_out_scale_and_counted(llama, tmp_path):
    """gains="row": per-output-channel gains undo a per-channel mis-scaling; stored as fp16, 2 bytes per row."""
    model, ref = quantized(llama)
    data = batches()
    kl_q = kl(model, ref, data[-2:])
    bits0 = bits_per_weight(model)
    g = torch.Generator().manual_seed(0)
    rows = 0
    for m in model.modules():
        if isinstance(m, HNLQLinear):
            m.enable_out_scale()  # all ones: the output is unchanged ...
            rows += m.out_features
            with torch.no_grad():  # ... until the channels are mis-scaled
                m.out_scale.copy_((0.6 + 0.8 * torch.rand(m.out_features, generator=g)).half())
    assert bits_per_weight(model).nbytes >= bits0.nbytes + 2 * rows
    rep = finetune_(model, ref, data, FinetuneConfig(steps=30, lr=5e-2, gains="row", holdout=2))
    assert rep.kept and rep.holdout_before > 1.2 * kl_q
    # the gains take back (nearly) all the damage of the mis-scaling; beating kl_q itself is not a property
    assert rep.holdout_after - kl_q < 0.1 * (rep.holdout_before - kl_q)
    assert rep.holdout_after == pytest.approx(kl(model, ref, data[-2:]), rel=1e-4)  # the fp16 values it trained
    for m in model.modules():
        if isinstance(m, HNLQLinear):
            assert m.spec.out_scale and m.out_scale.dtype == torch.float16 and not m._forward_hooks
    assert_round_trip(model, tmp_path, data[0])
    assert bits_per_weight(tmp_path).nbytes == bits_per_weight(model).nbytes
    # per-layer gains on top of stored row gains: they multiply, and the report matches the folded model
    rep2 = finetune_(model, ref, data, FinetuneConfig(steps=3, lr=1e-2, gains="layer", holdout=2))
    assert rep2.holdout_before == pytest.approx(rep.holdout_after, rel=1e-4)
    kept_loss = rep2.holdout_after if rep2.kept else rep2.holdout_before  # not kept: the model is restored
    assert kept_loss == pytest.approx(kl(model, ref, data[-2:]), rel=1e-4)


@pytest.mark.slow
def test_head_tuning_undoes_damage_to_the_tied_head_and_is_saved(llama, tmp_path):
    """head=True tunes the float lm_head (tied to the input embedding): a random perturbation of it is mostly
    undone, the tie survives, the code bytes are unchanged and the saved model has the tuned head."""
    model, ref = quantized(llama)
    data = batches()
    kl_q = kl(model, ref, data[-2:])
    bits0 = bits_per_weight(model).nbytes
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a shift along one direction: learnable from a few batches (noise per entry is not)
        u = torch.randn(head.shape[1], generator=g)
        head.add_(0.5 * head.std() * u / u.norm() * head.shape[1] ** 0.5)
    cfg = FinetuneConfig(steps=60, lr=1e-2, norms=False, scales=False, head=True, head_lr=1e-2, holdout=2)
    rep = finetune_(model, ref, data, cfg)
    assert rep.n_head_params == head.numel() and rep.n_norm_params == 0 and rep.n_gains == 0
    assert rep.kept and rep.holdout_before > 2 * kl_q
    assert rep.holdout_after - kl_q < 0.5 * (rep.holdout_before - kl_q)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert rep.holdout_after == pytest.approx(kl(model, ref, data[-2:]), rel=1e-4)
    assert bits_per_weight(model).nbytes == bits0  # the head is not a quantized weight
    assert_round_trip(model, tmp_path, data[0])


def test_head_tuning_needs_a_float_head(bert):
    ref = clone_reference(bert)
    with pytest.raises(ValueError, match="output head"):  # BertModel has no output embeddings
        finetune_(bert, ref, batches(), FinetuneConfig(norms=False, scales=False, head=True))


@pytest.mark.slow
def test_code_tuning_lowers_the_loss_and_stores_what_it_scored(llama, tmp_path):
    """codes=True: straight-through latents move the codes of every HNLQLinear; the rebuilt layers hold exactly
    the codes of the final latents (their KL is the reported held-out loss), the label bytes are unchanged and
    a save/load round trip keeps the outputs."""
    model, ref = quantized(llama)
    data = batches(1, t=64, seed=7) * 6  # one batch: the objective the latents descend is the one scored
    lins = {n: m for n, m in model.named_modules() if isinstance(m, HNLQLinear)}
    labels0 = {n: m.weight.numel() for n, m in lins.items()}
    cfg = FinetuneConfig(steps=40, norms=False, scales=False, codes=True, code_lr=4e-3, code_every=2, holdout=2)
    rep = finetune_(model, ref, data, cfg)
    assert rep.n_code_params == sum(m.in_features * m.out_features for m in lins.values())
    assert rep.kept and rep.holdout_after < 0.9 * rep.holdout_before
    assert 0.0 < rep.blocks_changed < 1.0
    assert rep.holdout_after == pytest.approx(kl(model, ref, data[-2:]), rel=1e-4)
    new = {n: m for n, m in model.named_modules() if isinstance(m, HNLQLinear)}
    assert set(new) == set(lins) and all(new[n] is not lins[n] for n in new)  # rebuilt from the final codes
    assert all(new[n].weight.numel() == labels0[n] for n in new) and not any(m.cache_weight for m in new.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert_round_trip(model, tmp_path, data[0])


def test_code_tuning_needs_hnlq_layers(llama):
    ref = clone_reference(llama)
    lins = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    with pytest.raises(ValueError, match="HNLQLinear"):
        finetune_(llama, ref, batches(), FinetuneConfig(codes=True), layers=lins)


def _stop_adam_after(monkeypatch, n):
    """Make Adam.step raise on its (n+1)-th call: an interruption after n steps; returns the call counter."""
    calls = [0]
    step = torch.optim.Adam.step

    def stopping(self, *args, **kwargs):
        if calls[0] == n:
            raise KeyboardInterrupt("stopped")
        calls[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", stopping)
    return calls


@pytest.mark.parametrize("codes", [False, True])
def test_checkpoint_resume_equals_an_uninterrupted_run(llama, tmp_path, monkeypatch, codes):
    """A tuning stopped after 7 steps and called again resumes from its step-4 checkpoint and ends with the
    same floats (state dict, training losses, held-out loss) as a run that was never stopped."""
    model, ref = quantized(llama)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(steps=12, gains="row", head=True, schedule="cosine", lr=2e-3, holdout=2)
    cfg = FinetuneConfig(**kw, codes=True, code_every=2) if codes else FinetuneConfig(**kw)
    data = batches()
    full = finetune_(a, ref, data, cfg)
    path = tmp_path / "tune.pt"
    calls = _stop_adam_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        finetune_(b, ref, data, cfg, checkpoint=path, checkpoint_every=4)
    assert calls[0] == 7 and path.exists()
    assert torch.load(path, weights_only=True)["step"] == 4
    monkeypatch.undo()
    resumed = finetune_(b, ref, data, cfg, checkpoint=path, checkpoint_every=4)
    assert resumed.train_losses == full.train_losses and len(full.train_losses) == 12
    assert resumed.resumed_from == 4 and full.resumed_from == 0
    assert resumed.holdout_after == full.holdout_after and resumed.kept == full.kept
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.load(path, weights_only=True)["step"] == 12  # the finished state stays
    # a third call finds the finished state: it scores it and takes no step
    c = copy.deepcopy(model)
    calls = _stop_adam_after(monkeypatch, 0)
    again = finetune_(c, ref, data, cfg, checkpoint=path)
    assert calls[0] == 0 and again.train_losses == full.train_losses and again.holdout_after == full.holdout_after


def test_checkpoint_of_another_tuning_is_refused(llama, tmp_path):
    model, ref = quantized(llama)
    data = batches()
    cfg = FinetuneConfig(steps=4)
    path = tmp_path / "tune.pt"
    finetune_(copy.deepcopy(model), ref, data, cfg, checkpoint=str(path), checkpoint_every=2)
    with pytest.raises(ValueError, match="another tuning: its config"):
        finetune_(copy.deepcopy(model), ref, data, FinetuneConfig(steps=5), checkpoint=path)
    lins = [n for n, m in model.named_modules() if isinstance(m, HNLQLinear)][:2]
    with pytest.raises(ValueError, match="another tuning: its layers"):
        finetune_(copy.deepcopy(model), ref, data, cfg, layers=lins, checkpoint=path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)  # another model: its held-out loss before tuning differs
    with pytest.raises(ValueError, match="another model"):
        finetune_(other, ref, data, cfg, checkpoint=path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a finetune_ checkpoint"):
        finetune_(copy.deepcopy(model), ref, data, cfg, checkpoint=bad)
    with pytest.raises(ValueError, match="checkpoint_every"):
        finetune_(copy.deepcopy(model), ref, data, cfg, checkpoint=path, checkpoint_every=0)
    with pytest.raises(ValueError, match="directory does not exist"):
        finetune_(copy.deepcopy(model), ref, data, cfg, checkpoint=tmp_path / "no" / "tune.pt")
    with pytest.raises(TypeError, match="checkpoint"):
        finetune_(copy.deepcopy(model), ref, data, cfg, checkpoint=3)  # type: ignore[arg-type]
