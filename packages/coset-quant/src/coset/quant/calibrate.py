"""Choosing beta: a grid search of the scale that minimises the reconstruction MSE on sample data."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .config import QuantizationConfig
from .quantize import quantize

__all__ = ["beta_min", "calibrate_beta"]


def beta_min(config: QuantizationConfig, sigma: float = 1.0) -> float:
    """Smallest sensible beta for data of per-coordinate std ``sigma`` (LatticeQuant's grid start):
    ``sigma sqrt(d/(d+2)) / (q^M sqrt(sigma^2(L)))`` — the ball matching ``q^M V``'s second moment."""
    L = config.lattice
    d = L.dim
    return sigma * math.sqrt(d / (d + 2)) / (config.q**config.M * math.sqrt(L.second_moment))


def calibrate_beta(
    x: torch.Tensor,
    config: Optional[QuantizationConfig] = None,
    grid: Optional[Sequence[float]] = None,
    objective: str = "mse",
) -> tuple[float, float]:
    """Return ``(beta, mse)``: the beta of a grid that minimises ``objective`` for ``quantize`` on ``x`` (..., d).

    Parameters
    ----------
    x : (..., d) float tensor, sample data
    config : the code (its beta is ignored)
    grid : candidate betas; default ``beta_min * (1 + 0.05 k)``, k = -12..39 (0.4x .. 2.95x beta_min, with
        beta_min from the data's std, paper.md §5.1) — wide enough to contain the MSE optimum (~0.63 beta_min
        for D4 q=4 M=2) as well as the rate-aware one
    objective : ``"mse"`` (plain per-dimension MSE; it drifts to small beta with many T > 0 blocks) or
        ``"rd"`` (``mse * 2^(2 H(T)/d)``: the MSE at the effective rate once the empirical entropy of T is paid
        for, the paper's criterion; prefer it when T is stored)

    Returns
    -------
    (beta, mse) : the chosen beta and its per-dimension MSE
    """
    config = config if config is not None else QuantizationConfig()
    if objective not in ("mse", "rd"):
        raise ValueError(f"objective must be 'mse' or 'rd', got {objective!r}")
    if grid is None:
        sigma = float(x.double().std()) or 1.0
        b0 = beta_min(config, sigma)
        grid = [b0 * (1 + 0.05 * k) for k in range(-12, 40)]
    best = (math.inf, math.inf)
    best_f = math.inf
    d = config.dim
    for beta in grid:
        xh, T, _ = quantize(x, config=config.replace(beta=float(beta)), return_info=True)
        mse = float(((xh.double() - x.double()) ** 2).mean())
        f = mse
        if objective == "rd" and T.numel():
            counts = torch.bincount(T.reshape(-1).long()).double()
            p = counts[counts > 0] / T.numel()
            f = mse * 2.0 ** (2.0 * float(-(p * torch.log2(p)).sum()) / d)
        if f < best_f:
            best, best_f = (float(beta), mse), f
    return best
