"""Per-layer rate allocation under an all-in bit budget (mixed precision across the linears of a model).

Each linear ``l`` can be coded at one of a few rates ``r`` (e.g. the 2-, 3- and 4-bit codes of
:meth:`~coset.ptq.hnlq_block.MethodConfig.for_bits`), costing ``nbytes[l][r]`` bytes all-in (measured from the
compressed module, so T, scales and seeds are counted) and ``cost[l][r]`` of model loss. The loss of a weight
error ``ΔW`` is estimated to second order with the diagonal Fisher information of the model's output
distribution, ``KL ≈ ½ Σ_l Σ_ij F_l,ij ΔW_l,ij²`` (the sensitivity measure of Fisher-weighted mixed precision,
e.g. HAWQ-V2 / "Fisher pruning"): a layer whose error the model amplifies gets more bits.

:func:`allocate_rates` minimises ``Σ_l cost[l][r_l]`` subject to ``Σ_l nbytes[l][r_l] ≤ budget`` by walking
the lower convex hull of every layer's (bytes, cost) points in order of decreasing cost drop per byte — the
Lagrangian path, optimal at every point where it stops (Everett 1963) — and then spends what is left on the
best upgrades that still fit. :func:`fisher_diagonal` estimates ``F`` (labels sampled from the model itself,
so it is the true Fisher, not the empirical one), :func:`fisher_costs` turns quantized weights into costs, and
:func:`plan_rates` does all of it for a model (quantize every linear at every rate, measure, allocate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .codes import LinearCodes

__all__ = ["allocate_rates", "fisher_diagonal", "fisher_costs", "plan_rates", "saved_nbytes", "RatePlan"]


def _check_table(name: str, table: Mapping[str, Mapping[Any, float]], integer: bool) -> None:
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{name} must be a non-empty mapping layer -> {{rate: value}}")
    for layer, row in table.items():
        if not isinstance(row, Mapping) or not row:
            raise ValueError(f"{name}[{layer!r}] must be a non-empty mapping rate -> value")
        for r, v in row.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}[{layer!r}][{r!r}] must be a finite number >= 0, got {v!r}")
            if integer and int(v) != v:
                raise ValueError(f"{name}[{layer!r}][{r!r}] must be a whole number of bytes, got {v!r}")


def _hull(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """Lower convex hull of (bytes, cost, rate), from fewest bytes on; points that cost more bytes without
    lowering the cost are dropped (never worth buying)."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    front: list[tuple[float, float, Any]] = []
    for p in pts:  # Pareto front: strictly decreasing cost as bytes grow
        if not front or p[1] < front[-1][1]:
            if front and p[0] == front[-1][0]:
                front.pop()
            front.append(p)
    hull: list[tuple[float, float, Any]] = []
    for p in front:
        while len(hull) >= 2:
            (b0, c0, _), (b1, c1, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> p
            if (c1 - c0) * (p[0] - b0) >= (p[1] - c0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_rates(
    cost: Mapping[str, Mapping[Any, float]],
    nbytes: Mapping[str, Mapping[Any, int]],
    budget: int,
) -> dict[str, Any]:
    """Choose one rate per layer minimising the summed cost within a byte budget.

    Parameters
    ----------
    cost : mapping layer -> {rate: estimated loss}
        E.g. from :func:`fisher_costs`. Every layer must list the same rates as in ``nbytes``.
    nbytes : mapping layer -> {rate: all-in bytes}
    budget : int
        Total bytes allowed (e.g. ``target_bits * n_weights / 8``).

    Returns
    -------
    dict layer -> rate
        Within budget. The allocation reached along the Lagrangian path is optimal for its own byte total;
        the bytes it leaves are then spent greedily on the upgrades (cost drop per byte) that still fit.

    Raises
    ------
    ValueError
        Malformed tables, or a budget below the cheapest allocation.
    """
    _check_table("cost", cost, integer=False)
    _check_table("nbytes", nbytes, integer=True)
    if set(cost) != set(nbytes):
        raise ValueError("cost and nbytes must list the same layers")
    for layer in cost:
        if set(cost[layer]) != set(nbytes[layer]):
            raise ValueError(f"cost[{layer!r}] and nbytes[{layer!r}] must list the same rates")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number of bytes, got {budget!r}")
    layers = list(cost)
    hulls = {n: _hull([(float(nbytes[n][r]), float(cost[n][r]), r) for r in cost[n]]) for n in layers}
    # the cheapest point of each hull is the Pareto point with the fewest bytes
    pos = dict.fromkeys(layers, 0)
    used = sum(hulls[n][0][0] for n in layers)
    if used > budget:
        raise ValueError(f"budget {budget} bytes is below the cheapest allocation ({int(used)} bytes)")
    # Lagrangian path: all hull segments by decreasing slope; a layer's own segments are already in that order
    segs = []
    for i, n in enumerate(layers):
        h = hulls[n]
        for k in range(1, len(h)):
            slope = (h[k - 1][1] - h[k][1]) / (h[k][0] - h[k - 1][0])
            segs.append((-slope, i, k))
    segs.sort()
    blocked: set[str] = set()
    for _, i, k in segs:
        n = layers[i]
        if n in blocked or pos[n] != k - 1:
            continue
        extra = hulls[n][k][0] - hulls[n][k - 1][0]
        if used + extra <= budget:
            pos[n], used = k, used + extra
        else:
            blocked.add(n)  # its later segments depend on this one
    alloc = {n: hulls[n][pos[n]][2] for n in layers}
    # fill: any single-layer change (also off the hull) that fits and lowers the cost most per byte
    while True:
        best = None
        for n in layers:
            r0 = alloc[n]
            for r, c in cost[n].items():
                extra = nbytes[n][r] - nbytes[n][r0]
                drop = cost[n][r0] - c
                if drop <= 0 or used + extra > budget:
                    continue
                key = drop / extra if extra > 0 else math.inf
                if best is None or key > best[0]:
                    best = (key, n, r, extra)
        if best is None:
            return alloc
        _, n, r, extra = best
        alloc[n], used = r, used + extra


def _sample_loss(out: Any, generator: torch.Generator) -> torch.Tensor:
    """A loss whose gradient has the output distribution's Fisher as its covariance: cross-entropy against
    labels drawn from the model's own softmax (logits), or ``<y, ε>`` with ``ε ~ N(0, I)`` for a hidden-state
    output (the Fisher of a unit-variance Gaussian around ``y``)."""
    from .finetune import _output

    kind, y = _output(out)
    if kind == "kl":
        flat = y.float().flatten(0, -2)
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(flat, -1), 1, generator=generator)[:, 0]
        return nn.functional.cross_entropy(flat, labels, reduction="sum")
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    return (y.float() * eps).sum()


def fisher_diagonal(
    model: nn.Module, batches: Iterable[Any], names: Sequence[str], *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``model``'s output distribution w.r.t. the weights of ``names``.

    Parameters
    ----------
    model : nn.Module
        Returns logits (a language model: next-token distribution) or a last hidden state (an encoder).
    batches : iterable of LongTensor (b, s) or mappings with ``input_ids``
    names : sequence of str
        Linear layers (``model.get_submodule(name)`` has a ``weight``).
    seed : int
        Seed of the sampled labels / noise.

    Returns
    -------
    dict name -> Tensor (out, in) float32
        ``E[g²]`` per output position (token), so ``½ Σ F ΔW²`` estimates the KL per token.

    The model's parameters are left as they were (``requires_grad`` restored, gradients cleared).
    """
    from .calib import vocab_size
    from .finetune import _ids

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    names = list(names)
    if not names:
        raise ValueError("names must not be empty")
    weights = {}
    for n in names:
        w = getattr(model.get_submodule(n), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{n} has no weight tensor")
        weights[n] = w
    saved = {p: p.requires_grad for p in model.parameters()}
    g = torch.Generator().manual_seed(seed)
    F = {n: torch.zeros(w.shape, dtype=torch.float32) for n, w in weights.items()}
    positions = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            kw = _ids(batch, vocab_size(model))
            ids = kw["input_ids"]
            loss = _sample_loss(model(**kw), g)
            grads = torch.autograd.grad(loss, list(weights.values()))
            for n, gr in zip(weights, grads, strict=True):
                F[n].add_(gr.detach().float().pow(2).cpu())
            positions += ids.numel()
    finally:
        for p, rg in saved.items():
            p.requires_grad_(rg)
    if positions == 0:
        raise ValueError("batches is empty")
    return {n: f / positions for n, f in F.items()}


def fisher_costs(
    fisher: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[Any, Mapping[str, torch.Tensor]],
) -> dict[str, dict[Any, float]]:
    """``cost[layer][rate] = ½ Σ F (W_hat − W)²`` for each rate's quantized weights.

    Parameters
    ----------
    fisher : name -> (out, in) float
        From :func:`fisher_diagonal`.
    weights : name -> (out, in) float
        The float weights.
    quantized : rate -> name -> (out, in) float
        ``W_hat`` of every layer at every rate.
    """
    out: dict[str, dict[Any, float]] = {}
    for n, f in fisher.items():
        if n not in weights:
            raise ValueError(f"weights has no entry for {n!r}")
        w = weights[n].detach().float()
        out[n] = {}
        for r, what in quantized.items():
            if n not in what:
                raise ValueError(f"quantized[{r!r}] has no entry for {n!r}")
            if what[n].shape != w.shape or f.shape != w.shape:
                raise ValueError(f"shape mismatch for {n!r}: {tuple(what[n].shape)} vs {tuple(w.shape)}")
            out[n][r] = _fisher_cost(f, w, what[n])
    return out


def _fisher_cost(f: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``½ Σ F (W_hat − W)²``: the second-order KL of one layer's quantization error."""
    return 0.5 * float((f.float() * (w_hat.detach().float() - w.detach().float()).pow(2)).sum())


def saved_nbytes(name: str, codes: LinearCodes) -> int:
    """The bytes ``save_quantized`` writes for one layer's codes (tensors + safetensors header + spec JSON),
    counted as :func:`~coset.ptq.bits.bits_per_weight` counts them."""
    from .bits import bits_per_weight
    from .layers import HNLQLinear

    holder = nn.ModuleDict({name.replace(".", "/"): HNLQLinear.from_codes(codes, None)})
    return bits_per_weight(holder).nbytes


@dataclass
class RatePlan:
    """What :func:`plan_rates` chose.

    ``rates``: layer -> rate; ``methods``: layer -> :class:`MethodConfig` (pass as
    ``PTQConfig(layer_methods=...)`` to re-quantize sequentially); ``codes``: layer -> the chosen code, already
    computed (``install_`` puts them in the model); ``nbytes``/``cost``: the tables the choice was made from;
    ``all_in_bits``: bytes of the chosen codes × 8 / weights; ``predicted_kl``: ``Σ cost`` of the choice (per
    token, second order) next to ``uniform_kl`` of every rate that fits.
    """

    rates: dict[str, Any]
    methods: dict[str, Any]
    codes: dict[str, Any]
    nbytes: dict[str, dict[Any, int]]
    cost: dict[str, dict[Any, float]]
    n_weights: int
    all_in_bits: float
    predicted_kl: float
    uniform_kl: dict[Any, float] = field(default_factory=dict)

    def histogram(self) -> dict[Any, int]:
        """Number of layers per rate."""
        out: dict[Any, int] = {}
        for r in self.rates.values():
            out[r] = out.get(r, 0) + 1
        return dict(sorted(out.items()))

    def install_(self, model: nn.Module) -> None:
        """Replace each planned ``nn.Linear`` of ``model`` by the compressed module of its chosen code."""
        from .layers import HNLQLinear

        for name, codes in self.codes.items():
            lin = model.get_submodule(name)
            bias = getattr(lin, "bias", None)
            model.set_submodule(name, HNLQLinear.from_codes(codes, None if bias is None else bias.detach()))


def plan_rates(
    model: nn.Module,
    calib: Iterable[Any],
    target_bits: float,
    *,
    rates: Sequence[int] = (2, 3, 4),
    method: str = "hnlq_ldlq",
    names: Sequence[str] | None = None,
    fisher_batches: Iterable[Any] | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> RatePlan:
    """Mixed-precision plan: one rate per linear so that the all-in bits average at most ``target_bits``.

    Every selected linear is quantized at every rate (``MethodConfig.for_bits(rate, method=method)``, float
    Hessians of ``calib`` shared by all rates), its all-in bytes measured as :func:`bits_per_weight` counts them
    (what ``save_quantized`` writes: tensors, header, spec; a bias is not counted), and its
    cost estimated as ``½ Σ F ΔW²`` with the diagonal Fisher of the float model; :func:`allocate_rates` then
    picks the rates. The model is not modified (see :meth:`RatePlan.install_`).

    Parameters
    ----------
    model : nn.Module
        The float model (a transformer; see :func:`coset.ptq.calib.find_blocks`).
    calib : iterable of LongTensor (b, s) or mappings with ``input_ids``
        Calibration batches for the Hessians (and for the Fisher unless ``fisher_batches`` is given).
    target_bits : float
        All-in bits per weight, averaged over the planned linears (e.g. 3.07 to leave room for per-row gains).
    rates : sequence of int
        Candidate rate classes (keys of ``RATE_CODES``).
    method : str
        HNLQ method of every rate (default rotation + LDLQ).
    names : sequence of str, optional
        Linears to plan (default: every linear of the transformer blocks).
    fisher_batches : iterable, optional
        Batches for :func:`fisher_diagonal` (one backward each; batches of one sequence keep the estimate's
        variance low).
    hessians : mapping name -> (n, n), optional
        Precomputed float Hessians (e.g. shared with other runs).
    seed : int
        Rotation seed base and Fisher sampling seed.
    """
    from .calib import collect_hessians
    from .codes import LinearCodes
    from .hnlq_block import RATE_CODES, MethodConfig, quantize_linear

    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not target_bits > 0:
        raise ValueError(f"target_bits must be a number > 0, got {target_bits!r}")
    rates = tuple(rates)
    if not rates or len(set(rates)) != len(rates) or any(r not in RATE_CODES for r in rates):
        raise ValueError(f"rates must be distinct values of {sorted(RATE_CODES)}, got {rates!r}")
    if target_bits < min(rates):  # all-in bits are never below the label bits
        raise ValueError(f"target_bits {target_bits} is below the cheapest rate {min(rates)}: no budget fits")
    methods = {r: MethodConfig.for_bits(r, method=method, seed=seed) for r in rates}
    if not methods[rates[0]].is_hnlq:
        raise ValueError(f"method must be an HNLQ method (hnlq_*), got {method!r}")
    calib = list(calib)
    if hessians is None:
        include = None if names is None else set(names).__contains__
        hessians = collect_hessians(model, calib, include=include, dtype=torch.float32)
    names = list(hessians) if names is None else list(names)
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ValueError(f"no Hessian for {missing[:3]}")
    weights: dict[str, torch.Tensor] = {n: model.get_submodule(n).weight.detach() for n in names}  # type: ignore[operator]
    F = fisher_diagonal(model, calib if fisher_batches is None else fisher_batches, names, seed=seed)
    all_codes: dict[Any, dict[str, Any]] = {r: {} for r in rates}
    nbytes: dict[str, dict[Any, int]] = {n: {} for n in names}
    cost: dict[str, dict[Any, float]] = {n: {} for n in names}
    for n in names:
        W = weights[n]
        f = F[n]
        for r in rates:
            W_hat, codes, _ = quantize_linear(W, hessians[n], methods[r], name=n)
            assert isinstance(codes, LinearCodes)  # HNLQ methods return lattice codes
            all_codes[r][n] = codes
            nbytes[n][r] = saved_nbytes(n, codes)
            cost[n][r] = _fisher_cost(f, W, W_hat)
    n_weights = sum(w.numel() for w in weights.values())
    budget = int(target_bits * n_weights / 8)
    chosen = allocate_rates(cost, nbytes, budget)
    used = sum(nbytes[n][r] for n, r in chosen.items())
    uniform = {r: sum(cost[n][r] for n in names) for r in rates if sum(nbytes[n][r] for n in names) <= budget}
    return RatePlan(
        rates=chosen,
        methods={n: methods[r] for n, r in chosen.items()},
        codes={n: all_codes[r][n] for n, r in chosen.items()},
        nbytes=nbytes,
        cost=cost,
        n_weights=n_weights,
        all_in_bits=8.0 * used / n_weights,
        predicted_kl=sum(cost[n][r] for n, r in chosen.items()),
        uniform_kl=uniform,
    )
