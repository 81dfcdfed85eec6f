"""Real 2-process gloo runs of the HNLQ DDP hooks (CPU).

Each scenario of ``dist_workers.py`` runs once in a subprocess (``mp.spawn`` inside it) under a hard timeout,
so a hang is a test failure; the per-rank measurements are then checked here.

Error bounds asserted (per d-block of the averaged gradient, W = 2 ranks, R = covering radius):

* modular: ``||avg_hat - avg|| <= s * R`` with the agreed chunk scale ``s``, and ``s`` itself satisfies the
  no-overload condition ``sum_r max||x_r|| / s + W R <= 0.99 rho q^M`` (rho = packing radius); the decoded
  sum of codes equals the sum of the ranks' lattice points exactly.
* allgather / decode: ``||avg_hat - avg|| <= (1/W) sum_r R * s_r`` with ``s_r <= max(s0_r, 2^alpha ||x_r|| /
  r_safe)``, ``s0_r = beta * RMS(x_r)`` and ``r_safe = 0.99 (rho q^M (1 - r_{q,M}) - R)`` the radius below which
  HNLQ cannot overload (sandwich bound, paper.md section 4).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coset.dist import default_config
from coset.dist.codec import allgather_bytes, choose_sum_packing, payload_layout, ring_allreduce_bytes
from coset.quant import to_blocks

pytestmark = pytest.mark.slow  # subprocess gloo runs (tens of seconds)

WORKERS = Path(__file__).with_name("dist_workers.py")
TIMEOUT = 240  # seconds for a whole scenario (measured ~40 s on a loaded 2-core box)


def run_scenario(name, tmp_path, world_size=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS), name, str(tmp_path), str(world_size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"distributed scenario {name!r} hung for more than {TIMEOUT} s")
    errs = sorted(tmp_path.glob("rank*.err"))
    detail = "\n".join(p.read_text() for p in errs) + out.decode(errors="replace")[-4000:]
    assert proc.returncode == 0, f"scenario {name!r} failed (rc={proc.returncode}):\n{detail}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    return run_scenario("all", tmp_path_factory.mktemp("gloo"))


@pytest.fixture(scope="module")
def modes(gloo_run):
    return [r["modes"] for r in gloo_run]


@pytest.fixture(scope="module")
def errors(gloo_run):
    return [r["errors"] for r in gloo_run]


CONFIGS = {
    "q4M2": default_config(4, 2),
    "q16M2": default_config(16, 2),
    "q2M4": default_config(2, 4),
    "E8q4M2": default_config(4, 2, "E8"),
}
W = 2


def block_err(out, xs, d):
    avg = (xs[0].double() + xs[1].double()) / W
    return torch.linalg.vector_norm(to_blocks(out.double() - avg, d)[0], dim=-1), avg


def hnlq_bound(xs, cfg, dithered=False):
    """Per-block bound of the allgather/decode average (see module docstring)."""
    lat = cfg.lattice
    R, rho = lat.covering_radius, lat.packing_radius
    r = (1 - cfg.q ** (1 - cfg.M)) / (cfg.q - 1)
    r_safe = 0.99 * (rho * cfg.q**cfg.M * (1 - r) - R * (2 if dithered else 1))
    total = 0
    for x in xs:
        x = x.double()
        rms = float(x.pow(2).mean().sqrt()) or 1.0
        s0 = rms * cfg.beta
        nrm = torch.linalg.vector_norm(to_blocks(x, lat.dim)[0], dim=-1)
        total = total + R * torch.clamp(2**cfg.alpha * nrm / r_safe, min=s0)
    return total / W


def modular_checks(e, cfg, n, dithered=False, rel_slack=0.0):
    lat = cfg.lattice
    d, R, rho = lat.dim, lat.covering_radius, lat.packing_radius
    s = e["scales"].double()
    bpc = e["bpc"]
    nb = -(-n // d)
    s_b = s.repeat_interleave(bpc)[:nb]
    # the agreed scale keeps the sum of W ranks strictly inside q^M V
    for c in range(s.numel()):
        m = sum(
            float(torch.linalg.vector_norm(to_blocks(x.double(), d)[0][c * bpc : (c + 1) * bpc], dim=-1).max())
            for x in e["xs"]
        )
        reff = R * (2 if dithered else 1)
        assert m / float(s[c]) + W * reff <= 0.99 * rho * cfg.q**cfg.M * (1 + 1e-6)
    err, avg = block_err(e["out"].float(), [x.float() for x in e["xs"]], d)
    slack = rel_slack * (torch.linalg.vector_norm(to_blocks(avg, d)[0], dim=-1) + s_b * R)
    assert bool((err <= s_b * R * (1 + 1e-5) + 1e-7 + slack).all()), float((err / (s_b * R)).max())


@pytest.mark.parametrize("n", [1003, 4096])
@pytest.mark.parametrize("cname", list(CONFIGS))
def test_modular_sum_exact_in_gloo(modes, cname, n):
    for r in range(W):
        e = modes[r][("modular", cname, n)]
        # the codes summed by gloo decode to exactly the sum of both ranks' lattice points ...
        assert torch.equal(e["decoded_sum"], e["sum_of_points"])
        # ... and the hook's output is bit-for-bit s * (lam_0 + lam_1) / W (an error would be a lattice vector)
        assert torch.equal(e["out"], e["expected_out"])
        modular_checks(e, CONFIGS[cname], n)
    assert torch.equal(modes[0][("modular", cname, n)]["out"], modes[1][("modular", cname, n)]["out"])


@pytest.mark.parametrize("n", [1003, 4096])
@pytest.mark.parametrize("cname", ["q4M2", "E8q4M2"])
@pytest.mark.parametrize("mode", ["allgather", "decode"])
def test_allgather_and_decode_within_lattice_bound(modes, mode, cname, n):
    cfg = CONFIGS[cname]
    e = modes[0][(mode, cname, n)]
    err, avg = block_err(e["out"], e["xs"], cfg.dim)
    bound = hnlq_bound(e["xs"], cfg)
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), float((err / bound).max())
    assert e["out"].shape == (n,) and e["out"].dtype == torch.float32
    assert e["stats"]["clamp_rate"] == 0.0
    assert torch.equal(e["out"], modes[1][(mode, cname, n)]["out"])  # identical on every rank
    # allgather and decode decode the same labels: same averages up to float32 rounding
    other = modes[0][("allgather" if mode == "decode" else "decode", cname, n)]["out"]
    assert torch.allclose(e["out"], other, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("n", [1003, 4096])
def test_bytes_sent_match_the_wire_format(modes, n):
    cfg = CONFIGS["q4M2"]
    base = ring_allreduce_bytes(4 * n, W)
    ag = modes[0][("allgather", "q4M2", n)]["stats"]
    assert ag["bytes_fp32_baseline"] == base
    assert ag["bytes_sent"] == allgather_bytes(payload_layout(n, cfg).nbytes, W)
    assert ag["compression_ratio"] >= 6.0
    nb = -(-n // 4)
    pk = choose_sum_packing(16, W)
    chunks = -(-nb // 64)
    mod = modes[0][("modular", "q4M2", n)]["stats"]
    assert mod["bytes_sent"] == ring_allreduce_bytes(pk.nbytes(nb * 4), W) + ring_allreduce_bytes(4 * (chunks + 1), W)
    assert mod["compression_ratio"] >= 5.5
    assert mod["overload_rate"] == 0.0
    q16 = modes[0][("modular", "q16M2", n)]["stats"]  # uint8 codes: just under 4x
    assert 3.8 <= q16["compression_ratio"] < 4.0
    dec = modes[0][("decode", "q4M2", n)]["stats"]
    assert dec["bytes_sent"] == base and dec["compression_ratio"] == 1.0  # the reference saves nothing


@pytest.mark.parametrize("mode", ["allgather", "modular", "decode"])
def test_zero_gradients_stay_zero(modes, mode):
    for r in range(W):
        out = modes[r][("zero", mode)]
        assert out.shape == (37,) and torch.equal(out, torch.zeros(37))


@pytest.mark.parametrize("dt", ["torch.float16", "torch.bfloat16"])
@pytest.mark.parametrize("mode", ["allgather", "modular"])
def test_half_precision_buckets(modes, mode, dt):
    e = modes[0][("half", mode, dt)]
    dtype = getattr(torch, dt.split(".")[1])
    assert e["out"].dtype == dtype and e["out"].shape == (515,)
    assert torch.equal(e["out"], modes[1][("half", mode, dt)]["out"])
    xs = [x.to(dtype).float() for x in e["xs"]]  # what the ranks actually had
    cfg = default_config()
    err, avg = block_err(e["out"].float(), xs, cfg.dim)
    eps = torch.finfo(dtype).eps
    anorm = torch.linalg.vector_norm(to_blocks(avg, cfg.dim)[0], dim=-1)
    if mode == "allgather":
        bound = hnlq_bound(xs, cfg)
        assert bool((err <= bound * (1 + 1e-5) + eps * (anorm + bound)).all())
    else:  # modular: s * R per block with the agreed chunk scales (checked against the no-overload bound)
        modular_checks(dict(e, xs=xs), cfg, 515, rel_slack=float(eps))


@pytest.mark.parametrize("mode", ["allgather", "modular"])
def test_warmup_error_feedback_buckets_and_checkpoint(modes, mode):
    e = modes[0][("multi", mode)]
    xs, outs = e["xs"], e["outs"]
    avg = [(xs[0][i] + xs[1][i]) / W for i in range(len(xs[0]))]
    rel = lambda got, i: float((got - avg[i]).norm() / avg[i].norm())  # noqa: E731
    # warm-up (start_iter=2): a plain all-reduce
    for step in (0, 1):
        for i in range(4):
            assert torch.allclose(outs[step][i], avg[i], rtol=1e-6, atol=0)
    # compressed steps: error feedback makes the running mean converge like 1/K (a deterministic quantizer
    # without it would repeat the same error every step on a constant gradient)
    K = len(outs) - 2
    first = max(rel(outs[2][i], i) for i in range(4))
    assert first > 0.01  # compression really happened
    for i in range(4):
        mean = sum(outs[s][i] for s in range(2, len(outs))) / K
        assert rel(mean, i) <= 2.0 * first / K
    assert e["iter"] == len(outs)  # one increment per backward (on the last bucket)
    assert e["n_buckets"] >= 2  # several buckets, each with its own residual
    assert e["restored_equal"]  # pickled and restored without the process group
    st = e["stats"]
    assert st["buckets_uncompressed"] >= 2  # the warm-up iterations
    assert st["buckets_compressed"] == K * e["n_buckets"]
    for r in (0, 1):
        for s in range(len(outs)):
            for i in range(4):
                assert torch.equal(modes[r][("multi", mode)]["outs"][s][i], outs[s][i])


@pytest.mark.parametrize("mode", ["allgather", "modular"])
def test_dithered_hooks(modes, mode):
    e = modes[0][("dither", mode)]
    assert torch.equal(e["out"], modes[1][("dither", mode)]["out"])
    cfg = default_config().replace(with_dither=True)
    if mode == "modular":
        modular_checks(e, cfg, 999, dithered=True)
    else:
        err, _ = block_err(e["out"], e["xs"], 4)
        bound = hnlq_bound(e["xs"], cfg, dithered=True)
        assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())


def test_modular_sum_exact_with_three_ranks(tmp_path):
    """W=3 in a real gloo run: 2 guard bits per int64 field (q^M=16) and uint8 wrap-around (q^M=256)."""
    res = run_scenario("modular_w", tmp_path, world_size=3)
    for cname, kind in (("q4M2", "int64"), ("q16M2", "uint8")):
        cfg = CONFIGS[cname]
        for r in range(3):
            e = res[r][cname]
            assert e["packing"] == kind
            assert torch.equal(e["decoded_sum"], e["sum_of_points"])
            assert torch.equal(e["out"], e["expected_out"])
            assert torch.equal(e["out"], res[0][cname]["out"])
        e = res[0][cname]
        lat = cfg.lattice
        s_b = e["scales"].repeat_interleave(e["bpc"])[: e["sum_of_points"].shape[0]]
        avg = to_blocks(sum(x.double() for x in e["xs"]) / 3, 4)[0]
        err = torch.linalg.vector_norm(to_blocks(e["out"].double(), 4)[0] - avg, dim=-1)
        assert bool((err <= s_b * lat.covering_radius * (1 + 1e-5) + 1e-7).all())


def test_modulus_too_small_rejected_at_construction(modes):
    msg = modes[0]["small_modulus_error"]
    assert msg is not None and "raise q or M" in msg


@pytest.mark.parametrize("mode", ["allgather", "modular", "decode"])
def test_nonfinite_gradient_on_one_rank_raises_everywhere(errors, mode):
    for r in range(W):
        kind, msg = errors[r][(mode, "raise")]
        assert kind == "raised" and "NaN/Inf" in msg, msg
        kind, has_nan = errors[r][(mode, "allreduce")]
        assert kind == "ok" and has_nan  # fallback: the NaN reaches the gradient, as without a hook
