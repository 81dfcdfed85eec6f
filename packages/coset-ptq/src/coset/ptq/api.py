"""The user verb: ``quantize_(model, calib, config) -> PTQReport`` (in place, torchao-style).

It walks the model's transformer blocks with :func:`coset.ptq.calib.sequential_quantize` (or, with
``sequential=False``, takes all Hessians from the float model in one pass), quantizes each selected linear
with :func:`coset.ptq.hnlq_block.quantize_linear`, and finally swaps every HNLQ-quantized ``nn.Linear`` for a
compressed :class:`coset.ptq.layers.HNLQLinear` (scalar baselines keep an ``nn.Linear`` holding ``W_hat``).
While the driver runs, each quantized layer's ``W_hat`` is written into its ``nn.Linear`` so propagation
through later blocks is a plain matmul (the compressed module computes the same product).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import resource
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .block_tuning import BlockTuneConfig
from .calib import collect_hessians, find_blocks, sequential_quantize
from .hnlq_block import MethodConfig, quantize_linear

__all__ = ["PTQConfig", "PTQReport", "quantize_", "calibration_batches", "cpu_seconds", "peak_rss_mb"]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (robust to other load on the machine, unlike wall time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pos_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class PTQConfig:
    """How to post-training-quantize a model (frozen, validated).

    Attributes
    ----------
    method : MethodConfig
        Per-linear method and code (``coset.ptq.hnlq_block``); default ``MethodConfig.for_bits(4)``: HNLQ E8
        q=16 M=1 + rotation + LDLQ.
    skip : tuple of str
        fnmatch patterns (or substrings) of linear names left in float (default ``("lm_head",)``; only
        linears inside the transformer blocks are ever candidates).
    nsamples, seqlen : int
        Calibration windows used by :func:`calibration_batches` (and the cap applied by :func:`quantize_`
        to a 2-D token tensor).
    batch_size : int
        Windows per calibration forward.
    sequential : bool
        True: GPTQ-style, each block's Hessians from already-quantized upstream blocks. False: all Hessians
        from the float model in one pass.
    true_sequential : bool
        Within a block, re-collect Hessians after each group of linears (q/k/v → o → gate/up → down).
    asymmetric : bool
        Asymmetric calibration (needs ``sequential``): each linear is quantized toward the float model's
        output on the quantized model's inputs (:func:`coset.ptq.calib.asymmetric_target`), not toward its own
        output on those inputs. One extra float block forward per collection. Experimental: measured harmful on
        SmolLM2-135M (docs/ptq.md), off by default.
    block_tune : BlockTuneConfig or None
        Block tuning (needs ``sequential``; implies true-sequential re-collection): after each quantized group
        of a block, the block's still-float later linears are tuned toward the float (or unquantized) block
        output (:mod:`coset.ptq.block_tuning`, QuIP#'s first fine-tuning stage). Needs at least 2 calibration
        forward batches (the last is held out). Reports land in ``PTQReport.block_tuning``.
    seed : int or None
        Base seed of the per-layer rotations (overrides ``method.seed`` when given).
    compress : bool
        Install compressed ``HNLQLinear`` modules for HNLQ methods (False keeps ``nn.Linear`` with W_hat).
    progress : bool
        Per-layer progress bar (tqdm, when installed).
    layer_methods : mapping of str to MethodConfig, optional
        Per-layer overrides of ``method`` (exact linear names, e.g. :attr:`coset.ptq.allocate.RatePlan.methods`
        for mixed precision); all must be HNLQ if ``method`` is, scalar if it is not.
    """

    method: MethodConfig = field(default_factory=lambda: MethodConfig.for_bits(4))
    skip: tuple[str, ...] = ("lm_head",)
    nsamples: int = 64
    seqlen: int = 512
    batch_size: int = 8
    sequential: bool = True
    true_sequential: bool = False
    asymmetric: bool = False
    block_tune: BlockTuneConfig | None = None
    seed: int | None = None
    compress: bool = True
    progress: bool = True
    layer_methods: Mapping[str, MethodConfig] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, MethodConfig):
            raise TypeError(f"method must be a MethodConfig, got {type(self.method).__name__}")
        if not isinstance(self.skip, (str, Iterable)) or isinstance(self.skip, bytes):
            raise TypeError(f"skip must be a str or a sequence of str, got {type(self.skip).__name__}")
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        if not all(isinstance(s, str) and s for s in skip):
            raise ValueError(f"skip must be a sequence of non-empty strings, got {self.skip!r}")
        object.__setattr__(self, "skip", skip)
        for name in ("nsamples", "seqlen", "batch_size"):
            _pos_int(name, getattr(self, name))
        for name in ("sequential", "true_sequential", "asymmetric", "compress", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.true_sequential and not self.sequential:
            raise ValueError("true_sequential=True requires sequential=True")
        if self.asymmetric and not self.sequential:
            raise ValueError("asymmetric=True requires sequential=True")
        if self.block_tune is not None:
            if not isinstance(self.block_tune, BlockTuneConfig):
                raise TypeError(f"block_tune must be a BlockTuneConfig or None, got {type(self.block_tune).__name__}")
            if not self.sequential:
                raise ValueError("block_tune requires sequential=True")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
                raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")
            object.__setattr__(self, "method", dataclasses.replace(self.method, seed=self.seed))
        if self.layer_methods is not None:
            if not isinstance(self.layer_methods, Mapping):
                raise TypeError(f"layer_methods must be a mapping name -> MethodConfig, got {self.layer_methods!r}")
            lm = {}
            for k, v in self.layer_methods.items():
                if not isinstance(k, str) or not k:
                    raise ValueError(f"layer_methods keys must be non-empty layer names, got {k!r}")
                if not isinstance(v, MethodConfig):
                    raise TypeError(f"layer_methods[{k!r}] must be a MethodConfig, got {type(v).__name__}")
                if v.is_hnlq != self.method.is_hnlq:
                    raise ValueError(
                        f"layer_methods[{k!r}] ({v.method}) and method ({self.method.method}) must be "
                        "both HNLQ or both scalar"
                    )
                lm[k] = v if self.seed is None else dataclasses.replace(v, seed=self.seed)
            object.__setattr__(self, "layer_methods", MappingProxyType(lm))

    def skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or p in name for p in self.skip)

    def method_for(self, name: str) -> MethodConfig:
        """The method of linear ``name``: its ``layer_methods`` entry, else ``method``."""
        if self.layer_methods is not None and name in self.layer_methods:
            return self.layer_methods[name]
        return self.method


@dataclass
class PTQReport:
    """What :func:`quantize_` did.

    ``layers``: one dict per quantized linear (name, shape, seconds, and ``quantize_linear``'s metrics:
    proxy, rel_proxy, sqnr_db, nominal_bits, overload_frac, ...; plus ``nbytes`` all-in bytes).
    ``bits``: all-in and nominal bits per quantized weight (from the bytes of the compressed state / packed
    scalar codes). ``wall_s``: total wall time; ``cpu_s``: process CPU time spent (all threads);
    ``peak_rss_mb``: process peak RSS after quantization.
    """

    method: str
    layers: list[dict] = field(default_factory=list)
    n_weights: int = 0
    nbytes: int = 0
    all_in_bits: float = float("nan")
    nominal_bits: float = float("nan")
    rel_proxy_mean: float = float("nan")
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    skipped: list[str] = field(default_factory=list)
    block_tuning: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.method}: {len(self.layers)} linears, {self.n_weights} weights, all-in "
            f"{self.all_in_bits:.3f} b/w (nominal {self.nominal_bits:.3f}), mean rel. proxy "
            f"{self.rel_proxy_mean:.4g}, {self.wall_s:.1f} s wall ({self.cpu_s:.1f} s CPU), peak RSS {self.peak_rss_mb:.0f} MiB"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def calibration_batches(tokenizer: Any, texts: Sequence[str], config: PTQConfig) -> list[torch.Tensor]:
    """``config.nsamples`` windows of ``config.seqlen`` tokens from ``texts``, in batches of
    ``config.batch_size`` (LongTensors (b, seqlen))."""
    from .data import token_windows

    ids = token_windows(tokenizer, texts, config.seqlen, config.nsamples)
    return list(ids.split(config.batch_size))


def _as_batches(calib: Any, config: PTQConfig) -> list[Any]:
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0 or calib.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"calib must be an integer tensor (n, seqlen) of token ids, got shape "
                f"{tuple(calib.shape)} {calib.dtype}"
            )
        return list(calib[: config.nsamples].split(config.batch_size))
    if isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise ValueError("calib must be a (n, seqlen) token tensor or an iterable of batches")
    batches = list(calib)
    if not batches:
        raise ValueError("calib is empty")
    return batches


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return None
    return tqdm(total=total, desc=desc, unit="layer", leave=False)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """``model.get_submodule(name)``, which must be an ``nn.Linear`` (the calibration only visits those)."""
    lin = model.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} is a {type(lin).__name__}, expected an nn.Linear")
    return lin


def quantize_(model: nn.Module, calib: Any, config: PTQConfig | None = None) -> PTQReport:
    """Quantize the linears of ``model``'s transformer blocks in place.

    Parameters
    ----------
    model : nn.Module
        A transformer (Llama-, BERT-, GPT-2-like: anything with an ``nn.ModuleList`` of blocks).
    calib : LongTensor (n, seqlen) or iterable of batches
        Token ids (split into batches of ``config.batch_size``, at most ``config.nsamples`` rows), or an
        iterable of LongTensors (b, seqlen) / mappings of model kwargs with ``input_ids``.
    config : PTQConfig

    Returns
    -------
    PTQReport
    """
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise TypeError(f"config must be a PTQConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    batches = _as_batches(calib, config)
    t0, c0 = time.perf_counter(), cpu_seconds()
    prefix, blocks = find_blocks(model)
    candidates = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear) and n]
    report = PTQReport(method=config.method.method)
    report.skipped = [n for n in candidates if config.skipped(n)]
    chosen = set(candidates) - set(report.skipped)
    if not chosen:
        raise ValueError("no linear layer left to quantize (all skipped by config.skip)")
    if config.layer_methods is not None:
        unknown = sorted(set(config.layer_methods) - chosen)
        if unknown:
            raise ValueError(
                f"layer_methods names {unknown[:3]} that are not quantized linears of this model (or are skipped)"
            )
    cfg = config.method
    codes_by_name: dict[str, Any] = {}
    bar = _progress(len(chosen), config.progress, f"coset ptq {cfg.method}")

    def qfn(name: str, lin: nn.Linear, H: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        W_hat, codes, metrics = quantize_linear(lin.weight.detach(), H, config.method_for(name), name=name)
        codes_by_name[name] = codes
        report.layers.append(
            {"name": name, "shape": list(lin.weight.shape), "seconds": time.perf_counter() - t, **metrics}
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{name.split('.', 2)[-1]} rel {metrics['rel_proxy']:.2e}")
        return W_hat

    include = chosen.__contains__
    try:
        if config.sequential:
            seq = sequential_quantize(
                model,
                batches,
                qfn,
                blocks=blocks,
                true_sequential=config.true_sequential,
                include=include,
                asymmetric=config.asymmetric,
                block_tune=config.block_tune,
            )
            report.block_tuning = dict(seq.block_tuning)
        else:
            hessians = collect_hessians(model, batches, blocks=blocks, include=include)
            for name, H in hessians.items():
                lin = _linear(model, name)
                with torch.no_grad():
                    lin.weight.copy_(qfn(name, lin, H))
            del hessians
    finally:
        if bar is not None:
            bar.close()

    # Bytes: compressed modules for HNLQ (exactly what save_quantized writes), packed ints + fp16 scales for
    # scalar baselines.
    nbytes: dict[str, int | None] = {}
    if cfg.is_hnlq:
        from .bits import bits_per_weight
        from .layers import HNLQLinear

        mods = {}
        for name, codes in codes_by_name.items():
            lin = _linear(model, name)
            mod = HNLQLinear.from_codes(codes, None if lin.bias is None else lin.bias.detach())
            mods[name] = mod
            if config.compress:
                model.set_submodule(name, mod)
        holder = nn.ModuleDict({n.replace(".", "/"): m for n, m in mods.items()})
        bits = bits_per_weight(holder)
        for name in mods:
            lb = bits.layers.get(name.replace(".", "/"))
            nbytes[name] = lb.nbytes if lb is not None else None
        report.nbytes, report.all_in_bits, report.nominal_bits = bits.nbytes, bits.all_in, bits.nominal
        report.n_weights = bits.weights
    else:
        scalar_nbytes = {name: int(codes.nbytes()) for name, codes in codes_by_name.items()}
        nbytes.update(scalar_nbytes)
        report.n_weights = sum(int(codes.dequantize().numel()) for codes in codes_by_name.values())
        report.nbytes = sum(scalar_nbytes.values())
        report.all_in_bits = 8.0 * report.nbytes / report.n_weights
        nb = [(config.method_for(n).bits, int(c.dequantize().numel())) for n, c in codes_by_name.items()]
        report.nominal_bits = sum(b * k for b, k in nb) / sum(k for _, k in nb)
    for row in report.layers:
        row["nbytes"] = nbytes.get(row["name"])
    w = [r["shape"][0] * r["shape"][1] for r in report.layers]
    report.rel_proxy_mean = float(sum(r["rel_proxy"] * wi for r, wi in zip(report.layers, w, strict=True)) / sum(w))
    report.wall_s = time.perf_counter() - t0
    report.cpu_s = cpu_seconds() - c0
    report.peak_rss_mb = peak_rss_mb()
    return report
