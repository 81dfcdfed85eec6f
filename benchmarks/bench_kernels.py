"""Kernel benchmark (issue 14): fast quantize/encode/decode vs fake_quantize and clone; LUT GEMV vs F.linear.

Writes benchmarks/results/kernels.{md,json}. CPU = process CPU seconds with 1 thread everywhere (robust on
the shared 2-core machine); wall = wall seconds with 2 threads. Minimum over repetitions.
Run: uv run python benchmarks/bench_kernels.py [--reps 5] [--n 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import coset.cuda as cc
from coset.cuda import _C
from coset.cuda.lut_gemv import CodedWeight, lut_gemv
from coset.quant import QuantizationConfig, decode, encode, quantize


def _caches() -> str:
    """The CPU's model, pext speed and cache sizes, from sysfs / cpuinfo (Linux; "caches unknown" elsewhere)."""
    parts = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                parts.append(line.split(":", 1)[1].strip())
                break
        base = Path("/sys/devices/system/cpu/cpu0/cache")
        for idx in sorted(base.glob("index*")):
            level = (idx / "level").read_text().strip()
            if level in ("2", "3"):
                parts.append(f"L{level} {(idx / 'size').read_text().strip()}")
    except OSError:
        return "caches unknown"
    parts.append(f"decode index by {'pext' if _C.fast_path_pext() else 'shift-merge (no fast pext)'}")
    return ", ".join(parts) or "caches unknown"


def tmin(f, reps, clock):
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        f()
        best = min(best, clock() - t0)
    return best


