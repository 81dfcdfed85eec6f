"""Calibration: per-linear input Hessians and the block-sequential (GPTQ-style) quantization driver.

``H = XᵀX / N`` of every linear's input ``X`` (N tokens × in_features), accumulated in float64 (each batch's
product is formed in the activations' dtype, then added in float64). The model is walked **block by block**
(transformer layers): the inputs of block 0 are captured once with a catcher, and each block is re-run on the
stored activations, so memory stays bounded by one block's activations plus the Hessians of that block, and
no LM head logits are ever materialized.

- :func:`sequential_quantize` — per block: Hessians of its linears from the *current* activations (the
  upstream blocks are already quantized), ``quantize_fn(name, linear, H)`` for each linear, install the
  result, re-run the block to feed the next one. ``true_sequential=True`` also orders the linears inside a
  block by their input (q/k/v → o → gate/up → down), re-collecting after each group.
- :func:`collect_hessians` — the non-sequential variant: all Hessians from the float model in one pass (what
  a benchmark can share across methods).

Linears that read the *same* input tensor (q/k/v; gate/up) share one accumulator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .block_tuning import BlockTuneConfig, tune_block_

__all__ = [
    "HessianAccumulator",
    "asymmetric_target",
    "find_blocks",
    "capture_block_inputs",
    "collect_hessians",
    "sequential_quantize",
    "SequentialResult",
]

QuantizeFn = Callable[[str, nn.Linear, torch.Tensor], "nn.Module | torch.Tensor | None"]


class HessianAccumulator:
    """Running ``Σ x xᵀ`` (float64) and token count of one linear's input.

    Parameters
    ----------
    n : int
        ``in_features`` of the linear.
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.n = n
        self.H = torch.zeros((n, n), dtype=torch.float64)
        self.n_tokens = 0

    @staticmethod
    def product(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``XᵀX`` (float64) and N for activations ``x`` of shape (..., n)."""
        X = x.detach().reshape(-1, x.shape[-1])
        if not X.dtype.is_floating_point or X.dtype in (torch.float16, torch.bfloat16):
            X = X.float()
        return (X.T @ X).to(torch.float64), X.shape[0]

    def add(self, prod: torch.Tensor, count: int) -> None:
        self.H += prod
        self.n_tokens += count

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` (..., n)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"x has last dim {x.shape[-1]}, expected {self.n}")
        self.add(*self.product(x))

    def finalize(self) -> torch.Tensor:
        """``H = Σ x xᵀ / N`` (n, n) float64 (a new tensor)."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were accumulated (did the linear run on the calibration data?)")
        return self.H / self.n_tokens


