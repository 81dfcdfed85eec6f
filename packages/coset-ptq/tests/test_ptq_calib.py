"""coset.ptq.calib: Hessians against brute force, the sequential driver's propagation, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coset.ptq.block_tuning import BlockTuneConfig
from coset.ptq.calib import (
    HessianAccumulator,
    asymmetric_target,
    capture_block_inputs,
    collect_hessians,
    find_blocks,
    sequential_quantize,
)


def brute_hessians(model, batches, names):
    """XᵀX/N of each named linear's input, by storing every input (float64)."""
    xs = {n: [] for n in names}
    hs = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hs:
        h.remove()
    out = {}
    for n in names:
        X = torch.cat(xs[n])
        out[n] = X.T @ X / X.shape[0]
    return out


def coarse(name, lin, H):
    """A destructive 'quantizer' so that propagation through quantized blocks is visible."""
    return torch.round(lin.weight.detach() * 50) / 50  # init std 0.02: ~2-3 levels


def test_accumulator_matches_brute_force_over_updates():
    g = torch.Generator().manual_seed(0)
    acc = HessianAccumulator(12)
    xs = [torch.randn(3, 5, 12, generator=g), torch.randn(7, 12, generator=g)]
    for x in xs:
        acc.update(x)
    X = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    assert acc.n_tokens == 22
    H = acc.finalize()
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, X.T @ X / 22, rtol=1e-6, atol=1e-7)
    assert torch.allclose(H, H.T)


def test_accumulator_bad_input():
    with pytest.raises(ValueError, match="n must"):
        HessianAccumulator(0)
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no tokens"):
        acc.finalize()
    with pytest.raises(ValueError, match="last dim"):
        acc.update(torch.zeros(2, 5))


@pytest.mark.parametrize("kind, prefix", [("llama", "model.layers"), ("bert", "encoder.layer")])
def test_find_blocks(kind, prefix, makers):
    name, blocks = find_blocks(makers[kind]())
    assert name == prefix and len(blocks) == 2


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_collect_hessians_equal_brute_force_and_share_inputs(kind, calib_ids, makers):
    make = makers[kind]
    model = make()
    Hs = collect_hessians(model, calib_ids)
    assert len(Hs) == (14 if kind == "llama" else 12)
    ref = brute_hessians(model, calib_ids, list(Hs))
    for n, H in Hs.items():
        torch.testing.assert_close(H, ref[n], rtol=1e-5, atol=1e-6)
    if kind == "llama":  # q/k/v read the same tensor: one accumulator, one tensor object
        p = "model.layers.0.self_attn."
        assert Hs[p + "q_proj"] is Hs[p + "k_proj"] is Hs[p + "v_proj"]
        assert Hs[p + "q_proj"] is not Hs[p + "o_proj"]


def test_sequential_identity_leaves_model_unchanged(calib_ids, makers):
    model, ref = makers["llama"](), makers["llama"]()
    seen = []
    res = sequential_quantize(model, calib_ids, lambda n, lin, H: seen.append(n))
    assert res.layers == seen and len(seen) == 14 and all(v == 64 * 4 for v in res.n_tokens.values())
    x = calib_ids[0]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sequential_hessians_see_quantized_upstream_blocks(kind, calib_ids, makers):
    """Block 1's Hessians are those of the model whose block 0 is already quantized (GPTQ-style), not the
    float model's."""
    make = makers[kind]
    model = make()
    float_H = collect_hessians(make(), calib_ids)
    got = {}

    def qfn(name, lin, H):
        got[name] = H
        return coarse(name, lin, H)

    sequential_quantize(model, calib_ids, qfn)
    # after the run, block 1's first linears (q/k/v) read inputs that depend only on the quantized block 0
    names = [n for n in got if ".1." in n][:3]
    ref = brute_hessians(model, calib_ids, names)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[n], float_H[n], rtol=1e-3, atol=1e-5)
    # block 0's first linear sees the float inputs
    n0 = next(iter(got))
    torch.testing.assert_close(got[n0], float_H[n0], rtol=1e-5, atol=1e-6)


def test_true_sequential_orders_groups_inside_a_block(calib_ids, makers):
    """With true_sequential, o_proj's Hessian comes after q/k/v were quantized; without, from the float block."""
    p = "model.layers.0.self_attn.o_proj"
    float_H = collect_hessians(makers["llama"](), calib_ids)[p]
    for ts in (False, True):
        model, got = makers["llama"](), {}

        def qfn(name, lin, H, got=got):
            got[name] = H
            return coarse(name, lin, H)

        sequential_quantize(model, calib_ids, qfn, true_sequential=ts)
        if ts:
            ref = brute_hessians(model, calib_ids, [p])[p]
            torch.testing.assert_close(got[p], ref, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got[p], float_H, rtol=1e-3, atol=1e-5)
        else:
            torch.testing.assert_close(got[p], float_H, rtol=1e-5, atol=1e-6)


