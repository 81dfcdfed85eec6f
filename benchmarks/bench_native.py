"""Native (coset.cuda, C++ CPU kernels) vs the PyTorch reference of coset.quant, and vs torch built-ins.

Writes benchmarks/results/native.json and native.md.

    cd /work/main && uv run python benchmarks/bench_native.py [--n 1000000] [--reps 5]

Measured: encode, decode, quantize for D4 q=4 M=2 and E8 q=4 M=2 on N(0,1) float32 data (beta calibrated),
the LUT scoring ops, ``torch.fake_quantize_per_tensor_affine`` and ``clone`` on the same tensor (the
memory-bandwidth yardstick: bytes in + out per second of the kernel vs of clone).
Targets: >= 10x over the reference on quantize (D4 q=4 M=2); quantize within 2x of fake_quantize.
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

import coset.cuda as cc
from coset.quant import QuantizationConfig, calibrate_beta, decode, encode, quantize

OUT = Path(__file__).resolve().parent / "results"


def timeit(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_lattice(name: str, n: int, reps: int, ref_reps: int) -> dict:
    d = QuantizationConfig(name).dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    cfg0 = QuantizationConfig(name, q=4, M=2)
    # beta for N(0,1): 0.25 (in the 0.2-0.3 range of the brief); the MSE-optimal grid value is recorded too
    beta_mse, _ = calibrate_beta(x[:20000], cfg0)
    beta = 0.25
    cfg = cfg0.replace(beta=beta)
    b, T = encode(x, config=cfg, backend="native")
    r = {"lattice": name, "q": 4, "M": 2, "n_vectors": n, "dtype": "float32", "beta": beta,
         "beta_mse_calibrated": beta_mse,
         "frac_T_gt_0": float((T > 0).float().mean())}
    for op, f_nat, f_ref in (
        ("encode", lambda: encode(x, config=cfg, backend="native"), lambda: encode(x, config=cfg, backend="torch")),
        ("decode", lambda: decode(b, config=cfg, T=T, backend="native"),
         lambda: decode(b, config=cfg, T=T, backend="torch")),
        ("quantize", lambda: quantize(x, config=cfg, backend="native"),
         lambda: quantize(x, config=cfg, backend="torch")),
    ):
        t_nat = timeit(f_nat, reps)
        t_ref = timeit(f_ref, ref_reps, warmup=0)
        r[op] = {"native_s": t_nat, "torch_ref_s": t_ref, "speedup": t_ref / t_nat,
                 "native_Mvec_per_s": n / t_nat / 1e6}
    # single-thread native quantize (how the kernel scales with cores)
    nt = cc.get_num_threads()
    cc.set_num_threads(1)
    r["quantize"]["native_1thread_s"] = timeit(lambda: quantize(x, config=cfg, backend="native"), max(1, reps // 2))
    cc.set_num_threads(nt)
    # yardsticks on the same tensor
    t_fq = timeit(lambda: torch.fake_quantize_per_tensor_affine(x, 0.05, 128, 0, 255), reps * 4)
    t_clone = timeit(lambda: x.clone(), reps * 4)
    bytes_clone = 2 * x.numel() * x.element_size()
    bytes_q = x.numel() * x.element_size() * 2 + 2 * n  # x in, x_hat out, T and clamped out
    r["fake_quantize_s"] = t_fq
    r["clone_s"] = t_clone
    r["quantize_vs_fake_quantize"] = r["quantize"]["native_s"] / t_fq
    r["clone_GBps"] = bytes_clone / t_clone / 1e9
    r["quantize_GBps"] = bytes_q / r["quantize"]["native_s"] / 1e9
    r["quantize_bandwidth_fraction"] = r["quantize_GBps"] / r["clone_GBps"]
    bytes_e = x.numel() * 4 + n * (2 * d + 2)
    r["encode_bandwidth_fraction"] = bytes_e / r["encode"]["native_s"] / 1e9 / r["clone_GBps"]
    return r


def bench_lut(reps: int) -> dict:
    try:
        from coset.lut.kernels import torch_one_sided, torch_two_sided
    except Exception:  # coset.lut is optional for this benchmark
        torch_one_sided = torch_two_sided = None
    g = torch.Generator().manual_seed(1)
    q, M, Q = 4, 2, 256  # D4 q=4 M=2
    n, K, m = 4096, 64, 64  # 4096 encoded rows of length 256 against 64 queries
    ix = torch.randint(0, Q, (n, K, M), generator=g, dtype=torch.int32)
    sx = torch.rand(n, K, generator=g)
    tables = torch.randn(m, K, Q, generator=g)
    iy = torch.randint(0, Q, (m, K, M), generator=g, dtype=torch.int32)
    sy = torch.rand(m, K, generator=g)
    lut = torch.randint(-9, 17, (Q, Q), generator=g).to(torch.int8)
    res = {"shape": {"n": n, "K": K, "m": m, "M": M, "Q": Q}}
    t1 = timeit(lambda: cc.lut_one_sided(ix, sx, tables, q), reps)
    t2 = timeit(lambda: cc.lut_two_sided(ix, sx, iy, sy, lut, q), reps)
    lookups1 = n * m * K * M
    res["one_sided"] = {"native_s": t1, "Glookups_per_s": lookups1 / t1 / 1e9}
    res["two_sided"] = {"native_s": t2, "Glookups_per_s": n * m * K * M * M / t2 / 1e9}
    if torch_one_sided is not None:
        r1 = timeit(lambda: torch_one_sided(ix, sx, tables, q), reps)
        r2 = timeit(lambda: torch_two_sided(ix, sx, iy, sy, lut, q), reps)
        res["one_sided"].update(torch_ref_s=r1, speedup=r1 / t1)
        res["two_sided"].update(torch_ref_s=r2, speedup=r2 / t2)
    # dense float32 matmul of the decoded operands, for scale
    A = torch.randn(n, K * 4)
    B = torch.randn(m, K * 4)
    res["dense_matmul_fp32_s"] = timeit(lambda: A @ B.T, reps)
    return res


def to_md(res: dict) -> str:
    lines = ["# coset.cuda native kernels (CPU) vs the PyTorch reference", "",
             f"Machine: {res['machine']}; torch {res['torch']}; threads {res['threads']}; "
             f"CUDA kernels compiled: {res['with_cuda']}, GPU present: {res['cuda_available']}.", "",
             "| lattice | op | native (s) | torch ref (s) | speedup | native Mvec/s |",
             "|---|---|---|---|---|---|"]
    for r in res["lattices"]:
        for op in ("encode", "decode", "quantize"):
            o = r[op]
            lines.append(f"| {r['lattice']} q=4 M=2 | {op} | {o['native_s']:.4f} | {o['torch_ref_s']:.3f} | "
                         f"{o['speedup']:.1f}x | {o['native_Mvec_per_s']:.1f} |")
    lines += ["", "| lattice | beta | frac T>0 | quantize 1 thread (s) | fake_quantize (s) | quantize / fake_quantize | "
              "clone (s) | clone GB/s | quantize GB/s | bandwidth fraction (quantize) | (encode) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["lattices"]:
        lines.append(f"| {r['lattice']} | {r['beta']:.4f} | {r['frac_T_gt_0']:.3f} | {r['quantize']['native_1thread_s']:.4f} | "
                     f"{r['fake_quantize_s']:.5f} | {r['quantize_vs_fake_quantize']:.1f}x | {r['clone_s']:.5f} | "
                     f"{r['clone_GBps']:.1f} | {r['quantize_GBps']:.2f} | {r['quantize_bandwidth_fraction']:.3f} | "
                     f"{r['encode_bandwidth_fraction']:.3f} |")
    d4 = res["lattices"][0]
    lines += ["", "Targets (D4 q=4 M=2): quantize speedup over the reference "
              f"{d4['quantize']['speedup']:.1f}x (target >= 10x: {'met' if d4['quantize']['speedup'] >= 10 else 'MISSED'}); "
              f"quantize / fake_quantize {d4['quantize_vs_fake_quantize']:.1f}x (target <= 2x: "
              f"{'met' if d4['quantize_vs_fake_quantize'] <= 2 else 'MISSED'})."]
    L = res["lut"]
    lines += ["", f"LUT scoring (D4 q=4 M=2, n={L['shape']['n']} rows x K={L['shape']['K']} blocks vs "
              f"m={L['shape']['m']} queries):", "",
              "| op | native (s) | torch ref (s) | speedup | G lookups/s |", "|---|---|---|---|---|"]
    for op in ("one_sided", "two_sided"):
        o = L[op]
        ref = f"{o['torch_ref_s']:.4f}" if "torch_ref_s" in o else "n/a"
        sp = f"{o['speedup']:.1f}x" if "speedup" in o else "n/a"
        lines.append(f"| {op} | {o['native_s']:.4f} | {ref} | {sp} | {o['Glookups_per_s']:.2f} |")
    lines.append(f"\nDense fp32 matmul of the same sizes (decoded operands): {L['dense_matmul_fp32_s']:.5f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-reps", type=int, default=1)
    args = ap.parse_args()
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": cc.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "with_cuda": cc.WITH_CUDA,
        "cuda_available": cc.cuda_available(),
        "lattices": [bench_lattice(nm, args.n, args.reps, args.ref_reps) for nm in ("D4", "E8")],
        "lut": bench_lut(args.reps),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "native.json").write_text(json.dumps(res, indent=2))
    md = to_md(res)
    (OUT / "native.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
