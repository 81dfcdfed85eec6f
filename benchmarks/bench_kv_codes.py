"""Which nested-lattice code for the KV cache: MSE of E8/D4 codes at equal label bits and equal T side information.

    uv run python benchmarks/bench_kv_codes.py

The cache codes keys and values with E8 q=2 M=bits because one layer's label is then one byte per 8-dim block and
the scores come from 256-entry tables. This measures what that choice costs against flatter codes of the same
label rate (q=4 M=2 at 4 bits, q=8 M=1 at 3, q=4 M=1 at 2), all centred, 2 T bits per 8 dims (alpha 0.5, D4 pays
the same 2 bits per 4 dims, i.e. twice the side information), MSE-optimal beta (``coset.quant.rd.hnlq_rd``'s
grid) on 262144 seeded N(0, 1) scalars — what the head rotation and rms normalisation feed the code. Writes
``results/kv_codes.{json,md}``.
"""

from __future__ import annotations

import json
import pathlib
import warnings

from coset.quant import QuantizationConfig
from coset.quant.rd import hnlq_rd

OUT = pathlib.Path(__file__).resolve().parent / "results"
CODES = [  # (lattice, q, M): label bits per element = M log2 q
    ("E8", 2, 4),
    ("E8", 4, 2),
    ("E8", 16, 1),
    ("D4", 4, 2),
    ("E8", 2, 3),
    ("E8", 8, 1),
    ("D4", 8, 1),
    ("E8", 2, 2),
    ("E8", 4, 1),
]


def main() -> None:
    rows = []
    for lat, q, m in CODES:
        cfg = QuantizationConfig(lat, q=q, M=m, max_scaling_iterations=3, center=True, overload_policy="clamp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clamped overloads are part of the measured error
            r = hnlq_rd(config=cfg, alpha=0.5, objective="mse", n=1 << 18, seed=1234)
        rows.append({**r, "label_bits": r["rate_nominal"], "t_bits_per_element": 2 / r["d"]})
        print({k: rows[-1][k] for k in ("lattice", "q", "M", "beta", "mse", "snr_db", "clamp_rate")}, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "kv_codes.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# KV cache code choice: MSE on N(0, 1) at equal label bits (`benchmarks/bench_kv_codes.py`)",
        "",
        "| lattice | q | M | label bits | T bits/elem | beta | MSE | SNR dB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['lattice']} | {r['q']} | {r['M']} | {r['label_bits']:.0f} | {r['t_bits_per_element']:.2f} | "
        f"{r['beta']:.4f} | {r['mse']:.5f} | {r['snr_db']:.2f} |"
        for r in rows
    ]
    (OUT / "kv_codes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
