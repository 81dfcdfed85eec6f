"""SmolLM2-135M: HNLQ + rotation + LDLQ, then ``coset.ptq.finetune_`` of the norms and per-layer scales.

    uv run python benchmarks/bench_ptq_finetune.py --bits 4 --steps 48 --lr 2e-3 [--threads 1]

Same protocol as ``bench_ptq.py --model smollm2`` (float-model Hessians of 64×512 stdlib-docstring tokens,
shared; evaluation on the first 4,096 tokens of pydoc_data.topics in 512-token windows, never seen in tuning).
Tuning data: the same 64 calibration windows cut into 256-token batches, the last 4 held out. Appends one row
per run to ``results/ptq_finetune.jsonl`` (before / after metrics, held-out KL, CPU seconds). ``--cache DIR``
keeps the reference log-probs, Hessians and W_hat between runs (several hundred MB each).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coset.ptq.api import cpu_seconds  # noqa: E402
from coset.ptq.calib import collect_hessians  # noqa: E402
from coset.ptq.data import pydoc_text, stdlib_docstrings, token_windows  # noqa: E402
from coset.ptq.eval import lm_fidelity, lm_reference  # noqa: E402
from coset.ptq.finetune import FinetuneConfig, clone_reference, finetune_  # noqa: E402
from coset.ptq.hnlq_block import MethodConfig, quantize_linear  # noqa: E402
from coset.ptq.models import load_smollm2  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gains", choices=("layer", "row"), default="layer", help="row: fp16 per-channel out_scale")
    ap.add_argument("--seqlen", type=int, default=256, help="tuning batch length (calibration windows are cut)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/coset-ptq-cache")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    reference = clone_reference(model)
    calib = token_windows(tok, stdlib_docstrings(), 512, 64)
    ids = torch.tensor(tok(pydoc_text(), add_special_tokens=False)["input_ids"][:4096])
    p = cache / "smol_lmref.pt"
    ref = torch.load(p, weights_only=False) if p.exists() else lm_reference(model, ids, 512)
    torch.save(ref, p)
    p = cache / f"smol_what{args.bits}.pt"
    if p.exists():
        what = torch.load(p)
    else:
        hp = cache / "smol_h64.pt"
        if hp.exists():
            hessians = torch.load(hp)["hessians"]
        else:
            hessians = collect_hessians(model, list(calib.split(8)), dtype=torch.float32)
            torch.save({"hessians": hessians}, hp)
        cfg = MethodConfig.for_bits(args.bits)
        what = {}
        for name, H in hessians.items():
            what[name] = quantize_linear(model.get_submodule(name).weight.detach(), H, cfg, name=name)[0].float()
        torch.save(what, p)
    with torch.no_grad():
        for n, w in what.items():
            model.get_submodule(n).weight.copy_(w)
    before = lm_fidelity(ref, model, ids, 512)
    print("before", before, flush=True)
    batches = list(calib.reshape(-1, args.seqlen).split(1))
    c0, t0 = cpu_seconds(), time.perf_counter()
    rep = finetune_(
        model,
        reference,
        batches,
        FinetuneConfig(steps=args.steps, lr=args.lr, gains=args.gains, holdout=4),
        layers=list(what),
    )
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    after = lm_fidelity(ref, model, ids, 512)
    print("after", after, flush=True)
    row = {
        "model": "smollm2",
        "code": f"MethodConfig.for_bits({args.bits}), HNLQ+rot+LDLQ",
        "bits_class": args.bits,
        "steps": args.steps,
        "lr": args.lr,
        "gains": args.gains,
        "seqlen": args.seqlen,
        "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
        "finetune_cpu_s": cpu,
        "finetune_wall_s": wall,
        "before": before,
        "after": after,
        "report": rep.to_dict(),
    }
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "ptq_finetune.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
