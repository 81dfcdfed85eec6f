"""HNLQLinear forward at small batches: decode + matmul vs the registered coded GEMV vs fp32 F.linear.

The PTQ layer computes ``W̃ x̃`` either by decoding its weight per call or, for codes whose packed bytes are the
int8-codebook kernel's label indices (the 2-bit E8 q=4 M=1 centred code, E8/D4 q=4 M=2), straight from the codes
(coset-cuda's ``coded_gemv``, ``coset.cuda.lut_gemv``). Shapes of SmolLM2-135M's linears; random rotated codes
(the kernel's time does not depend on the weights). 1 thread (torch and native), CPU time per forward, minimum
of interleaved repetitions. Writes ``benchmarks/results/ptq_gemv.{json,md}``.

    uv run python benchmarks/bench_ptq_gemv.py
    uv run python benchmarks/bench_ptq_gemv.py --model smollm2   # + greedy decoding of the 2-bit SmolLM2

With ``--model smollm2`` the real model is quantized at 2 bits (``MethodConfig.for_bits(2)``, a short calibration:
the timing does not depend on the quality) and greedy generation is timed per token with the default paths (coded
GEMV up to ``DEFAULT_GEMV_MAX_ROWS`` rows) against decode + matmul everywhere (``lut_max_rows = 0``) and the fp32
model; writes ``benchmarks/results/ptq_gemv_smollm2[_4|_4h].json`` (``--code``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import coset.cuda as cc
from coset.ptq.codes import LinearCodes, Rotation
from coset.ptq.layers import DEFAULT_GEMV_MAX_ROWS, HNLQLinear
from coset.quant import QuantizationConfig, encode

RESULTS = Path(__file__).parent / "results"


def layer(m: int, n: int, cfg: QuantizationConfig) -> tuple[HNLQLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(m * 7 + n)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    rin, rout = Rotation(n, 11), Rotation(m, 12)
    Wt = rout.apply(rin.apply(W).t()).t()
    s = Wt.pow(2).mean().sqrt()
    b, T = encode((Wt / s).reshape(m, n // cfg.dim, cfg.dim), config=cfg)
    codes = LinearCodes(cfg, b, T, s.to(torch.float32), rin, rout, n, m)
    return HNLQLinear.from_codes(codes, None), W.to(torch.float32)


def tmin(f, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        f()
        best = min(best, time.process_time() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rows", default="1,8,32,64,128")
    ap.add_argument("--model", choices=("none", "smollm2"), default="none")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--code",
        choices=("2", "4", "4h"),
        default="2",
        help="--model smollm2: MethodConfig.for_bits(2) / for_bits(4) (E8 q=16 M=1, decoded) / the hierarchical "
        "4-bit for_bits(4, q=4, M=2, center=True)",
    )
    args = ap.parse_args()
    if args.model == "smollm2":
        return generation(args)
    torch.set_num_threads(1)
    cc.set_num_threads(1)
    codes = {
        "E8 q=4 M=1 centred (2-bit)": QuantizationConfig(lattice_type="E8", q=4, M=1, beta=0.5, center=True),
        "E8 q=4 M=2 (4-bit)": QuantizationConfig(lattice_type="E8", q=4, M=2, beta=0.5),
    }
    shapes = [(1536, 576), (576, 1536), (576, 576)]  # SmolLM2: gate/up, down, q/o
    rows_list = [int(r) for r in args.rows.split(",")]
    out: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": 1,
        "load_avg": os.getloadavg(),
        "default_gemv_max_rows": DEFAULT_GEMV_MAX_ROWS,
        "rows": [],
    }
    with torch.no_grad():
        for name, cfg in codes.items():
            for m, n in shapes:
                mod, W = layer(m, n, cfg)
                for r in rows_list:
                    x = torch.randn(r, n)
                    fns = {
                        "decode": lambda: mod(x, path="decode"),
                        "gemv": lambda: mod(x, path="lut"),
                        "fp32": lambda: F.linear(x, W),
                    }
                    for f in fns.values():
                        f()
                    t = {k: float("inf") for k in fns}
                    for _ in range(args.reps):
                        for k, f in fns.items():
                            t[k] = min(t[k], tmin(f, 1))
                    row = {"code": name, "shape": [m, n], "rows": r, **{f"{k}_ms": v for k, v in t.items()}}
                    out["rows"].append(row)
                    print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ptq_gemv.json").write_text(json.dumps(out, indent=1))
    L = [
        "# HNLQLinear at small batches: decode + matmul vs coded GEMV (coset.ptq, issue 12/14)\n",
        f"Machine: {out['machine']}; torch {out['torch']}; 1 thread (torch and native); load average at start "
        f"{out['load_avg'][0]:.1f}. Command: `uv run python benchmarks/bench_ptq_gemv.py`. CPU ms per forward "
        "(rotations, bias and scales included for both code paths), minimum of interleaved repetitions; fp32 = "
        "`F.linear` on a float32 weight of the same shape (no rotation).\n",
        f"`DEFAULT_GEMV_MAX_ROWS = {DEFAULT_GEMV_MAX_ROWS}`: `forward` uses the GEMV up to that many rows.\n",
        "| code | out x in | rows | decode + matmul | coded GEMV | fp32 F.linear | GEMV speedup over decode |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        L.append(
            f"| {r['code']} | {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['decode_ms']:.3f} | "
            f"{r['gemv_ms']:.3f} | {r['fp32_ms']:.3f} | {r['decode_ms'] / r['gemv_ms']:.1f}x |"
        )
    (RESULTS / "ptq_gemv.md").write_text("\n".join(L) + "\n")


def generation(args) -> None:
    from coset.ptq import MethodConfig, PTQConfig, quantize_
    from coset.ptq.data import stdlib_docstrings, token_windows
    from coset.ptq.layers import HNLQLinear as L
    from coset.ptq.models import load_smollm2

    torch.set_num_threads(1)
    cc.set_num_threads(1)
    ref, tok = load_smollm2()
    model, _ = load_smollm2(with_tokenizer=False)
    calib = token_windows(tok, stdlib_docstrings(), 256, 8)
    t0 = time.perf_counter()
    method = {
        "2": MethodConfig.for_bits(2),
        "4": MethodConfig.for_bits(4),
        "4h": MethodConfig.for_bits(4, q=4, M=2, center=True),
    }[args.code]
    quantize_(model, calib, PTQConfig(method=method, nsamples=8, seqlen=256, progress=False))
    q_s = time.perf_counter() - t0
    layers = [m for m in model.modules() if isinstance(m, L)]
    prompt = tok("The Python language reference says that", return_tensors="pt")["input_ids"]

    def run(m) -> tuple[float, list[int]]:
        with torch.no_grad():
            m.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
            c0 = time.process_time()
            out = m.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            return (time.process_time() - c0) * 1e3 / args.new_tokens, out[0, prompt.shape[1] :].tolist()

    res: dict = {
        "code": f"E8 q={method.q} M={method.M} center={method.center}",
        "quantize_s": q_s,
        "linears": len(layers),
        "coded_gemv_layers": sum(m._gemv_backend(prompt.float()) is not None for m in layers),
        "new_tokens": args.new_tokens,
        "threads": 1,
    }
    for name, rows in (("coded GEMV (default)", None), ("decode + matmul", 0)):
        for m in layers:
            m.lut_max_rows = rows
        res[name] = dict(zip(("ms_per_token", "tokens"), run(model), strict=True))
    res["fp32"] = dict(zip(("ms_per_token", "tokens"), run(ref), strict=True))
    a, b = res["coded GEMV (default)"]["tokens"], res["decode + matmul"]["tokens"]
    res["same_tokens_gemv_vs_decode"] = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    res["load_avg"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.code == "2" else f"_{args.code}"
    (RESULTS / f"ptq_gemv_smollm2{suffix}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: (v if not isinstance(v, dict) else v["ms_per_token"]) for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
