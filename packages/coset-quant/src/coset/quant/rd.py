"""Rate-distortion evaluation of HNLQ and of uniform scalar quantizers on Gaussian data.

Used by ``benchmarks/bench_rd.py`` and the ``coset rd`` command. Everything is measured on the same
reproducible i.i.d. N(0, 1) sample (``gaussian_data(n, seed)``), per dimension:

* ``mse``: mean of ``(x - x_hat)^2`` over all scalars;
* ``snr_db``: ``10 log10(var(x) / mse)``;
* HNLQ rates (bits per dimension): ``rate_nominal = M log2 q`` (the labels) and
  ``rate_effective = M log2 q + H(T)/d``, where ``H(T)`` is the empirical entropy (bits) of the per-block
  scale index T (paper.md §5.1: what LatticeQuant charges for the overload side information);
* ``f = mse / 2^(-2 rate_effective)`` (the paper's figure of merit; 1 is Shannon's D(R) for a Gaussian) and
  ``snr_rate_adjusted_db = snr_db - 20 log10(2) H(T)/d``: the SNR with the side information's bits paid back at
  6.02 dB/bit, i.e. comparable with a quantizer of rate ``rate_nominal`` that sends no side information.

``beta`` is chosen on a grid: by default ``beta_min (1 + 0.05 k)`` for k = -10..39 (LatticeQuant's grid,
extended below beta_min because with alpha = 1/3 the optimum can sit at the grid's start), minimising ``f``
(``objective="rd"``, LatticeQuant's rule) or the plain MSE (``objective="mse"``, which ignores the cost of T
and therefore favours small beta and many overload steps).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from coset.lattice.validate import check_int

from coset.lattice import Lattice

from .calibrate import beta_min
from .config import MAX_T, QuantizationConfig
from .quantize import quantize

__all__ = ["gaussian_data", "entropy_bits", "hnlq_rd", "scalar_rd", "uniform_scalar_quantize"]

_LOG10_4 = 20.0 * math.log10(2.0)  # 6.0206 dB per bit


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` i.i.d. N(0, 1) float32 samples from a fixed CPU generator (the same data for every quantizer)."""
    check_int("n", n, 1)
    check_int("seed", seed, 0)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float32)


def entropy_bits(T: torch.Tensor) -> float:
    """Empirical entropy (bits) of an integer tensor's values."""
    if not isinstance(T, torch.Tensor) or T.dtype.is_floating_point:
        raise TypeError("T must be an integer tensor")
    if T.numel() == 0:
        return 0.0
    counts = torch.bincount(T.reshape(-1).long()).double()
    p = counts[counts > 0] / T.numel()
    return float(-(p * torch.log2(p)).sum())


def _snr(var: float, mse: float) -> float:
    return 10.0 * math.log10(var / mse) if mse > 0 else math.inf


def hnlq_rd(
    lattice_type: str = "D4",
    q: int = 4,
    M: int = 2,
    n: int = 1 << 20,
    seed: int = 0,
    alpha: Optional[float] = 1.0 / 3.0,
    betas: Optional[Sequence[float]] = None,
    *,
    config: Optional[QuantizationConfig] = None,
    objective: str = "rd",
    max_scaling_iterations: int = 30,
    x: Optional[torch.Tensor] = None,
    backend: str = "auto",
    center: Optional[bool] = None,
    return_grid: bool = False,
) -> dict:
    """Distortion and rate of HNLQ on Gaussian data at the best beta of a grid.

    Parameters
    ----------
    lattice_type, q, M : the code (ignored when ``config`` is given)
    n, seed : number of N(0,1) scalars (rounded down to a multiple of d) and the data seed
    alpha : ramp step; ``None`` takes ``config.alpha``
    betas : beta grid (default: ``beta_min (1 + 0.05 k)``, k = -10..39)
    config : a base configuration (lattice, q, M, dither, overload policy, ...); beta is overridden
    objective : ``"rd"`` (minimise ``f = mse / 2^(-2 rate_effective)``) or ``"mse"``
    max_scaling_iterations : cap of T (ignored when ``config`` is given)
    x : optional data (any shape, last dim a multiple of d) instead of ``gaussian_data(n, seed)``
    center : sets ``config.center`` (centre the constellation, :func:`coset.quant.constellation_offset`);
        ``None`` keeps the config's value (False for the default config)
    return_grid : also return every grid point under ``"grid"``

    Returns
    -------
    dict with lattice, q, M, d, alpha, beta, mse, snr_db, overload_rate (share of blocks with T > 0),
    clamp_rate, H_T (bits per block), mean_T, rate_nominal, rate_effective, f, snr_rate_adjusted_db,
    n_vectors, objective.
    """
    if config is None:
        check_int("max_scaling_iterations", max_scaling_iterations, 0, MAX_T)
        config = QuantizationConfig(lattice_type, q, M, max_scaling_iterations=max_scaling_iterations)
    elif not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if center is not None:
        if not isinstance(center, bool):
            raise TypeError(f"center must be a bool or None, got {type(center).__name__}")
        config = config.replace(center=center)
    if alpha is not None:
        config = config.replace(alpha=float(alpha) if not isinstance(alpha, bool) else alpha)
    if config.disable_scaling:
        raise ValueError("config.disable_scaling must be False: hnlq_rd searches beta")
    if objective not in ("rd", "mse"):
        raise ValueError(f"objective must be 'rd' or 'mse', got {objective!r}")
    d = config.dim
    if x is None:
        x = gaussian_data(n, seed)
    elif not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating torch.Tensor")
    flat = x.reshape(-1)
    nv = flat.numel() // d
    if nv < 1:
        raise ValueError(f"need at least d={d} samples, got {flat.numel()}")
    xv = flat[: nv * d].reshape(nv, d)
    var = float(xv.double().var())
    if betas is None:
        b0 = beta_min(config, math.sqrt(var))
        betas = [b0 * (1 + 0.05 * k) for k in range(-10, 40)]
    else:
        betas = [float(b) for b in betas]
        if not betas or any(not math.isfinite(b) or b <= 0 for b in betas):
            raise ValueError("betas must be a non-empty sequence of finite numbers > 0")
    grid = []
    for beta in betas:
        cfg = config.replace(beta=beta)
        xh, T, cl = quantize(xv, config=cfg, backend=backend, return_info=True)
        mse = float(((xh.double() - xv.double()) ** 2).mean())
        H = entropy_bits(T)
        rate_eff = config.rate + H / d
        grid.append({
            "beta": beta,
            "mse": mse,
            "H_T": H,
            "overload_rate": float((T > 0).double().mean()),
            "clamp_rate": float(cl.double().mean()),
            "mean_T": float(T.double().mean()),
            "rate_effective": rate_eff,
            "f": mse / 2.0 ** (-2.0 * rate_eff),
        })
    key = "f" if objective == "rd" else "mse"
    best = min(grid, key=lambda r: r[key])
    snr = _snr(var, best["mse"])
    out = {
        "lattice": config.lattice_type,
        "q": config.q,
        "M": config.M,
        "d": d,
        "alpha": config.alpha,
        "max_scaling_iterations": config.max_scaling_iterations,
        "with_dither": config.with_dither,
        "center": config.center,
        "objective": objective,
        "n_vectors": nv,
        "beta": best["beta"],
        "beta_grid_edge": best["beta"] in (betas[0], betas[-1]),
        "mse": best["mse"],
        "snr_db": snr,
        "overload_rate": best["overload_rate"],
        "clamp_rate": best["clamp_rate"],
        "H_T": best["H_T"],
        "mean_T": best["mean_T"],
        "rate_nominal": config.rate,
        "rate_effective": best["rate_effective"],
        "f": best["f"],
        "snr_rate_adjusted_db": snr - _LOG10_4 * best["H_T"] / d,
    }
    if return_grid:
        out["grid"] = grid
    return out


