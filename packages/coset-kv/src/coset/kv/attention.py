"""Masked softmax attention of grouped queries over scores that come from several cache parts.

Shared by the coded store (:mod:`coset.kv.coded_store`); independent of transformers. Masks follow the
transformers conventions: ``None`` (no padding; causal when there is more than one query, the queries being
the last ``Lq`` positions), a boolean mask ``(B, 1 or Hq, Lq, >= Lk)`` with True = attend, or an additive
float mask of the same shape.
"""

from __future__ import annotations

import torch

__all__ = ["masked_softmax"]


def masked_softmax(scores: torch.Tensor, mask, num_kv_heads: int) -> torch.Tensor:
    """Softmax over the last axis of ``scores (B, H, G, Lq, Lk)`` (H = KV heads, G query heads per KV head).

    An additive mask may hold ``-inf`` (and ``+inf``): masked scores are clamped to the float range, so a row
    whose keys are all masked gets uniform weights, as with a boolean mask, instead of NaN.

    Raises
    ------
    TypeError for a mask that is not a tensor or None; ValueError for a mask of the wrong shape or with NaN.
    """
    B, H, G, Lq, Lk = scores.shape
    if mask is None:
        if Lq > 1:
            i = torch.arange(Lq, device=scores.device).view(Lq, 1)
            j = torch.arange(Lk, device=scores.device).view(1, Lk)
            scores = scores.masked_fill(j > i + (Lk - Lq), torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.ndim != 4 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H * G) or mask.shape[2] != Lq:
        raise ValueError(f"attention_mask must have shape (B, 1 or Hq, Lq={Lq}, >= Lk), got {tuple(mask.shape)}")
    if mask.shape[-1] < Lk:
        raise ValueError(f"attention_mask covers {mask.shape[-1]} keys, the cache has {Lk}")
    m = mask[..., :Lk]
    m = m.reshape(m.shape[0], 1, 1, Lq, Lk) if m.shape[1] == 1 else m.reshape(m.shape[0], H, G, Lq, Lk)
    if m.dtype == torch.bool:
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    else:
        m = m.to(scores.dtype)
        if bool(torch.isnan(m).any()):
            raise ValueError("attention_mask contains NaN")
        fi = torch.finfo(scores.dtype)
        scores = (scores + m).clamp(min=fi.min, max=fi.max)
    return torch.softmax(scores, dim=-1)
