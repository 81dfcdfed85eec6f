"""CPU time (time.process_time) of the native bucket codec on 5M float32 values, per stage.

    uv run python benchmarks/bench_bucket_codec.py            # 1 codec thread (T=2: two threads)

Prints ms of CPU time per call (best of 5) and, for reference, the same machine's cost of one float32 pass
(x + r). The codec is reached as coset.dist does: through coset.quant's backend registry.
"""

import os
import time

import torch

from coset.dist import default_config
from coset.dist.codec import choose_sum_packing, modular_scales, payload_layout
from coset.dist.fast_codec import native_codec

torch.set_num_threads(1)
threads = int(os.environ.get("T", "1"))
os.environ["COSET_NUM_THREADS"] = str(threads)
n = 5_000_000
g = torch.Generator().manual_seed(0)
x = (torch.randn(n, generator=g) * 1e-3).float()
cfg = default_config(4, 2)
bc = native_codec(cfg)
if bc is None:
    raise SystemExit("no registered backend serves the bucket codec (install coset-cuda)")
from coset.cuda import set_num_threads  # noqa: E402  (benchmark only: the thread count of the kernels)

set_num_threads(threads)
lay = payload_layout(n, cfg)
p = torch.empty(lay.nbytes, dtype=torch.uint8)
r = torch.zeros(n)


def tm(f, k=5):
    ts = []
    for _ in range(k):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return min(ts) * 1e3


print(f"threads={threads} n={n} load={os.getloadavg()}")
print(f"reference: one float32 pass x + r: {tm(lambda: x + r):.1f} ms")
print(f"allgather q=4 encode + pack: {tm(lambda: bc.allgather_encode(x, cfg, p, resid=r)):.1f} ms")
P = torch.stack([p, p])
out = torch.empty(n)
print(
    f"allgather q=4 unpack + decode + average, W=2: {tm(lambda: bc.allgather_decode(P, n, cfg, out, own=0, resid=r)):.1f} ms"
)
for q, chunk in ((4, 64), (8, 256)):
    cfg = default_config(q, 2)
    bpc = chunk // 4
    print(f"modular q={q} norms: {tm(lambda: bc.modular_norms(x, 4, bpc, resid=r)):.1f} ms")
    nr, _ = bc.modular_norms(x, 4, bpc)
    sc = modular_scales(nr * 2, cfg.lattice, q, 2, 2, False)
    pk = choose_sum_packing(q * q, 2)
    print(
        f"modular q={q} encode + pack ({pk.kind}): {tm(lambda: bc.modular_encode(x, sc, cfg, bpc, pk, resid=r)):.1f} ms"
    )
    pkd = bc.modular_encode(x, sc, cfg, bpc, pk)
    print(f"modular q={q} unpack + decode: {tm(lambda: bc.modular_decode(pkd, n, sc, cfg, bpc, pk, 2, out)):.1f} ms")