class _Hooks:
    """Forward-pre-hooks on a set of linears; linears fed the same tensor object share one product."""

    def __init__(self, linears: Mapping[str, nn.Module], cross: bool = False):
        self.acc: dict[str, HessianAccumulator] = {}
        # asymmetric calibration: Σ x_q (x_f - x_q)ᵀ (float64) per owner, against ``float_inputs`` set by the
        # caller; the difference is taken per token, so identical inputs give exactly 0 (the difference of two
        # accumulated moments would not: activations with massive outlier channels make its rounding dominate)
        self.cross: dict[str, torch.Tensor] | None = {} if cross else None
        self.float_inputs: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}  # name -> owner name (same input tensor in the first forward)
        # per forward: (x, owner, XᵀX, N, X_qᵀX_f or None)
        self._seen: list[tuple[torch.Tensor, str, torch.Tensor, int, torch.Tensor | None]] = []
        self.order: list[str] = []  # call order in the first forward
        self._handles = [lin.register_forward_pre_hook(self._make(name)) for name, lin in linears.items()]

    def _make(self, name: str):
        def hook(_mod, args):
            x = args[0]
            for xs, owner, prod, cnt, c in self._seen:
                if xs is x:
                    if name not in self.acc and name not in self.alias:
                        self.alias[name] = owner
                        self.order.append(name)
                    elif name in self.acc:  # not shared this time after all: accumulate separately
                        self.acc[name].add(prod, cnt)
                        self._add_cross(name, c)
                    return None
            if name in self.alias:  # was shared in the first forward but is not now: break the alias
                raise RuntimeError(f"{name} no longer shares its input with {self.alias[name]}")
            if name not in self.acc:
                self.acc[name] = HessianAccumulator(x.shape[-1])
                self.order.append(name)
            prod, cnt = HessianAccumulator.product(x)
            self.acc[name].add(prod, cnt)
            c = None
            if self.cross is not None:
                xf = self.float_inputs[name]
                if xf.shape != x.shape:
                    raise RuntimeError(f"{name}: float input {tuple(xf.shape)} != quantized input {tuple(x.shape)}")
                xq = x.detach().reshape(-1, x.shape[-1]).double()
                c = xq.T @ (xf.reshape(-1, x.shape[-1]).double() - xq)
                self._add_cross(name, c)
            self._seen.append((x, name, prod, cnt, c))
            return None

        return hook

    def _add_cross(self, name: str, c: torch.Tensor | None) -> None:
        if self.cross is not None and c is not None:
            self.cross[name] = c if name not in self.cross else self.cross[name] + c

    def end_forward(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.alias.get(name, name)
        if owner not in self.acc:
            raise ValueError(f"linear {name!r} never ran on the calibration data")
        return self.acc[owner].finalize()

    def cross_moment(self, name: str) -> torch.Tensor:
        """``E[x_q (x_f - x_q)ᵀ]`` (n, n) float64 of linear ``name`` (asymmetric calibration only)."""
        assert self.cross is not None
        owner = self.alias.get(name, name)
        return self.cross[owner] / self.acc[owner].n_tokens

    def groups(self) -> list[list[str]]:
        """Linears grouped by shared input, in call order."""
        out: dict[str, list[str]] = {}
        for name in self.order:
            out.setdefault(self.alias.get(name, name), []).append(name)
        return list(out.values())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks of ``model``: the ``nn.ModuleList`` holding the most ``nn.Linear`` layers.

    This is ``model.model.layers`` for Llama, ``encoder.layer`` for BERT, ``h`` for GPT-2-like models.

    Returns
    -------
    (prefix, blocks) — ``prefix`` is the module path of the list (e.g. ``"model.layers"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(isinstance(m, nn.Linear) for m in mod.modules())
            if count and (best is None or count > best[0]):
                best = (count, name, mod)
    if best is None:
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise ValueError("model has no nn.Linear layers to quantize")
        raise ValueError("model has no nn.ModuleList of blocks containing nn.Linear layers; pass blocks=")
    return best[1], best[2]


class _Stop(Exception):
    pass


def vocab_size(model: nn.Module) -> int | None:
    """Rows of ``model``'s input embedding (``get_input_embeddings()``), or None when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def check_token_ids(ids: torch.Tensor, vocab: int | None, where: str) -> None:
    """``ValueError`` naming ``where`` when a token id is negative or ``>= vocab`` (the embedding lookup would
    otherwise fail deep inside the model with an ``IndexError``)."""
    if vocab is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{where} holds token ids in [{lo}, {hi}], outside the model's vocabulary [0, {vocab})")


def _check_batch(batch: Any, i: int, vocab: int | None = None) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            f"calib_batches[{i}] must be a LongTensor (batch, seq) of token ids or a mapping with 'input_ids', "
            f"got {type(batch).__name__}"
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"calib_batches[{i}]['input_ids'] must be an integer tensor of shape (batch, seq), got "
            f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
            + (f" {ids.dtype}" if isinstance(ids, torch.Tensor) else "")
        )
    if ids.numel() == 0:
        raise ValueError(f"calib_batches[{i}] is empty (shape {tuple(ids.shape)})")
    check_token_ids(ids, vocab, f"calib_batches[{i}]['input_ids']")
    return dict(batch)


@dataclass
class _BlockInputs:
    hidden: list[torch.Tensor]  # per batch (B, T, hidden)
    rest: list[tuple[tuple, dict]]  # per batch: extra positional args and keyword args of the block call


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, calib_batches: Iterable[Any]) -> _BlockInputs:
    """Run ``model`` on each batch until ``block`` is called; store that call's arguments (the "catcher")."""
    if isinstance(calib_batches, (torch.Tensor, Mapping)):
        calib_batches = [calib_batches]
    hidden: list[torch.Tensor] = []
    rest: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            h, extra = args[0], tuple(args[1:])
        else:
            h, extra = kwargs.pop("hidden_states"), ()
        hidden.append(h.detach())
        rest.append((extra, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    cfg = getattr(model, "config", None)
    old_cache = getattr(cfg, "use_cache", None)
    if cfg is not None and old_cache is not None:
        cfg.use_cache = False  # no KV cache objects in the captured kwargs
    vocab = vocab_size(model)
    try:
        n = 0
        for i, batch in enumerate(calib_batches):
            batch = _check_batch(batch, i, vocab)
            n += 1
            try:
                model(**batch)
            except _Stop:
                pass
            if len(hidden) != n:
                raise ValueError("the model finished without calling its first block (wrong blocks=?)")
    finally:
        handle.remove()
        if cfg is not None and old_cache is not None:
            cfg.use_cache = old_cache
    if not hidden:
        raise ValueError("calib_batches is empty")
    return _BlockInputs(hidden, rest)


def _run_block(block: nn.Module, inp: _BlockInputs, hooks: _Hooks | None, keep: bool) -> list[torch.Tensor] | None:
    outs: list[torch.Tensor] | None = [] if keep else None
    for h, (extra, kw) in zip(inp.hidden, inp.rest, strict=True):
        out = block(h, *extra, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if hooks is not None:
            hooks.end_forward()
        if outs is not None:
            outs.append(out.detach())
    return outs


class _Recorder:
    """Forward-pre-hooks storing each linear's input (of the float twin of a block) into ``into[name]``."""

    def __init__(self, linears: Mapping[str, nn.Module], into: dict[str, torch.Tensor]):
        self._handles = [
            lin.register_forward_pre_hook(lambda _m, args, n=name: into.__setitem__(n, args[0].detach()))
            for name, lin in linears.items()
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _run_pair(block: nn.Module, fblock: nn.Module, inp: _BlockInputs, inp_f: _BlockInputs, hooks: _Hooks) -> None:
    """Run the float twin and the (partly quantized) block batch by batch, so that ``hooks`` sees each
    quantized input next to the float input of the same tokens."""
    for h, hf, (extra, kw) in zip(inp.hidden, inp_f.hidden, inp.rest, strict=True):
        fblock(hf, *extra, **kw)
        block(h, *extra, **kw)
        hooks.end_forward()
        hooks.float_inputs.clear()


def _collect(
    block: nn.Module,
    fblock: nn.Module | None,
    lins: Mapping[str, nn.Module],
    names: Iterable[str],
    inp: _BlockInputs,
    inp_f: _BlockInputs | None,
    bprefix: str,
) -> _Hooks:
    """One pass over the calibration batches collecting ``names``' Hessians (and, with a float twin
    ``fblock``, their cross moments with the float inputs)."""
    names = list(names)
    hooks = _Hooks({n: lins[n] for n in names}, cross=fblock is not None)
    rec = None
    try:
        if fblock is not None and inp_f is not None:
            # the twin is a deepcopy: its linears have the same names below the block
            flins = {n: fblock.get_submodule(n[len(bprefix) + 1 :]) for n in names}
            rec = _Recorder(flins, hooks.float_inputs)
            _run_pair(block, fblock, inp, inp_f, hooks)
        else:
            _run_block(block, inp, hooks, keep=False)
    finally:
        hooks.remove()
        if rec is not None:
            rec.remove()
    return hooks


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The float weight that best maps the quantized model's inputs to the float model's outputs.

    ``argmin_Ŵ E‖W x_f − Ŵ x_q‖² + λ‖Ŵ − W‖²`` with ``λ = damp · mean diag H`` (a ridge toward ``W``):
    ``Ŵ = W + W (Σ_fq − Σ_qq)(Σ_qq + λI)⁻¹ = W + W Cᵀ (Σ_qq + λI)⁻¹``. Quantizing Ŵ with the Hessian ``Σ_qq``
    then minimizes the error against the float model's output instead of against ``W x_q`` (GPTQ's target), so
    each layer also corrects the drift its quantized inputs carry (asymmetric calibration, Li et al. 2025,
    "GPTAQ"). Equal inputs (``C == 0``) give ``W`` exactly.

    Parameters
    ----------
    W : (m, n) weight
    H : (n, n) ``Σ_qq = E[x_q x_qᵀ]``
    C : (n, n) ``E[x_q (x_f − x_q)ᵀ]`` (the drift moment, accumulated from per-token differences)
    damp : relative ridge, > 0

    Returns
    -------
    (m, n) float64
    """
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp must be a number > 0, got {damp!r}")
    n = W.shape[-1]
    if W.ndim != 2 or H.shape != (n, n) or C.shape != (n, n):
        raise ValueError(f"W (m, n), H and C (n, n) expected, got {tuple(W.shape)}, {tuple(H.shape)}, {tuple(C.shape)}")
    W64, H64, C64 = W.to(torch.float64), H.to(torch.float64), C.to(torch.float64)
    lam = damp * float(torch.diagonal(H64).mean())
    if not lam > 0:  # no signal at all: nothing to correct
        return W64.clone()
    Hd = 0.5 * (H64 + H64.T) + lam * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(Hd)
    return W64 + torch.cholesky_solve(C64 @ W64.T, L).T


def _linears(block: nn.Module, prefix: str, include: Callable[[str], bool] | None) -> dict[str, nn.Linear]:
    return {
        f"{prefix}.{n}": m
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and (include is None or include(f"{prefix}.{n}"))
    }


def _install(block: nn.Module, prefix: str, name: str, lin: nn.Linear, new: Any) -> None:
    if new is None:
        return
    if isinstance(new, torch.Tensor):
        if new.shape != lin.weight.shape:
            raise ValueError(
                f"quantize_fn returned W_hat of shape {tuple(new.shape)} for {name} {tuple(lin.weight.shape)}"
            )
        lin.weight.data.copy_(new.to(lin.weight.dtype))
    elif isinstance(new, nn.Module):
        block.set_submodule(name[len(prefix) + 1 :], new)
    else:
        raise TypeError(f"quantize_fn must return an nn.Module, a Tensor or None, got {type(new).__name__}")


@dataclass
class SequentialResult:
    """What the driver did: layer names in quantization order, their token counts, the block prefix, and
    with ``block_tune`` one report per tuning (``"<block>:<group index>"`` -> held-out losses, kept)."""

    prefix: str
    layers: list[str] = field(default_factory=list)
    n_tokens: dict[str, int] = field(default_factory=dict)
    block_tuning: dict[str, dict[str, float | bool]] = field(default_factory=dict)


def _prepare(model, calib_batches, blocks):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError("model has no nn.Linear layers to quantize")
    if blocks is None:
        prefix, blocks = find_blocks(model)
    else:
        if not isinstance(blocks, (nn.ModuleList, list, tuple)) or len(blocks) == 0:
            raise ValueError("blocks must be a non-empty nn.ModuleList (or list) of modules")
        prefix = next((n for n, m in model.named_modules() if m is blocks), "blocks")
    if isinstance(calib_batches, (torch.Tensor, Mapping)):
        calib_batches = [calib_batches]
    if calib_batches is None:
        raise ValueError("calib_batches is empty")
    inp = capture_block_inputs(model, blocks[0], calib_batches)
    return prefix, blocks, inp


def _block_call(block: nn.Module, inp: _BlockInputs) -> Callable[[int], torch.Tensor]:
    """``i -> block output on calibration batch i`` (differentiable; for :func:`tune_block_`)."""

    def run(i: int) -> torch.Tensor:
        extra, kw = inp.rest[i]
        out = block(inp.hidden[i], *extra, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


def _tune_targets(
    block: nn.Module,
    twin: nn.Module | None,
    inp: _BlockInputs,
    inp_f: _BlockInputs | None,
    cfg: BlockTuneConfig | None,
) -> list[torch.Tensor] | None:
    """The outputs block tuning matches: the float twin on the float inputs, or the still unquantized block on
    the current inputs (computed before its first group is quantized)."""
    if cfg is None:
        return None
    if cfg.target == "float":
        assert twin is not None and inp_f is not None  # sequential_quantize keeps the float stream for it
        return _run_block(twin, inp_f, None, keep=True)
    return _run_block(block, inp, None, keep=True)


@torch.no_grad()
def sequential_quantize(
    model: nn.Module,
    calib_batches: Iterable[Any],
    quantize_fn: QuantizeFn,
    *,
    blocks: nn.ModuleList | None = None,
    true_sequential: bool = False,
    include: Callable[[str], bool] | None = None,
    on_layer: Callable[[str], None] | None = None,
    asymmetric: bool = False,
    asym_damp: float = 0.01,
    block_tune: BlockTuneConfig | None = None,
) -> SequentialResult:
    """Quantize every linear of every block in order, each from Hessians of already-quantized upstream outputs.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    calib_batches : iterable
        LongTensors (batch, seq) of token ids, or mappings of model kwargs with ``input_ids``.
    quantize_fn : callable ``(name, linear, H) -> nn.Module | Tensor | None``
        ``H`` is (in_features, in_features) float64 ``XᵀX/N``. A module replaces the linear, a tensor is
        written into ``linear.weight`` (W_hat), ``None`` leaves it as is.
    blocks : nn.ModuleList, optional
        The transformer blocks (default :func:`find_blocks`).
    true_sequential : bool
        Inside a block, quantize the linears group by group (groups = linears reading the same input), each
        group's Hessians collected after the previous groups were quantized.
    include : callable ``name -> bool``, optional
        Only linears for which it returns True are hooked and quantized.
    on_layer : callable ``name -> None``, optional
        Called after each linear is done (progress bars).
    asymmetric : bool
        Asymmetric calibration: a float twin of the model is run alongside, and before ``quantize_fn`` sees a
        linear its weight is replaced by :func:`asymmetric_target` (the float weight that best maps the
        quantized inputs to the float model's outputs); ``H`` stays ``Σ_qq``. Costs one more block forward per
        collection and a float copy of one block.
    asym_damp : float
        Relative ridge of :func:`asymmetric_target`.
    block_tune : BlockTuneConfig, optional
        After each group of a block is quantized, tune the weights of the block's later (still float) groups
        toward the target of :mod:`coset.ptq.block_tuning` (implies ``true_sequential``: the later groups'
        Hessians are collected after the tuning). The reports go to ``SequentialResult.block_tuning``.
    """
    if not callable(quantize_fn):
        raise TypeError("quantize_fn must be callable")
    if not isinstance(asymmetric, bool):
        raise TypeError(f"asymmetric must be a bool, got {type(asymmetric).__name__}")
    if isinstance(asym_damp, bool) or not isinstance(asym_damp, (int, float)) or not asym_damp > 0:
        raise ValueError(f"asym_damp must be a number > 0, got {asym_damp!r}")
    if block_tune is not None and not isinstance(block_tune, BlockTuneConfig):
        raise TypeError(f"block_tune must be a BlockTuneConfig or None, got {type(block_tune).__name__}")
    prefix, blocks, inp = _prepare(model, calib_batches, blocks)
    if block_tune is not None and len(inp.hidden) < 2:
        raise ValueError("block_tune needs at least 2 calibration batches (the last one is held out)")
    float_stream = asymmetric or (block_tune is not None and block_tune.target == "float")
    inp_f = _BlockInputs(list(inp.hidden), inp.rest) if float_stream else None
    result = SequentialResult(prefix)
    for bi, block in enumerate(blocks):
        bprefix = f"{prefix}.{bi}"
        lins = _linears(block, bprefix, include)
        twin = copy.deepcopy(block) if inp_f is not None else None  # the float twin, before any change
        fblock = twin if asymmetric else None  # cross moments only for the asymmetric target

        if lins:
            hooks = _collect(block, fblock, lins, lins, inp, inp_f, bprefix)
            groups = hooks.groups()
            targets = _tune_targets(block, twin, inp, inp_f, block_tune) if len(groups) > 1 else None
            for gi, group in enumerate(groups):
                if (true_sequential or targets is not None) and gi > 0:
                    # re-collect this group's Hessians after the previous groups (and the tuning)
                    hooks = _collect(block, fblock, lins, group, inp, inp_f, bprefix)
                for name in group:
                    H = hooks.hessian(name)
                    result.n_tokens[name] = hooks.acc[hooks.alias.get(name, name)].n_tokens
                    if fblock is not None:
                        W = lins[name].weight
                        W.data.copy_(asymmetric_target(W.detach(), H, hooks.cross_moment(name), asym_damp).to(W.dtype))
                    new = quantize_fn(name, lins[name], H)
                    _install(block, bprefix, name, lins[name], new)
                    result.layers.append(name)
                    if on_layer is not None:
                        on_layer(name)
                if targets is not None and block_tune is not None and gi + 1 < len(groups):
                    later = [lins[n].weight for g in groups[gi + 1 :] for n in g]
                    report = tune_block_(block, _block_call(block, inp), targets, later, block_tune)
                    result.block_tuning[f"{bprefix}:{gi}"] = report
            del hooks
        if bi + 1 < len(blocks):
            inp.hidden = _run_block(block, inp, None, keep=True)
            if twin is not None and inp_f is not None:
                out_f = _run_block(twin, inp_f, None, keep=True)
                assert out_f is not None  # keep=True returns the outputs
                inp_f.hidden = out_f
    return result


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    blocks: nn.ModuleList | None = None,
    include: Callable[[str], bool] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """All block linears' Hessians ``XᵀX/N`` from the (unmodified) model, in one block-by-block pass.

    Linears sharing an input share the returned tensor object (q/k/v, gate/up), which keeps SmolLM2's 210
    Hessians at ~0.8 GB in float64 (``dtype=torch.float32`` halves it).

    Returns
    -------
    dict name -> (n, n) tensor, in call order.
    """
    prefix, blocks, inp = _prepare(model, calib_batches, blocks)
    out: dict[str, torch.Tensor] = {}
    for bi, block in enumerate(blocks):
        lins = _linears(block, f"{prefix}.{bi}", include)
        hooks = _Hooks(lins) if lins else None
        try:
            outs = _run_block(block, inp, hooks, keep=bi + 1 < len(blocks))
        finally:
            if hooks is not None:
                hooks.remove()
        if hooks is not None:
            for group in hooks.groups():
                H = hooks.hessian(group[0]).to(dtype)
                for name in group:
                    out[name] = H
        if outs is not None:
            inp.hidden = outs
    if not out:
        raise ValueError("no linear layer was selected (include= rejected all of them)")
    return out
