"""HNLQLinear forward on a 576×1536 layer: decode + matmul vs the one-sided LUT path, vs nn.Linear.

uv run python benchmarks/bench_ptq_layer.py [--lut-max-rows 64]   # markdown table (min of repeats, ms/call)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from coset.ptq.codes import LinearCodes, Rotation
from coset.ptq.layers import HNLQLinear
from coset.quant import QuantizationConfig, encode


def layer(cfg, m=576, n=1536):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.02
    rin, rout = Rotation(n, 1), Rotation(m, 2)
    Wt = rout.apply(rin.apply(W).t()).t()
    s = Wt.pow(2).mean(dim=1).sqrt()
    b, T = encode((Wt / s[:, None]).reshape(m, n // cfg.dim, cfg.dim), config=cfg)
    return HNLQLinear.from_codes(LinearCodes(cfg, b, T, s.float(), rin, rout, n, m), torch.zeros(m)), W.float()


def bench(f, reps):
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lut-max-rows", type=int, default=64, help="time the LUT path only up to this many rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| code | rows | nn.Linear fp32 | decode + matmul | decode (cached W̃) | one-sided LUT |")
    print("|---|---|---|---|---|---|")
    codes = {
        "E8 q=4 M=2 (4 b)": QuantizationConfig(lattice_type="E8", q=4, M=2, beta=1.0),
        "D4 q=4 M=2 (4 b)": QuantizationConfig(lattice_type="D4", q=4, M=2, beta=1.0),
        "E8 q=4 M=1 c (2 b)": QuantizationConfig(lattice_type="E8", q=4, M=1, beta=1.0, center=True),
    }
    with torch.no_grad():
        for name, cfg in codes.items():
            mod, W = layer(cfg)
            modc, _ = layer(cfg)
            modc.cache_weight = True
            for rows in (1, 64):
                x = torch.randn(rows, 1536)
                t_lin = bench(lambda: F.linear(x, W), 20)
                t_dec = bench(lambda: mod(x, path="decode"), 5)
                t_c = bench(lambda: modc(x, path="decode"), 20)
                t_lut = bench(lambda: mod(x, path="lut"), 3 if rows == 1 else 1) if rows <= args.lut_max_rows else None
                lut = "-" if t_lut is None else f"{t_lut:.1f}"
                print(f"| {name} | {rows} | {t_lin:.2f} | {t_dec:.1f} | {t_c:.2f} | {lut} |", flush=True)
            print(f"<!-- {name}: compressed state {mod.compressed_nbytes()} B vs fp32 weight {W.numel() * 4} B -->")


if __name__ == "__main__":
    main()
