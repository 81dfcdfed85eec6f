"""DDP on a real, bandwidth-limited link: wall-clock to accuracy and bytes counted on the wire.

Every rank runs in its own network namespace; the namespaces are joined by a veth cable (2 ranks) or a bridge
(more ranks), shaped with ``tc tbf`` (and optional ``netem`` delay), and gloo talks TCP over those private
addresses (``packages/coset-dist/tests/netns_harness.py`` builds and always removes them). "loopback" runs
the ranks on 127.0.0.1 without namespaces (the unshaped reference for the hook's overhead).

Model: a wide MLP (64 -> H -> H -> 10, H = 2208: 5.04M parameters) on scikit-learn's digits (offline, real
8x8 handwritten digits), Adam, the same seed / init / data order for every method.

Per (link, world size, method, seed) the workers record: the median step time (forward + backward +
optimizer, i.e. including the hook and the communication), the test accuracy every ``--eval-every`` steps
against the cumulative training wall-clock (evaluation excluded), the final accuracy, and per rank the
bytes per step

* on the wire: the kernel's tx/rx byte counters of the rank's ``eth0`` (Ethernet + IP + TCP headers and
  ACKs included), read by the rank itself at the first steady step (after the warm-up) and at the end;
* modelled: the ring-model count at the ``dist.all_reduce`` / ``dist.all_gather`` calls (as in
  bench_ddp.py; DDP's own fp32 all-reduce is counted from the parameter count).

    sudo uv run python benchmarks/bench_ddp_link.py                     # the full matrix -> results/ddp_link.*
    uv run python benchmarks/bench_ddp_link.py --links loopback --methods fp32,hnlq-allgather --seeds 0
    uv run python benchmarks/bench_ddp_link.py --links 1gbit --world-sizes 2,4 --methods fp32,hnlq-modular-q4

Partial results are appended to ``<out>/<name>.jsonl`` as each run finishes; ``--report-only`` rebuilds the
markdown/plot from that file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "packages" / "coset-dist" / "tests"))

from netns_harness import LinkSpec, ShapedNetwork, netns_unavailable_reason  # noqa: E402

START_ITER = 10
METHODS = [
    "fp32",
    "fp16",
    "powersgd-r2",
    "powersgd-r4",
    "hnlq-allgather",
    "hnlq-modular-q4",
    "hnlq-modular-q8",
]
EXTRA = ["hnlq-allgather-py", "hnlq-modular-q4-py"]  # the pure-Python codec (native bucket codec disabled)
EXTRA += [m + "-s2" for m in METHODS if m.startswith("hnlq")]  # 2 fp32 warm-up steps instead of 10
EXTRA += ["hnlq-modular-q4-u8", "hnlq-modular-q8-u8"]  # code_packing="uint8": 1 B/value at every world size
PORT = 29611


# ---------------------------------------------------------------------------------------------- worker side
def _wire_counters(iface: str | None):
    if iface is None:
        return None
    base = Path("/sys/class/net") / iface / "statistics"
    return {k: int((base / k).read_text()) for k in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")}


def _load_digits(seed: int):
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    Xtr, Xte = t(Xtr, torch.float32), t(Xte, torch.float32)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    return (Xtr - mu) / sd, t(ytr, torch.long), (Xte - mu) / sd, t(yte, torch.long)


def _register(ddp, method: str):
    import torch.distributed as dist  # noqa: F401
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from coset.dist import HNLQHookState, default_config, hnlq_hook

    if method == "fp32":
        return None
    if method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if method.startswith("powersgd-r"):
        st = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(method[len("powersgd-r") :]),
            start_powerSGD_iter=START_ITER,
            random_seed=0,
        )
        ddp.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
        return st
    # "-s2": compress from step 2, the earliest coset.dist allows (DDP rebuilds its buckets after step 0); HNLQ with
    # error feedback needs no longer fp32 warm-up, unlike PowerSGD
    kw: dict[str, Any] = dict(error_feedback=True, start_iter=2 if method.endswith("-s2") else START_ITER)
    base = method.removesuffix("-s2").removesuffix("-py")
    if base.endswith("-u8"):
        kw["code_packing"] = "uint8"
        base = base.removesuffix("-u8")
    if base == "hnlq-allgather":
        st = HNLQHookState(config=default_config(4, 2), mode="allgather", **kw)
    elif base == "hnlq-modular-q4":
        st = HNLQHookState(config=default_config(4, 2), mode="modular", chunk_size=64, **kw)
    elif base == "hnlq-modular-q8":
        st = HNLQHookState(config=default_config(8, 2), mode="modular", chunk_size=256, **kw)
    else:
        raise ValueError(f"unknown method {method!r}")
    # read by coset.dist.fast_codec (the native bucket codec when built)
    st.native = not method.removesuffix("-s2").endswith("-py")
    ddp.register_comm_hook(st, hnlq_hook)
    return st


def _train(rank, W, method, seed, cfg, data, counter, iface):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    H = cfg["hidden"]
    model = nn.Sequential(nn.Linear(Xtr.shape[1], H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 10))
    numel = sum(p.numel() for p in model.parameters())
    # One bucket for every method: PowerSGD issues all-reduces from future callbacks, which with several
    # buckets can reach gloo in a different order on different ranks (a collective mismatch).
    ddp = DDP(model, bucket_cap_mb=cfg["bucket_cap_mb"])
    state = _register(ddp, method)
    opt = torch.optim.Adam(ddp.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(Xtr), generator=gen), 0
    batch, steps = cfg["batch"], cfg["steps"]
    times, cpu_times, curve, model_bytes = [], [], [], 0
    clock = 0.0
    wire0 = None

    def evaluate():
        with torch.no_grad():
            return float((model(Xte).argmax(-1) == yte).float().mean())

    for step in range(steps):
        if step == START_ITER:
            wire0, mb0 = _wire_counters(iface), counter.bytes
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(Xtr), generator=gen), 0
        idx = perm[pos : pos + batch][rank::W]
        pos += batch
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(Xtr[idx]), ytr[idx]).backward()
        opt.step()
        dt = time.perf_counter() - t0
        times.append(dt)
        cpu_times.append(time.process_time() - c0)
        clock += dt
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            curve.append((step + 1, clock, evaluate()))
    wire1 = _wire_counters(iface)
    steady = steps - START_ITER
    fp32_model = math.ceil(2 * (W - 1) * 4 * numel / W)
    model_bytes = fp32_model if method == "fp32" else (counter.bytes - mb0) / steady
    res = {
        "method": method,
        "seed": seed,
        "world_size": W,
        "numel": numel,
        "steps": steps,
        "final_accuracy": curve[-1][2],
        "curve": curve,
        "step_time_ms_median": 1000 * statistics.median(times[START_ITER:]),
        # process CPU time per step (all threads: compute, gloo, codec), far less sensitive to load than wall
        "step_cpu_ms_median": 1000 * statistics.median(cpu_times[START_ITER:]),
        "train_seconds": clock,
        "model_bytes_per_step": model_bytes,
        "fp32_model_bytes_per_step": fp32_model,
    }
    if wire0 is not None:
        res["wire_tx_per_step"] = (wire1["tx_bytes"] - wire0["tx_bytes"]) / steady
        res["wire_rx_per_step"] = (wire1["rx_bytes"] - wire0["rx_bytes"]) / steady
    if state is not None and hasattr(state, "stats"):
        s = state.stats()
        res["hnlq"] = {k: s[k] for k in ("compression_ratio", "overload_rate", "clamp_rate")}
        res["native_buckets"] = int(getattr(state, "native_buckets", 0))
        ncs = getattr(state, "native_cpu_s", None)
        if ncs and res["native_buckets"]:  # codec CPU time of the hook thread, per compressed step
            res["codec_cpu_ms_per_step"] = {k: 1000 * v / (steps - START_ITER) for k, v in ncs.items()}
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return res, params


def worker_main(rank: int, W: int, master: str, cfg: dict, iface: str | None, outfile: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}:{cfg['port']}",
        rank=rank,
        world_size=W,
        timeout=datetime.timedelta(seconds=cfg["timeout"]),
    )
    counter = _ByteCounter(W)
    try:
        for seed in cfg["seeds"]:
            data = _load_digits(seed)
            for method in cfg["methods"]:
                res, params = _train(rank, W, method, seed, cfg, data, counter, iface)
                gathered = [torch.empty_like(params) for _ in range(W)]
                counter.paused = True
                dist.all_gather(gathered, params)
                counter.paused = False
                res["ranks_identical"] = all(torch.equal(g, gathered[0]) for g in gathered)
                res["max_param_diff_across_ranks"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
                res["rank"] = rank
                res["link"] = cfg["link"]
                with open(outfile, "a") as f:
                    f.write(json.dumps(res) + "\n")
                if rank == 0:
                    print(
                        f"[{cfg['link']} W={W} seed {seed}] {method:20s} acc={res['final_accuracy']:.4f} "
                        f"step={res['step_time_ms_median']:.1f} ms model={res['model_bytes_per_step']:.0f} B "
                        f"wire_tx={res.get('wire_tx_per_step', float('nan')):.0f} B",
                        flush=True,
                    )
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _ByteCounter:
    """Ring-model bytes at ``dist.all_reduce`` / ``dist.all_gather`` (as in bench_ddp.py)."""

    def __init__(self, W: int):
        import torch.distributed as dist

        self.W, self.bytes, self.paused = W, 0, False
        ar, ag = dist.all_reduce, dist.all_gather

        def all_reduce(t, *a, **k):
            if not self.paused:
                self.bytes += math.ceil(2 * (self.W - 1) * t.numel() * t.element_size() / self.W)
            return ar(t, *a, **k)

        def all_gather(tl, t, *a, **k):
            if not self.paused:
                self.bytes += (self.W - 1) * t.numel() * t.element_size()
            return ag(tl, t, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


# ---------------------------------------------------------------------------------------------- parent side
def run_group(link: str, W: int, cfg: dict, outfile: Path, delay_ms: float, timeout: float) -> None:
    """Start W ranks on ``link`` ("loopback" or a tc rate), wait for them; results go to ``outfile``."""
    cfg = dict(cfg, link=link if not delay_ms else f"{link}+{delay_ms:g}ms")
    cfgfile = outfile.with_suffix(f".cfg-{os.getpid()}.json")
    cfgfile.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", COSET_NUM_THREADS=str(cfg["codec_threads"]))

    def argv(rank, master, iface):
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(rank),
            str(W),
            master,
            str(cfgfile),
            iface or "",
            str(outfile),
        ]

    try:
        if link == "loopback":
            procs = [subprocess.Popen(argv(r, "127.0.0.1", None), env=env, start_new_session=True) for r in range(W)]
            try:
                _wait(procs, timeout)
            finally:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, 9)
                        p.wait()
        else:
            with ShapedNetwork(W, LinkSpec(link, delay_ms)) as net:
                procs = [net.popen(r, argv(r, net.addr(0), "eth0"), env=env) for r in range(W)]
                _wait(procs, timeout)
    finally:
        cfgfile.unlink(missing_ok=True)


def _wait(procs, timeout):
    t0 = time.time()
    while any(p.poll() is None for p in procs):
        if time.time() - t0 > timeout:
            raise TimeoutError(f"ranks still running after {timeout:.0f} s")
        if any(p.returncode not in (None, 0) for p in procs):
            raise RuntimeError(f"a rank failed: return codes {[p.returncode for p in procs]}")
        time.sleep(0.5)
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed: return codes {[p.returncode for p in procs]}")


# ---------------------------------------------------------------------------------------------- report
def _time_to(curve, target):
    for _step, t, acc in curve:
        if acc >= target:
            return t
    return None


def summarize(rows: list[dict], target: float) -> list[dict]:
    """One row per (link, world size, method): medians / means over seeds of rank 0 (bytes: mean over ranks)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["link"], r["world_size"], r["method"]), []).append(r)
    out = []
    for (link, W, m), rs in groups.items():
        r0 = [r for r in rs if r["rank"] == 0]
        if not r0:
            continue
        accs = [100 * r["final_accuracy"] for r in r0]
        ttt = [_time_to(r["curve"], target) for r in r0]
        reached = [t for t in ttt if t is not None]
        tx = [r["wire_tx_per_step"] for r in rs if "wire_tx_per_step" in r]
        rx = [r["wire_rx_per_step"] for r in rs if "wire_rx_per_step" in r]
        out.append(
            {
                "link": link,
                "world_size": W,
                "method": m,
                "seeds": sorted(r["seed"] for r in r0),
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accs": accs,
                "step_ms": statistics.median(r["step_time_ms_median"] for r in r0),
                "cpu_ms": (
                    statistics.median(r["step_cpu_ms_median"] for r in r0)
                    if all("step_cpu_ms_median" in r for r in r0)
                    else None
                ),
                "codec_ms": (
                    statistics.median(sum(r["codec_cpu_ms_per_step"].values()) for r in r0)
                    if all("codec_cpu_ms_per_step" in r for r in r0)
                    else None
                ),
                "ttt_s": statistics.median(reached) if len(reached) == len(ttt) else None,
                "ttt_reached": f"{len(reached)}/{len(ttt)}",
                "wire_tx": statistics.mean(tx) if tx else None,
                "wire_rx": statistics.mean(rx) if rx else None,
                "model_bytes": statistics.mean(r["model_bytes_per_step"] for r in rs),
                "fp32_model": r0[0]["fp32_model_bytes_per_step"],
                "identical": all(r["ranks_identical"] for r in rs),
                "max_diff": max(r["max_param_diff_across_ranks"] for r in rs),
                "native_buckets": max(r.get("native_buckets", 0) for r in rs),
                "numel": r0[0]["numel"],
                "steps": r0[0]["steps"],
            }
        )
    return out


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def to_markdown(rows: list[dict], meta: dict) -> str:
    target = meta["target_accuracy"]
    summ = summarize(rows, target)
    L = [
        "# DDP on a shaped link: time to accuracy and bytes on the wire",
        "",
        f"Model: MLP 64-{meta['hidden']}-{meta['hidden']}-10 ({summ[0]['numel'] if summ else '?'} parameters) on "
        f"sklearn digits, Adam lr {meta['lr']}, global batch {meta['batch']}, steps per table heading "
        f"({START_ITER} plain warm-up steps for PowerSGD and HNLQ), seeds per row. gloo over TCP, one rank "
        "per network namespace; links are veth pairs (2 ranks) or a bridge (4 ranks) shaped with tc tbf "
        "on every host's egress and every switch port; `loopback` = 127.0.0.1, no namespaces, unshaped.",
        f"Machine: {meta['machine']}, torch {meta['torch']}. **Load:** {meta['load']}",
        "",
        "* step = median wall time of forward + backward (incl. hook and communication) + optimizer, rank 0, "
        "median over seeds; step CPU = the same step's process CPU time (all threads: compute, gloo, codec); "
        "codec CPU = CPU time of the native encode + decode calls per compressed step (hook thread, 1 codec "
        "thread).",
        f"* time to {100 * target:.0f}% = cumulative training wall-clock (evaluation excluded) until the test accuracy "
        "first reaches the target (evaluated every "
        f"{meta['eval_every']} steps); median over seeds, `—` if a seed never reached it.",
        "* wire tx/rx = bytes per step per rank from the kernel counters of the rank's interface after warm-up "
        "(includes Ethernet/IP/TCP headers and ACKs); model = ring-model count at the collective calls.",
        "",
    ]
    for link in dict.fromkeys(s["link"] for s in summ):
        for W in sorted({s["world_size"] for s in summ if s["link"] == link}):
            ss = [s for s in summ if s["link"] == link and s["world_size"] == W]
            base = next((s for s in ss if s["method"] == "fp32"), None)
            L += [
                f"## {link}, {W} ranks ({ss[0]['steps']} steps, seeds {sorted({x for q in ss for x in q['seeds']})})",
                "",
                f"| method | step (ms) | step CPU (ms) | codec CPU (ms) | time to {100 * target:.0f}% (s) | vs fp32 | "
                "final acc (%) | Δ acc vs fp32 | wire tx / step | wire rx / step | model / step | fp32 / wire tx | "
                "ranks identical |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for s in ss:
                rel = (s["ttt_s"] / base["ttt_s"]) if (base and base["ttt_s"] and s["ttt_s"]) else None
                dacc = s["acc_mean"] - base["acc_mean"] if base else None
                ratio = (base["wire_tx"] / s["wire_tx"]) if (base and base["wire_tx"] and s["wire_tx"]) else None
                L.append(
                    f"| {s['method']} | {s['step_ms']:.1f} | {_fmt(s['cpu_ms'], '.1f')} | {_fmt(s['codec_ms'], '.1f')} | "
                    f"{_fmt(s['ttt_s'], '.1f')} ({s['ttt_reached']}) | "
                    f"{_fmt(rel, '.2f')}x | {s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {_fmt(dacc, '+.2f')} | "
                    f"{_fmt(s['wire_tx'], ',.0f')} | {_fmt(s['wire_rx'], ',.0f')} | {s['model_bytes']:,.0f} | "
                    f"{_fmt(ratio, '.2f')}x | {'yes' if s['identical'] else 'NO'} ({s['max_diff']:.0e}) |"
                )
            L.append("")
    L += _targets(summ)
    return "\n".join(L)


def _targets(summ: list[dict]) -> list[str]:
    """The issue's targets, checked against the summary rows that exist (missing links are said so)."""
    by = {(s["link"], s["world_size"], s["method"]): s for s in summ}
    hnlq = [m for m in ("hnlq-allgather", "hnlq-modular-q4", "hnlq-modular-q8")]
    out = ["## Targets", ""]

    def line(ok, text):
        out.append(f"* {'MET' if ok else 'MISSED'}: {text}")

    f32, f16 = by.get(("100mbit", 2, "fp32")), by.get(("100mbit", 2, "fp16"))
    if f32 and f32["ttt_s"]:
        for m in hnlq:
            s = by.get(("100mbit", 2, m))
            if not s:
                continue
            rel = s["ttt_s"] / f32["ttt_s"] if s["ttt_s"] else None
            below16 = bool(s["ttt_s"] and f16 and f16["ttt_s"] and s["ttt_s"] < f16["ttt_s"])
            dacc = s["acc_mean"] - f32["acc_mean"]
            line(
                rel is not None and rel <= 0.4 and below16 and abs(dacc) <= 1.0,
                f"100 Mbit/s {m}: time to target {_fmt(rel, '.2f')}x fp32 (<= 0.4x), "
                f"{'below' if below16 else 'NOT below'} fp16, final accuracy {dacc:+.2f} points vs fp32 (within 1)",
            )
    else:
        out.append("* 100 Mbit/s: no fp32 time-to-target yet")
    g16 = by.get(("1gbit", 2, "fp16"))
    if g16:
        for m in hnlq:
            s = by.get(("1gbit", 2, m))
            if s:
                faster = s["step_ms"] < g16["step_ms"]
                t_ok = bool(s["ttt_s"] and g16["ttt_s"] and s["ttt_s"] < g16["ttt_s"])
                line(
                    faster and t_ok,
                    f"1 Gbit/s {m}: step {s['step_ms']:.0f} ms vs fp16 {g16['step_ms']:.0f} ms; "
                    f"time to target {_fmt(s['ttt_s'], '.1f')} s vs fp16 {_fmt(g16['ttt_s'], '.1f')} s",
                )
    lb = by.get(("loopback", 2, "fp32"))
    if lb:
        for m in hnlq:
            s = by.get(("loopback", 2, m))
            if s:
                r = s["step_ms"] / lb["step_ms"]
                rc = s["cpu_ms"] / lb["cpu_ms"] if s["cpu_ms"] and lb["cpu_ms"] else None
                line(
                    r <= 1.2,
                    f"loopback {m} (native codec, {s['native_buckets']} native buckets): step "
                    f"{s['step_ms']:.0f} ms = {r:.2f}x fp32 all-reduce ({lb['step_ms']:.0f} ms; target <= 1.2x); "
                    f"step CPU {_fmt(rc, '.2f')}x, codec CPU {_fmt(s['codec_ms'], '.0f')} ms per step",
                )
    for link in dict.fromkeys(s["link"] for s in summ):
        Ws = sorted({s["world_size"] for s in summ if s["link"] == link})
        if len(Ws) < 2:
            continue
        out += [
            "",
            f"### Bytes per rank vs world size ({link}, wire tx per rank per step)",
            "",
            "| method | " + " | ".join(f"W={w}" for w in Ws) + f" | W={Ws[-1]} / W={Ws[0]} | "
            "ring-model factor 2(W-1)/W | fp32 / method at the largest W |",
            "|---|" + "---|" * (len(Ws) + 3),
        ]
        for m in dict.fromkeys(s["method"] for s in summ if s["link"] == link):
            vals = [by.get((link, w, m)) for w in Ws]
            if any(v is None or v["wire_tx"] is None for v in vals):
                continue
            fp = by.get((link, Ws[-1], "fp32"))
            ring = (2 * (Ws[-1] - 1) / Ws[-1]) / (2 * (Ws[0] - 1) / Ws[0])
            out.append(
                f"| {m} | "
                + " | ".join(f"{v['wire_tx']:,.0f}" for v in vals)
                + f" | {vals[-1]['wire_tx'] / vals[0]['wire_tx']:.2f}x | {ring:.2f}x | "
                f"{_fmt(fp['wire_tx'] / vals[-1]['wire_tx'] if fp and fp['wire_tx'] else None, '.2f')}x |"
            )
    out.append("")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["link"], r["world_size"]) for r in rows if r["rank"] == 0))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (link, W) in zip(axes[0], panels, strict=False):
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["rank"] == 0 and r["link"] == link and r["world_size"] == W and r["method"] == m]
            if not rs:
                continue
            r = min(rs, key=lambda r: r["seed"])  # one seed per method (seed 0), to keep the plot legible
            ax.plot([c[1] for c in r["curve"]], [100 * c[2] for c in r["curve"]], label=m, marker=".", ms=3)
        ax.set_title(f"{link}, {W} ranks (seed 0)")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xscale("log")
        ax.set_ylim(80, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(out: Path, name: str, meta: dict, inputs: list[Path] | None = None) -> None:
    rows = []
    for jl in inputs or [out / f"{name}.jsonl"]:
        if jl.exists():
            rows += [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
    (out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "summary": summarize(rows, meta["target_accuracy"]), "runs": rows}, indent=1)
    )
    (out / f"{name}.md").write_text(to_markdown(rows, meta))
    try:
        plot(rows, out / f"{name}.png")
    except ImportError:
        pass


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, W, master, cfgfile, iface, outfile = sys.argv[2:8]
        worker_main(int(rank), int(W), master, json.loads(Path(cfgfile).read_text()), iface or None, outfile)
        # no interpreter finalization: gloo threads releasing tensors then can abort a finished rank
        # (pytorch/pytorch#190489); the results are already on disk
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--links", default="loopback,1gbit,100mbit", help="comma list: loopback, or tc rates (1gbit, 100mbit)"
    )
    ap.add_argument("--world-sizes", default="2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=2208)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.95, help="target test accuracy for time-to-target")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way netem delay on every shaped egress")
    ap.add_argument("--bucket-cap-mb", type=float, default=32.0, help="DDP bucket size (32: one bucket)")
    ap.add_argument("--codec-threads", type=int, default=1, help="threads of the native bucket codec per rank")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--load", default="", help="free text describing the machine load, copied into the report")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="ddp_link")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--inputs", default="", help="with --report-only: comma list of .jsonl files to merge")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS + EXTRA]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS + EXTRA}")
    links = [x for x in a.links.split(",") if x]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "hidden": a.hidden,
        "lr": a.lr,
        "batch": a.batch,
        "steps": a.steps,
        "seeds": a.seeds,
        "eval_every": a.eval_every,
        "target_accuracy": a.target,
        "delay_ms": a.delay_ms,
        "load": a.load or f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)",
        "codec_threads": a.codec_threads,
        "bucket_cap_mb": a.bucket_cap_mb,
    }
    meta_file = out / f"{a.name}.meta.json"
    if a.report_only:
        if a.load:
            meta["load"] = a.load
        inputs = [Path(p) for p in a.inputs.split(",") if p] or None
        write_report(
            out, a.name, json.loads(meta_file.read_text()) if meta_file.exists() and not inputs else meta, inputs
        )
        print((out / f"{a.name}.md").read_text())
        return 0
    if any(x != "loopback" for x in links) and netns_unavailable_reason():
        print(f"shaped links skipped: {netns_unavailable_reason()}", file=sys.stderr)
        links = [x for x in links if x == "loopback"]
    meta_file.write_text(json.dumps(meta))
    cfg = {
        "methods": methods,
        "seeds": [int(s) for s in a.seeds.split(",") if s],
        "steps": a.steps,
        "hidden": a.hidden,
        "batch": a.batch,
        "lr": a.lr,
        "eval_every": a.eval_every,
        "port": PORT,
        "timeout": 600,
        "codec_threads": a.codec_threads,
        "bucket_cap_mb": a.bucket_cap_mb,
    }
    for link in links:
        for W in (int(w) for w in a.world_sizes.split(",") if w):
            t0 = time.time()
            try:
                run_group(link, W, cfg, out / f"{a.name}.jsonl", a.delay_ms, a.timeout)
            finally:
                write_report(out, a.name, meta)
            print(f"== {link} W={W}: {time.time() - t0:.0f} s", flush=True)
    print((out / f"{a.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
