"""End-to-end tuning of the free continuous parameters of a quantized model against its float original.

After post-training quantization every code is fixed, but some numbers remain continuous and cost nothing
extra on disk: the normalisation weights (RMSNorm / LayerNorm, stored in float anyway), the one float
scale per quantized layer (``HNLQLinear.scale``) and, optionally, the output head (``head=True``: the
language-model head, which is not quantized and stays in float — with tied embeddings, the shared embedding
matrix). QuIP# (Tseng et al. 2024, §5 "fine-tuning") tunes such parameters end to end against the float
model's soft outputs; this is that step restricted to parameters that do not change the all-in bits.

``codes=True`` goes one step further and tunes the codes themselves (PV-Tuning's straight-through "V step",
Malinovskii et al. 2024): each ``HNLQLinear`` gets a float latent ``Z`` in its rotated basis, initialised to its
decoded weight; the forward uses ``scale · Q(Z / scale)`` — the layer's own code (lattice, q, M, overload ramp),
recomputed every ``code_every`` steps — and the gradient of the output reaches ``Z`` unchanged (straight
through). Afterwards ``Z`` is encoded once more and the layer is rebuilt from those labels and T: the label
bits are unchanged, the compact T may grow or shrink a little (the report gives the new layer bytes).

Objective on each calibration batch: ``KL(p_float ‖ p_quantized)`` of the next-token distributions when the
model returns ``logits``, otherwise the mean squared error of ``last_hidden_state`` relative to the float
model's mean square (encoders). Adam on the chosen parameters; a held-out part of the calibration data is
scored before and after, and the parameters are restored when tuning did not lower the held-out loss — the
call never leaves the model worse on its own validation data.

``checkpoint=path`` makes a long tuning (the 2-bit recipe runs for hours on a CPU) survive an interruption: every
``checkpoint_every`` steps the step, the tuned tensors and Adam's state are written to ``path`` (atomically), and
a call that finds the file resumes from it — to the same floats as an uninterrupted run on the same machine, since
batches and the learning-rate schedule are functions of the step. The file records what it was written for (the
config, the tuned layers and tensor shapes, the held-out loss of the untuned model) and a call that does not match
raises instead of resuming another tuning.

Each tunable layer gets a multiplicative gain ``g`` (initialised to 1) on its output ``W x`` — one per layer, or
one per output channel (``gains="row"``); afterwards the gain is folded into the layer: ``HNLQLinear.scale *= g``
(exact: the labels are unchanged) or the float16 ``HNLQLinear.out_scale`` (per channel: 16 bits per row, the
only option that adds bytes), or, for a float ``nn.Linear`` holding a dequantized weight, ``weight *= g``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coset.quant import ClampWarning, encode, quantize

from .calib import check_token_ids, vocab_size
from .codes import LinearCodes
from .layers import HNLQLinear

__all__ = ["FinetuneConfig", "FinetuneReport", "clone_reference", "finetune_"]

_CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class FinetuneConfig:
    """How to tune (frozen, validated).

    Attributes
    ----------
    steps : optimizer steps (each on one calibration batch, cycling)
    lr : Adam learning rate of the norm weights and of the log-gains
    norms : tune the weights of normalisation layers (modules with ``Norm`` in their class name)
    scales : tune gains of the quantized linears
    gains : "layer" — one gain per linear, folded into its float32 scale (no extra bits); "row" — one gain
        per output channel, stored as a float16 ``out_scale`` (16 bits per row: 16/in_features bits/weight)
    holdout : calibration batches kept aside to score the tuning (at least 1)
    schedule : "constant" learning rate, or "cosine" decay from ``lr`` to 0 over ``steps``
    head : also tune the float output head (``model.get_output_embeddings()``; tied to the input embedding
        when the model ties them), at learning rate ``head_lr``
    head_lr : Adam learning rate of the head (its entries are ~100x smaller than a norm weight)
    codes : also tune the codes of the ``HNLQLinear`` layers (straight-through latents, see the module doc)
    code_lr : Adam learning rate of the latents in units of each layer's code scale (a code changes when its
        latent has moved about half a lattice cell, ~0.5 scale; layers' scales differ by 10x)
    code_every : re-quantize the latents every this many steps (the forward uses the last quantization)
    """

    steps: int = 64
    lr: float = 5e-4
    norms: bool = True
    scales: bool = True
    gains: str = "layer"
    holdout: int = 2
    schedule: str = "constant"
    head: bool = False
    head_lr: float = 1e-5
    codes: bool = False
    code_lr: float = 2e-3
    code_every: int = 4

    def __post_init__(self) -> None:
        for name in ("steps", "holdout", "code_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "head_lr", "code_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < math.inf):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("norms", "scales", "head", "codes"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.gains not in ("layer", "row"):
            raise ValueError(f"gains must be 'layer' or 'row', got {self.gains!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not (self.norms or self.scales or self.head or self.codes):
            raise ValueError("at least one of norms / scales / head / codes must be tuned")


@dataclass
class FinetuneReport:
    """Held-out loss before/after, the training losses, and what was tuned."""

    holdout_before: float = math.nan
    holdout_after: float = math.nan
    kept: bool = False
    train_losses: list[float] = field(default_factory=list)
    n_norm_params: int = 0
    n_gains: int = 0
    n_head_params: int = 0
    n_code_params: int = 0
    blocks_changed: float = 0.0
    seconds: float = 0.0
    objective: str = ""
    resumed_from: int = 0  # the step a checkpoint resumed from (``seconds`` counts this call only)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _ids(batch: Any, vocab: int | None = None) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        if batch.dtype != torch.long or batch.ndim != 2:
            raise ValueError(
                f"calibration batches must be (b, seqlen) LongTensors, got {batch.dtype} {tuple(batch.shape)}"
            )
        check_token_ids(batch, vocab, "a calibration batch")
        return {"input_ids": batch}
    if isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"]
        if isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point:
            check_token_ids(ids, vocab, "a calibration batch's input_ids")
        return dict(batch)
    raise TypeError(f"a calibration batch must be a LongTensor or a mapping with input_ids, got {type(batch).__name__}")


def _output(out: Any) -> tuple[str, torch.Tensor]:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is not None:
        return "kl", logits
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, dict):
        hidden = out.get("last_hidden_state")
    if hidden is None and isinstance(out, torch.Tensor):
        hidden = out
    if hidden is None:
        raise TypeError("the model output has neither logits nor last_hidden_state")
    return "mse", hidden


def _loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "kl":
        # logits (b, s, V): predict the next token, so every position counts
        lq = F.log_softmax(student.float().flatten(0, -2), dim=-1)
        lp = F.log_softmax(teacher.float().flatten(0, -2), dim=-1)
        return F.kl_div(lq, lp, log_target=True, reduction="batchmean")
    t = teacher.float()
    return (student.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-30)


class _Gain:
    """A forward hook multiplying ``W x`` (the output minus the bias) by a trainable gain ``exp(log_g)``:
    a scalar, or one per output channel rounded to float16 as it will be stored (straight-through)."""

    def __init__(self, mod: nn.Module, per_row: bool):
        self.mod = mod
        self.per_row = per_row
        shape: tuple[int, ...] = (int(getattr(mod, "out_features")),) if per_row else ()  # noqa: B009
        self.log_g = nn.Parameter(torch.zeros(shape, dtype=torch.float32))
        if per_row and isinstance(mod, HNLQLinear) and mod.spec.out_scale:
            with torch.no_grad():  # continue from the stored gains
                self.log_g.copy_(mod.get_buffer("out_scale").float().log())
        self.handle = mod.register_forward_hook(self._hook)

    def gain(self) -> torch.Tensor:
        g = self.log_g.exp()
        if self.per_row:
            g = g + (g.half().float() - g).detach()
        return g

    def _hook(self, mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if self.per_row and isinstance(mod, HNLQLinear) and mod.spec.out_scale:
            out_scale = mod.get_buffer("out_scale").to(out.dtype)  # the row gain replaces the stored one
        else:
            out_scale = None
        b = getattr(mod, "bias", None)
        core = out if b is None else out - b
        if out_scale is not None:
            core = core / out_scale
        y = core * self.gain().to(out.dtype)
        return y if b is None else y + b

    @torch.no_grad()
    def fold(self) -> None:
        g = self.gain().detach()
        if isinstance(self.mod, HNLQLinear):
            if self.per_row:
                self.mod.enable_out_scale()
                self.mod.get_buffer("out_scale").copy_(g.half())
            else:
                self.mod.scale.mul_(float(g))
            self.mod._w_cache = None
        else:
            weight = self.mod.weight
            assert isinstance(weight, torch.Tensor)
            weight.mul_(g[:, None] if self.per_row else float(g))

    def remove(self) -> None:
        self.handle.remove()


class _Latent:
    """Straight-through latent of one ``HNLQLinear``'s codes: ``Z`` (m, n) float32 in the rotated basis; the
    layer's forward sees ``Z + (Q(Z) - Z).detach()`` through its weight cache (value ``Q(Z)``, gradient to Z)."""

    def __init__(self, mod: HNLQLinear):
        self.mod = mod
        with torch.no_grad():
            w = mod.rotated_weight(torch.float32).detach().clone()
        self.z = nn.Parameter(w)
        self.q = w.clone()
        self.handle = mod.register_forward_pre_hook(self._pre)

    def _scale(self) -> torch.Tensor:
        # float32 throughout: the fast native path (the codes are those of the float32 latent, in both places)
        s = self.mod.scale.detach().to(torch.float32)
        return s if s.ndim == 0 else s[:, None, None]

    @torch.no_grad()
    def requantize(self) -> None:
        m, n, d = self.mod.out_features, self.mod.in_features, self.mod.code.dim
        s = self._scale()
        u = self.z.detach().reshape(m, n // d, d) / s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClampWarning)  # as in quantization: the ramp cap is the code's
            self.q = (quantize(u, config=self.mod.code) * s).reshape(m, n)

    def _pre(self, mod: nn.Module, args: Any) -> None:
        mod._w_cache = self.z + (self.q - self.z).detach()

    @torch.no_grad()
    def rebuilt(self, cache_weight: bool) -> tuple[HNLQLinear, float]:
        """A new module holding the codes of the final latent, and the fraction of blocks whose code changed."""
        mod = self.mod
        m, n, d = mod.out_features, mod.in_features, mod.code.dim
        s = self._scale()
        u = self.z.detach().reshape(m, n // d, d) / s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClampWarning)
            labels, T = encode(u, config=mod.code)
        old_labels, old_T = mod.codes()
        changed = ((labels != old_labels).flatten(2).any(-1) | (T != old_T)).double().mean()
        codes = LinearCodes(mod.code, labels, T, mod.scale.detach().clone(), mod.rot_in, mod.rot_out, n, m)
        new = HNLQLinear.from_codes(codes, mod.bias, cache_weight=cache_weight, lut_max_rows=mod.lut_max_rows)
        if mod.spec.out_scale:
            new.enable_out_scale()
            new.get_buffer("out_scale").copy_(mod.get_buffer("out_scale"))
        return new, float(changed)

    def remove(self) -> None:
        self.handle.remove()
        self.mod._w_cache = None


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a stop while writing leaves the previous checkpoint whole


def _load_checkpoint(path: str, expect: dict[str, Any], tuned: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The checkpoint at ``path`` if it was written by this tuning (``expect``), else ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: never resume from it silently
        raise ValueError(f"checkpoint {path!r} is not a finetune_ checkpoint: {e}") from None
    if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path!r} is not a finetune_ checkpoint (version {_CHECKPOINT_VERSION})")
    for key in ("config", "layers"):
        if state.get(key) != expect[key]:
            raise ValueError(f"checkpoint {path!r} was written by another tuning: its {key} differs")
    params = state.get("params")
    if not isinstance(params, list) or [tuple(t.shape) for t in params] != [tuple(t.shape) for t in tuned]:
        raise ValueError(f"checkpoint {path!r} was written by another tuning: its tuned tensors differ in shape")
    before, now = state.get("holdout_before"), expect["holdout_before"]
    if not isinstance(before, float) or not math.isclose(before, now, rel_tol=1e-4):
        raise ValueError(
            f"checkpoint {path!r} was written for another model: held-out loss {before!r} before tuning, "
            f"this model's is {now!r}"
        )
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= expect["config"]["steps"]:
        raise ValueError(f"checkpoint {path!r} has no valid step ({step!r})")
    return state


def finetune_(
    model: nn.Module,
    reference: nn.Module,
    batches: Sequence[Any] | Iterable[Any],
    config: FinetuneConfig | None = None,
    *,
    layers: Sequence[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 64,
) -> FinetuneReport:
    """Tune ``model``'s norm weights and per-layer gains in place to match ``reference``'s outputs.

    Parameters
    ----------
    model : the quantized model (``HNLQLinear`` layers, or ``nn.Linear`` holding dequantized weights)
    reference : the float model it was quantized from (same architecture and inputs; not modified)
    batches : calibration batches, (b, seqlen) LongTensors or mappings with ``input_ids``; the last
        ``config.holdout`` are held out
    config : FinetuneConfig
    layers : names of the linears that get a gain (default: every ``HNLQLinear`` in ``model``)
    checkpoint : file to save the tuning state to every ``checkpoint_every`` steps and to resume from when it
        exists (see the module doc); it is left in place after the call
    checkpoint_every : steps between checkpoints (rounded up to a multiple of ``config.code_every`` with
        ``codes=True``, where the latents are re-quantized)

    Returns
    -------
    FinetuneReport. The model is changed in place only when the held-out loss went down.
    """
    config = FinetuneConfig() if config is None else config
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"checkpoint must be a path, got {type(checkpoint).__name__}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    ckpt = os.fspath(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not os.path.isdir(os.path.dirname(os.path.abspath(ckpt))):
        raise ValueError(f"checkpoint {ckpt!r}: its directory does not exist (checked before hours of tuning)")
    if config.codes:
        checkpoint_every = -(-checkpoint_every // config.code_every) * config.code_every
    for name, m in (("model", model), ("reference", reference)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    if model is reference:
        raise ValueError("reference must be a separate float model, not the quantized model itself")
    vocab = vocab_size(model)
    data = [_ids(b, vocab) for b in batches]
    if len(data) <= config.holdout:
        raise ValueError(f"need more than holdout={config.holdout} calibration batches, got {len(data)}")
    train, held = data[: -config.holdout], data[-config.holdout :]
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, HNLQLinear)]
    mods = dict(model.named_modules())
    for n in layers:
        if n not in mods or not isinstance(mods[n], nn.Linear | HNLQLinear):
            raise ValueError(f"layers: {n!r} is not a linear of the model")

    t0 = time.perf_counter()
    report = FinetuneReport()
    was_training = model.training
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    norm_params: list[nn.Parameter] = []
    if config.norms:
        for m in model.modules():
            w = getattr(m, "weight", None)
            if "Norm" in type(m).__name__ and isinstance(w, nn.Parameter):
                norm_params.append(w)
    head_params: list[nn.Parameter] = []
    if config.head:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        w = getattr(head, "weight", None)
        if not isinstance(w, nn.Parameter):
            raise ValueError("head=True needs a float output head (model.get_output_embeddings() with a weight)")
        if not any(w is p for p in norm_params):
            head_params.append(w)
    gains = [_Gain(mods[n], config.gains == "row") for n in layers] if config.scales else []
    if config.codes and not any(isinstance(mods[n], HNLQLinear) for n in layers):
        for g in gains:
            g.remove()
        raise ValueError("codes=True needs HNLQLinear layers (the compressed modules of quantize_)")
    if not norm_params and not gains and not head_params and not config.codes:
        raise ValueError("nothing to tune: the model has no norm layer and no quantized linear")
    # decode each compressed weight once for the whole tuning, not at every forward
    cached = [m for m in model.modules() if isinstance(m, HNLQLinear) and not m.cache_weight]
    for m in cached:
        m.cache_weight = True
        m.rotated_weight()  # decoded now: every forward (held-out scores too) takes the same dense path
    latents = {n: _Latent(mods[n]) for n in layers if config.codes and isinstance(mods[n], HNLQLinear)}
    floats = norm_params + head_params  # tuned in place; restored from these copies unless kept
    saved_floats = [p.detach().clone() for p in floats]
    report.n_norm_params, report.n_gains = sum(p.numel() for p in norm_params), len(gains)
    report.n_head_params = sum(p.numel() for p in head_params)
    report.n_code_params = sum(lat.z.numel() for lat in latents.values())
    groups = [{"params": norm_params + [g.log_g for g in gains], "lr": config.lr}]
    if head_params:
        groups.append({"params": head_params, "lr": config.head_lr})
    for lat in latents.values():
        groups.append({"params": [lat.z], "lr": config.code_lr * float(lat.mod.scale.float().mean())})
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in floats:
            p.requires_grad_(True)
        model.eval()  # no dropout: the objective is the deterministic inference model
        reference.eval()

        with torch.no_grad():
            targets_held = [reference(**b) for b in held]
            kinds = {_output(o)[0] for o in targets_held}
            report.objective = kinds.pop()

            def held_loss() -> float:
                return float(
                    sum(
                        _loss(report.objective, _output(model(**b))[1], _output(t)[1])
                        for b, t in zip(held, targets_held, strict=True)
                    )
                    / len(held)
                )

            report.holdout_before = held_loss()
        opt = torch.optim.Adam(groups)
        base_lr = [g["lr"] for g in opt.param_groups]
        tuned = norm_params + [g.log_g for g in gains] + head_params + [lat.z for lat in latents.values()]
        identity = {"config": dataclasses.asdict(config), "layers": list(layers)}

        def checkpoint_state(step: int) -> dict[str, Any]:
            return identity | {
                "version": _CHECKPOINT_VERSION,
                "holdout_before": report.holdout_before,
                "step": step,
                "params": [p.detach().clone() for p in tuned],
                "optimizer": opt.state_dict(),
                "train_losses": list(report.train_losses),
            }

        start = 0
        if ckpt is not None and os.path.exists(ckpt):
            state = _load_checkpoint(ckpt, identity | {"holdout_before": report.holdout_before}, tuned)
            with torch.no_grad():
                for p, t in zip(tuned, state["params"], strict=True):
                    p.copy_(t)
            opt.load_state_dict(state["optimizer"])
            start, report.train_losses = state["step"], list(state["train_losses"])
            report.resumed_from = start
        for step in range(start, config.steps):
            if ckpt is not None and step > start and step % checkpoint_every == 0:
                _save_checkpoint(ckpt, checkpoint_state(step))
            if latents and step and step % config.code_every == 0:
                for lat in latents.values():
                    lat.requantize()
            b = train[step % len(train)]
            with torch.no_grad():
                target = _output(reference(**b))[1]
            loss = _loss(report.objective, _output(model(**b))[1], target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune_: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.schedule == "cosine":
                for group, lr in zip(opt.param_groups, base_lr, strict=True):
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
            opt.step()
            report.train_losses.append(float(loss.detach()))
        if ckpt is not None and start < config.steps:  # the finished state: a repeated call only scores it
            _save_checkpoint(ckpt, checkpoint_state(config.steps))
        for lat in latents.values():  # the model scored is the one stored: the codes of the final latents
            lat.requantize()
        with torch.no_grad():
            report.holdout_after = held_loss()
        report.kept = report.holdout_after < report.holdout_before
        if report.kept:
            changed, total = 0.0, 0
            for name, lat in latents.items():
                new, frac = lat.rebuilt(cache_weight=lat.mod not in cached)
                lat.remove()
                for g in gains:
                    if g.mod is lat.mod:
                        g.remove()
                        g.mod = new
                model.set_submodule(name, new)
                changed, total = (
                    changed + frac * new.in_features * new.out_features,
                    total + new.in_features * new.out_features,
                )
            report.blocks_changed = changed / max(total, 1)
            for g in gains:
                g.fold()
    finally:
        if not report.kept:  # no gain, or an exception: the model is left exactly as it came in
            with torch.no_grad():
                for p, s in zip(floats, saved_floats, strict=True):
                    p.copy_(s)
        for g in gains:
            g.remove()
        for lat in latents.values():
            lat.remove()
        for m in cached:
            m.cache_weight = False
            m._w_cache = None
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
        model.train(was_training)
        del saved_floats
    report.seconds = time.perf_counter() - t0
    return report


def clone_reference(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to serve as ``reference`` (call before quantizing)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