def test_quantize_fn_module_replacement_and_include(calib_ids, makers):
    model = makers["llama"]()
    res = sequential_quantize(
        model,
        calib_ids,
        lambda n, lin, H: nn.Sequential(lin) if n.endswith("down_proj") else None,
        include=lambda n: "mlp" in n,
    )
    assert all("mlp" in n for n in res.layers) and len(res.layers) == 6
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Sequential)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)


def test_bad_input(calib_ids, makers):
    with pytest.raises(ValueError, match="no nn.Linear"):
        sequential_quantize(nn.Sequential(nn.ReLU()), calib_ids, coarse)
    with pytest.raises(ValueError, match="calib_batches is empty"):
        sequential_quantize(makers["llama"](), [], coarse)
    with pytest.raises(ValueError, match=r"calib_batches\[0\]"):
        sequential_quantize(makers["llama"](), [torch.randn(2, 8)], coarse)
    with pytest.raises(ValueError, match=r"calib_batches\[1\]"):
        sequential_quantize(makers["llama"](), [calib_ids[0], calib_ids[0][0]], coarse)
    with pytest.raises(ValueError, match=r"calib_batches\[0\]"):
        collect_hessians(makers["llama"](), [{"attention_mask": calib_ids[0]}])
    with pytest.raises(TypeError, match="quantize_fn"):
        sequential_quantize(makers["llama"](), calib_ids, None)
    with pytest.raises(ValueError, match="W_hat of shape"):
        sequential_quantize(makers["llama"](), calib_ids, lambda n, lin, H: torch.zeros(3, 3))


def brute_inputs(model, batches, name):
    """Every input of linear ``name`` (N, n) float64, by storing them."""
    xs = []
    h = model.get_submodule(name).register_forward_pre_hook(
        lambda mod, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
    )
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    h.remove()
    return torch.cat(xs)


def test_asymmetric_target_is_the_ridge_least_squares_solution():
    """argmin ‖X_q Ŵᵀ − X_f Wᵀ‖²/N + λ‖Ŵ − W‖² by lstsq on the augmented system; equal inputs give W."""
    g = torch.Generator().manual_seed(0)
    N, n, m = 200, 12, 5
    Xf = torch.randn(N, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, n, dtype=torch.float64)
    Xq = Xf + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    H, C = Xq.T @ Xq / N, Xq.T @ (Xf - Xq) / N
    damp = 0.05
    lam = damp * float(torch.diagonal(H).mean())
    A = torch.cat([Xq / N**0.5, lam**0.5 * torch.eye(n, dtype=torch.float64)])
    B = torch.cat([Xf @ W.T / N**0.5, lam**0.5 * W.T])
    ref = torch.linalg.lstsq(A, B).solution.T
    got = asymmetric_target(W, H, C, damp)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    # it beats W on the output error it is built for
    err = lambda V: float(((Xq @ V.T - Xf @ W.T) ** 2).sum())  # noqa: E731
    assert err(got) < 0.9 * err(W)
    zero = torch.zeros(n, n, dtype=torch.float64)
    assert torch.equal(asymmetric_target(W, H, zero, damp), W)  # no drift: W exactly
    assert torch.equal(asymmetric_target(W, zero, zero), W)  # no signal: nothing to correct
    with pytest.raises(ValueError, match="damp"):
        asymmetric_target(W, H, C, 0.0)
    with pytest.raises(ValueError, match=r"W \(m, n\)"):
        asymmetric_target(W, H[:-1, :-1], C)


