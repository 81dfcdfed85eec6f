"""SmolLM2-135M: HNLQ + rotation + LDLQ, then ``coset.ptq.finetune_`` of the norms and per-layer scales.

    uv run python benchmarks/bench_ptq_finetune.py --bits 4 --steps 48 --lr 2e-3 [--threads 1]
    uv run python benchmarks/bench_ptq_finetune.py --bits 3 --alloc 3.07 --rates 2,3,4 --gains row ...

``--alloc B``: mixed precision first (``coset.ptq.allocate``): every linear quantized at every rate of
``--rates``, costs ½ΣFΔW² from the float model's diagonal Fisher (12 calibration windows), rates chosen by
``allocate_rates`` so the codes average at most B bits/weight all-in as saved (per-row gains add 16 bits per row).

Same protocol as ``bench_ptq.py --model smollm2`` (float-model Hessians of 64×512 stdlib-docstring tokens,
shared; evaluation on the first 4,096 tokens of pydoc_data.topics in 512-token windows, never seen in tuning).
Tuning data: the same 64 calibration windows (or ``--tune-windows N`` docstring windows, the first 64 being the
calibration ones) cut into 256-token batches, the last 4 held out. Appends one row
per run to ``results/ptq_finetune.jsonl`` (before / after metrics, held-out KL, CPU seconds). ``--cache DIR``
keeps the reference log-probs, Hessians and W_hat between runs (several hundred MB each).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coset.ptq.allocate import allocate_rates, fisher_costs, fisher_diagonal, saved_nbytes  # noqa: E402
from coset.ptq.api import cpu_seconds  # noqa: E402
from coset.ptq.bits import bits_per_weight  # noqa: E402
from coset.ptq.block_tuning import BlockTuneConfig  # noqa: E402
from coset.ptq.calib import collect_hessians, sequential_quantize  # noqa: E402
from coset.ptq.data import pydoc_text, stdlib_docstrings, token_windows  # noqa: E402
from coset.ptq.eval import lm_fidelity, lm_reference  # noqa: E402
from coset.ptq.finetune import FinetuneConfig, clone_reference, finetune_  # noqa: E402
from coset.ptq.hnlq_block import MethodConfig, quantize_linear  # noqa: E402
from coset.ptq.layers import HNLQLinear  # noqa: E402
from coset.ptq.models import load_smollm2  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gains", choices=("layer", "row"), default="layer", help="row: fp16 per-channel out_scale")
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    ap.add_argument("--head-lr", type=float, default=0.0, help="> 0: also tune the (tied) float lm_head at this lr")
    ap.add_argument(
        "--code-lr",
        type=float,
        default=0.0,
        help="> 0: also tune the codes (straight-through latents), lr in units of each layer's scale",
    )
    ap.add_argument("--code-every", type=int, default=4, help="re-quantize the latents every N steps")
    ap.add_argument("--seqlen", type=int, default=256, help="tuning batch length (calibration windows are cut)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/coset-ptq-cache")
    ap.add_argument("--alloc", type=float, default=0.0, help="mixed precision: all-in bits target of the codes")
    ap.add_argument("--rates", default="2,3,4")
    ap.add_argument("--fisher-windows", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="rotation seed base of the codes (cached per seed)")
    ap.add_argument(
        "--calibration",
        choices=("shared", "sequential", "true-sequential", "asym"),
        default="shared",
        help="Hessians: shared float-model ones, GPTQ-style sequential (true-sequential: inside a block too, group"
        " by group), or sequential + asymmetric target",
    )
    ap.add_argument(
        "--block-tune-epochs",
        type=int,
        default=0,
        help="> 0: sequential calibration with block tuning (coset.ptq.block_tuning) of the later groups",
    )
    ap.add_argument("--block-tune-lr", type=float, default=1e-3)
    ap.add_argument("--block-tune-target", choices=("float", "block"), default="float")
    ap.add_argument(
        "--tune-windows", type=int, default=64, help="512-token docstring windows to tune on (the first 64 calibrate)"
    )
    ap.add_argument(
        "--checkpoint", default=None, help="save the tuning state here every 32 steps and resume from it if present"
    )
    args = ap.parse_args()
    block_tune = None
    if args.block_tune_epochs:
        block_tune = BlockTuneConfig(args.block_tune_epochs, args.block_tune_lr, args.block_tune_target)
        if args.calibration == "shared":
            args.calibration = "sequential"
        args.calibration += f"-bt{args.block_tune_epochs}-{args.block_tune_lr:g}-{args.block_tune_target}"
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    reference = clone_reference(model)
    # one tokenization: the first 64 windows calibrate, the first --tune-windows tune
    windows = token_windows(tok, stdlib_docstrings(), 512, max(64, args.tune_windows))
    calib, tune = windows[:64], windows[: args.tune_windows]
    ids = torch.tensor(tok(pydoc_text(), add_special_tokens=False)["input_ids"][:4096])
    p = cache / "smol_lmref.pt"
    if p.exists():
        ref = torch.load(p, weights_only=False)
    else:  # saved only when computed: runs sharing a cache must not rewrite a file another one is reading
        ref = lm_reference(model, ids, 512)
        torch.save(ref, p)
    alloc_row: dict = {}
    if args.alloc:
        rates = [int(r) for r in args.rates.split(",")]
        whats = {r: quantized(model, calib, cache, r, args.seed) for r in rates}
        nbytes_r = {r: torch.load(cache / f"smol_bytes{r}{_tag(args.seed)}.pt") for r in rates}
        fp = cache / "smol_fisher.pt"
        if fp.exists():
            fisher = torch.load(fp)
        else:
            fisher = fisher_diagonal(model, list(calib[: args.fisher_windows].split(1)), list(whats[rates[0]]))
            torch.save(fisher, fp)
        names = list(fisher)
        W0 = {n: model.get_submodule(n).weight.detach() for n in names}
        cost = fisher_costs(fisher, W0, whats)
        nbytes = {n: {r: nbytes_r[r][n] for r in rates} for n in names}
        n_w = sum(w.numel() for w in W0.values())
        choice = allocate_rates(cost, nbytes, int(args.alloc * n_w / 8))
        what = {n: whats[r][n] for n, r in choice.items()}
        used = sum(nbytes[n][r] for n, r in choice.items())
        hist = {r: sum(1 for v in choice.values() if v == r) for r in rates}
        alloc_row = {
            "alloc_target": args.alloc,
            "rates": rates,
            "alloc_bits": 8 * used / n_w,
            "hist": hist,
            "choice": choice,
        }
        print("allocation", {k: v for k, v in alloc_row.items() if k != "choice"}, flush=True)
    elif args.code_lr > 0:  # the tuning moves the codes: the layers must be the compressed HNLQLinear modules
        codes = quantized_codes(model, calib, cache, args.bits, args.seed)
        what = dict.fromkeys(codes)
        for n, c in codes.items():
            model.set_submodule(n, HNLQLinear.from_codes(c))
        alloc_row = {"bits_before": bits_per_weight(model).all_in}
    else:
        what = quantized(model, calib, cache, args.bits, args.seed, args.calibration, block_tune)
        nb = torch.load(cache / f"smol_bytes{args.bits}{_what_tag(args.seed, args.calibration)}.pt")
        n_w = sum(model.get_submodule(n).weight.numel() for n in nb)
        alloc_row = {"code_bits": 8 * sum(nb.values()) / n_w}  # saved bytes of the codes (row gains not included)
        print("code bits", alloc_row["code_bits"], flush=True)
    with torch.no_grad():
        for n, w in what.items():
            if w is not None:
                model.get_submodule(n).weight.copy_(w)
    before = lm_fidelity(ref, model, ids, 512)
    print("before", before, flush=True)
    batches = list(tune.reshape(-1, args.seqlen).split(1))
    c0, t0 = cpu_seconds(), time.perf_counter()
    rep = finetune_(
        model,
        reference,
        batches,
        FinetuneConfig(
            steps=args.steps,
            lr=args.lr,
            gains=args.gains,
            holdout=4,
            schedule=args.schedule,
            head=args.head_lr > 0,
            head_lr=args.head_lr or 1e-5,
            codes=args.code_lr > 0,
            code_lr=args.code_lr or 2e-3,
            code_every=args.code_every,
        ),
        layers=list(what),
        checkpoint=args.checkpoint,
        checkpoint_every=32,
    )
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    after = lm_fidelity(ref, model, ids, 512)
    print("after", after, flush=True)
    row = {
        "model": "smollm2",
        "code": f"MethodConfig.for_bits({args.bits}), HNLQ+rot+LDLQ",
        "calibration": args.calibration,
        "bits_class": args.bits,
        "steps": args.steps,
        "seed": args.seed,
        "lr": args.lr,
        "gains": args.gains,
        "schedule": args.schedule,
        "head_lr": args.head_lr,
        "code_lr": args.code_lr,
        "code_every": args.code_every,
        "t_codings": "zero/dense/sparse/elias_fano",
        "seqlen": args.seqlen,
        "tune_windows": len(tune),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
        "finetune_cpu_s": cpu,
        "finetune_wall_s": wall,
        "before": before,
        "after": after,
        "report": rep.to_dict(),
        **alloc_row,
    }
    if args.code_lr > 0:  # all-in bits of the tuned codes (T may have changed), fp16 row gains included
        row["bits_after"] = bits_per_weight(model).all_in
        print("bits", row["bits_before"], "->", row["bits_after"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "ptq_finetune.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _tag(seed: int) -> str:
    return f"_s{seed}" if seed else ""


def _what_tag(seed: int, calibration: str) -> str:
    """Cache-file tag of the W_hat / bytes of one rotation seed and calibration mode."""
    return _tag(seed) + ("" if calibration == "shared" else f"_{calibration}")


def quantized_codes(model, calib, cache: pathlib.Path, bits: int, seed: int = 0) -> dict:
    """LinearCodes of every block linear at one rate class (float Hessians shared), cached."""
    p = cache / f"smol_codes{bits}{_tag(seed)}.pt"
    if p.exists():
        return torch.load(p, weights_only=False)
    hessians = _hessians(model, calib, cache)
    cfg = MethodConfig.for_bits(bits, seed=seed)
    codes = {}
    for name, H in hessians.items():
        codes[name] = quantize_linear(model.get_submodule(name).weight.detach(), H, cfg, name=name)[1]
    torch.save(codes, p)
    return codes


def _hessians(model, calib, cache: pathlib.Path) -> dict:
    hp = cache / "smol_h64.pt"
    if hp.exists():
        return torch.load(hp)["hessians"]
    hessians = collect_hessians(model, list(calib.split(8)), dtype=torch.float32)
    torch.save({"hessians": hessians}, hp)
    return hessians


def quantized(
    model, calib, cache: pathlib.Path, bits: int, seed: int = 0, calibration: str = "shared", block_tune=None
) -> dict:
    """W_hat of every block linear at one rate class, cached with its all-in bytes. ``calibration``: "shared"
    float-model Hessians, or the GPTQ-style "sequential" driver (on a copy of the model), optionally with the
    "asym"metric target (each layer quantized toward the float model's outputs) or ``block_tune``."""
    tag = _what_tag(seed, calibration)
    p, bp = cache / f"smol_what{bits}{tag}.pt", cache / f"smol_bytes{bits}{tag}.pt"
    if p.exists() and bp.exists():
        return torch.load(p)
    cfg = MethodConfig.for_bits(bits, seed=seed)
    what, nbytes = {}, {}

    def qfn(name, lin, H):
        W_hat, codes, _ = quantize_linear(lin.weight.detach(), H, cfg, name=name)
        what[name] = W_hat.float()
        nbytes[name] = saved_nbytes(name, codes)
        return W_hat

    if calibration == "shared":
        for name, H in _hessians(model, calib, cache).items():
            qfn(name, model.get_submodule(name), H)
    else:
        t0 = time.perf_counter()
        res = sequential_quantize(
            copy.deepcopy(model),
            list(calib.split(8)),
            qfn,
            true_sequential=calibration.startswith("true-sequential"),
            asymmetric=calibration == "asym",
            block_tune=block_tune,
        )
        print(f"{calibration} quantization {time.perf_counter() - t0:.0f} s", flush=True)
        if res.block_tuning:
            kept = sum(bool(r["kept"]) for r in res.block_tuning.values())
            gain = [r["holdout_after"] / r["holdout_before"] for r in res.block_tuning.values() if r["kept"]]
            print(
                f"block tuning: kept {kept}/{len(res.block_tuning)}, held-out error ratio "
                f"median {sorted(gain)[len(gain) // 2] if gain else float('nan'):.3f}",
                flush=True,
            )
    torch.save(what, p)
    torch.save(nbytes, bp)
    return what


if __name__ == "__main__":
    main()
