"""quantize_rows's ``previous_betas`` hint (incremental re-quantization): the results equal a call without it.

With the hint, the kernel keeps a block's previous point when the new ``x / beta`` is certified to lie strictly
inside that point's Voronoi cell, and re-quantizes the others. Checked against the float64 reference over
perturbations from none to a new matrix, boundary classes, the beta ramp, the clamp, padded rows, every lattice
(E8 runs without the hint) and thread counts; hints that hold no results (NaN, zeros) are harmless.
"""

import pytest
import torch

from coset.cuda import _C
from coset.quant import QuantizationConfig, RmsBetas, quantize_rows


def _rows(R: int, k: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    betas = (torch.rand(R, generator=g) * 0.5 + 0.05).to(torch.float32)
    x = torch.randn(R, k, generator=g) * betas[:, None] * 4
    flat = x.view(-1)
    n = R * k
    rows = torch.arange(n) // k
    u = torch.randint(-4 * q * q, 4 * q * q, (n // 4,), generator=g).to(torch.float32)
    flat[: n // 4] = u / (2 * q) * betas[rows[: n // 4]]  # exact ties of every layer
    x[-1, : min(k, 12)] *= 1e4  # clamps past the cap (T >= 2 in the hint: the full path)
    return x, betas


def _step(x: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + rel * x.abs().mean() * torch.randn(x.shape, generator=g)


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("lat,q,M", [("D4", 4, 2), ("D4", 2, 3), ("D8", 4, 2), ("E8", 4, 2)])
@pytest.mark.parametrize("k", [64, 37, 5])
@pytest.mark.parametrize("rel", [0.0, 1e-5, 1e-3, 0.1, 3.0])
@pytest.mark.parametrize("ws", [False, True])
def test_hinted_rows_equal_reference(lat, q, M, k, rel, ws):
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, max_scaling_iterations=4)
    x0, b0 = _rows(40, k, q, seed=k)
    x1 = _step(x0, rel, seed=1)
    b1 = b0 * (1 + 1e-4 * torch.randn(40, generator=torch.Generator().manual_seed(2))).to(torch.float32)
    nb = -(-k // cfg.dim)
    for betas0, betas1 in ((b0, b1), (b0, b0)):
        w = {"workspace": torch.empty(40 * nb * cfg.dim, dtype=torch.int8)} if ws else {}
        out = (torch.empty(40, k), torch.empty(40, nb, dtype=torch.uint8), torch.empty(40, nb, dtype=torch.bool))
        quantize_rows(x0, betas0, cfg, backend="native", out=out, **w)
        got = quantize_rows(x1, betas1, cfg, backend="native", return_info=True, out=out, previous_betas=betas0, **w)
        want = quantize_rows(x1, betas1, cfg, backend="torch", return_info=True)
        assert _same(got, want)
        assert all(g is o for g, o in zip(got, out, strict=True))  # written into out
    assert bool((want[1] > 0).any()) and bool(want[2].any())  # the ramp and the clamp were exercised


@pytest.mark.parametrize("rel", [0.0, 1e-4, 0.3])
def test_hinted_rms_rows_equal_reference_over_training_like_steps(rel):
    """The QAT use: the automatic per-row betas (RmsBetas) and the last step's results as the hint."""
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    spec = RmsBetas(scale=1 / 3.0)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.03
    ws = torch.empty(64 * 256, dtype=torch.int8)
    res = quantize_rows(x, spec, cfg, backend="native", return_info=True, workspace=ws)
    out, betas = tuple(t.clone() for t in res[:3]), res[3].to(torch.float32)
    for step in range(6):
        x = _step(x, rel, seed=10 + step)
        got = quantize_rows(
            x, spec, cfg, backend="native", return_info=True, out=out, previous_betas=betas, workspace=ws
        )
        want = quantize_rows(x, spec, cfg, backend="torch", return_info=True)
        assert _same(got[:3], want[:3]) and torch.equal(got[3], want[3])
        assert bool((want[1] > 0).any())
        betas = got[3].to(torch.float32)


@pytest.mark.parametrize("fill", ["nan", "zeros", "ones"])
def test_hint_without_results_is_harmless(fill):
    """out holding no results: NaN certifies nothing; a zero point is never overloaded, so T = 0 or 1 with zero
    outputs is a true hint for any matrix (the t = 1 blocks are checked at t = 0 again)."""
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, max_scaling_iterations=4)
    x, betas = _rows(32, 64, 4, seed=3)
    out = (torch.empty(32, 64), torch.empty(32, 16, dtype=torch.uint8), torch.zeros(32, 16, dtype=torch.bool))
    out[0].fill_(float("nan") if fill == "nan" else 0.0)
    out[1].fill_(1 if fill == "ones" else 0)
    got = quantize_rows(x, betas, cfg, backend="native", return_info=True, out=out, previous_betas=betas)
    assert _same(got, quantize_rows(x, betas, cfg, backend="torch", return_info=True))


def test_hinted_rows_same_bits_on_every_thread_count():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x0, b0 = _rows(300, 128, 4, seed=7)
    x1 = _step(x0, 1e-3, seed=8)
    want = quantize_rows(x1, b0, cfg, backend="torch", return_info=True)
    prev = quantize_rows(x0, b0, cfg, backend="native", return_info=True)
    n0 = _C.get_num_threads()
    try:
        for n in (1, 2, 3):
            _C.set_num_threads(n)
            out = tuple(t.clone() for t in prev)
            assert _same(
                quantize_rows(x1, b0, cfg, backend="native", return_info=True, out=out, previous_betas=b0), want
            )
    finally:
        _C.set_num_threads(n0)


def test_hint_arguments_are_checked():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x, betas = _rows(8, 16, 4, seed=1)
    out = tuple(t.clone() for t in quantize_rows(x, betas, cfg, backend="native", return_info=True))
    with pytest.raises(ValueError, match="previous_betas"):
        quantize_rows(x, betas, cfg, backend="native", previous_betas=betas)  # no out
    with pytest.raises(ValueError, match="previous_betas"):
        quantize_rows(x, betas, cfg, backend="native", out=out, previous_betas=betas[:4])
    with pytest.raises(TypeError, match="previous_betas"):
        quantize_rows(x, betas, cfg, backend="native", out=out, previous_betas=[1.0] * 8)
    with pytest.raises(TypeError, match="workspace"):
        quantize_rows(x, betas, cfg, backend="native", out=out, workspace=torch.empty(8 * 16))
    with pytest.raises(ValueError, match="workspace"):
        quantize_rows(x, betas, cfg, backend="native", out=out, workspace=torch.empty(8 * 15, dtype=torch.int8))
    # the reference ignores the hint (it never changes a result)
    got = quantize_rows(x, betas, cfg, backend="torch", return_info=True, out=out, previous_betas=betas)
    assert _same(got, quantize_rows(x, betas, cfg, backend="torch", return_info=True))


def _mask_counts(T: torch.Tensor, clamped: torch.Tensor) -> tuple[int, int]:
    return int(((T > 0) | clamped).sum()), int(clamped.sum())


@pytest.mark.parametrize("lat,q,M", [("D4", 4, 2), ("D8", 4, 2), ("E8", 4, 2)])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_counts_equal_the_masks(lat, q, M, threads):
    """The kernel's (n_overloaded, n_clamped), counted as it writes the masks, with and without the hint (kept
    blocks count too), equal counts of the masks."""
    from coset.cuda import _ops

    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, max_scaling_iterations=4)
    x0, b0 = _rows(40, 37, q, seed=3)
    nb = -(-37 // cfg.dim)
    out = (torch.empty(40, 37), torch.empty(40, nb, dtype=torch.uint8), torch.empty(40, nb, dtype=torch.bool))
    n0 = _ops.get_num_threads()
    try:
        _ops.set_num_threads(threads)
        first = quantize_rows(x0, b0, cfg, backend="native", out=out, return_info=True, return_counts=True)
        assert first[-1] == _mask_counts(first[1], first[2]) and first[-1][1] >= 1
        got = quantize_rows(
            _step(x0, 1e-4, seed=4), b0, cfg, backend="native", out=out, previous_betas=b0, return_counts=True
        )
        assert got[-1] == _mask_counts(out[1], out[2])
        rms = quantize_rows(x0, RmsBetas(0.5), cfg, backend="native", return_info=True, return_counts=True)
        assert len(rms) == 5 and rms[-1] == _mask_counts(rms[1], rms[2])
    finally:
        _ops.set_num_threads(n0)


@pytest.mark.parametrize("rel", [0.0, 1e-4, 0.3])
def test_prepared_row_quantizer_equals_reference_over_training_like_steps(rel):
    """coset.quant.RowQuantizer on the native backend (the prepared kernel, checked once) with the QAT use's
    hint and workspace: every step equals the float64 reference, betas and counts included."""
    from coset.quant import RowQuantizer

    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    spec = RmsBetas(scale=1 / 3.0)
    rq = RowQuantizer((64, 250), cfg, betas=spec, backend="native")
    assert rq._kernel is not None  # the prepared path runs
    x = torch.randn(64, 250, generator=torch.Generator().manual_seed(0)) * 0.03
    ws = torch.empty(64 * 252, dtype=torch.int8)
    res, T, clamped, betas, counts = rq(x, workspace=ws)
    out = (res, T, clamped)
    for step in range(5):
        x = _step(x, rel, seed=20 + step)
        got = rq(x, out=out, previous_betas=betas, workspace=ws)
        want = quantize_rows(x, spec, cfg, backend="torch", return_info=True)
        assert _same(got[:3], want[:3]) and torch.equal(got[3].double(), want[3])
        assert got[4] == _mask_counts(want[1], want[2])
        assert all(g is o for g, o in zip(got[:3], out, strict=True))
        betas = got[3]
    given = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 0.02 + 0.005
    plain = RowQuantizer((64, 250), cfg, backend="native")
    got = plain(x, given)
    want = quantize_rows(x, given, cfg, backend="torch", return_info=True)
    assert _same(got[:3], want) and got[3] is None


def test_prepared_row_quantizer_errors_are_the_references():
    """Non-finite input raises quantize_rows's ValueError; outputs overlapping x are handed to quantize_rows,
    which refuses them."""
    from coset.quant import RowQuantizer

    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    rq = RowQuantizer((4, 16), cfg, betas=RmsBetas(1.0), backend="native")
    x = torch.randn(4, 16)
    x[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rq(x)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="share memory"):
        rq(x, out=(x, torch.empty(4, 4, dtype=torch.uint8), torch.empty(4, 4, dtype=torch.bool)))
