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
) -> tuple[float, float]:
    """Return ``(beta, mse)`` minimising the per-dimension MSE of ``quantize`` on ``x`` (..., d).

    The default grid is ``beta_min * (1 + 0.05 k)``, k = 0..39, with beta_min from the data's std (paper.md §5.1).
    """
    config = config if config is not None else QuantizationConfig()
    if grid is None:
        sigma = float(x.double().std()) or 1.0
        b0 = beta_min(config, sigma)
        grid = [b0 * (1 + 0.05 * k) for k in range(40)]
    best = (math.inf, math.inf)
    for beta in grid:
        xh = quantize(x, config=config.replace(beta=float(beta)))
        mse = float(((xh.double() - x.double()) ** 2).mean())
        if mse < best[1]:
            best = (float(beta), mse)
    return best
