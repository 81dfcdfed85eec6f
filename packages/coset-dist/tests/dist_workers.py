"""Multi-process scenarios for the coset.dist gloo tests (run as a script by tests/test_dist_gloo.py).

``python dist_workers.py <scenario> <outdir> [world_size]`` spawns ``world_size`` gloo ranks (file:// init,
60 s collective timeout); every rank writes ``outdir/rank<r>.pt`` with its measurements. The parent test
runs this in a subprocess with a timeout, so a hang becomes a failure.
"""

import datetime
import os
import pickle
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from coset.dist import HNLQHookState, default_config, register
from coset.dist.codec import choose_sum_packing, modular_decode, modular_encode, pack_sum_fields, unpack_sum_fields


class Vec(nn.Module):
    """loss = sum(p * x): the gradient of p is exactly x, so each rank's gradient is chosen by the test."""

    def __init__(self, n, dtype=torch.float32):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n, dtype=dtype))

    def forward(self, x):
        return (self.p * x).sum()


class Multi(nn.Module):
    """Several parameters (several buckets with a small bucket_cap_mb); gradients are the inputs again."""

    def __init__(self, sizes):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])

    def forward(self, xs):
        return sum((p * x).sum() for p, x in zip(self.ps, xs, strict=True))


def grad_of(rank, n, seed=0, scale=1e-3):
    """Heavy-tailed (Student-t, 3 dof) rank-dependent gradient, as real gradients are."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    chi = torch.randn(n, 3, generator=g, dtype=torch.float64).pow(2).sum(-1) / 3
    return (scale * t / chi.sqrt()).to(torch.float32)


def one_step(model_fn, state_kwargs, xs_rank, dtype=torch.float32, bucket_cap_mb=25.0, steps=1):
    model = model_fn().to(dtype)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = register(ddp, **state_kwargs)
    outs = []
    for k in range(steps):
        ddp.zero_grad(set_to_none=True)
        x = xs_rank(k)
        ddp(x).backward()
        outs.append([p.grad.detach().clone() for p in ddp.module.parameters()])
    return state, outs


def modular_expectation(state, cfg, xs, n, W, chunk):
    """The same codes through the public pieces: every rank can compute every rank's lattice points."""
    lat, modulus = cfg.lattice, cfg.q**cfg.M
    s = state.bucket_scales[0]
    bpc = chunk // lat.dim
    lams, codes = [], []
    for r in range(W):
        c, lam = modular_encode(xs[r], s, lat, modulus, bpc)
        lams.append(lam)
        codes.append(c)
    pk = choose_sum_packing(modulus, W)
    summed = sum(pack_sum_fields(c, pk) for c in codes)
    out = {"bpc": bpc, "packing": pk.kind}
    out["decoded_sum"] = modular_decode(unpack_sum_fields(summed, codes[0].numel(), pk), lat, modulus)
    out["sum_of_points"] = torch.stack(lams).sum(0)
    s_blocks = s.repeat_interleave(bpc)[: lams[0].shape[0]].unsqueeze(-1)
    out["expected_out"] = ((out["sum_of_points"] * s_blocks).reshape(-1)[:n] / W).to(torch.float32)
    return out


# ---------------------------------------------------------------------------------------- scenarios
def scenario_modular_w(rank, W):
    """Modular exactness at any world size (guard bits grow with W)."""
    res = {}
    for cname, cfg in (("q4M2", default_config(4, 2)), ("q16M2", default_config(16, 2))):
        n = 1003
        xs = [grad_of(r, n, seed=W) for r in range(W)]
        kw = dict(config=cfg, mode="modular", error_feedback=False, start_iter=0, chunk_size=256)
        state, outs = one_step(lambda: Vec(n), kw, lambda k: xs[rank])  # noqa: B023 (called at once)
        entry = {"out": outs[0][0], "xs": xs, "stats": state.stats(), "scales": state.bucket_scales.get(0)}
        entry.update(modular_expectation(state, cfg, xs, n, W, 256))
        res[cname] = entry
    return res


