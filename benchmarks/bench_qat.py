"""QAT benchmark: training-step time of QLinear vs nn.Linear, and the FP32 vs HNLQ-QAT accuracy table.

Writes benchmarks/results/qat.json, benchmarks/results/qat.md and the curves
benchmarks/results/qat_mnist1d.png, benchmarks/results/qat_digits.png.

    uv run python benchmarks/bench_qat.py                  # everything (a few minutes)
    uv run python benchmarks/bench_qat.py --skip-accuracy  # step times only (keeps the last accuracy tables)

Step time: one SGD step (forward, backward, optimizer) of a 1024x1024 layer on a (256, 1024) batch, CPU, torch
and the native kernels on the same number of threads. nn.Linear and the QLinear variants (D4 q=4 M=2, per-channel
beta; re-quantizing every 1, 4 and N steps; and with activation quantization) are stepped in turn, one step each
per round, so that they share the machine's load; wall and process CPU time per step are reported, with the
load average. Target (issue 14): QLinear with quantize_every=1 <= 1.3x nn.Linear. The "torch" backend (float64
reference) is timed alone with a few steps.
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


def _one_step(layer: nn.Module, opt, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(wall s, process CPU s) of one SGD step."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    F.mse_loss(layer(x), target).backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def _native_threads(n: int) -> None:
    """The native kernels use their own thread pool: give them the same count as torch."""
    try:
        from coset.cuda import set_num_threads
    except ImportError:
        return
    set_num_threads(n)


def bench_step(n: int, batch: int, windows: int, every: int, threads: int, optimizer: str = "sgd") -> dict:
    """All layers stepped in turn (one step each per round), so that they share the machine's load.

    Step times are grouped in windows of 16 consecutive steps of one layer (a whole number of re-quantization
    periods for quantize_every in {1, 4, 16}); a layer's figure is the median over windows of the window mean.
    """
    torch.set_num_threads(threads)
    _native_threads(threads)
    torch.manual_seed(0)
    x, target = torch.randn(batch, n), torch.randn(batch, n)
    base = nn.Linear(n, n)
    variants: list[tuple[str, str, int | None, bool]] = [("nn.Linear", "-", None, False)]
    backs = available_backends()
    fast = [b for b in backs if b != "torch"]
    for be in fast:
        if optimizer == "adam":  # (the re-quantization hint keeps fewer blocks under Adam's larger steps)
            variants += [("QLinear", be, 1, False), ("QLinear", be, 1, True)]
            continue
        variants += [("QLinear", be, qe, False) for qe in sorted({1, 4, every})]
        variants.append(("QLinear", be, 1, True))
    layers, opts = [], []
    for name, be, qe, act in variants:
        if name == "nn.Linear":
            layer: nn.Module = nn.Linear(n, n)
        else:
            cfg = QATConfig(backend=be, quantize_every=qe or 1, activation=QuantizationConfig() if act else None)
            layer = QLinear(n, n, qconfig=cfg)
        layer.load_state_dict(base.state_dict())
        layers.append(layer)
        if optimizer == "adam":
            opts.append(torch.optim.Adam(layer.parameters(), lr=1e-3))
        else:
            opts.append(torch.optim.SGD(layer.parameters(), lr=1e-3))
    W = 16
    load0 = os.getloadavg()[0]
    for layer, opt in zip(layers, opts, strict=True):
        for _ in range(2):
            _one_step(layer, opt, x, target)
    wall: list[list[float]] = [[] for _ in layers]
    cpu: list[list[float]] = [[] for _ in layers]
    for _ in range(windows * W):
        for i, (layer, opt) in enumerate(zip(layers, opts, strict=True)):
            w, c = _one_step(layer, opt, x, target)
            wall[i].append(w)
            cpu[i].append(c)

    def fig(ts: list[float]) -> float:
        return 1000 * statistics.median(statistics.mean(ts[j : j + W]) for j in range(0, len(ts), W))

    lin_ms, lin_cpu = fig(wall[0]), fig(cpu[0])
    rows = []
    for (name, be, qe, act), layer, tw, tc in zip(variants, layers, wall, cpu, strict=True):
        ms, cms = fig(tw), fig(tc)
        row = {
            "layer": name + (" +act" if act else ""),
            "backend": be,
            "quantize_every": qe,
            "step_ms": ms,
            "ratio": ms / lin_ms,
            "cpu_ms": cms,
            "cpu_ratio": cms / lin_cpu,
        }
        if name == "QLinear":
            t0, c0 = time.perf_counter(), time.process_time()
            layer.requantize()
            row["requantize_ms"] = 1000 * (time.perf_counter() - t0)
            row["requantize_cpu_ms"] = 1000 * (time.process_time() - c0)
        rows.append(row)
        print(
            f"  {row['layer']:<13} backend={be:<7} quantize_every={qe!s:<4} {ms:8.2f} ms/step ({ms / lin_ms:.2f}x) "
            f"CPU {cms:8.2f} ms ({cms / lin_cpu:.2f}x)"
        )
    if "torch" in backs and optimizer == "sgd":  # the float64 reference: slow, timed alone with a few steps
        for qe in (1, every):
            q = QLinear(n, n, qconfig=QATConfig(backend="torch", quantize_every=qe))
            q.load_state_dict(base.state_dict())
            opt = torch.optim.SGD(q.parameters(), lr=1e-3)
            _one_step(q, opt, x, target)
            ts = [_one_step(q, opt, x, target) for _ in range(max(4, qe))]
            ms = 1000 * statistics.mean(t for t, _ in ts)
            cms = 1000 * statistics.mean(c for _, c in ts)
            rows.append(
                {
                    "layer": "QLinear",
                    "backend": "torch",
                    "quantize_every": qe,
                    "step_ms": ms,
                    "ratio": ms / lin_ms,
                    "cpu_ms": cms,
                    "cpu_ratio": cms / lin_cpu,
                }
            )
            print(f"  QLinear       backend=torch   quantize_every={qe:<4} {ms:8.2f} ms/step ({ms / lin_ms:.2f}x)")
    return {
        "shape": [n, n],
        "batch": batch,
        "threads": threads,
        "optimizer": optimizer,
        "rows": rows,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


def bench_breakdown(n: int, batch: int, rounds: int) -> dict:
    """Where one quantize_every=1 step's extra time goes (1 thread, CPU ms, medians over interleaved rounds)."""
    from coset.cuda._ops import rms_betas  # the native one (coset.quant.rms_betas is the float64 reference)
    from coset.nn.fake_quant import _unit_config, weight_betas, weight_rms
    from coset.quant import quantize_rows

    torch.set_num_threads(1)
    _native_threads(1)
    torch.manual_seed(0)
    x, target = torch.randn(batch, n), torch.randn(batch, n)
    lin = nn.Linear(n, n)
    q = QLinear(n, n, qconfig=QATConfig(backend="native"))
    q.load_state_dict(lin.state_dict())
    qa = QLinear(n, n, qconfig=QATConfig(backend="native", activation=QuantizationConfig()))
    qa.load_state_dict(lin.state_dict())
    ol, oq = torch.optim.SGD(lin.parameters(), lr=1e-3), torch.optim.SGD(q.parameters(), lr=1e-3)
    w = lin.weight.detach()
    wq = q.weight_quantizer
    assert wq is not None and qa.activation_quantizer is not None
    betas = weight_betas(w, q.qconfig).to(torch.float32)
    spec = weight_rms(q.qconfig)
    cfg = _unit_config(q.qconfig.weight)  # type: ignore[arg-type]
    outs = quantize_rows(w, betas, cfg, backend="native", return_info=True)  # reused by the "into out=" rows
    T = outs[1].clone()  # (the rows below write into outs, the betas x2 row last)
    aq = qa.activation_quantizer
    aq.train()
    # re-quantization after one SGD step of this benchmark: a second layer alternates between two weights one
    # step apart, so each call's hint (the last results) is one step old, as in training
    q2 = QLinear(n, n, qconfig=QATConfig(backend="native"))
    q2.load_state_dict(lin.state_dict())
    F.mse_loss(q2(x), target).backward()
    assert q2.weight.grad is not None
    w_a = q2.weight.detach().clone()
    w_b = (w_a - 1e-3 * q2.weight.grad).contiguous()
    wq2, flip = q2.weight_quantizer, [0]
    assert wq2 is not None

    def requantize_after_a_step() -> None:
        flip[0] ^= 1
        q2.weight.data = w_a if flip[0] else w_b
        wq2.requantize(q2.weight)

    parts = {
        "nn.Linear step": lambda: _one_step(lin, ol, x, target),
        "QLinear step (quantize_every=1)": lambda: _one_step(q, oq, x, target),
        "  requantize after one SGD step (hint: the last results)": requantize_after_a_step,
        "    quantize_rows kernel with the rms betas (one call)": lambda: quantize_rows(
            w, spec, cfg, backend="native", out=outs
        ),
        "    same kernel, betas given": lambda: quantize_rows(w, betas, cfg, backend="native", out=outs),
        "    same kernel, betas x2 (no block overloads)": lambda: quantize_rows(
            w, 2 * betas, cfg, backend="native", out=outs
        ),
        "    same kernel, fresh outputs (page faults)": lambda: quantize_rows(w, spec, cfg, backend="native"),
        "    rms betas alone (a separate pass over the weight)": lambda: rms_betas(w, spec),
        "activation quantizer forward (256x1024)": lambda: aq(x),
        "torch.fake_quantize_per_tensor_affine (1M)": lambda: torch.fake_quantize_per_tensor_affine(w, 0.01, 0, -8, 7),
        "nn.Linear forward only": lambda: lin(x),
    }
    res: dict[str, list[float]] = {k: [] for k in parts}
    for f in parts.values():
        f()
    load0 = os.getloadavg()[0]
    for _ in range(rounds):
        for k, f in parts.items():
            c0 = time.process_time()
            f()
            res[k].append(1000 * (time.process_time() - c0))
    out = {k: statistics.median(v) for k, v in res.items()}
    for k, v in out.items():
        print(f"  {k:<48} {v:7.2f} ms CPU")
    return {
        "cpu_ms": out,
        "weight_overload_rate": float((T > 0).float().mean()),
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


def _md(res: dict) -> str:
    load = res["load_average_at_start"][0]
    busy = " (other jobs were running on the 2 cores, so times are inflated)" if load > 1.0 else " (quiet machine)"
    out = [
        "# QAT benchmark (coset.nn)",
        "",
        f"Machine: {res['machine']}; torch {res['torch']}; backends {res['backends']}; load average at start "
        f"{load:.1f}{busy}.",
        "",
    ]
    for s in res["step"]:
        out += [
            f"## Training step ({'Adam' if s.get('optimizer') == 'adam' else 'SGD'}, lr 1e-3), "
            f"{s['shape'][0]}x{s['shape'][1]} layer, batch {s['batch']}, {s['threads']} threads "
            f"(torch and native kernels), load {s.get('load_before', float('nan')):.1f} -> "
            f"{s.get('load_after', float('nan')):.1f}",
            "",
            "| layer | backend | quantize_every | wall ms/step | x nn.Linear | CPU ms/step | CPU x nn.Linear | "
            "re-quantize wall / CPU ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            qe = "-" if r["quantize_every"] is None else r["quantize_every"]
            rq = (
                f"{r['requantize_ms']:.1f} / {r.get('requantize_cpu_ms', float('nan')):.1f}"
                if "requantize_ms" in r
                else "-"
            )
            cm = f"{r['cpu_ms']:.2f} | {r['cpu_ratio']:.2f}" if "cpu_ms" in r else "- | -"
            out.append(
                f"| {r['layer']} | {r['backend']} | {qe} | {r['step_ms']:.2f} | {r['ratio']:.2f} | {cm} | {rq} |"
            )
        out.append("")
    b = res.get("breakdown")
    if b:
        out += [
            f"## Where the time of a quantize_every=1 step goes (1 thread, CPU ms per call, median of interleaved "
            f"rounds; load {b['load_before']:.1f} -> {b['load_after']:.1f})",
            "",
            f"{100 * b['weight_overload_rate']:.1f}% of the weight's 4-blocks overload at T=0 with the automatic "
            "per-channel beta, so they go through the beta ramp (a second pass).",
            "",
            "| part | CPU ms |",
            "|---|---|",
        ]
        out += [f"| {k.strip()} | {v:.2f} |" for k, v in b["cpu_ms"].items()]
        c = b["cpu_ms"]
        extra = c["QLinear step (quantize_every=1)"] - c["nn.Linear step"]
        kern = c["    quantize_rows kernel with the rms betas (one call)"]
        hinted = c["  requantize after one SGD step (hint: the last results)"]
        given = c["    same kernel, betas given"]
        x2 = c["    same kernel, betas x2 (no block overloads)"]
        fq = c["torch.fake_quantize_per_tensor_affine (1M)"]
        budget = 0.3 * c["nn.Linear step"]
        out += [
            "",
            f"Reading: the quantize_every=1 step costs {extra:.1f} ms more than nn.Linear (target 1.3x: at most "
            f"{budget:.1f} ms). Re-quantizing the weight one SGD step after the last results costs {hinted:.1f} "
            "ms: coset-nn passes those results as the kernel's hint (coset.quant.quantize_rows previous_betas, with "
            "a workspace of t = 0 points), and a block whose point provably did not move (x / beta still strictly "
            "inside its Voronoi cell) costs a cell check instead of a closest-point search. Without the hint "
            f"(first step, or outputs held elsewhere) the fused quantize_rows kernel takes {kern:.1f} ms "
            f"({kern / fq:.2f}x torch's "
            f"fake_quantize on the same 1M floats), the per-channel betas included ({kern - given:+.1f} ms against "
            f"betas passed in; the rms pass alone costs {c['    rms betas alone (a separate pass over the weight)']:.1f}"
            " ms: summing each row as the kernel reached it was measured no faster). Of the "
            f"kernel, {x2:.1f} ms is the pass at T=0 over every block (betas x2, where no block overloads) and "
            f"{given - x2:.1f} ms the beta ramp of the {100 * b['weight_overload_rate']:.0f}% of blocks that "
            "overload (a second closest-point pass on them, listed pack by pack and redone 8 at a time). The kernel "
            "writes into the previous step's outputs (coset-nn reuses them when nothing else holds them); with fresh "
            f"4 MB outputs it took {c['    same kernel, fresh outputs (page faults)']:.1f} ms in this run (page "
            "faults). No copy of the weight is kept for the labels (recovered from the quantized weight when needed).",
        ]
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
    p.add_argument("--windows", type=int, default=5, help="windows of 16 steps per layer (default 5)")
    p.add_argument("--rounds", type=int, default=15, help="rounds of the time breakdown (default 15)")
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
        res["step"].append(bench_step(a.n, a.batch, a.windows, a.every, th))
    print("-- 1 thread, Adam")
    res["step"].append(bench_step(a.n, a.batch, a.windows, a.every, 1, optimizer="adam"))
    print("== breakdown (1 thread)")
    res["breakdown"] = bench_breakdown(a.n, a.batch, a.rounds)
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
