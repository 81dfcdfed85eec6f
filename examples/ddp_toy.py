"""Toy 2-process DDP run with the HNLQ comm hook (CPU, gloo): least squares, every mode, printed stats.

uv run python examples/ddp_toy.py [--mode modular|allgather|decode] [--steps 200]
"""

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import coset.dist as cdist


def worker(rank, world_size, initfile, mode, steps):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{initfile}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.manual_seed(0)
    w_true = torch.randn(203)  # 203 is not a multiple of the block length 4: padding is tracked and stripped
    model = torch.nn.Linear(203, 1, bias=True)
    ddp = DDP(model)
    state = cdist.register(ddp, mode=mode, start_iter=5, error_feedback=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for _ in range(steps):
        x = torch.randn(64, 203, generator=g)
        y = x @ w_true + 0.01 * torch.randn(64, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = float((model.weight.detach().squeeze() - w_true).norm() / w_true.norm())
    if rank == 0:
        s = state.stats()
        print(f"mode={mode}: final loss {loss.item():.4f}, relative weight error {err:.4f}")
        print(
            f"  bytes sent {s['bytes_sent']} vs fp32 all-reduce {s['bytes_fp32_baseline']} "
            f"-> {s['compression_ratio']:.2f}x fewer; overload rate {s['overload_rate']:.3f}"
        )
        torch.save({"comm_hook_state": state}, os.path.join(os.path.dirname(initfile), "hook_state.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="modular", choices=cdist.MODES)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), a.mode, a.steps), nprocs=2, join=True)
        # the checkpointed state reloads without a process group (re-register it on the new DDP model)
        st = torch.load(os.path.join(tmp, "hook_state.pt"), weights_only=False)["comm_hook_state"]
        print("reloaded:", st)
