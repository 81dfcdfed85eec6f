"""How far the cache's own codes are from the ideal code: SNR of ``KVQuantConfig`` codes on N(0, 1) head vectors
against the Gaussian distortion-rate bound ``6.02 R`` dB, at their all-in rate R (labels + T + per-vector scale).

    uv run python benchmarks/bench_kv_rate_gap.py

Each config encodes 20000 seeded N(0, I_64) vectors through ``encode_states`` / ``decode_states`` (the cache's
path: head rotation, rms scale, E8 q=2 labels, overload ramp). ``effective bits`` = SNR / 6.02: the rate at which
an ideal code reaches the same SNR, so ``gap`` = all-in - effective is what the code wastes.
``results/kv_oracle_shaped.md`` gives the perplexity of ideal codes at each rate. Writes
``results/kv_rate_gap.{json,md}``.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch

from coset.kv import HeadRotation, KVQuantConfig
from coset.kv.codes import decode_states, encode_states

OUT = pathlib.Path(__file__).resolve().parent / "results"
D = 64
#: (label bits, t_bits, alpha, scale_bits): no T, 1, 2 and 4 T bits per 8-dim block, as the cache offers them
CONFIGS = [(m, t, a, s) for m in (2, 3, 4) for t, a in ((0, 0.5), (1, 1.0), (2, 0.5), (4, 0.25)) for s in (8, 16)]


def main() -> None:
    x = torch.randn(1, 1, 20000, D, generator=torch.Generator().manual_seed(0))
    rot = HeadRotation(1, D, seed=0)
    rows = []
    for m, t, a, s in CONFIGS:
        cfg = KVQuantConfig(bits=m, t_bits=t, alpha=a, scale_bits=s)
        y = decode_states(encode_states(x, rot, cfg), rot, cfg)
        snr = -10 * math.log10(float((y - x).pow(2).mean() / x.pow(2).mean()))
        allin = cfg.bits_per_element(D)
        eff = snr / (20 * math.log10(2))
        rows.append({"bits": m, "t_bits": t, "alpha": a, "scale_bits": s, "all_in": allin, "snr_db": snr})
        rows[-1] |= {"effective_bits": eff, "gap_bits": allin - eff}
        print(f"M={m} t_bits={t} alpha={a} scale_bits={s}: {allin:.3f} b all-in, SNR {snr:.2f} dB = {eff:.2f} b")
    (OUT / "kv_rate_gap.json").write_text(json.dumps({"head_dim": D, "vectors": x.shape[2], "rows": rows}, indent=1))
    lines = [
        "# KV codes against the ideal code: SNR on N(0, I_64) head vectors (`benchmarks/bench_kv_rate_gap.py`)",
        "",
        "effective bits = SNR / 6.02 dB (the rate of an ideal code with the same SNR); gap = all-in - effective.",
        "",
        "| label bits M | t_bits | alpha | scale bits | all-in b/elem | SNR dB | effective b | gap b |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['t_bits']} | {r['alpha']} | {r['scale_bits']} | {r['all_in']:.3f} | "
            f"{r['snr_db']:.2f} | {r['effective_bits']:.2f} | {r['gap_bits']:.2f} |"
        )
    (OUT / "kv_rate_gap.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
