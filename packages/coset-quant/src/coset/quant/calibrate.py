"""Choosing beta: a grid search of the scale that minimises a rate-distortion (default) or MSE objective."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from coset.lattice.validate import check_float_tensor, check_pos

from .config import ClampWarning, QuantizationConfig
from .quantize import quantize

__all__ = ["beta_min", "calibrate_beta", "DEFAULT_GRID_K", "EXTEND_STEPS", "EXTEND_FACTOR"]

#: Default grid: ``beta_min (1 + 0.05 k)`` for these k (0.4x .. 2.95x beta_min).
DEFAULT_GRID_K = range(-12, 40)
#: With the default grid, while the best beta sits at the grid's lower edge the grid is extended downwards by
#: this factor, at most this many times (the MSE objective can prefer betas far below beta_min: it does not
#: pay for the T side information).
EXTEND_FACTOR = 0.9
EXTEND_STEPS = 60


def beta_min(config: QuantizationConfig, sigma: float = 1.0) -> float:
    """Smallest sensible beta for data of per-coordinate std ``sigma`` (LatticeQuant's grid start):
    ``sigma sqrt(d/(d+2)) / (q^M sqrt(sigma^2(L)))`` — the ball matching ``q^M V``'s second moment.

    Raises
    ------
    TypeError for a non-config; TypeError/ValueError for a ``sigma`` that is not a finite number > 0.
    """
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    sigma = check_pos("sigma", sigma)
    L = config.lattice
    d = L.dim
    return sigma * math.sqrt(d / (d + 2)) / (config.q**config.M * math.sqrt(L.second_moment))


def _objective(x: torch.Tensor, config: QuantizationConfig, beta: float, objective: str, d: int):
    with warnings.catch_warnings():  # a candidate beta that clamps is scored by its MSE, not reported
        warnings.simplefilter("ignore", ClampWarning)
        xh, T, _ = quantize(x, config=config.replace(beta=beta), return_info=True)
    mse = float(((xh.double() - x.double()) ** 2).mean())
    if objective == "mse" or T.numel() == 0:
        return mse, mse
    counts = torch.bincount(T.reshape(-1).long()).double()
    p = counts[counts > 0] / T.numel()
    return mse, mse * 2.0 ** (2.0 * float(-(p * torch.log2(p)).sum()) / d)


def calibrate_beta(
    x: torch.Tensor,
    config: QuantizationConfig | None = None,
    grid: Sequence[float] | None = None,
    objective: str = "rd",
) -> tuple[float, float]:
    """Return ``(beta, mse)``: the beta of a grid that minimises ``objective`` for ``quantize`` on ``x`` (..., d).

    Parameters
    ----------
    x : (..., d) float tensor, sample data (non-empty, finite)
    config : the code (its beta is ignored)
    grid : candidate betas (finite, > 0). Default: ``beta_min (1 + 0.05 k)``, k = -12..39 (0.4x .. 2.95x
        beta_min, with beta_min from the data's std), extended downwards by factors of 0.9 (at most 60 times)
        while the best beta sits at its lower edge, so the returned beta is a minimum inside the searched range
        unless that range is exhausted.
    objective : ``"rd"`` (default; ``mse * 2^(2 H(T)/d)``: the MSE at the effective rate once the empirical
        entropy of T is paid for, the paper's criterion) or ``"mse"`` (the plain per-dimension MSE; it does not
        charge the T side information, so it prefers small betas with many T > 0 blocks, often far below
        beta_min with alpha = 1)

    Returns
    -------
    (beta, mse) : the chosen beta and its per-dimension MSE

    Raises
    ------
    TypeError for a non-tensor or non-float ``x`` or a bad config; ValueError for an empty or non-finite ``x``,
    a wrong last dimension, an unknown objective, or an empty grid / a grid entry that is not a finite number > 0.
    """
    config = config if config is not None else QuantizationConfig()
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if objective not in ("mse", "rd"):
        raise ValueError(f"objective must be 'mse' or 'rd', got {objective!r}")
    d = config.dim
    check_float_tensor("x", x, d)
    if x.numel() == 0:
        raise ValueError("x must hold at least one vector to calibrate on")
    extend = grid is None
    if grid is None:
        sigma = float(x.double().std()) if x.numel() > 1 else 0.0
        b0 = beta_min(config, sigma if math.isfinite(sigma) and sigma > 0 else 1.0)
        grid = [b0 * (1 + 0.05 * k) for k in DEFAULT_GRID_K]
    else:
        grid = list(grid)
        if not grid:
            raise ValueError("grid must hold at least one beta")
        grid = [check_pos(f"grid[{i}]", b) for i, b in enumerate(grid)]
    evals = [(float(b), *_objective(x, config, float(b), objective, d)) for b in grid]
    best = min(evals, key=lambda e: e[2])
    if extend:
        lo = min(evals, key=lambda e: e[0])
        cur = lo
        for _ in range(EXTEND_STEPS):
            if best is not cur and best[0] != cur[0]:
                break  # the minimum is inside the range searched
            nb = cur[0] * EXTEND_FACTOR
            if nb < 2.0**-1000:
                break
            cur = (nb, *_objective(x, config, nb, objective, d))
            if cur[2] < best[2]:
                best = cur
    return best[0], best[1]
