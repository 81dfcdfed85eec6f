"""Fidelity of a quantized model to its float reference (sentence embeddings; causal LM).

- :func:`embed` / :func:`embedding_fidelity` — sentence embedding = attention-masked mean pooling of the last
  hidden state + L2 normalization (equals sentence-transformers' all-MiniLM-L6-v2 output). Metrics of the
  quantized vs the reference embeddings: per-text cosine (mean, 5th percentile, min), overlap of the top-k
  cosine neighbours (each text as a query, itself excluded), recall@k of the reference top-1, and the
  Spearman correlation of all pairwise similarities.
- :func:`lm_fidelity` — perplexity of both models on non-overlapping windows, their ratio, mean token
  ``KL(p_ref ‖ p_q)`` and top-1 agreement. :func:`lm_reference` precomputes the reference's log-probs once so
  a benchmark comparing many quantized models runs the reference only once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["embed", "embedding_fidelity", "lm_fidelity", "lm_reference", "LMReference", "spearman"]


def _texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError("texts must be a non-empty sequence of strings")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must contain only strings")
    return list(texts)


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 256
) -> torch.Tensor:
    """Sentence embeddings (N, hidden) float32, L2-normalized, in the order of ``texts``.

    Texts are batched by length (less padding); padding is excluded by the attention mask.
    """
    texts = _texts(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    chunks = []
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc = {k: v for k, v in dict(enc).items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        chunks.append((idx, F.normalize(pooled, dim=-1)))
    out = torch.empty((len(texts), chunks[0][1].shape[-1]))
    for idx, e in chunks:
        out[idx] = e
    return out


def _rank(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[torch.argsort(x)] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ranks by sort order; ties broken by position)."""
    if a.shape != b.shape or a.ndim != 1 or a.numel() < 2:
        raise ValueError("a and b must be 1-D tensors of the same length >= 2")
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embedding_fidelity(
    ref_model: nn.Module,
    q_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    k: int = 10,
    *,
    ref_embeddings: torch.Tensor | None = None,
    batch_size: int = 64,
    max_length: int = 256,
) -> dict[str, float]:
    """Agreement of the quantized model's sentence embeddings with the reference's.

    Parameters
    ----------
    ref_model, q_model : nn.Module
        Encoders returning ``last_hidden_state`` (e.g. ``BertModel``). ``ref_model`` may be None when
        ``ref_embeddings`` (from :func:`embed`) is given.
    tokenizer : HF tokenizer
    texts : sequence of str, N > k
    k : int
        Neighbourhood size for the overlap and recall metrics.

    Returns
    -------
    dict: cos_mean, cos_p5, cos_min, overlap_at_k (mean |top-k_ref ∩ top-k_q| / k), recall_top1_at_k
    (fraction of queries whose reference nearest neighbour is in the quantized top-k), spearman (pairwise
    similarities, upper triangle), n (texts), k.
    """
    texts = _texts(texts)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < len(texts) - 1:
        raise ValueError(f"k must be an int in [1, len(texts) - 2], got {k!r} for {len(texts)} texts")
    if ref_embeddings is None:
        if ref_model is None:
            raise ValueError("ref_model is None and no ref_embeddings were given")
        ref_embeddings = embed(ref_model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    elif ref_embeddings.shape[0] != len(texts):
        raise ValueError(f"ref_embeddings has {ref_embeddings.shape[0]} rows for {len(texts)} texts")
    e_r = ref_embeddings.double()
    e_q = embed(q_model, tokenizer, texts, batch_size=batch_size, max_length=max_length).double()
    cos = (e_r * e_q).sum(-1)
    n = len(texts)
    s_r, s_q = e_r @ e_r.T, e_q @ e_q.T
    eye = torch.eye(n, dtype=torch.bool)
    s_r.masked_fill_(eye, -torch.inf)
    s_q.masked_fill_(eye, -torch.inf)
    top_r = s_r.topk(k, dim=1).indices
    top_q = s_q.topk(k, dim=1).indices
    hit = torch.zeros((n, n), dtype=torch.bool)
    hit.scatter_(1, top_q, True)
    overlap = hit.gather(1, top_r).double().sum(1) / k
    recall1 = hit.gather(1, top_r[:, :1]).double().squeeze(1)
    iu = torch.triu_indices(n, n, offset=1)
    rho = spearman(s_r[iu[0], iu[1]], s_q[iu[0], iu[1]])
    return {
        "cos_mean": float(cos.mean()),
        "cos_p5": float(torch.quantile(cos, 0.05)),
        "cos_min": float(cos.min()),
        "overlap_at_k": float(overlap.mean()),
        "recall_top1_at_k": float(recall1.mean()),
        "spearman": rho,
        "n": n,
        "k": k,
    }


def _windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("ids must be an integer tensor (a 1-D token stream or (n, seqlen) windows)")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an int >= 2, got {seqlen!r}")
    if ids.ndim == 1:
        n = ids.numel() // seqlen
        if n == 0:
            raise ValueError(f"ids holds {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
        return ids[: n * seqlen].view(n, seqlen).long()
    if ids.ndim == 2 and ids.shape[1] >= 2 and ids.shape[0] >= 1:
        return ids.long()
    raise ValueError(f"ids must be 1-D or (n, seqlen) with seqlen >= 2, got shape {tuple(ids.shape)}")


@dataclass
class LMReference:
    """The reference model's log-probs (n, seqlen, vocab) on fixed windows (see :func:`lm_reference`)."""

    windows: torch.Tensor  # (n, seqlen) int64
    logprobs: list[torch.Tensor]  # per window (seqlen, vocab), stored in ``dtype``
    nll: float  # mean next-token NLL


@torch.no_grad()
def _logprobs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=window.unsqueeze(0), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.log_softmax(logits[0].float(), dim=-1)


def _nll(lp: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    return -lp[:-1].gather(1, window[1:, None]).squeeze(1).double()


@torch.no_grad()
def lm_reference(
    ref: nn.Module, ids: torch.Tensor, seqlen: int = 512, dtype: torch.dtype = torch.float16
) -> LMReference:
    """Run the reference once and keep its log-probs (``dtype``; fp16 halves the memory: 4k tokens ×
    49k vocab ≈ 0.4 GB)."""
    W = _windows(ids, seqlen)
    lps, nll = [], []
    for w in W:
        lp = _logprobs(ref, w)
        nll.append(_nll(lp, w))
        lps.append(lp.to(dtype))
    return LMReference(W, lps, float(torch.cat(nll).mean()))


@torch.no_grad()
def lm_fidelity(ref: nn.Module | LMReference, q: nn.Module, ids: torch.Tensor, seqlen: int = 512) -> dict[str, float]:
    """Perplexities, their ratio, mean token ``KL(p_ref ‖ p_q)`` (nats) and top-1 agreement.

    Parameters
    ----------
    ref : causal LM or :class:`LMReference`
    q : causal LM (``model(input_ids=...)`` returns ``.logits``)
    ids : LongTensor
        A 1-D token stream (cut into ``len // seqlen`` windows, the tail dropped) or (n, seqlen) windows;
        ignored when ``ref`` is an :class:`LMReference` (its windows are used).
    seqlen : int

    Returns
    -------
    dict: ppl_ref, ppl_q, ppl_ratio, kl (mean over all window positions), top1_agree, n_tokens (predicted
    tokens per model).
    """
    if isinstance(ref, LMReference):
        W = ref.windows
    else:
        if not isinstance(ref, nn.Module):
            raise TypeError(f"ref must be an nn.Module or an LMReference, got {type(ref).__name__}")
        W = _windows(ids, seqlen)
    nll_r, nll_q, kls, agree = [], [], [], []
    for i, w in enumerate(W):
        lr = ref.logprobs[i].float() if isinstance(ref, LMReference) else _logprobs(ref, w)
        lq = _logprobs(q, w)
        nll_r.append(_nll(lr, w))
        nll_q.append(_nll(lq, w))
        kls.append((lr.exp() * (lr - lq)).sum(-1).double())
        agree.append((lr.argmax(-1) == lq.argmax(-1)).double())
    mr, mq = float(torch.cat(nll_r).mean()), float(torch.cat(nll_q).mean())
    if isinstance(ref, LMReference):
        mr = ref.nll  # exact (float32) reference NLL, not the one from the stored low-precision log-probs
    ppl_r, ppl_q = float(torch.exp(torch.tensor(mr))), float(torch.exp(torch.tensor(mq)))
    return {
        "ppl_ref": ppl_r,
        "ppl_q": ppl_q,
        "ppl_ratio": ppl_q / ppl_r,
        "kl": float(torch.cat(kls).mean()),
        "top1_agree": float(torch.cat(agree).mean()),
        "n_tokens": int(sum(x.numel() for x in nll_q)),
    }
