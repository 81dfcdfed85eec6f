"""The native bucket codec (coset-cuda) against the Python codec of coset.dist: bit for bit.

Skipped when coset-cuda is not installed (coset-dist does not depend on it; the hook then takes the Python
path, which the other tests cover).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from coset.dist import HNLQHookState, default_config, hnlq_hook
from coset.dist.codec import (
    choose_sum_packing,
    chunk_block_norms,
    modular_decode,
    modular_encode,
    modular_scales,
    pack_sum_fields,
    unpack_sum_fields,
)
from coset.dist.fast_codec import native_available

bc = pytest.importorskip("coset.cuda.bucket_codec", reason="coset-cuda (native kernels) is not installed")

CONFIGS = {
    "D4q4M2": default_config(4, 2),
    "D4q8M2": default_config(8, 2),
    "D4q16M2": default_config(16, 2),
    "E8q4M2": default_config(4, 2, "E8"),
    "D4q3M3": default_config(3, 3),
    # a short ramp, so that the largest blocks are clamped past it
    "D4q4M2cap1": default_config(4, 2).replace(max_scaling_iterations=1),
}


def grad(n, seed, scale=1e-3):
    """Heavy-tailed (Student-t, 3 dof) values with a few huge outliers, as gradients have."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    chi = torch.randn(n, 3, generator=g, dtype=torch.float64).pow(2).sum(-1) / 3
    x = scale * t / chi.sqrt()
    x[:: max(1, n // 7)] *= 300.0
    return x.to(torch.float32)


def test_native_available():
    assert native_available()


@pytest.mark.parametrize("q,chunk,W", [(4, 64, 2), (8, 256, 2), (16, 256, 2), (4, 64, 3), (16, 128, 5)])
def test_modular_bit_exact(q, chunk, W):
    cfg = default_config(q, 2)
    lat, d, m, n = cfg.lattice, cfg.dim, q**2, 10_001
    bpc = chunk // d
    nb = -(-n // d)
    xs = [grad(n, 20 + r) for r in range(W)]
    norms = [bc.modular_norms(x, d, bpc)[0] for x in xs]
    for x, nr in zip(xs, norms, strict=False):
        assert torch.allclose(nr, chunk_block_norms(x, d, bpc), rtol=1e-15, atol=0)
    scales = modular_scales(sum(norms), lat, q, 2, W, False)
    pk = choose_sum_packing(m, W, "auto")
    s_blocks = scales.repeat_interleave(bpc)[:nb].unsqueeze(-1)
    packed, lams = [], []
    for x in xs:
        codes, lam = modular_encode(x, scales, lat, m, bpc, None, True)
        resid = x.clone()
        nat = bc.modular_encode(x, scales, cfg, bpc, pk, resid=resid)
        assert torch.equal(nat, pack_sum_fields(codes, pk))
        assert torch.equal(resid, x - (lam * s_blocks).reshape(-1)[:n].to(torch.float32))
        packed.append(nat)
        lams.append(lam)
    summed = sum(p.to(torch.int64) for p in packed)
    if pk.kind == "uint8":
        summed = (summed % 256).to(torch.uint8)  # what gloo's uint8 SUM does
    lam_sum = modular_decode(unpack_sum_fields(summed, nb * d, pk), lat, m, True)
    assert torch.equal(lam_sum, sum(lams))  # the sum of codes decodes to the sum of points
    out = torch.empty(n)
    bc.modular_decode(summed, n, scales, cfg, bpc, pk, W, out)
    assert torch.equal(out, ((lam_sum * s_blocks).reshape(-1)[:n] / W).to(torch.float32))


class _Bucket:
    def __init__(self, buf, idx=0):
        self._b, self._i = buf, idx

    def buffer(self):
        return self._b

    def index(self):
        return self._i

    def is_last(self):
        return True


@pytest.fixture(scope="module")
def one_rank_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("mode,kw", [("modular", {"chunk_size": 64}), ("modular", {"chunk_size": 256})])
def test_hook_native_equals_python(one_rank_group, mode, kw):
    """The hook's two paths give identical buckets, residuals and byte counts, step after step."""
    states = {}
    for native in (True, False):
        st = HNLQHookState(config=default_config(4, 2), mode=mode, start_iter=2, **kw)
        st.native = native
        outs = []
        for step in range(5):
            buf = grad(3001, 100 + step)
            outs.append(hnlq_hook(st, _Bucket(buf)).wait().clone())
        states[native] = (st, outs)
    (sn, on), (sp, op) = states[True], states[False]
    assert sn.native_buckets == 3 and getattr(sp, "native_buckets", 0) == 0
    for a, b in zip(on, op, strict=False):
        assert torch.equal(a, b)
    assert torch.equal(sn.residuals[0], sp.residuals[0])
    assert sn.stats()["bytes_sent"] == sp.stats()["bytes_sent"]
    assert sn.stats()["blocks_overloaded"] == sp.stats()["blocks_overloaded"]
