"""The key transform that minimises the score error of coded keys: the matrix geometric mean of the key and
query second moments, stored as a low-rank correction of the identity.

Keys are coded as ``k' = T (k - mu)`` (then rotated, normalised and encoded with white error ``e`` of variance
``sigma^2`` proportional to ``E||k'||^2 = tr(T S_k T^T)``) and queries are mapped to ``q' = T^-T q``, so
``<q', k'> = <q, k - mu>`` exactly. The score error ``<q', e>`` has variance ``sigma^2 tr(T^-T S_q T^-1)``, so
the expected squared score error is proportional to ``tr(P S_k) tr(P^-1 S_q)`` with ``P = T^T T``. Its minimum
over SPD ``P`` is ``P = S_k^-1 # S_q`` (the geometric mean ``A # B = A^1/2 (A^-1/2 B A^-1/2)^1/2 A^1/2``),
where it equals ``tr((S_k^1/2 S_q S_k^1/2)^1/2)^2`` (stationarity: ``P S_k P = c S_q``). A diagonal ``P``
(per-channel scales, :func:`coset.kv.hf_cache.calibrate_key_scales`) is the restriction of this to diagonal
matrices, where the optimum is ``p_c = (E[q_c^2] / E[k_c^2])^1/2``.

The overall scale of ``T`` does not matter (the code normalises every vector), so ``T = I + V diag(g - 1) V^T``
keeps only the ``r`` eigen-directions of ``P^1/2`` whose gains ``g`` (relative to the median eigenvalue) are
furthest from 1: ``r (D + 1)`` numbers per head instead of ``D^2``. On SmolLM2-135M the default rank 8 scores
within 8% of the full optimum (rank 16: 4%), the best diagonal 1.33x worse, no transform 2.24x; in perplexity
ranks 8, 16 and 64 are alike (``benchmarks/results/kv.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KeyTransform", "key_transform", "score_error_factor"]


@dataclass(frozen=True, eq=False)
class KeyTransform:
    """``T = I + V diag(g - 1) V^T`` per KV head, stored in float16.

    Attributes
    ----------
    vectors : (..., D, r) float16, orthonormal columns (up to float16 rounding)
    gains : (..., r) float16, > 0
    """

    vectors: torch.Tensor
    gains: torch.Tensor

    def __post_init__(self):
        for name, x in (("vectors", self.vectors), ("gains", self.gains)):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float16:
                raise TypeError(f"KeyTransform.{name} must be a float16 torch.Tensor")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"KeyTransform.{name} must be finite")
        if self.vectors.ndim < 2 or self.gains.shape != self.vectors.shape[:-2] + self.vectors.shape[-1:]:
            raise ValueError(
                f"KeyTransform.vectors (..., D, r) and gains (..., r) do not match: {tuple(self.vectors.shape)}, "
                f"{tuple(self.gains.shape)}"
            )
        if not bool((self.gains > 0).all()):
            raise ValueError("KeyTransform.gains must be > 0")

    @property
    def rank(self) -> int:
        return self.vectors.shape[-1]

    @property
    def nbytes(self) -> int:
        return (self.vectors.numel() + self.gains.numel()) * 2

    def matrix(self) -> torch.Tensor:
        """``(..., D, D)`` float32 ``T``."""
        v, g = self.vectors.to(torch.float32), self.gains.to(torch.float32)
        eye = torch.eye(v.shape[-2], dtype=torch.float32, device=v.device)
        return eye + (v * (g - 1).unsqueeze(-2)) @ v.transpose(-1, -2)


def _check_moments(sigma_k: torch.Tensor, sigma_q: torch.Tensor) -> None:
    for name, s in (("sigma_k", sigma_k), ("sigma_q", sigma_q)):
        if not isinstance(s, torch.Tensor) or not s.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if s.ndim < 2 or s.shape[-1] != s.shape[-2] or s.shape[-1] < 1:
            raise ValueError(f"{name} must have shape (..., D, D) with D >= 1, got {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if sigma_k.shape != sigma_q.shape:
        raise ValueError(f"sigma_k {tuple(sigma_k.shape)} and sigma_q {tuple(sigma_q.shape)} differ")


def _spd_power(s: torch.Tensor, p: float) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=torch.finfo(s.dtype).tiny).pow(p).unsqueeze(-2)) @ v.transpose(-1, -2)


def _regularised(s: torch.Tensor, ridge: float) -> torch.Tensor:
    s = 0.5 * (s + s.transpose(-1, -2))
    d = s.shape[-1]
    mean = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)
    return s + (ridge * mean)[..., None, None] * torch.eye(d, dtype=s.dtype, device=s.device)


def check_options(ridge: float, rank: int | None, head_dim: int | None = None) -> None:
    """ValueError unless ``0 < ridge < 1`` and ``rank`` is None or an int in ``[1, head_dim]`` (``>= 1`` when the
    head dim is not known yet: callers check before the calibration forward, not after it)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge < 1:
        raise ValueError(f"ridge must be a number in (0, 1), got {ridge!r}")
    top = head_dim if head_dim is not None else float("inf")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top):
        raise ValueError(f"rank must be an int in [1, {head_dim or 'head_dim'}] or None, got {rank!r}")


