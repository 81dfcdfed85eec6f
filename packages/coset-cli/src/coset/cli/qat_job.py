"""FP32 vs HNLQ quantization-aware training on offline data (the ``coset`` command's main job).

Models: a small 1-D CNN for MNIST-1D (three stride-2 convolutions, 32 channels, and a linear head, after
the MNIST-1D paper's CNN baseline) and an MLP (64-128-128-10) for scikit-learn's digits.

Variants, all trained from the same initialisation with the same seed, data order and budget:

* ``fp32``: the float model;
* ``ptq_w``: the trained fp32 model with its weights quantized after training (no training, a reference);
* ``qat_w``: weights quantized with HNLQ (default D4, q=4, M=2, per-channel beta) during training;
* ``qat_wa``: weights and the inputs of every layer but the first (the raw data stays float).

:func:`run_qat_comparison` returns per-variant final test accuracy, curves, effective bits/weight and
compressed size (from :func:`coset.nn.save_compressed`), overload rates and timings, and can write a PNG
and a JSON file of the curves.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coset.nn import QATConfig, quantize_model, quantized_layers, save_compressed
from coset.quant import QuantizationConfig

from .data import DATASETS, Dataset, load_dataset

__all__ = [
    "MNIST1DCNN",
    "DigitsMLP",
    "make_model",
    "train_model",
    "evaluate",
    "variant_configs",
    "run_qat_comparison",
    "run_main_job",
    "print_report",
    "plot_curves",
    "DEFAULTS",
    "VARIANTS",
    "MAIN_JOB_EPOCHS",
]

VARIANTS = ("fp32", "ptq_w", "qat_w", "qat_wa")

#: per dataset: epochs, batch size, Adam learning rate (cosine-decayed to 0)
DEFAULTS = {
    "mnist1d": {"epochs": 30, "batch_size": 100, "lr": 1e-2},
    "digits": {"epochs": 30, "batch_size": 64, "lr": 3e-3},
}


class MNIST1DCNN(nn.Module):
    """1-D CNN for MNIST-1D: input (B, 40) -> logits (B, 10).

    conv(1->C, k5, s2, p1) -> ReLU -> conv(C->C, k3, s2, p1) -> ReLU -> conv(C->C, k3, s2, p1) -> ReLU ->
    flatten (C*5) -> linear(10).
    """

    def __init__(self, channels: int = 32, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        L = length
        for k in (5, 3, 3):
            L = (L + 2 - k) // 2 + 1
        self.fc = nn.Linear(channels * L, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc(h.flatten(1))


class DigitsMLP(nn.Module):
    """MLP for the 8x8 digits: input (B, 64) -> logits (B, 10)."""

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make_model(dataset: str) -> nn.Module:
    """The model used for ``dataset`` ("mnist1d" -> MNIST1DCNN, "digits" -> DigitsMLP)."""
    if dataset == "mnist1d":
        return MNIST1DCNN()
    if dataset == "digits":
        return DigitsMLP()
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def variant_configs(model: nn.Module, config: QuantizationConfig) -> dict[str, dict]:
    """Per-layer QATConfig dicts of the quantized variants: ``{"qat_w": {...}, "qat_wa": {...}}``.

    The first quantizable layer's input (the raw data) stays float in ``qat_wa``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    w = QATConfig(weight=config)
    wa = QATConfig(weight=config, activation=config)
    return {"qat_w": {"*": w}, "qat_wa": {names[0]: w, "*": wa}}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """``(accuracy in %, mean cross-entropy)`` of ``model`` in eval mode (restores the previous mode)."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / len(x), loss / len(x)


def train_model(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
    desc: str = "",
) -> dict:
    """Adam + cosine decay, cross-entropy; evaluates the test set after every epoch.

    Returns
    -------
    dict with ``epoch``, ``train_loss``, ``test_acc``, ``test_loss`` lists, ``train_seconds`` and
    ``step_ms`` (mean wall time per optimizer step).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    curves: dict[str, Any] = {"epoch": [], "train_loss": [], "test_acc": [], "test_loss": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=desc, leave=False)
    t_train, steps = 0.0, 0
    model.train()
    for ep in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            steps += 1
        t_train += time.perf_counter() - t0
        acc, tl = evaluate(model, data.x_test, data.y_test)
        curves["epoch"].append(ep)
        curves["train_loss"].append(tot / n)
        curves["test_acc"].append(acc)
        curves["test_loss"].append(tl)
        if bar is not None:
            bar.set_postfix(loss=f"{tot / n:.3f}", acc=f"{acc:.1f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    curves["train_seconds"] = t_train
    curves["step_ms"] = 1000.0 * t_train / max(steps, 1)
    return curves


def _overload_rates(model: nn.Module) -> tuple[float, float]:
    w_num = w_den = 0.0
    a = []
    for m in quantized_layers(model).values():
        if m.qconfig.weight is not None:
            m.quantized_weight()
            st = m.stats()
            nb = st["blocks"]
            w_num += st["weight_overload_rate"] * nb
            w_den += nb
        r = m.stats()["act_overload_rate"]
        if r == r:
            a.append(r)
    return (w_num / w_den if w_den else float("nan")), (sum(a) / len(a) if a else float("nan"))


def _compressed(model: nn.Module, out_dir: Path | None, tag: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = (out_dir / f"{tag}.safetensors") if out_dir is not None else Path(tmp) / f"{tag}.safetensors"
        rep = save_compressed(model, path)
        d = rep.to_dict()
    d["path"] = str(path) if out_dir is not None else None
    return d


def _fp32_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_qat_comparison(
    dataset: str = "mnist1d",
    epochs: int | None = None,
    seed: int = 0,
    config: QuantizationConfig | None = None,
    progress: bool = True,
    out_dir: None | str | os.PathLike = None,
    variants: Iterable[str] = VARIANTS,
    batch_size: int | None = None,
    lr: float | None = None,
    threads: int | None = None,
    data: Dataset | None = None,
) -> dict:
    """Train FP32 and HNLQ-QAT versions of the dataset's model with the same seed and budget.

    Parameters
    ----------
    dataset : "mnist1d" (1-D CNN) or "digits" (MLP)
    epochs, batch_size, lr : training budget (defaults in :data:`DEFAULTS`)
    seed : seeds the initialisation (identical for all variants) and the data order
    config : HNLQ config of weights and activations (default D4, q=4, M=2)
    progress : tqdm bars
    out_dir : if given, writes ``qat_<dataset>.png`` (curves), ``qat_<dataset>.json`` and the compressed
        checkpoints ``qat_<dataset>_<variant>.safetensors`` there
    variants : subset of ("fp32", "ptq_w", "qat_w", "qat_wa"); "ptq_w" needs "fp32"
    threads : torch.set_num_threads during the run (default 1: these models are tiny, and two threads
        were up to 40x slower than one on a busy 2-core machine); restored afterwards
    data : a preloaded :class:`Dataset` (default: loaded by name)

    Returns
    -------
    dict with ``dataset``, ``epochs``, ``seed``, ``config``, ``variants`` (per variant:
    ``final_test_acc``, ``best_test_acc``, ``curves``, ``bits_per_weight``, ``size_bytes``, and for
    quantized variants ``compressed`` (CheckpointReport dict), ``weight_overload_rate``,
    ``act_overload_rate``), ``gap_points`` (fp32 minus variant accuracy) and ``files``.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    variants = tuple(variants)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants must be among {VARIANTS}, got {v!r}")
    if "ptq_w" in variants and "fp32" not in variants:
        raise ValueError("variant 'ptq_w' needs 'fp32'")
    if config is None:
        config = QuantizationConfig()
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    d = DEFAULTS[dataset]
    epochs = int(d["epochs"]) if epochs is None else epochs
    batch_size = int(d["batch_size"]) if batch_size is None else batch_size
    lr = float(d["lr"]) if lr is None else lr
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else 1)
    try:
        data = data if data is not None else load_dataset(dataset)
        torch.manual_seed(seed)
        init = make_model(dataset).state_dict()
        cfgs = variant_configs(make_model(dataset), config)
        res: dict = {
            "dataset": dataset,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "config": QATConfig(weight=config).to_dict()["weight"],
            "threads": torch.get_num_threads(),
            "variants": {},
        }
        fp32_model = None
        for v in variants:
            if v == "ptq_w":
                continue
            model = make_model(dataset)
            model.load_state_dict(init)
            if v != "fp32":
                quantize_model(model, cfgs[v])
            curves = train_model(model, data, epochs, batch_size, lr, seed, progress, desc=f"{dataset} {v}")
            entry = {
                "final_test_acc": curves["test_acc"][-1],
                "best_test_acc": max(curves["test_acc"]),
                "curves": curves,
            }
            if v == "fp32":
                fp32_model = model
                entry.update(bits_per_weight=32.0, size_bytes=_fp32_bytes(model))
            else:
                comp = _compressed(model, out, f"qat_{dataset}_{v}")
                wo, ao = _overload_rates(model)
                entry.update(
                    bits_per_weight=comp["effective_bits_per_weight"],
                    size_bytes=comp["file_bytes"],
                    compressed=comp,
                    weight_overload_rate=wo,
                    act_overload_rate=ao,
                )
            res["variants"][v] = entry
        if "ptq_w" in variants:
            import copy

            assert fp32_model is not None  # "ptq_w" needs "fp32", checked above
            model = copy.deepcopy(fp32_model)
            quantize_model(model, cfgs["qat_w"])
            acc, _ = evaluate(model, data.x_test, data.y_test)
            comp = _compressed(model, out, f"qat_{dataset}_ptq_w")
            wo, _ = _overload_rates(model)
            res["variants"]["ptq_w"] = {
                "final_test_acc": acc,
                "best_test_acc": acc,
                "bits_per_weight": comp["effective_bits_per_weight"],
                "size_bytes": comp["file_bytes"],
                "compressed": comp,
                "weight_overload_rate": wo,
                "act_overload_rate": float("nan"),
            }
        if "fp32" in res["variants"]:
            f = res["variants"]["fp32"]["final_test_acc"]
            res["gap_points"] = {v: f - e["final_test_acc"] for v, e in res["variants"].items() if v != "fp32"}
        res["files"] = {}
        if out is not None:
            png = plot_curves(res, out / f"qat_{dataset}.png")
            if png is not None:
                res["files"]["png"] = str(png)
            js = out / f"qat_{dataset}.json"
            res["files"]["json"] = str(js)
            js.write_text(json.dumps(res, indent=1, default=float))
        return res
    finally:
        torch.set_num_threads(old_threads)


def plot_curves(result: dict, path: str | os.PathLike) -> Path | None:
    """Test accuracy and train loss per epoch of every trained variant (PTQ as a dashed line). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for v, e in result["variants"].items():
        if "curves" in e:
            c = e["curves"]
            lab = f"{v} ({e['final_test_acc']:.1f}%, {e['bits_per_weight']:.2f} b/w)"
            a1.plot(c["epoch"], c["test_acc"], label=lab)
            a2.plot(c["epoch"], c["train_loss"], label=v)
        else:
            a1.axhline(e["final_test_acc"], ls="--", c="gray", label=f"{v} ({e['final_test_acc']:.1f}%)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy (%)")
    a1.set_title(f"{result['dataset']}: FP32 vs HNLQ QAT")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.set_xlabel("epoch")
    a2.set_ylabel("train loss")
    a2.set_yscale("log")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: epochs of the ``coset`` command's default run (about a minute on 2 cores; the benchmark uses 30)
MAIN_JOB_EPOCHS = 20


def run_main_job(
    epochs: int | None = None, seed: int = 0, progress: bool = True, out_dir: None | str | os.PathLike = None
) -> dict:
    """The ``coset`` command's default run: :func:`run_qat_comparison` on MNIST-1D, D4 q=4 M=2, all four
    variants, ``MAIN_JOB_EPOCHS`` epochs unless given."""
    epochs = MAIN_JOB_EPOCHS if epochs is None else epochs
    return run_qat_comparison("mnist1d", epochs=epochs, seed=seed, progress=progress, out_dir=out_dir)


def print_report(result: dict) -> None:
    """Print the per-variant table of a :func:`run_qat_comparison` result."""
    c = result["config"]
    print(
        f"{result['dataset']}: {result['epochs']} epochs, seed {result['seed']}, "
        f"HNLQ {c['lattice_type']} q={c['q']} M={c['M']}"
    )
    hdr = (
        f"{'variant':<8}{'test acc %':>11}{'gap pts':>9}{'bits/w':>8}{'size B':>10}{'w-ovl %':>9}"
        f"{'a-ovl %':>9}{'step ms':>9}"
    )
    print(hdr)
    print("-" * len(hdr))

    def cell(v, width, fmt=".1f", scale=1.0):  # "-" where a column does not apply to the variant
        return f"{'-':>{width}}" if v is None or v != v else f"{scale * v:>{width}{fmt}}"

    for v, e in result["variants"].items():
        gap = result.get("gap_points", {}).get(v, 0.0)
        step = e["curves"].get("step_ms") if "curves" in e else None
        print(
            f"{v:<8}{e['final_test_acc']:>11.2f}{gap:>9.2f}{e['bits_per_weight']:>8.2f}{e['size_bytes']:>10d}"
            f"{cell(e.get('weight_overload_rate'), 9, scale=100)}{cell(e.get('act_overload_rate'), 9, scale=100)}"
            f"{cell(step, 9, '.2f')}"
        )
    print(
        "variants: fp32 = float baseline; qat_w = QAT of the weights; qat_wa = weights and activations; "
        "ptq_w = the fp32 model quantized after training. bits/w = labels + T + betas + metadata per weight; "
        "w-/a-ovl = share of weight/activation blocks that needed T > 0."
    )
    for k, p in result.get("files", {}).items():
        print(f"{k}: {p}")
