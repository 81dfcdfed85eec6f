"""How good could any per-vector KV code be? SmolLM2 perplexity with every key / value vector replaced by
``x + n``, ``n ~ N(0, |x|^2 / D * 2^(-2R) I)`` per token and KV head: the mean squared error of an ideal rate-R
code of each vector (the Gaussian distortion-rate bound, with the vector's scale free and exact), token 0
exact (the sink, as the coded cache keeps it), every position reading the noisy states (the protocol of
``bench_kv.py --sections ppl``: the same windows of pydoc_data.topics).

    uv run python benchmarks/bench_kv_oracle.py [--windows 2] [--seeds 0,1]

Writes ``results/kv_oracle.{json,md}``. The noise is white in the raw key / value space: it models a code
without the cache's key transforms (which shape the key error where the queries do not look), so for keys it is
not a bound on what shaped codes reach; for values (decoded, then averaged by the attention) it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DynamicCache  # noqa: E402

from coset.ptq.data import pydoc_text, token_windows  # noqa: E402
from coset.ptq.models import load_smollm2  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# (key rate, value rate) in bits per element; None = exact. Splits that average 4 / 3 / 2 bits, then one side.
RATES = [(4, 4), (4.5, 3.5), (3, 3), (3.5, 2.5), (2, 2), (2.5, 1.5)]
RATES += [(None, r) for r in (2.375, 3.0, 3.375, 3.5, 4.0, 4.5)] + [(r, None) for r in (3.625, 4.0, 4.5, 4.625)]


class NoiseCache(DynamicCache):
    """DynamicCache whose appended keys / values get the ideal code's noise (rate None: exact)."""

    def __init__(self, config, rk: float | None, rv: float | None, seed: int) -> None:
        super().__init__(config=config)
        self.rk, self.rv = rk, rv
        self.g = torch.Generator().manual_seed(seed)

    def _noisy(self, x: torch.Tensor, r: float | None) -> torch.Tensor:
        if r is None:
            return x
        var = x.pow(2).mean(-1, keepdim=True) * 2.0 ** (-2 * r)  # (B, H, L, 1)
        n = torch.randn(x.shape, generator=self.g, dtype=x.dtype) * var.sqrt()
        n[:, :, 0] = 0  # the sink stays exact
        return x + n

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._noisy(key_states, self.rk), self._noisy(value_states, self.rv)
        return super().update(k, v, layer_idx, *args, **kwargs)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, rk, rv, seed: int) -> float:
    nll, count = 0.0, 0
    for i, w in enumerate(windows):
        cache = NoiseCache(model.config, rk, rv, 1000 * seed + i)
        logits = model(w.unsqueeze(0), past_key_values=cache, use_cache=True).logits[0]
        lp = torch.log_softmax(logits[:-1].double(), -1)
        nll += float(-lp.gather(-1, w[1:].unsqueeze(-1)).sum())
        count += w.numel() - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    windows = token_windows(tok, pydoc_text(), args.seqlen, args.windows)
    seeds = [int(s) for s in args.seeds.split(",")]
    ref = perplexity(model, windows, None, None, 0)
    rows = []
    for rk, rv in RATES:
        ratios = [perplexity(model, windows, rk, rv, s) / ref for s in seeds]
        rows.append({"key_bits": rk, "value_bits": rv, "ppl_ratio": ratios})
        print(f"keys {rk} values {rv}: {' / '.join(f'{r:.4f}' for r in ratios)}", flush=True)
    cmd = "uv run python benchmarks/bench_kv_oracle.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    out = {
        "command": cmd,
        "fp32_ppl": ref,
        "windows": args.windows,
        "seqlen": args.seqlen,
        "seeds": seeds,
        "rows": rows,
    }
    (RESULTS / "kv_oracle.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# KV cache: the ideal per-vector code (Gaussian distortion-rate noise) on SmolLM2-135M-Instruct",
        "",
        f"`{cmd}`: {args.windows} windows x {args.seqlen} tokens of pydoc_data.topics (fp32-cache ppl {ref:.4f}); "
        "every key / value vector x (per token and KV head) replaced by x + N(0, |x|^2/D 2^(-2R)), token 0 exact; "
        f"perplexity ratio vs the fp32 cache for noise seeds {seeds}. '-' = that side exact.",
        "",
        "| key bits R | value bits R | ppl ratio (per noise seed) |",
        "|---|---|---|",
    ]
    for r in rows:
        k = "-" if r["key_bits"] is None else r["key_bits"]
        v = "-" if r["value_bits"] is None else r["value_bits"]
        lines.append(f"| {k} | {v} | {' / '.join(f'{x:.4f}' for x in r['ppl_ratio'])} |")
    (RESULTS / "kv_oracle.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
