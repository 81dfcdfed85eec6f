"""CPU time (time.process_time, 1 thread) of the native bucket codec on 5M float32 values: uv run python benchmarks/bench_bucket_codec.py"""

import os
import time

import torch

from coset.cuda import bucket_codec as bc
from coset.cuda import set_num_threads
from coset.dist import default_config, payload_layout
from coset.dist.codec import choose_sum_packing, modular_scales

torch.set_num_threads(1)
set_num_threads(int(os.environ.get("T", "1")))
n = 5_000_000
x = (torch.randn(n) * 1e-3).float()
cfg = default_config(4, 2)
lay = payload_layout(n, cfg)
p = torch.empty(lay.nbytes, dtype=torch.uint8)
r = torch.zeros(n)


def tm(f, k=3):
    ts = []
    for _ in range(k):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return min(ts) * 1e3


print("encode allgather ms", tm(lambda: bc.encode_allgather(x, cfg, p, resid=r)))
P = torch.stack([p, p])
out = torch.empty(n)
print("decode allgather W=2 ms", tm(lambda: bc.decode_allgather(P, n, cfg, out, own=0, resid=r)))
print("memcpy-ish x+r ms", tm(lambda: x + r))
for q, chunk in ((4, 64), (8, 256)):
    cfg = default_config(q, 2)
    bpc = chunk // 4
    print(q, "norms ms", tm(lambda: bc.modular_norms(x, 4, bpc, resid=r)))
    nr, _ = bc.modular_norms(x, 4, bpc)
    sc = modular_scales(nr * 2, cfg.lattice, q, 2, 2, False)
    pk = choose_sum_packing(q * q, 2)
    print(q, "mod encode ms", tm(lambda: bc.modular_encode(x, sc, cfg, bpc, pk, resid=r)))
    pkd = bc.modular_encode(x, sc, cfg, bpc, pk)
    print(q, "mod decode ms", tm(lambda: bc.modular_decode(pkd, n, sc, cfg, bpc, pk, 2, out)))
