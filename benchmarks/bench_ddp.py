"""2-process DDP convergence benchmark of the coset.dist HNLQ hooks against PyTorch's built-in hooks.

Trains the same MLP (same seed, same data order) with: no hook (fp32 all-reduce), ``fp16_compress_hook``,
PowerSGD (rank 2) and each HNLQ mode, on CPU with gloo, and records final test accuracy, bytes sent per rank
per step (ring model, counted at the collective calls) and step time.

    uv run python benchmarks/bench_ddp.py                       # digits + mnist1d -> benchmarks/results/ddp.*
    uv run python benchmarks/bench_ddp.py --dataset digits --steps 300 --methods fp32,hnlq-modular --out /tmp/x

Bytes: every ``dist.all_reduce`` / ``dist.all_gather`` issued during training is counted as
``2 (W-1)/W x bytes`` (all-reduce) or ``(W-1) x bytes`` (all-gather); DDP's own all-reduce (no hook) is
counted the same way from the bucket sizes. "bytes/step" is the mean over the steps after warm-up
(``start_iter``; PowerSGD and HNLQ both use 10 plain steps first); "bytes/step (all)" includes warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from coset.dist import HNLQHookState, default_config, hnlq_hook

START_ITER = 10
ALL_METHODS = [
    "fp32",
    "fp16",
    "powersgd-r2",
    "hnlq-allgather",
    "hnlq-modular",
    "hnlq-modular-q4",
    "hnlq-decode",
]
EXTRA_METHODS = ["hnlq-modular-q16"]
DEFAULTS = {  # dataset -> (steps, global batch, lr, hidden)
    "digits": (600, 64, 2e-3, 128),
    "mnist1d": (3000, 128, 2e-3, 256),
}


def load_data(name: str, seed: int):
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = 42
        d = make_dataset(args)
        Xtr, ytr, Xte, yte = d["x"], d["y"], d["x_test"], d["y_test"]
    else:
        raise ValueError(f"dataset must be 'digits' or 'mnist1d', got {name!r}")
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    Xtr, Xte = t(Xtr, torch.float32), t(Xte, torch.float32)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    return (Xtr - mu) / sd, t(ytr, torch.long), (Xte - mu) / sd, t(yte, torch.long)


def make_model(d_in: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


class ByteCounter:
    """Counts bytes at ``dist.all_reduce`` / ``dist.all_gather`` (ring model)."""

    def __init__(self, world_size: int):
        self.W = world_size
        self.bytes = 0
        self._ar, self._ag = dist.all_reduce, dist.all_gather

        def all_reduce(tensor, *a, **k):
            self.bytes += math.ceil(2 * (self.W - 1) * tensor.numel() * tensor.element_size() / self.W)
            return self._ar(tensor, *a, **k)

        def all_gather(tensor_list, tensor, *a, **k):
            self.bytes += (self.W - 1) * tensor.numel() * tensor.element_size()
            return self._ag(tensor_list, tensor, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def register_method(ddp: DDP, method: str, W: int):
    if method == "fp32":
        return None
    if method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if method == "powersgd-r2":
        st = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=START_ITER, random_seed=0
        )
        ddp.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
        return st
    kw = dict(error_feedback=True, start_iter=START_ITER)
    if method == "hnlq-allgather":
        st = HNLQHookState(mode="allgather", **kw)
    elif method == "hnlq-modular":  # q=8, M=2: 6-bit codes, 9 per int64 word at W=2 (+1 guard bit)
        st = HNLQHookState(config=default_config(8, 2), mode="modular", chunk_size=256, **kw)
    elif method == "hnlq-modular-q4":  # q=4, M=2: 4-bit codes, 12 per int64 word at W=2
        st = HNLQHookState(config=default_config(4, 2), mode="modular", chunk_size=64, **kw)
    elif method == "hnlq-modular-q16":  # q=16, M=2: uint8 codes (mod 256 wrap)
        st = HNLQHookState(config=default_config(16, 2), mode="modular", chunk_size=256, **kw)
    elif method == "hnlq-decode":
        st = HNLQHookState(mode="decode", **kw)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS + EXTRA_METHODS}")
    ddp.register_comm_hook(st, hnlq_hook)
    return st


def train_one(rank, W, method, data, steps, batch, lr, hidden, seed, counter):
    Xtr, ytr, Xte, yte = data
    model = make_model(Xtr.shape[1], hidden, seed)
    ddp = DDP(model)
    state = register_method(ddp, method, W)
    opt = torch.optim.Adam(ddp.parameters(), lr=lr)
    numel = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(Xtr), generator=gen), 0
    per_step_bytes, times = [], []
    for _ in range(steps):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(Xtr), generator=gen), 0
        idx = perm[pos : pos + batch][rank::W]
        pos += batch
        b0 = counter.bytes
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(Xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        sent = counter.bytes - b0
        if method == "fp32":  # DDP's built-in all-reduce bypasses dist.all_reduce: count the fp32 buckets
            sent = math.ceil(2 * (W - 1) * 4 * numel / W)
        per_step_bytes.append(sent)
    with torch.no_grad():
        acc = float((model(Xte).argmax(-1) == yte).float().mean())
        train_loss = float(F.cross_entropy(model(Xtr), ytr))
    steady = per_step_bytes[START_ITER:] if steps > START_ITER else per_step_bytes
    out = {
        "method": method,
        "test_accuracy": acc,
        "train_loss": train_loss,
        "bytes_per_step": statistics.mean(steady),
        "bytes_per_step_all": statistics.mean(per_step_bytes),
        "fp32_bytes_per_step": math.ceil(2 * (W - 1) * 4 * numel / W),
        "step_time_ms_median": 1000 * statistics.median(times[START_ITER:] or times),
        "numel": numel,
    }
    if isinstance(state, HNLQHookState):
        s = state.stats()
        out["hnlq_stats"] = {k: s[k] for k in ("compression_ratio", "overload_rate", "clamp_rate", "bytes_sent")}
        out["hnlq_stats"]["bytes_sent_counted"] = sum(per_step_bytes)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out, params


def run_method(rank, W, ds, seed, method, data, steps, batch, lr, hidden, counter):
    res, params = train_one(rank, W, method, data, steps, batch, lr, hidden, seed, counter)
    # every rank must end with the same parameters (DDP correctness of the hook)
    gathered = [torch.empty_like(params) for _ in range(W)]
    dist.all_gather(gathered, params)
    res["ranks_identical"] = all(torch.equal(g, gathered[0]) for g in gathered)
    res["max_param_diff_across_ranks"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
    res.update(dataset=ds, seed=seed, steps=steps)
    if rank == 0:
        print(
            f"[{ds} seed {seed}] {method:18s} acc={res['test_accuracy']:.4f} bytes/step={res['bytes_per_step']:.0f} "
            f"step={res['step_time_ms_median']:.2f} ms",
            flush=True,
        )
    return res


def worker(rank, W, initfile, outfile, cfg):
    dist.init_process_group(
        "gloo", init_method=f"file://{initfile}", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    counter = ByteCounter(W)
    results = []
    try:
        for ds in cfg["datasets"]:
            steps, batch, lr, hidden = DEFAULTS[ds]
            steps = cfg["steps"] or steps
            for seed in cfg["seeds"]:
                data = load_data(ds, seed)
                for method in cfg["methods"]:
                    results.append(run_method(rank, W, ds, seed, method, data, steps, batch, lr, hidden, counter))
        if rank == 0:
            Path(outfile).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def to_markdown(results, meta) -> str:
    lines = [
        "# DDP gradient compression: HNLQ hooks vs PyTorch built-ins",
        "",
        f"world_size={meta['world_size']}, gloo on CPU ({meta['machine']}), torch {meta['torch']}, seeds {meta['seeds']}.",
        "Accuracy: test set, mean ± std over seeds (Δ: mean of the per-seed differences to fp32 with the same seed).",
        "bytes/step: sent per rank per step after the 10 warm-up steps (ring model; identical for every seed).",
        "Step time: median wall time of forward+backward+optimizer on this 2-core VM (noisy whenever other jobs share it).",
        "",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == ds]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        base = {r["seed"]: r for r in rows if r["method"] == "fp32"}
        lines += [
            f"## {ds} ({rows[0]['steps']} steps, {rows[0]['numel']} parameters)",
            "",
            "| method | test acc | Δ vs fp32 (points) | per-seed acc | bytes/step | fp32 / bytes | step time (ms) | max |Δparam| across ranks |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            rs = [r for r in rows if r["method"] == m]
            accs = [100 * r["test_accuracy"] for r in rs]
            deltas = [100 * (r["test_accuracy"] - base[r["seed"]]["test_accuracy"]) for r in rs if r["seed"] in base]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            bps = statistics.mean(r["bytes_per_step"] for r in rs)
            ratio = rs[0]["fp32_bytes_per_step"] / bps if bps else float("inf")
            lines.append(
                f"| {m} | {statistics.mean(accs):.2f} ± {sd:.2f}% | {statistics.mean(deltas) if deltas else 0:+.2f} "
                f"| {', '.join(f'{a:.1f}' for a in accs)} | {bps:.0f} | {ratio:.2f}x "
                f"| {statistics.median(r['step_time_ms_median'] for r in rs):.2f} "
                f"| {max(r['max_param_diff_across_ranks'] for r in rs):.1e} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits,mnist1d", help="comma list of digits, mnist1d")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--steps", type=int, default=0, help="override the per-dataset step count")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds (init, data order, split)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--name", default="ddp")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in ALL_METHODS + EXTRA_METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    datasets = [d for d in a.dataset.split(",") if d]
    seeds = [int(x) for x in a.seeds.split(",") if x]
    cfg = {"methods": methods, "datasets": datasets, "steps": a.steps, "seeds": seeds}
    with tempfile.TemporaryDirectory() as tmp:
        initfile, outfile = os.path.join(tmp, "init"), os.path.join(tmp, "results.json")
        t0 = time.time()
        mp.spawn(worker, args=(a.world_size, initfile, outfile, cfg), nprocs=a.world_size, join=True)
        results = json.loads(Path(outfile).read_text())
    meta = {
        "world_size": a.world_size,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seeds": seeds,
        "wall_seconds": round(time.time() - t0, 1),
        "start_iter": START_ITER,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / f"{a.name}.md").write_text(to_markdown(results, meta))
    print(to_markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
