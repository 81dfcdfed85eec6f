"""End-to-end: 2-process gloo DDP training on sklearn digits through benchmarks/bench_ddp.py.

Runs the benchmark script (short: 200 steps, fp32 vs HNLQ allgather and modular) in a subprocess under a hard
timeout, then checks: HNLQ reaches the fp32 accuracy within 2 points (360 test images: 1 image = 0.28
points), every rank ends with bit-identical parameters, the bytes the hook state reports equal the bytes
counted at the collective calls, and the steady-state traffic is >= 4x below the fp32 all-reduce.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess gloo runs (tens of seconds)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_ddp.py"
TIMEOUT = 300


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        str(BENCH),
        "--dataset",
        "digits",
        "--steps",
        "200",
        "--methods",
        "fp32,hnlq-allgather,hnlq-modular",
        "--out",
        str(out),
        "--name",
        "it",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"bench_ddp.py hung for more than {TIMEOUT} s")
    assert proc.returncode == 0, log.decode(errors="replace")[-4000:]
    data = json.loads((out / "it.json").read_text())
    assert (out / "it.md").read_text().startswith("# DDP gradient compression")
    return {r["method"]: r for r in data["results"]}


def test_fp32_baseline_learns(results):
    assert results["fp32"]["test_accuracy"] > 0.9


@pytest.mark.parametrize("method", ["hnlq-allgather", "hnlq-modular"])
def test_hnlq_matches_fp32_accuracy_with_4x_fewer_bytes(results, method):
    r, base = results[method], results["fp32"]
    assert r["test_accuracy"] >= base["test_accuracy"] - 0.02
    assert r["fp32_bytes_per_step"] / r["bytes_per_step"] >= 4.0
    assert r["ranks_identical"] and r["max_param_diff_across_ranks"] == 0.0
    st = r["hnlq_stats"]
    assert st["bytes_sent"] == st["bytes_sent_counted"]  # the state's accounting = the wire
    assert st["clamp_rate"] == 0.0
