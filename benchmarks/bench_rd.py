"""Rate-distortion of HNLQ (Z2, D4, E8) against the best uniform scalar quantizer on N(0,1) data.

    uv run python benchmarks/bench_rd.py [--n 262144] [--seed 0]

Writes benchmarks/results/rd.json and rd.md. See coset.quant.rd for the definitions (SNR, H(T), effective
rate, f, rate-adjusted SNR). beta is the best of LatticeQuant's grid (extended below beta_min) under the paper's
objective f = MSE / 2^(-2 R_eff); alpha = 1/3 as in the paper. "centred" rows use the library option
``QuantizationConfig(center=True)`` (``hnlq_rd(..., center=True)``): the code is shifted by the centroid of its
constellation (coset.quant.constellation_offset).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time

import torch

from coset.quant import available_backends
from coset.quant.rd import gaussian_data, hnlq_rd, scalar_rd

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# (lattice, q, M, label)
CODES = [
    ("Z2", 4, 2, "4-bit"),
    ("D4", 4, 2, "4-bit"),
    ("E8", 4, 2, "4-bit"),
    ("Z2", 2, 4, "4-bit"),
    ("D4", 2, 4, "4-bit"),
    ("E8", 2, 4, "4-bit"),
    ("D4", 4, 1, "2-bit"),
    ("E8", 4, 1, "2-bit"),
]
ANCHORS_2BIT = {"QuIP# E8P (2 bit, paper value)": 0.091, "Lloyd-Max 2 bit (Max 1960)": 0.1175}
ANCHORS_4BIT = {"Lloyd-Max 4 bit (Max 1960)": 0.009497, "Shannon D(R) = 2^-2R": 2.0**-8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 18, help="number of N(0,1) scalars")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x = gaussian_data(args.n, args.seed)
    t0 = time.time()
    rows = []
    for lat, q, M, label in CODES:
        for center in (False, True):
            t = time.time()
            r = hnlq_rd(lat, q, M, seed=args.seed, x=x, alpha=1 / 3, center=center)
            r["label"] = label
            r["seconds"] = round(time.time() - t, 1)
            rows.append(r)
            print(
                f"{lat} q={q} M={M} centre={center}: beta={r['beta']:.4f} MSE={r['mse']:.4e} SNR={r['snr_db']:.2f} dB "
                f"H(T)={r['H_T']:.3f} R_eff={r['rate_effective']:.3f} adj SNR={r['snr_rate_adjusted_db']:.2f} dB "
                f"({r['seconds']} s)",
                flush=True,
            )
    # fixed rate: no side information at all (T = 0 always, overloaded vectors clamped)
    fixed = []
    for lat, q, M in (("D4", 4, 2), ("E8", 4, 2), ("E8", 4, 1)):
        r = hnlq_rd(
            lat,
            q,
            M,
            x=x,
            alpha=1 / 3,
            max_scaling_iterations=0,
            betas=[0.05 * 1.05**k for k in range(90)],
            objective="mse",
        )
        fixed.append(r)
        print(
            f"fixed-rate {lat} q={q} M={M}: beta={r['beta']:.4f} MSE={r['mse']:.4e} SNR={r['snr_db']:.2f} dB "
            f"clamped={r['clamp_rate']:.4f}",
            flush=True,
        )
    scal = {b: scalar_rd(b, x=x) for b in (2, 3, 4, 5)}
    for b, s in scal.items():
        print(
            f"scalar {b} bit: uniform MSE={s['uniform']['mse']:.4e} SNR={s['uniform']['snr_db']:.2f} dB; "
            f"fake_quant MSE={s['fake_quant']['mse']:.4e} SNR={s['fake_quant']['snr_db']:.2f} dB",
            flush=True,
        )

    def scalar_at(rate: float) -> float:
        """SNR of the best uniform scalar quantizer interpolated (linearly in dB) at a fractional rate."""
        lo = max(2, min(4, int(math.floor(rate))))
        a, b = scal[lo]["uniform"]["snr_db"], scal[lo + 1]["uniform"]["snr_db"]
        return a + (b - a) * (rate - lo)

    for r in rows:
        nominal = int(round(r["rate_nominal"]))
        r["scalar_snr_db_same_nominal_rate"] = scal[nominal]["uniform"]["snr_db"]
        r["scalar_snr_db_same_effective_rate"] = scalar_at(r["rate_effective"])
        r["beats_scalar_at_effective_rate"] = r["snr_db"] > r["scalar_snr_db_same_effective_rate"]
    out = {
        "benchmark": "rd",
        "data": f"{args.n} i.i.d. N(0,1) float32 scalars, seed {args.seed}",
        "alpha": 1 / 3,
        "beta_grid": "beta_min*(1+0.05k), k=-10..39, objective f = MSE/2^(-2 R_eff)",
        "backend": available_backends()[0],
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
        "seconds": round(time.time() - t0, 1),
        "hnlq": rows,
        "hnlq_fixed_rate": fixed,
        "scalar": scal,
        "anchors_mse": {**ANCHORS_2BIT, **ANCHORS_4BIT},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rd.json").write_text(json.dumps(out, indent=2))

    md = [
        "# Rate-distortion: HNLQ vs uniform scalar quantization on N(0,1)",
        "",
        f"`uv run python benchmarks/bench_rd.py` -- {out['data']}; alpha = 1/3; beta = best of "
        f"{out['beta_grid']}; backend `{out['backend']}`; {out['seconds']} s.",
        "",
        "SNR = 10 log10(var/MSE). R = M log2 q (labels); R_eff = R + H(T)/d (entropy of the per-block scale index, "
        "the paper's accounting). *adj SNR* = SNR - 6.02 H(T)/d: the side information paid back at 6.02 dB/bit, "
        "comparable with a quantizer of rate R and no side information. *scalar@R_eff*: best uniform scalar "
        "quantizer interpolated to R_eff. *centred*: `QuantizationConfig(center=True)` (code shifted by "
        "the centroid of its constellation, `coset.quant.constellation_offset`); q = 2 needs it.",
        "",
        "| code | R | centred | beta | MSE | SNR dB | H(T) | R_eff | adj SNR dB | scalar@R dB | scalar@R_eff dB | f | overload |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['lattice']} q={r['q']} M={r['M']} | {r['rate_nominal']:.0f} | {'yes' if r['center'] else 'no'} | "
            f"{r['beta']:.4f}{' (edge)' if r['beta_grid_edge'] else ''} | {r['mse']:.4e} | {r['snr_db']:.2f} | "
            f"{r['H_T']:.3f} | {r['rate_effective']:.3f} | {r['snr_rate_adjusted_db']:.2f} | "
            f"{r['scalar_snr_db_same_nominal_rate']:.2f} | {r['scalar_snr_db_same_effective_rate']:.2f} | "
            f"{r['f']:.3f} | {100 * r['overload_rate']:.1f}% |"
        )
    md += [
        "",
        "Fixed rate (no side information: T = 0, overloaded vectors clamped radially; beta minimising MSE):",
        "",
        "| code | R | beta | MSE | SNR dB | clamped |",
        "|---|---|---|---|---|---|",
    ]
    for r in fixed:
        md.append(
            f"| {r['lattice']} q={r['q']} M={r['M']} | {r['rate_nominal']:.0f} | {r['beta']:.4f} | "
            f"{r['mse']:.4e} | {r['snr_db']:.2f} | {100 * r['clamp_rate']:.2f}% |"
        )
    md += [
        "",
        "Scalar quantizers (2^bits levels, step searched on the same data):",
        "",
        "| bits | uniform mid-rise step | MSE | SNR dB | torch fake_quantize step | MSE | SNR dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, s in scal.items():
        u, f = s["uniform"], s["fake_quant"]
        md.append(
            f"| {b} | {u['step']:.4f} | {u['mse']:.4e} | {u['snr_db']:.2f} | {f['step']:.4f} | {f['mse']:.4e} | "
            f"{f['snr_db']:.2f} |"
        )
    md += [
        "",
        "Anchors (MSE per dimension, N(0,1)): " + "; ".join(f"{k} {v:.4g}" for k, v in out["anchors_mse"].items()),
        "",
    ]
    (RESULTS / "rd.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / 'rd.json'} and rd.md in {out['seconds']} s")


if __name__ == "__main__":
    main()