def both(f, reps):
    torch.set_num_threads(1)
    cc.set_num_threads(1)
    f()
    cpu = tmin(f, reps, time.process_time)
    torch.set_num_threads(2)
    cc.set_num_threads(2)
    f()
    wall = tmin(f, reps, time.perf_counter)
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=1_000_000, help="number of scalars / 4 for the quantize tests")
    ap.add_argument("--n-big", type=int, default=16_000_000, help="scalars of the DRAM-sized decode/clone test")
    args = ap.parse_args()
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
        "torch": torch.__version__,
        "isa": _C.fast_path_isa(),
        "command": " ".join(["python"] + sys.argv),
        "load_avg": os.getloadavg(),
        "quant": [],
        "gemv": [],
    }
    g = torch.Generator().manual_seed(0)
    for lat in ("D4", "E8"):
        cfg = QuantizationConfig(lattice_type=lat, q=4, M=2, beta=0.25)
        d = cfg.dim
        x = torch.randn(args.n * 4 // d, d, generator=g)
        b, T = encode(x, config=cfg)
        row = {"lattice": lat, "vectors": x.shape[0]}
        for name, f in [
            ("quantize", lambda: quantize(x, config=cfg)),
            ("encode", lambda: encode(x, config=cfg)),
            ("decode", lambda: decode(b, config=cfg, T=T)),
            ("fake_quantize", lambda: torch.fake_quantize_per_tensor_affine(x, 0.25, 0, -128, 127)),
            ("clone", lambda: x.clone()),
        ]:
            row[name] = both(f, args.reps)
        _C.set_fast_path(False)
        row["quantize_float64_kernels"] = both(lambda: quantize(x, config=cfg), args.reps)
        _C.set_fast_path(True)
        # decode vs clone once more at a DRAM-sized tensor (the 1M-scalar tensors above stay in L3)
        xb = torch.randn(args.n_big // d, d, generator=g)
        bb, Tb = encode(xb, config=cfg)
        row["big_vectors"] = xb.shape[0]
        row["decode_big"] = both(lambda: decode(bb, config=cfg, T=Tb), max(2, args.reps // 2))
        row["clone_big"] = both(lambda: xb.clone(), max(2, args.reps // 2))
        del xb, bb, Tb
        row["load_avg"] = os.getloadavg()[0]
        out["quant"].append(row)
        print(row, flush=True)
    for lat, q, M in (("D4", 4, 2), ("E8", 2, 4), ("E8", 4, 2)):
        cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25)
        for n, k in ((4096, 4096), (11008, 4096)):
            W = torch.randn(n, k, generator=g) / 16
            CW = CodedWeight.from_dense(W, cfg)
            for B in (1, 8):
                xq = torch.randn(B, k, generator=g)
                row = {
                    "lattice": lat,
                    "q": q,
                    "M": M,
                    "n": n,
                    "k": k,
                    "B": B,
                    "code_bytes": CW.nbytes,
                    "fp32_bytes": W.numel() * 4,
                    "lut_gemv": both(lambda: lut_gemv(xq, CW), args.reps),
                    "linear": both(lambda: F.linear(xq, W), args.reps),
                    "load_avg": os.getloadavg()[0],
                }
                out["gemv"].append(row)
                print(row, flush=True)
            del W, CW
    res = Path(__file__).parent / "results"
    (res / "kernels.json").write_text(json.dumps(out, indent=1))
    L = [
        "# Native kernels (issue 14)\n",
        f"Machine: {out['machine']}; torch {out['torch']}; fast path ISA {out['isa']}; load average at start "
        f"{out['load_avg'][0]:.1f} (shared machine). Command: `uv run {out['command']}`.\n",
        "CPU = process CPU s, 1 thread everywhere; wall = wall s, 2 threads; minimum of the repetitions.\n",
        "| lattice | op | CPU (ms) | wall (ms) | CPU ratio to fake_quantize | wall ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in out["quant"]:
        fq = r["fake_quantize"]
        for op in ("quantize", "quantize_float64_kernels", "encode", "decode", "fake_quantize", "clone"):
            c, w = r[op]
            L.append(f"| {r['lattice']} | {op} | {c * 1e3:.2f} | {w * 1e3:.2f} | {c / fq[0]:.2f}x | {w / fq[1]:.2f}x |")
    L += [
        "",
        "decode bandwidth fraction of clone (same bytes written; CPU 1 thread / wall 2 threads), "
        f"{args.n * 4} scalars ({args.n * 16 / 1e6:.0f} MB in, {args.n * 16 / 1e6:.0f} MB out; {_caches()}): "
        + ", ".join(
            f"{r['lattice']} {r['clone'][0] / r['decode'][0]:.2f} / {r['clone'][1] / r['decode'][1]:.2f}"
            for r in out["quant"]
        ),
        "",
        f"same at {args.n_big} scalars (DRAM; ms decode / clone CPU): "
        + ", ".join(
            f"{r['lattice']} {r['clone_big'][0] / r['decode_big'][0]:.2f} / {r['clone_big'][1] / r['decode_big'][1]:.2f}"
            f" ({r['decode_big'][0] * 1e3:.1f} / {r['clone_big'][0] * 1e3:.1f})"
            for r in out["quant"]
        ),
        "",
        "load average per lattice row: " + ", ".join(f"{r['lattice']} {r['load_avg']:.1f}" for r in out["quant"]),
        "",
        "| lattice | q | M | n x k | B | codes MiB | fp32 MiB | lut_gemv CPU (ms) | F.linear CPU (ms) | speedup CPU | lut_gemv wall | F.linear wall | speedup wall | load |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["gemv"]:
        lc, lw = r["lut_gemv"]
        fc, fw = r["linear"]
        L.append(
            f"| {r['lattice']} | {r['q']} | {r['M']} | {r['n']}x{r['k']} | {r['B']} | {r['code_bytes'] / 2**20:.1f} | "
            f"{r['fp32_bytes'] / 2**20:.0f} | {lc * 1e3:.2f} | {fc * 1e3:.2f} | {fc / lc:.2f}x | {lw * 1e3:.2f} | {fw * 1e3:.2f} | {fw / lw:.2f}x | {r['load_avg']:.1f} |"
        )
    (res / "kernels.md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