def geometric_mean_p(sigma_k: torch.Tensor, sigma_q: torch.Tensor, ridge: float) -> torch.Tensor:
    """``P = S_k^-1 # S_q`` of the regularised moments, ``(..., D, D)`` float64 (symmetric)."""
    sk = _regularised(sigma_k.to(torch.float64), ridge)
    sq = _regularised(sigma_q.to(torch.float64), ridge)
    a, a_inv = _spd_power(sk, -0.5), _spd_power(sk, 0.5)  # A = S_k^-1: A^1/2 and A^-1/2
    p = a @ _spd_power(a_inv @ sq @ a_inv, 0.5) @ a
    return 0.5 * (p + p.transpose(-1, -2))


def key_transform(
    sigma_k: torch.Tensor, sigma_q: torch.Tensor, ridge: float = 1e-3, rank: int | None = 8
) -> KeyTransform:
    """The ``T`` (``P^1/2`` with ``P = S_k^-1 # S_q``, up to scale) that minimises ``tr(P S_k) tr(P^-1 S_q)``,
    kept to its ``rank`` most important eigen-directions.

    Parameters
    ----------
    sigma_k : (..., D, D) second moment of the (centred) keys, e.g. per KV head
    sigma_q : (..., D, D) second moment of the queries that score them (uncentred: a constant query component
        scores every key)
    ridge : both moments get ``ridge * mean(diag)`` added (a direction never seen in calibration is neither
        amplified nor suppressed without bound)
    rank : eigen-directions kept (those whose eigenvalue is furthest, in log, from the median; the others get
        gain 1); None or D = the full optimum

    Returns
    -------
    KeyTransform with ``vectors (..., D, rank)``, ``gains (..., rank)``
    """
    _check_moments(sigma_k, sigma_q)
    D = sigma_k.shape[-1]
    check_options(ridge, rank, D)
    rank = D if rank is None else rank
    w, v = torch.linalg.eigh(geometric_mean_p(sigma_k, sigma_q, ridge))
    logg = 0.5 * w.clamp(min=torch.finfo(w.dtype).tiny).log()  # eigenvalues of T = P^1/2, in log
    logg = logg - logg.median(dim=-1, keepdim=True).values  # T up to scale: the median direction gets gain 1
    keep = logg.abs().argsort(dim=-1, descending=True)[..., :rank]
    vec = v.gather(-1, keep.unsqueeze(-2).expand(*v.shape[:-1], rank))
    gains = logg.gather(-1, keep).exp().to(torch.float16)
    if not bool(torch.isfinite(gains).all()) or not bool((gains > 0).all()):
        raise ValueError(
            f"sigma_k and sigma_q are too ill-conditioned for ridge={ridge!r}: the transform's gains leave the "
            "float16 range; use a larger ridge"
        )
    return KeyTransform(vec.to(torch.float16), gains)


def score_error_factor(
    sigma_k: torch.Tensor, sigma_q: torch.Tensor, transform: KeyTransform | torch.Tensor | None
) -> torch.Tensor:
    """``tr(T S_k T^T) tr(T^-T S_q T^-1)`` for the key transform ``T`` (a :class:`KeyTransform`, a ``(..., D,
    D)`` matrix, a ``(..., D)`` diagonal, or None for the identity): proportional to the expected squared score
    error of the code at a fixed rate (module docstring). Returns ``(...)`` float64.

    Raises
    ------
    TypeError / ValueError for moments as :func:`key_transform`, or a transform of the wrong type or shape,
    non-finite or singular."""
    _check_moments(sigma_k, sigma_q)
    sk, sq = sigma_k.to(torch.float64), sigma_q.to(torch.float64)
    D = sk.shape[-1]
    if transform is None:
        t = torch.eye(D, dtype=torch.float64).expand_as(sk)
    elif isinstance(transform, KeyTransform):
        t = transform.matrix().to(torch.float64)
    elif isinstance(transform, torch.Tensor) and not transform.is_complex():
        t = transform.to(torch.float64)
        t = torch.diag_embed(t) if t.ndim >= 1 and t.shape[-1] == D and t.ndim == sk.ndim - 1 else t
    else:
        raise TypeError(f"transform must be a KeyTransform, a tensor or None, got {type(transform).__name__}")
    if t.ndim < 2 or t.shape[-2:] != (D, D) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"transform must be finite, (..., {D}) diagonal or (..., {D}, {D}), got {tuple(t.shape)}")
    try:
        torch.broadcast_shapes(t.shape, sk.shape)
    except RuntimeError:
        raise ValueError(f"transform {tuple(t.shape)} does not broadcast with the moments {tuple(sk.shape)}") from None
    ti, info = torch.linalg.inv_ex(t)
    if bool((info != 0).any()) or not bool(torch.isfinite(ti).all()):
        raise ValueError("transform is singular")
    tk = torch.diagonal(t @ sk @ t.transpose(-1, -2), dim1=-2, dim2=-1).sum(-1)
    tq = torch.diagonal(ti.transpose(-1, -2) @ sq @ ti, dim1=-2, dim2=-1).sum(-1)
    return tk * tq