def uniform_scalar_quantize(x: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Symmetric mid-rise uniform quantizer with ``2^bits`` levels ``(k + 1/2) step``, k = -2^(bits-1) .. 2^(bits-1)-1,
    clipping at the extreme levels (the usual best uniform quantizer of a symmetric density)."""
    half = 2 ** (bits - 1)
    k = torch.clamp(torch.floor(x / step), -half, half - 1)
    return (k + 0.5) * step


def _fake_quant(x: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """torch's per-tensor affine fake quantization with ``2^bits`` levels, zero point ``2^(bits-1)`` (mid-tread:
    levels ``step * (-2^(bits-1) .. 2^(bits-1) - 1)``), i.e. what an int``bits`` symmetric PTQ scheme does."""
    half = 2 ** (bits - 1)
    return torch.fake_quantize_per_tensor_affine(x, float(step), half, 0, 2 * half - 1)


def _search_step(x: torch.Tensor, fn, bits: int) -> tuple[float, float]:
    """Minimise the MSE of ``fn(x, bits, step)`` over the step: coarse log grid, then three finer passes."""
    xd = x.double()

    def mse(step: float) -> float:
        return float(((fn(x, bits, step).double() - xd) ** 2).mean())

    half = 2 ** (bits - 1)
    lo, hi = 0.5 / half, 8.0 / half  # covers clipping points 0.5 .. 8 sigma
    ratio = (hi / lo) ** (1 / 24)
    best = min((mse(lo * ratio**i), lo * ratio**i) for i in range(25))
    for _ in range(3):  # zoom in: each pass spans the previous spacing on both sides with 11 points
        lo2, hi2 = best[1] / ratio, best[1] * ratio
        best = min([best] + [(mse(s), s) for s in (lo2 + (hi2 - lo2) * i / 10 for i in range(11))])
        ratio = ratio ** 0.2
    return best[1], best[0]


def scalar_rd(bits: int, n: int = 1 << 20, seed: int = 0, x: Optional[torch.Tensor] = None) -> dict:
    """Best uniform scalar quantizers with ``2^bits`` levels on the same Gaussian data as :func:`hnlq_rd`.

    Returns ``{"bits", "rate", "n", "uniform": {step, mse, snr_db}, "fake_quant": {step, mse, snr_db}}``:
    ``uniform`` is the symmetric mid-rise quantizer (:func:`uniform_scalar_quantize`), ``fake_quant`` is
    ``torch.fake_quantize_per_tensor_affine`` (mid-tread, int``bits``); both with the step minimising the MSE.
    """
    check_int("bits", bits, 1, 16)
    if x is None:
        x = gaussian_data(n, seed)
    elif not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating torch.Tensor")
    x = x.reshape(-1).float()
    var = float(x.double().var())
    out = {"bits": bits, "rate": float(bits), "n": x.numel()}
    for name, fn in (("uniform", uniform_scalar_quantize), ("fake_quant", _fake_quant)):
        if name == "fake_quant" and bits > 8:
            continue
        step, mse = _search_step(x, fn, bits)
        out[name] = {"step": step, "mse": mse, "snr_db": _snr(var, mse)}
    return out