def scenario_modes(rank, W):
    res = {}
    cfgs = {
        "q4M2": default_config(4, 2),
        "q16M2": default_config(16, 2),
        "q2M4": default_config(2, 4),
        "E8q4M2": default_config(4, 2, "E8"),
    }
    for mode in ("allgather", "modular", "decode"):
        for cname, cfg in cfgs.items():
            if mode != "modular" and cname not in ("q4M2", "E8q4M2"):
                continue
            for n in (1003, 4096):
                xs = [grad_of(r, n, seed=n) for r in range(W)]
                kw = dict(config=cfg, mode=mode, error_feedback=False, start_iter=0, chunk_size=256)
                state, outs = one_step(lambda: Vec(n), kw, lambda k: xs[rank])  # noqa: B023 (called at once)
                out = outs[0][0]
                entry = {"out": out, "xs": xs, "stats": state.stats(), "scales": state.bucket_scales.get(0)}
                if mode == "modular":
                    entry.update(modular_expectation(state, cfg, xs, n, W, 256))
                res[(mode, cname, n)] = entry
    # zero and all-equal gradients
    for mode in ("allgather", "modular", "decode"):
        kw = dict(mode=mode, error_feedback=False, start_iter=0)
        state, outs = one_step(lambda: Vec(37), kw, lambda k: torch.zeros(37))  # noqa: B023 (called at once)
        res[("zero", mode)] = outs[0][0]
    # half precision buckets
    for mode in ("allgather", "modular"):
        for dt in (torch.float16, torch.bfloat16):
            xs = [grad_of(r, 515, seed=7) for r in range(W)]
            kw = dict(mode=mode, error_feedback=False, start_iter=0)
            state, outs = one_step(lambda: Vec(515), kw, lambda k: xs[rank].to(dt), dtype=dt)  # noqa: B023 (called at once)
            res[("half", mode, str(dt))] = {
                "out": outs[0][0],
                "xs": xs,
                "scales": state.bucket_scales[0],
                "bpc": state.chunk_size // 4,
            }
    # several buckets, warm-up, error feedback over steps, iteration count, checkpoint
    sizes = [3001, 777, 4096, 5]
    for mode in ("allgather", "modular"):
        steps = 12
        xs = [[grad_of(r, s, seed=i) for i, s in enumerate(sizes)] for r in range(W)]
        kw = dict(mode=mode, error_feedback=True, start_iter=2)
        state, outs = one_step(lambda: Multi(sizes), kw, lambda k: xs[rank], bucket_cap_mb=0.01, steps=steps)  # noqa: B023 (called at once)
        blob = pickle.dumps(state)
        restored = pickle.loads(blob)
        res[("multi", mode)] = {
            "outs": outs,
            "xs": xs,
            "iter": state.iter,
            "stats": state.stats(),
            "n_buckets": len(state.residuals),
            "restored_equal": restored.iter == state.iter
            and restored.process_group is None
            and set(restored.residuals) == set(state.residuals)
            and all(torch.equal(restored.residuals[k], state.residuals[k]) for k in state.residuals),
        }
    # dither: modular and allgather still agree across ranks and stay close
    for mode in ("allgather", "modular"):
        cfg = default_config().replace(with_dither=True)
        xs = [grad_of(r, 999, seed=3) for r in range(W)]
        kw = dict(config=cfg, mode=mode, error_feedback=False, start_iter=0, seed=5)
        state, outs = one_step(lambda: Vec(999), kw, lambda k: xs[rank])  # noqa: B023 (called at once)
        res[("dither", mode)] = {
            "out": outs[0][0],
            "xs": xs,
            "scales": state.bucket_scales[0],
            "bpc": state.chunk_size // 4,
        }
    # construction-time rejection once the group exists (q^M too small for W ranks)
    try:
        HNLQHookState(config=default_config(2, 1), mode="modular", error_feedback=False, start_iter=0)
        res["small_modulus_error"] = None
    except ValueError as e:
        res["small_modulus_error"] = str(e)
    return res


def scenario_errors(rank, W):
    """A non-finite gradient on rank 1 only: every rank must raise (or fall back), none may hang."""
    res = {}
    for mode in ("allgather", "modular", "decode"):
        for policy in ("raise", "allreduce"):
            x = torch.ones(64)
            if rank == 1:
                x[5] = float("nan")
            model = Vec(64)
            ddp = DDP(model)
            register(ddp, mode=mode, error_feedback=False, start_iter=0, nonfinite=policy)
            try:
                ddp(x).backward()
                res[(mode, policy)] = ("ok", bool(torch.isnan(model.p.grad).any()))
            except Exception as e:  # noqa: BLE001 - we record what surfaced
                res[(mode, policy)] = ("raised", f"{type(e).__name__}: {e}")
            dist.barrier()
    return res


def scenario_all(rank, W):
    """Everything in one spawn (each spawned rank pays several seconds of imports): raising cases last."""
    return {"modes": scenario_modes(rank, W), "errors": scenario_errors(rank, W)}


SCENARIOS = {
    "modes": scenario_modes,
    "errors": scenario_errors,
    "all": scenario_all,
    "modular_w": scenario_modular_w,
}


def _worker(rank, scenario, outdir, W, initfile):
    dist.init_process_group(
        "gloo", init_method=f"file://{initfile}", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        res = SCENARIOS[scenario](rank, W)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    except Exception:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # skip interpreter finalization (mp.spawn's child would run it): gloo threads releasing tensors then can
    # abort a rank whose results are already saved (pytorch/pytorch#190489)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv):
    scenario, outdir = argv[1], argv[2]
    W = int(argv[3]) if len(argv) > 3 else 2
    torch.set_num_threads(1)
    initfile = os.path.join(outdir, "init")
    mp.spawn(_worker, args=(scenario, outdir, W, initfile), nprocs=W, join=True)


if __name__ == "__main__":
    main(sys.argv)
