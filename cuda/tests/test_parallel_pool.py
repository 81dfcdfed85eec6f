"""The persistent worker pool behind every multi-threaded native kernel (parallel.h / kernels_cpu.cpp).

Results do not depend on the thread count or on which thread runs a chunk; the pool survives fork (a child
process gets a new pool: the parent's workers do not exist there) and concurrent callers (the second runs its
chunks serially on its own thread while the first holds the pool). With torch loaded the chunks run on its GNU
OpenMP team (``parallel_backend() == "openmp"``); ``COSET_OPENMP=0`` keeps the own pool, with the same results.
"""

import multiprocessing as mp
import threading

import pytest
import torch

from coset.cuda import _ops
from coset.quant import QuantizationConfig, quantize_rows

CFG = QuantizationConfig(lattice_type="E8", q=4, M=2)


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(512, 1024, generator=g) * 0.05


def _in_child(q) -> None:
    _ops.set_num_threads(2)
    x = _x()
    q.put(quantize_rows(x, None, CFG, backend="native").sum().item())


def test_results_do_not_depend_on_threads_and_repeat():
    x = _x()
    n0 = _ops.get_num_threads()
    try:
        _ops.set_num_threads(1)
        want = quantize_rows(x, None, CFG, backend="native", return_info=True)
        for th in (2, 3, 2, 4):
            _ops.set_num_threads(th)
            for _ in range(3):  # the same workers again, and more of them
                got = quantize_rows(x, None, CFG, backend="native", return_info=True)
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    finally:
        _ops.set_num_threads(n0)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork start method on this platform")
def test_forked_child_gets_a_working_pool():
    n0 = _ops.get_num_threads()
    try:
        _ops.set_num_threads(2)
        want = quantize_rows(_x(), None, CFG, backend="native").sum().item()  # the parent's pool is running
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_in_child, args=(q,))
        p.start()
        got = q.get(timeout=60)  # a child waiting on the parent's (absent) workers would hang here
        p.join(timeout=60)
        assert p.exitcode == 0 and got == want
    finally:
        _ops.set_num_threads(n0)


def test_concurrent_callers_get_correct_results():
    n0 = _ops.get_num_threads()
    xs = [_x(s) for s in range(4)]
    try:
        _ops.set_num_threads(1)
        want = [quantize_rows(x, None, CFG, backend="native") for x in xs]
        _ops.set_num_threads(2)
        got: list = [None] * 4
        errors: list = []

        def work(i: int) -> None:
            try:
                for _ in range(5):
                    got[i] = quantize_rows(xs[i], None, CFG, backend="native")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    finally:
        _ops.set_num_threads(n0)


_COUNT_THREADS = """
import os, torch
torch.set_num_threads(1)  # no OpenMP workers of torch's own in the count
from coset.cuda import _ops
from coset.quant import QuantizationConfig, quantize_rows
x = torch.randn(512, 1024) * 0.05
cfg = QuantizationConfig(lattice_type="E8", q=4, M=2)
counts = [len(os.listdir("/proc/self/task"))]
for th in (2, 2, 3, 1, 3):
    _ops.set_num_threads(th)
    quantize_rows(x, None, cfg, backend="native")
    counts.append(len(os.listdir("/proc/self/task")))
print(counts)
"""


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs /proc/<pid>/task (Linux)")
def test_pool_starts_one_worker_per_extra_thread_not_per_chunk():
    """parallel_for cuts a call into up to 4 chunks per thread (a thread slowed by a neighbour takes fewer), but
    only set_num_threads() - 1 workers exist (not one per chunk: 7 for this call at 2 threads)."""
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _COUNT_THREADS], capture_output=True, text=True, check=True)
    c = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert [n - c[0] for n in c] == [0, 1, 1, 2, 2, 2]


_BACKEND_RESULT = """
import hashlib, sys, torch
from coset.cuda import _ops
from coset.quant import QuantizationConfig, decode, encode, quantize_rows
_ops.set_num_threads(3)
g = torch.Generator().manual_seed(5)
x = torch.randn(700, 1000, generator=g) * 0.05
cfg = QuantizationConfig(lattice_type="E8", q=4, M=2)
y, T, cl = quantize_rows(x, None, cfg, backend="native", return_info=True)
b, Tb = encode(x.reshape(-1, 8), config=cfg, backend="native")
z = decode(b, config=cfg, T=Tb, backend="native")
h = hashlib.sha256()
for t in (y, T, cl, b, Tb, z):
    h.update(t.contiguous().numpy().tobytes())
print(_ops.parallel_backend(), h.hexdigest())
"""


def test_openmp_team_and_own_pool_give_the_same_bits():
    import os
    import subprocess
    import sys

    def run(env_extra):
        env = dict(os.environ, **env_extra)
        out = subprocess.run(
            [sys.executable, "-c", _BACKEND_RESULT], capture_output=True, text=True, check=True, env=env
        )
        return out.stdout.split()

    omp, own = run({}), run({"COSET_OPENMP": "0"})
    assert own[0] == "threads"
    assert omp[0] == "openmp"  # torch's wheels load libgomp, whose GOMP_parallel the kernels then use
    assert omp[1] == own[1]


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork start method on this platform")
def test_forked_child_uses_its_own_pool():
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(_ops.parallel_backend()))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert got == "threads"  # libgomp's team does not survive fork
