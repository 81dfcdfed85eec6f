"""coset-lut benchmark: LUT scoring / matmul from labels vs decode-then-torch.matmul, D4 q=4 M=2, CPU.

Run:  uv run python benchmarks/bench_lut.py [--quick]
Writes benchmarks/results/lut.json and benchmarks/results/lut.md.

Database X: n rows of k columns, encoded in d=4 blocks (random valid labels, T in {0, 1}: timings do not
depend on the data). Queries Y: m rows, float32 (one-sided) or encoded (two-sided). Methods, each producing
the (n, m) score matrix X̂ Y^T (or X̂ Ŷ^T):

* lut_one_sided  - coset.lut.lut_matmul_one_sided(X, Y): per-query q^d tables + K*M lookups per row
                   (table build included)
* lut_two_sided  - coset.lut.lut_matmul(X, Yenc): int8 <a_i,a_j> table, queries already encoded
* decode_matmul  - coset.quant.decode(labels, T) (float64 Algorithm 2) then torch.matmul (decode included)
* dequant_matmul - EncodedMatrix.dequantize() (representative-table decode) then torch.matmul
* dense_matmul   - torch.matmul on the float32 matrix already in memory (the uncompressed floor, 8x the bytes)

Times are the minimum over repeats (the machine is shared; the minimum is the least disturbed run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from coset.lut import EncodedMatrix, lut_matmul, lut_matmul_one_sided
from coset.quant import QuantizationConfig, decode, from_blocks
from coset.quant.backend import select_backend

OUT = Path(__file__).resolve().parent / "results"


def timeit(fn, budget: float = 1.0, max_reps: int = 5) -> float:
    """Minimum wall time of ``fn()`` over up to ``max_reps`` runs (fewer when a run is slow)."""
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (reps == 0 or spent < budget):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def random_codes(n: int, k: int, config: QuantizationConfig, seed: int) -> EncodedMatrix:
    g = torch.Generator().manual_seed(seed)
    K = -(-k // config.dim)
    b = torch.randint(0, config.q, (n, K, config.M, config.dim), generator=g, dtype=torch.uint8)
    T = (torch.rand(n, K, generator=g) < 0.1).to(torch.uint8)  # ~10% of blocks one ramp step up
    E = EncodedMatrix(labels=b, T=T, config=config, k=k)
    E.indices, E.block_scales  # kernel-ready views are computed once and cached, like the codes themselves
    return E


METHODS = (
    "lut_one_sided",
    "lut_two_sided",
    "lut_one_sided_torch",
    "lut_two_sided_torch",
    "decode_matmul",
    "dequant_matmul",
    "dense_matmul",
)
LABELS = {
    "lut_one_sided": "one-sided auto",
    "lut_two_sided": "two-sided auto",
    "lut_one_sided_torch": "one-sided torch",
    "lut_two_sided_torch": "two-sided torch",
    "decode_matmul": "decode+matmul",
    "dequant_matmul": "dequant+matmul",
}
SKIP_SECONDS = 20.0  # a run predicted (from the same k, m at smaller n) to take longer is skipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--md-only", action="store_true", help="rewrite lut.md from lut.json without measuring")
    args = ap.parse_args()
    if args.md_only:
        data = json.loads((OUT / "lut.json").read_text())
        write_md("lut", data["meta"], data["results"], sorted({r["m"] for r in data["results"]}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.2)
    ns = [1000, 10000] if args.quick else [1000, 10000, 100000]
    ks = [256] if args.quick else [256, 1024]
    ms = [1, 16, 256]
    records = []
    rate: dict[tuple, float] = {}  # (method, k, m) -> seconds per row at the last n
    for k in ks:
        for n in ns:
            X = random_codes(n, k, config, seed=n + k)
            be_dec = select_backend("auto", "decode", X.labels.reshape(-1, 2, 4), config.lattice, config)
            t_decode = timeit(
                lambda: from_blocks(decode(X.labels, config=config, T=X.T, dtype=torch.float32), X.pad),
                budget=0.5,
                max_reps=3,
            )
            Wf = from_blocks(decode(X.labels, config=config, T=X.T, dtype=torch.float32), X.pad)
            t_dequant = timeit(lambda: X.dequantize(), budget=0.5, max_reps=3)
            for m in ms:
                Y = torch.randn(m, k)
                Yenc = EncodedMatrix.from_dense(Y, config)
                be1 = select_backend("auto", "lut_one_sided", X.indices, None, None)
                be2 = select_backend("auto", "lut_two_sided", X.indices, None, None)
                ref = Wf.double() @ Y.double().T
                ref2 = Wf.double() @ Yenc.dequantize(torch.float64).T
                fns = {
                    "lut_one_sided": lambda: lut_matmul_one_sided(X, Y),
                    "lut_two_sided": lambda: lut_matmul(X, Yenc),
                    "lut_one_sided_torch": lambda: lut_matmul_one_sided(X, Y, backend="torch"),
                    "lut_two_sided_torch": lambda: lut_matmul(X, Yenc, backend="torch"),
                    "dense_matmul": lambda: Wf @ Y.T,
                }
                rec = dict(n=n, k=k, m=m)
                errs = {}
                for name, fn in fns.items():
                    pred = rate.get((name, k, m), 0.0) * n
                    if pred > SKIP_SECONDS:
                        rec[name] = None
                        continue
                    out = fn()
                    r = ref2 if "two" in name else ref
                    errs[name] = float((out.double() - r).abs().max() / r.abs().max())
                    rec[name] = timeit(fn)
                    rate[(name, k, m)] = rec[name] / n
                tm = rec["dense_matmul"]
                rec.update(
                    decode_matmul=t_decode + tm,
                    dequant_matmul=t_dequant + tm,
                    decode_only=t_decode,
                    dequant_only=t_dequant,
                    backend_auto_one_sided=getattr(be1, "name", "torch"),
                    backend_auto_two_sided=getattr(be2, "name", "torch"),
                    backend_decode=getattr(be_dec, "name", "torch"),
                    max_rel_err=max(errs.values()),
                    bytes_codes_packed=X.nbytes,
                    bytes_kernel_indices=X.indices.numel() * 4,
                    bytes_float32=n * k * 4,
                )
                records.append(rec)
                print(
                    f"n={n:>6} k={k:>4} m={m:>3} "
                    + " ".join(f"{a}={_ms(rec[a])}" for a in METHODS)
                    + f" relerr={rec['max_rel_err']:.1e}",
                    flush=True,
                )
            del X, Wf
    meta = dict(
        lattice="D4",
        q=4,
        M=2,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=platform.processor() or platform.platform(),
        timing="min over up to 5 repeats, milliseconds in the .md, seconds in the .json; "
        "decode_matmul / dequant_matmul = one decode of X + the dense matmul",
        skipped=f"null = not run: predicted > {SKIP_SECONDS:.0f} s from the same k, m at smaller n",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    name = "lut_quick" if args.quick else "lut"
    (OUT / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=records), indent=1))
    write_md(name, meta, records, ms)
    print(f"wrote {OUT / (name + '.json')} and .md")


def write_md(name: str, meta: dict, records: list, ms: list) -> None:
    r0 = records[0]
    lines = [
        f"# coset-lut benchmark (D4, q=4, M=2; CPU, {meta['threads']} torch threads, torch {meta['torch']})",
        "",
        f"{meta['date']}. Times in ms, {meta['timing']}. {meta['skipped']} (shown as -).",
        f"`auto` resolved to backend `{r0['backend_auto_one_sided']}` (one-sided) / `{r0['backend_auto_two_sided']}` "
        f"(two-sided); `_torch` columns force the PyTorch fallback; decode uses backend `{r0['backend_decode']}`.",
        "`best` = fastest way to get the scores from the codes (dense matmul needs the float32 matrix in memory: 5.3x the bytes of the packed codes).",
        "",
        "| n | k | m | one-sided auto | one-sided torch | two-sided auto | two-sided torch | decode+matmul | "
        "dequant+matmul | dense matmul | best from codes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        cands = {a: r[a] for a in METHODS if a != "dense_matmul" and r[a] is not None}
        best = LABELS[min(cands, key=cands.get)]
        lines.append(
            f"| {r['n']} | {r['k']} | {r['m']} | "
            + " | ".join(
                _ms(r[a])
                for a in (
                    "lut_one_sided",
                    "lut_one_sided_torch",
                    "lut_two_sided",
                    "lut_two_sided_torch",
                    "decode_matmul",
                    "dequant_matmul",
                    "dense_matmul",
                )
            )
            + f" | {best} |"
        )
    lines += ["", "Decode of X alone (once per matrix):", ""]
    lines += [
        f"- n={r['n']} k={r['k']}: coset.quant.decode {_ms(r['decode_only'])} ms, "
        f"EncodedMatrix.dequantize {_ms(r['dequant_only'])} ms"
        for r in records
        if r["m"] == ms[0]
    ]
    lines += [
        "",
        "Memory per weight: packed codes 6 bits (labels M log2 q = 4, plus one byte of T per 4-block), kernel "
        "indices (one int32 per layer and block) 2 bytes, float32 4 bytes.",
    ]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")


def _ms(t) -> str:
    return "-" if t is None else f"{t * 1e3:.2f}"


if __name__ == "__main__":
    main()
