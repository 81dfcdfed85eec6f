"""How good could any per-vector KV code be? SmolLM2 perplexity with every key / value vector replaced by
``x + n``, ``n ~ N(0, |x|^2 / D * 2^(-2R) I)`` per token and KV head: the mean squared error of an ideal rate-R
code of each vector (the Gaussian distortion-rate bound, with the vector's scale free and exact), token 0
exact (the sink, as the coded cache keeps it), every position reading the noisy states (the protocol of
``bench_kv.py --sections ppl``: the same windows of pydoc_data.topics).

    uv run python benchmarks/bench_kv_oracle.py [--windows 2] [--seeds 0,1] [--shaped]

Writes ``results/kv_oracle.{json,md}``. The noise is white in the raw key / value space: it models a code
without the cache's key transforms (which shape the key error where the queries do not look), so for keys it is
not a bound on what shaped codes reach; for values (decoded, then averaged by the attention) it is.

``--shaped`` (-> ``results/kv_oracle_shaped.{json,md}``) gives the ideal code what the best coded cache has:
keys centred on their rotated pre-RoPE mean ``R_p μ`` and mapped by the calibrated key transform ``T``
(``calibrate_key_transforms(..., rope=...)`` on the window after the evaluated ones, as ``bench_kv.py`` does),
values centred on their mean; the noise is white in the coded coordinates ``T (k - R_p μ)`` / ``v - μ_v``
with variance ``|z|^2 / D 2^(-2R)``, so the keys get ``T^-1 n``. The means are those of the prompt (the cache
freezes them at its first coded chunk, which is the whole window here). A real code at R bits all-in also pays
for its scale, which the ideal one gets free: no per-vector code with these transforms beats these figures.
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

from coset.kv import KeyTransform, RotaryTable  # noqa: E402
from coset.kv.hf_cache import calibrate_key_transforms  # noqa: E402
from coset.kv.rope import apply_rotary, unapply_rotary  # noqa: E402
from coset.ptq.data import pydoc_text, token_windows  # noqa: E402
from coset.ptq.models import load_smollm2  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# (key rate, value rate) in bits per element; None = exact. Splits that average 4 / 3 / 2 bits, then one side.
RATES = [(4, 4), (4.5, 3.5), (3, 3), (3.5, 2.5), (2, 2), (2.5, 1.5)]
RATES += [(None, r) for r in (2.375, 3.0, 3.375, 3.5, 4.0, 4.5)] + [(r, None) for r in (3.625, 4.0, 4.5, 4.625)]
# --shaped: the splits of 4 and 3 bits (the coded cache's t42 split is keys 4.625 / values 3.375 all-in), then
# one side at the coded cache's rates
SHAPED_RATES = [(4, 4), (4.5, 3.5), (4.625, 3.375), (5, 3), (5.5, 2.5), (3, 3), (3.5, 2.5), (3.625, 2.375), (4, 2)]
SHAPED_RATES += [(None, r) for r in (2.375, 3.375, 3.5)] + [(r, None) for r in (3.625, 4.5, 4.625)]


class NoiseCache(DynamicCache):
    """DynamicCache whose appended keys / values get the ideal code's noise (rate None: exact)."""

    def __init__(
        self,
        config,
        rk: float | None,
        rv: float | None,
        seed: int,
        transforms: list[KeyTransform] | None = None,
        rope: RotaryTable | None = None,
    ) -> None:
        super().__init__(config=config)
        self.rk, self.rv = rk, rv
        self.g = torch.Generator().manual_seed(seed)
        self.transforms, self.rope = transforms, rope

    def _noise(self, z: torch.Tensor, r: float) -> torch.Tensor:
        """White noise of the ideal rate-r code of each vector ``z (B, H, L, D)``; the sink (token 0) exact."""
        var = z.pow(2).mean(-1, keepdim=True) * 2.0 ** (-2 * r)  # (B, H, L, 1)
        n = torch.randn(z.shape, generator=self.g, dtype=z.dtype) * var.sqrt()
        n[:, :, 0] = 0
        return n

    def _noisy_keys(self, k: torch.Tensor, r: float | None, layer_idx: int) -> torch.Tensor:
        if r is None:
            return k
        if self.transforms is None:
            return k + self._noise(k, r)
        assert self.rope is not None and k.shape[2] > 1, "the shaped oracle codes a whole prompt at once"
        cos, sin = self.rope.get(1, k.shape[2])
        mu = unapply_rotary(k[:, :, 1:], cos, sin).mean(dim=2, keepdim=True)  # (B, H, 1, D) pre-RoPE mean
        kc = k.clone()
        kc[:, :, 1:] -= apply_rotary(mu, cos, sin)
        t = self.transforms[layer_idx].matrix()  # (H, D, D), symmetric
        n = self._noise(kc @ t.unsqueeze(0), r)  # in z = T kc
        return k + torch.linalg.solve(t, n.transpose(-1, -2)).transpose(-1, -2)  # k + T^-1 n

    def _noisy_values(self, v: torch.Tensor, r: float | None) -> torch.Tensor:
        if r is None:
            return v
        if self.transforms is None:
            return v + self._noise(v, r)
        return v + self._noise(v - v[:, :, 1:].mean(dim=2, keepdim=True), r)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = self._noisy_keys(key_states, self.rk, layer_idx)
        v = self._noisy_values(value_states, self.rv)
        return super().update(k, v, layer_idx, *args, **kwargs)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, rk, rv, seed: int, transforms=None, rope=None) -> float:
    nll, count = 0.0, 0
    for i, w in enumerate(windows):
        cache = NoiseCache(model.config, rk, rv, 1000 * seed + i, transforms, rope)
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
    ap.add_argument("--shaped", action="store_true", help="centred keys / values and calibrated key transforms")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    all_windows = token_windows(tok, pydoc_text(), args.seqlen, args.windows + 1)
    windows = all_windows[: args.windows]
    seeds = [int(s) for s in args.seeds.split(",")]
    transforms = rope = None
    if args.shaped:
        rope = RotaryTable.from_model(model)
        transforms = calibrate_key_transforms(model, all_windows[-1:], rope=rope)
    ref = perplexity(model, windows, None, None, 0)
    rows = []
    for rk, rv in SHAPED_RATES if args.shaped else RATES:
        ratios = [perplexity(model, windows, rk, rv, s, transforms, rope) / ref for s in seeds]
        rows.append({"key_bits": rk, "value_bits": rv, "ppl_ratio": ratios})
        print(f"keys {rk} values {rv}: {' / '.join(f'{r:.4f}' for r in ratios)}", flush=True)
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "shaped")
    cmd = "uv run python benchmarks/bench_kv_oracle.py " + flags + (" --shaped" if args.shaped else "")
    name = "kv_oracle_shaped" if args.shaped else "kv_oracle"
    out = {
        "command": cmd,
        "fp32_ppl": ref,
        "windows": args.windows,
        "seqlen": args.seqlen,
        "seeds": seeds,
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    noise = (
        "keys k -> k + T^-1 n with n ~ N(0, |z|^2/D 2^(-2R)) white in the coded coordinates z = T (k - R_p mu) "
        "(pre-RoPE mean, calibrated key transforms on the next window), values v -> v + N(0, |v - mu_v|^2/D "
        "2^(-2R))"
        if args.shaped
        else "every key / value vector x (per token and KV head) replaced by x + N(0, |x|^2/D 2^(-2R))"
    )
    lines = [
        "# KV cache: the ideal per-vector code (Gaussian distortion-rate noise) on SmolLM2-135M-Instruct",
        "",
        f"`{cmd}`: {args.windows} windows x {args.seqlen} tokens of pydoc_data.topics (fp32-cache ppl {ref:.4f}); "
        f"{noise}, token 0 exact; perplexity ratio vs the fp32 cache for noise seeds {seeds}. '-' = that side "
        "exact.",
        "",
        "| key bits R | value bits R | ppl ratio (per noise seed) |",
        "|---|---|---|",
    ]
    for r in rows:
        k = "-" if r["key_bits"] is None else r["key_bits"]
        v = "-" if r["value_bits"] is None else r["value_bits"]
        lines.append(f"| {k} | {v} | {' / '.join(f'{x:.4f}' for x in r['ppl_ratio'])} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
