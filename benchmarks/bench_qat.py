"""QAT benchmark: training-step time of QLinear vs nn.Linear, and the FP32 vs HNLQ-QAT accuracy table.

Writes benchmarks/results/qat.json, benchmarks/results/qat.md and the curves
benchmarks/results/qat_mnist1d.png, benchmarks/results/qat_digits.png.

    uv run python benchmarks/bench_qat.py                  # everything (a few minutes)
    uv run python benchmarks/bench_qat.py --skip-accuracy  # step times only (keeps the last accuracy tables)

Step time: one SGD step (forward, backward, optimizer) of a 1024x1024 layer on a (256, 1024) batch, CPU,
median of ``--reps`` steps after warm-up. QLinear (D4 q=4 M=2, per-channel beta) is timed with every
available coset.quant backend ("torch" = float64 PyTorch reference; "native" = coset-cuda's C++ kernels),
re-quantizing every step and every N steps. Target: <= 2x nn.Linear with native kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coset.cli.qat_job import plot_curves, run_qat_comparison
from coset.nn import QATConfig, QLinear
from coset.quant import QuantizationConfig, available_backends

RESULTS = Path(__file__).resolve().parent / "results"


def _step_times(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, reps: int, warmup: int) -> list[float]:
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(layer(x), target).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_step(n: int, batch: int, reps: int, every: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, target = torch.randn(batch, n), torch.randn(batch, n)
    base = nn.Linear(n, n)
    rows = []
    t = _step_times(base, x, target, reps, 3)
    lin_ms = 1000 * statistics.median(t)
    rows.append({"layer": "nn.Linear", "backend": "-", "quantize_every": None, "step_ms": lin_ms, "ratio": 1.0})
    for be in available_backends():
        for qe in sorted({1, 4, every}):
            q = QLinear(n, n, qconfig=QATConfig(backend=be, quantize_every=qe))
            q.load_state_dict(base.state_dict())
            # at least two full re-quantization periods are timed
            r = max(reps, 2 * qe)
            t = _step_times(q, x, target, r, 2)
            ms = 1000 * statistics.mean(t)  # mean: the amortised cost of re-quantizing every N steps
            rows.append({"layer": "QLinear", "backend": be, "quantize_every": qe, "step_ms": ms, "ratio": ms / lin_ms})
            t0 = time.perf_counter()
            q.requantize()
            rows[-1]["requantize_ms"] = 1000 * (time.perf_counter() - t0)
            print(f"  QLinear backend={be:<7} quantize_every={qe:<3} {ms:8.2f} ms/step  ({ms / lin_ms:.2f}x nn.Linear)")
    print(f"  nn.Linear {lin_ms:.2f} ms/step")
    return {"shape": [n, n], "batch": batch, "threads": threads, "rows": rows}


def _md(res: dict) -> str:
    out = [
        "# QAT benchmark (coset.nn)",
        "",
        f"Machine: {res['machine']}; torch {res['torch']}; backends {res['backends']}; load average at start "
        f"{res['load_average_at_start'][0]:.1f} (other jobs were running on the 2 cores, so times are inflated).",
        "",
    ]
    for s in res["step"]:
        out += [
            f"## Training step, {s['shape'][0]}x{s['shape'][1]} layer, batch {s['batch']}, {s['threads']} threads",
            "",
            "| layer | backend | quantize_every | ms/step | x nn.Linear | re-quantize ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            qe = "-" if r["quantize_every"] is None else r["quantize_every"]
            rq = f"{r['requantize_ms']:.1f}" if "requantize_ms" in r else "-"
            out.append(f"| {r['layer']} | {r['backend']} | {qe} | {r['step_ms']:.2f} | {r['ratio']:.2f} | {rq} |")
        out.append("")
    for name, a in res.get("accuracy", {}).items():
        c = a["config"]
        out += [
            "",
            f"## {name}: FP32 vs HNLQ QAT ({c['lattice_type']} q={c['q']} M={c['M']}), "
            f"{a['epochs']} epochs, batch {a['batch_size']}, lr {a['lr']}, seed {a['seed']}",
            "",
            "| variant | final test acc % | gap to FP32 (pts) | label bits/w | T bits/w | effective bits/w | "
            "file bytes | weight blocks T>0 | act blocks T>0 | ms/step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v, e in a["variants"].items():
            gap = a.get("gap_points", {}).get(v, 0.0)
            step = f"{e['curves']['step_ms']:.2f}" if "curves" in e else "-"
            wo = e.get("weight_overload_rate", float("nan"))
            ao = e.get("act_overload_rate", float("nan"))
            f = lambda v: "-" if v != v else f"{100 * v:.1f}%"  # noqa: E731
            ck = e.get("compressed")
            lb = f"{ck['label_bits_per_weight']:.2f}" if ck else "-"
            tb = f"{8 * ck['T_bytes'] / ck['num_quantized_weights']:.2f}" if ck else "-"
            out.append(
                f"| {v} | {e['final_test_acc']:.2f} | {gap:+.2f} | {lb} | {tb} | {e['bits_per_weight']:.2f} | "
                f"{e['size_bytes']} | {f(wo)} | {f(ao)} | {step} |"
            )
        out.append("")
        out.append(
            "effective bits/w = (labels + T + float32 betas + JSON metadata) / quantized weights; file bytes "
            "also hold the float biases. PTQ = the trained fp32 weights quantized after training."
        )
        out.append("")
        out.append(f"![curves](qat_{name}.png)")
    out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--every", type=int, default=16, help="the quantize_every=N variant (default 16)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--epochs-mnist1d", type=int, default=30)
    p.add_argument("--epochs-digits", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads max, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "backends": available_backends(),
        "load_average_at_start": list(os.getloadavg()),
    }
    print("== training step time")
    res["step"] = []
    for th in (int(t) for t in a.threads.split(",")):
        print(f"-- {th} threads")
        res["step"].append(bench_step(a.n, a.batch, a.reps, a.every, th))
    old = out / "qat.json"
    if a.skip_accuracy and old.exists():  # keep the last accuracy tables
        prev = json.loads(old.read_text())
        if "accuracy" in prev:
            res["accuracy"] = prev["accuracy"]
    if not a.skip_accuracy:
        res["accuracy"] = {}
        for name, ep in (("mnist1d", a.epochs_mnist1d), ("digits", a.epochs_digits)):
            print(f"== QAT accuracy: {name}, {ep} epochs")
            t0 = time.perf_counter()
            r = run_qat_comparison(name, epochs=ep, seed=a.seed, progress=False, config=QuantizationConfig())
            r["wall_seconds"] = time.perf_counter() - t0
            plot_curves(r, out / f"qat_{name}.png")
            for v, e in r["variants"].items():
                print(
                    f"  {v:<7} acc {e['final_test_acc']:6.2f}%  bits/w {e['bits_per_weight']:.2f}  "
                    f"bytes {e['size_bytes']}"
                )
            res["accuracy"][name] = r
    (out / "qat.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "qat.md").write_text(_md(res))
    print(f"wrote {out / 'qat.json'} and {out / 'qat.md'}")


if __name__ == "__main__":
    main()