def test_sequential_asymmetric_quantizes_toward_the_float_outputs(calib_ids, makers):
    """Each linear handed to quantize_fn holds asymmetric_target(W, Σ_qq, Σ_qf) of the inputs of the model
    as quantized so far (X_q) and of the float model (X_f); block 0 (identical inputs) keeps W."""
    model, floatm = makers["llama"](), makers["llama"]()
    W0 = {n: m.weight.detach().clone() for n, m in floatm.named_modules() if isinstance(m, nn.Linear)}
    seen = {}

    def qfn(name, lin, H):
        seen[name] = (lin.weight.detach().clone(), H)
        return coarse(name, lin, H) if ".0." in name else None  # block 1 keeps its corrected float weight

    sequential_quantize(model, calib_ids, qfn, asymmetric=True, asym_damp=0.01)
    q0 = "model.layers.0.self_attn.q_proj"
    assert torch.equal(seen[q0][0], W0[q0])  # identical inputs: no drift, W exactly
    q1 = "model.layers.1.self_attn.q_proj"
    Xq, Xf = brute_inputs(model, calib_ids, q1), brute_inputs(floatm, calib_ids, q1)
    H, C = Xq.T @ Xq / len(Xq), Xq.T @ (Xf - Xq) / len(Xq)
    torch.testing.assert_close(seen[q1][1], H, rtol=1e-5, atol=1e-6)
    ref = asymmetric_target(W0[q1], H, C, 0.01).float()
    torch.testing.assert_close(seen[q1][0], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref, W0[q1], rtol=1e-3, atol=1e-4)  # the drift of block 0 is corrected
    # and that correction lowers q_proj's output error against the float model
    W = W0[q1].double()
    err = lambda V: float(((Xq @ V.T - Xf @ W.T) ** 2).sum())  # noqa: E731
    assert err(seen[q1][0].double()) < err(W)


def test_asymmetric_bad_input(calib_ids, makers):
    with pytest.raises(TypeError, match="asymmetric"):
        sequential_quantize(makers["llama"](), calib_ids, coarse, asymmetric=1)
    with pytest.raises(ValueError, match="asym_damp"):
        sequential_quantize(makers["llama"](), calib_ids, coarse, asymmetric=True, asym_damp=-1.0)


def test_capture_block_inputs_records_every_batch(calib_ids, makers):
    model = makers["llama"]()
    inp = capture_block_inputs(model, model.model.layers[0], calib_ids)
    assert len(inp.hidden) == 4 and inp.hidden[0].shape == (2, 32, 64)
    with torch.no_grad():
        emb = model.model.embed_tokens(calib_ids[2])
    torch.testing.assert_close(inp.hidden[2], emb)
    assert model.config.use_cache is not False or True  # restored (no exception path)


def _final_error(model, ref, calib_ids):
    with torch.no_grad():
        num = sum(float((model(input_ids=b).logits - ref(input_ids=b).logits).pow(2).sum()) for b in calib_ids)
        den = sum(float(ref(input_ids=b).logits.pow(2).sum()) for b in calib_ids)
    return num / den


@pytest.mark.parametrize("target", ["float", "block"])
def test_sequential_block_tuning_tunes_later_groups_before_quantizing_them(calib_ids, makers, target):
    """q/k/v are quantized from the float weights; the later groups are tuned first (their weights as handed
    to quantize_fn differ from the float ones), their Hessians are collected after the tuning, and the
    quantized model is closer to the float one than the same quantizer without tuning."""
    ref = makers["llama"]()
    W0 = {n: m.weight.detach().clone() for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    seen = {}

    def qfn(name, lin, H):
        seen[name] = (lin.weight.detach().clone(), H)
        return coarse(name, lin, H)

    model = makers["llama"]()
    res = sequential_quantize(model, calib_ids, qfn, block_tune=BlockTuneConfig(epochs=4, lr=2e-3, target=target))
    for b in (0, 1):
        for lin in ("q_proj", "k_proj", "v_proj"):  # the first group: nothing was quantized before it in the block
            n = f"model.layers.{b}.self_attn.{lin}"
            if b == 0:
                assert torch.equal(seen[n][0], W0[n])
    assert set(res.block_tuning) == {f"model.layers.{b}:{g}" for b in (0, 1) for g in (0, 1, 2)}
    assert any(r["kept"] for r in res.block_tuning.values())
    moved = [n for n in seen if "down_proj" in n or "o_proj" in n if not torch.equal(seen[n][0], W0[n])]
    assert moved  # tuned before being quantized
    # o_proj's Hessian: collected after q/k/v were quantized (its input does not depend on later tuning)
    o = "model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(seen[o][1], brute_hessians(model, calib_ids, [o])[o], rtol=1e-5, atol=1e-6)
    plain = makers["llama"]()
    sequential_quantize(plain, calib_ids, coarse, true_sequential=True)
    assert _final_error(model, ref, calib_ids) < _final_error(plain, ref, calib_ids)


def test_sequential_block_tuning_bad_input(calib_ids, makers):
    with pytest.raises(TypeError, match="block_tune"):
        sequential_quantize(makers["llama"](), calib_ids, coarse, block_tune={"lr": 1e-3})
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        sequential_quantize(makers["llama"](), calib_ids[:1], coarse, block_tune=BlockTuneConfig())
