"""Rotary position embeddings, for centring keys on their *pre-RoPE* mean.

Keys carry large per-channel means before the rotary embedding; after it, the mean of channel pair j rotates
with the position (angle ``θ_j p``), so a constant mean removes it only for the slowest pairs and the rest
inflates the variance the code must cover (SmolLM2-135M: the optimal score error of the coded keys is 2.2x
lower once the rotating mean ``R_p μ`` is subtracted; KVQuant, Hooper et al. 2024, codes keys pre-RoPE for the
same reason). Subtracting ``R_p μ`` keeps the keys post-RoPE, so the scores still come from the codes through
one table per query; the mean's share of the score, ``<q, R_p μ> = (q∘μ)·cos_p + (q∘rot(μ))·sin_p``, is one
small matmul over the cached positions.

Convention: the "rotate half" form of Llama/Mistral/Qwen in transformers, ``R_p x = x cos_p + rot(x) sin_p``
with ``rot(x) = (-x[D/2:], x[:D/2])`` and ``cos_p, sin_p`` of shape ``(D,)`` (each frequency twice).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

__all__ = ["RotaryTable", "rotate_half", "apply_rotary", "unapply_rotary"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x[..., D/2:], x[..., :D/2])``."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R_p x``: ``x (..., L, D)`` at positions whose ``cos, sin`` are ``(L, D)``."""
    return x * cos + rotate_half(x) * sin


def unapply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R_p^T x`` (the inverse rotation; exact up to rounding when ``cos² + sin² = 1``)."""
    return x * cos - rotate_half(x) * sin


#: Positions a table may hold: 2^24 (16.8M) tokens of context, 8 GB of float32 [cos | sin] at head dim 64; a
#: larger ``stop`` is a mistake (an absolute position or a token id passed as a count), not a context.
MAX_POSITIONS = 1 << 24


class RotaryTable:
    """``cos, sin`` of positions ``0 .. n-1`` (float32, ``(n, D)``), computed once and grown on demand; one
    table serves every layer of a cache.

    Parameters
    ----------
    fn : callable ``positions (n,) LongTensor -> (cos, sin)``, each ``(n, D)`` (or broadcastable to it, e.g.
        ``(1, n, D)`` as a transformers rotary module returns)
    head_dim : D (even)
    """

    def __init__(self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], head_dim: int):
        if not callable(fn):
            raise TypeError("fn must be callable: positions -> (cos, sin)")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
        self.fn, self.head_dim = fn, head_dim
        self._cs = torch.zeros((0, 2 * head_dim))  # [cos | sin] per position: one matmul scores the mean
        # [cos | sin] of the first half of the channels, while both halves carry the same frequencies (the
        # Llama layout): half the bytes read per score
        self._half: torch.Tensor | None = torch.zeros((0, head_dim))

    @classmethod
    def from_model(cls, model) -> RotaryTable:
        """The table of a transformers decoder (its ``rotary_emb`` module, e.g. ``model.model.rotary_emb``)."""
        if not hasattr(model, "named_modules"):
            raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
        rot = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
        if rot is None:
            raise ValueError("model has no rotary_emb module (not a RoPE decoder?)")
        if not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(iter(rot.buffers()), None)
        device = p.device if p is not None else torch.device("cpu")

        @torch.no_grad()
        def fn(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.zeros((1, positions.numel(), D), device=device)
            return rot(x, positions.reshape(1, -1).to(device))

        return cls(fn, int(D))

    def get_cat(self, start: int, stop: int) -> torch.Tensor:
        """``[cos | sin]`` of positions ``start .. stop-1``: a ``(stop - start, 2 D)`` float32 view (no copy)."""
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not hasattr(type(v), "__index__"):  # ints, numpy ints, 0-d integer tensors
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        start, stop = operator.index(start), operator.index(stop)
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
        if stop > MAX_POSITIONS:
            raise ValueError(f"stop={stop} is past the {MAX_POSITIONS} positions a table holds")
        n = self._cs.shape[0]
        if stop > n:
            new = max(stop, 2 * n, 256)  # doubling: amortized O(1) per decoded token
            D = self.head_dim
            out = self.fn(torch.arange(n, new))
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError(f"the rotary function must return (cos, sin), got {type(out).__name__}")
            try:
                cos, sin = (torch.as_tensor(t).to(torch.float32) for t in out)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"the rotary function must return two tensors (cos, sin): {e}") from None
            for t in (cos, sin):
                if t.numel() != (new - n) * D:
                    raise ValueError(
                        f"the rotary function returned {tuple(t.shape)} for {new - n} positions; expected "
                        f"({new - n}, head_dim={D}) values"
                    )
            cos, sin = cos.reshape(new - n, D), sin.reshape(new - n, D)
            if not (bool(torch.isfinite(cos).all()) and bool(torch.isfinite(sin).all())):
                raise ValueError("the rotary function returned non-finite cos/sin")
            self._cs = torch.cat((self._cs.to(cos.device), torch.cat((cos, sin), dim=-1)))
            h = D // 2
            if self._half is not None and torch.equal(cos[:, :h], cos[:, h:]) and torch.equal(sin[:, :h], sin[:, h:]):
                self._half = torch.cat((self._half.to(cos.device), torch.cat((cos[:, :h], sin[:, :h]), dim=-1)))
            else:
                self._half = None
        return self._cs[start:stop]

    def mean_scores(self, q: torch.Tensor, mu: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``<q, R_p mu>`` for positions ``p = start .. stop-1``: ``q (..., R, D)``, ``mu`` broadcastable to it
        -> ``(..., R, stop - start)``. One matmul against the table (``D`` wide when the two halves of the
        channels share their frequencies, else ``2 D``)."""
        self.get_cat(start, stop)  # (checks start and stop)
        qm, table = self.mean_query(q, mu, stop)
        return qm @ table[start:stop].to(qm.device).T

    def mean_query(self, q: torch.Tensor, mu: torch.Tensor, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qm, table)`` with ``<q, R_p mu> = <qm, table[p]>`` for every ``p < stop`` (the table grown to hold
        ``stop`` positions): ``qm (..., R, W)``, ``table (>= stop, W)``, W = D or 2 D (see :meth:`mean_scores`)."""
        table = self.mean_table(stop)
        a, b = q * mu, q * rotate_half(mu)
        if self._half is not None:
            h = self.head_dim // 2
            return torch.cat((a[..., :h] + a[..., h:], b[..., :h] + b[..., h:]), dim=-1), table
        return torch.cat((a, b), dim=-1), table

    def mean_table(self, stop: int) -> torch.Tensor:
        """The table of :meth:`mean_query`, grown to hold ``stop`` positions: ``(>= stop, W)``."""
        self.get_cat(0, stop)
        return self._cs if self._half is None else self._half

    def cat_table(self, stop: int) -> torch.Tensor:
        """The whole ``[cos | sin]`` table, grown to hold ``stop`` positions: ``(>= stop, 2 D)`` (the same tensor
        until it grows again: kernels that index it by position take it without a view)."""
        self.get_cat(0, stop)
        return self._cs

    def get(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of positions ``start .. stop-1``, each a ``(stop - start, D)`` float32 view."""
        cs = self.get_cat(start, stop)
        return cs[:, : self.head_dim], cs[:, self.head_dim :]
