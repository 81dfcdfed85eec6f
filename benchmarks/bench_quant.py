"""Throughput (vectors/s) of HNLQ encode / decode / quantize, D4 and E8 with q=4, M=2, on N(0,1) float32 data.

    uv run python benchmarks/bench_quant.py [--n 1000000] [--torch-n 200000] [--repeats 3]

Backends: the PyTorch reference ("torch") and every native backend that coset.quant.available_backends() lists at
run time (coset-cuda's "native"). Baseline: torch.fake_quantize_per_tensor_affine (4-bit, per tensor) on the same
tensor (as n*d scalars). beta is calibrated per lattice with coset.quant.rd.hnlq_rd (paper objective, alpha = 1/3).
The reference is slow in Python, so by default it is timed on --torch-n vectors (throughput is linear in n).
Writes benchmarks/results/quant.json and quant.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

from coset.quant import QuantizationConfig, available_backends, decode, encode, quantize
from coset.quant.rd import hnlq_rd

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors for native backends and fake_quantize")
    ap.add_argument("--torch-n", type=int, default=200_000, help="vectors for the PyTorch reference")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    backends = available_backends()  # best first, "torch" last
    rows = []
    t0 = time.time()
    for lat in ("D4", "E8"):
        cal = hnlq_rd(lat, 4, 2, n=1 << 16, seed=1, alpha=1 / 3)
        cfg = QuantizationConfig(lat, 4, 2, beta=cal["beta"], alpha=1 / 3, max_scaling_iterations=10)
        d = cfg.dim
        g = torch.Generator().manual_seed(0)
        x_full = torch.randn(args.n, d, generator=g, dtype=torch.float32)
        # baseline: 4-bit per-tensor fake quantization of the same numbers
        step = 0.3401  # best step for N(0,1) at 4 bits (benchmarks/results/rd.md)
        fq = _time(lambda: torch.fake_quantize_per_tensor_affine(x_full, step, 8, 0, 15), args.repeats)
        rows.append(
            {
                "lattice": lat,
                "op": "fake_quantize_per_tensor_affine (4 bit)",
                "backend": "torch",
                "n": args.n,
                "seconds": fq,
                "vectors_per_s": args.n / fq,
            }
        )
        print(f"{lat} fake_quant: {args.n / fq:.3e} vectors/s", flush=True)
        ref = None
        for be in backends:
            n = args.torch_n if be == "torch" else args.n
            x = x_full[:n]
            reps = 1 if be == "torch" else args.repeats
            quantize(x[:1000], config=cfg, backend=be)  # warm-up
            b, T = encode(x, config=cfg, backend=be)
            te = _time(lambda: encode(x, config=cfg, backend=be), reps)
            td = _time(lambda: decode(b, config=cfg, T=T, backend=be), reps)
            tq = _time(lambda: quantize(x, config=cfg, backend=be), reps)
            xh = quantize(x, config=cfg, backend=be)
            mse = float(((xh.double() - x.double()) ** 2).mean())
            m = min(n, args.torch_n)
            same = ref is None or bool(torch.equal(xh[:m], ref[:m]))
            if be != "torch" and ref is None:
                ref = xh
            for op, s in (("encode", te), ("decode", td), ("quantize", tq)):
                rows.append(
                    {
                        "lattice": lat,
                        "op": op,
                        "backend": be,
                        "n": n,
                        "seconds": s,
                        "vectors_per_s": n / s,
                        "mse": mse,
                        "overload_rate": float((T > 0).double().mean()),
                        "matches_first_backend": same,
                    }
                )
            print(
                f"{lat} {be}: encode {n / te:.3e}/s decode {n / td:.3e}/s quantize {n / tq:.3e}/s "
                f"MSE={mse:.4e} same-as-native={same}",
                flush=True,
            )
        rows.append({"lattice": lat, "op": "beta", "beta": cal["beta"], "mse_calibration": cal["mse"]})
    out = {
        "benchmark": "quant",
        "config": "q=4, M=2, alpha=1/3, max_scaling_iterations=10, float32 N(0,1), beta calibrated",
        "backends": backends,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor()}",
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant.json").write_text(json.dumps(out, indent=2))
    md = [
        "# HNLQ throughput (vectors/s)",
        "",
        f"`uv run python benchmarks/bench_quant.py` -- {out['config']}; backends {backends}; torch {out['torch']}, "
        f"{out['threads']} threads; {out['seconds']} s in all. One vector = d numbers (d = 4 for D4, 8 for E8); "
        "fake_quantize is timed on the same n*d numbers. Best of repeats (the torch reference: one run).",
        "",
        "| lattice | op | backend | n | vectors/s | seconds | MSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["op"] == "beta":
            continue
        md.append(
            f"| {r['lattice']} | {r['op']} | {r['backend']} | {r['n']:,} | {r['vectors_per_s']:.3e} | "
            f"{r['seconds']:.3f} | {r.get('mse', float('nan')):.4e} |"
        )
    md += ["", "beta: " + ", ".join(f"{r['lattice']} {r['beta']:.4f}" for r in rows if r["op"] == "beta"), ""]
    (RESULTS / "quant.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / 'quant.json'} and quant.md")


if __name__ == "__main__":
    main()
