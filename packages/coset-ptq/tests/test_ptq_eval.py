"""coset.ptq.eval: known answers on tiny random models (identical → perfect; perturbed → strictly worse)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from coset.ptq.eval import embed, embedding_fidelity, lm_fidelity, lm_reference, spearman

TEXTS = [
    f"passage {i}: "
    + " ".join(["alpha", "beta", "gamma", "delta", "eps"][j % 5] * (1 + (i * j) % 3) for j in range(3 + i % 7))
    for i in range(40)
]


def perturbed(model, scale, seed=0):
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(scale * m.weight.std() * torch.randn(m.weight.shape, generator=g))
    return q


def test_spearman_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    closed = 1 - 6 * ((ra - rb) ** 2).sum() / (50 * (50**2 - 1))
    assert spearman(a, b) == pytest.approx(float(closed), abs=1e-12)
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # monotone transform
    assert spearman(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman(a, b[:10])


def test_embed_is_masked_mean_pool_normalized(bert, tiny_tokenizer):
    e = embed(bert, tiny_tokenizer, TEXTS[:5], batch_size=2)
    assert e.shape == (5, 64)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    # a single text alone (no padding) gives the same embedding as inside a padded batch
    for i in range(5):
        torch.testing.assert_close(embed(bert, tiny_tokenizer, [TEXTS[i]])[0], e[i], rtol=1e-4, atol=1e-5)


def test_embedding_fidelity_identical_then_worse(bert, tiny_tokenizer):
    same = embedding_fidelity(bert, copy.deepcopy(bert), tiny_tokenizer, TEXTS, k=5)
    assert same["cos_mean"] == pytest.approx(1.0, abs=1e-6) and same["cos_min"] == pytest.approx(1.0, abs=1e-6)
    assert same["overlap_at_k"] == 1.0 and same["recall_top1_at_k"] == 1.0
    assert same["spearman"] == pytest.approx(1.0, abs=1e-9)
    small = embedding_fidelity(bert, perturbed(bert, 0.05), tiny_tokenizer, TEXTS, k=5)
    large = embedding_fidelity(bert, perturbed(bert, 0.5), tiny_tokenizer, TEXTS, k=5)
    assert large["cos_mean"] < small["cos_mean"] < 1.0
    assert large["spearman"] < small["spearman"] < 1.0
    assert large["cos_min"] <= large["cos_p5"] <= large["cos_mean"]
    # precomputed reference embeddings give the same numbers
    ref = embed(bert, tiny_tokenizer, TEXTS)
    again = embedding_fidelity(None, perturbed(bert, 0.05), tiny_tokenizer, TEXTS, k=5, ref_embeddings=ref)
    assert again == pytest.approx(small)


def test_embedding_fidelity_bad_input(bert, tiny_tokenizer):
    with pytest.raises(ValueError, match="texts"):
        embedding_fidelity(bert, bert, tiny_tokenizer, [])
    with pytest.raises(ValueError, match="k must"):
        embedding_fidelity(bert, bert, tiny_tokenizer, TEXTS[:5], k=10)
    with pytest.raises(ValueError, match="ref_embeddings"):
        embedding_fidelity(None, bert, tiny_tokenizer, TEXTS, ref_embeddings=torch.zeros(3, 64))


def test_lm_fidelity_identical_then_worse(llama):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (200,), generator=g)
    same = lm_fidelity(llama, copy.deepcopy(llama), ids, seqlen=64)
    assert same["n_tokens"] == 3 * 63
    assert same["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and same["top1_agree"] == 1.0
    assert abs(same["kl"]) < 1e-6
    # reference ppl is exp(mean NLL) computed independently
    W = ids[:192].view(3, 64)
    with torch.no_grad():
        logits = llama(input_ids=W).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), W[:, 1:].reshape(-1))
    assert same["ppl_ref"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    small = lm_fidelity(llama, perturbed(llama, 0.3), ids, seqlen=64)
    large = lm_fidelity(llama, perturbed(llama, 3.0), ids, seqlen=64)
    assert 0 < small["kl"] < large["kl"]
    assert large["top1_agree"] <= small["top1_agree"] <= 1.0 and large["top1_agree"] < 1.0
    # the cached reference gives the same figures (fp32 cache: identical; fp16 cache: close)
    for dt, tol in ((torch.float32, 1e-9), (torch.float16, 1e-2)):
        cached = lm_fidelity(lm_reference(llama, ids, 64, dtype=dt), perturbed(llama, 0.3), None, seqlen=64)
        assert cached["ppl_ref"] == pytest.approx(small["ppl_ref"], rel=1e-9)
        assert cached["kl"] == pytest.approx(small["kl"], rel=tol, abs=1e-4 if dt == torch.float16 else 0)


def test_lm_fidelity_bad_input(llama):
    with pytest.raises(ValueError, match="fewer than one window"):
        lm_fidelity(llama, llama, torch.arange(10), seqlen=64)
    with pytest.raises(ValueError, match="integer"):
        lm_fidelity(llama, llama, torch.randn(100), seqlen=16)
    with pytest.raises(ValueError, match="seqlen"):
        lm_fidelity(llama, llama, torch.arange(100), seqlen=1)
    with pytest.raises(TypeError, match="ref"):
        lm_fidelity("model", llama, torch.arange(100), seqlen=16)
