"""The fused per-row fake quantizer (fast_quant.h quantize_rows_f32) equals coset.quant's composition bit for bit.

``quantize_rows(x, betas)`` = ``from_blocks(quantize(to_blocks(x) / betas) * betas)``: checked against
backend="torch" (float64 reference) on boundary classes, the beta ramp, the clamp, padded rows, every thread
count and with the fast path switched off; bad inputs raise what the reference raises.
"""

import pytest
import torch

from coset.cuda import _C, _ops
from coset.quant import OverloadError, QuantizationConfig, quantize_rows


def _rows(R: int, k: int, q: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    betas = (torch.rand(R, generator=g) * 0.5 + 0.05).to(torch.float32)
    x = torch.randn(R, k, generator=g) * betas[:, None]
    n = R * k
    flat = x.view(-1)
    # boundary classes (in units of beta_r after the division): multiples of 1/(2q), half-integers
    u = torch.randint(-4 * q * q, 4 * q * q, (n,), generator=g).to(torch.float32)
    rows = torch.arange(n) // k
    flat[: n // 4] = u[: n // 4] / (2 * q) * betas[rows[: n // 4]]
    flat[n // 4 : n // 2] = u[n // 4 : n // 2] / 2 * betas[rows[n // 4 : n // 2]]
    x[R // 2 : R // 2 + max(R // 8, 1)] *= 6.0  # T > 0
    x[-1, : min(k, 12)] *= 1e4  # clamps past the cap
    return x, betas


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("lat", ["D4", "D8", "E8"])
@pytest.mark.parametrize("q,M", [(2, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("k", [64, 37, 5])
def test_quantize_rows_equals_reference(lat, q, M, k):
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, max_scaling_iterations=4)
    x, betas = _rows(48, k, q, seed=k)
    for b in (betas, None):
        nat = quantize_rows(x, b, cfg, backend="native", return_info=True)
        ref = quantize_rows(x, b, cfg, backend="torch", return_info=True)
        assert _same(nat, ref)
        assert nat[0].shape == (48, k) and nat[1].shape == (48, -(-k // cfg.dim))
    T, clamped = ref[1], ref[2]
    assert bool((T > 0).any()) and bool(clamped.any())  # the ramp and the clamp were exercised


def test_quantize_rows_is_the_blockwise_composition():
    """The specification: each row divided by its beta, quantized in zero-padded d-blocks, multiplied back."""
    from coset.quant import from_blocks, quantize, to_blocks

    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x, betas = _rows(16, 30, 4, seed=5)
    blocks, pad = to_blocks(x, 4)
    want = from_blocks(quantize(blocks / betas[:, None, None], cfg, backend="torch") * betas[:, None, None], pad)
    assert torch.equal(quantize_rows(x, betas, cfg, backend="native"), want)


def test_quantize_rows_threads_and_switch_give_same_bits():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.7)
    x, betas = _rows(300, 1024, 4, seed=2)
    n0 = _ops.get_num_threads()
    try:
        _ops.set_num_threads(1)
        a = quantize_rows(x, betas, cfg, backend="native", return_info=True)
        _ops.set_num_threads(3)
        b = quantize_rows(x, betas, cfg, backend="native", return_info=True)
        _C.set_fast_path(False)
        c = quantize_rows(x, betas, cfg, backend="native", return_info=True)
    finally:
        _C.set_fast_path(True)
        _ops.set_num_threads(n0)
    assert _same(a, b) and _same(a, c)
    assert _same(a, quantize_rows(x, betas, cfg, backend="torch", return_info=True))


def test_quantize_rows_bad_input_raises_like_reference():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x, betas = _rows(8, 16, 4)
    x[3, 5] = float("nan")
    for be in ("native", "torch"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_rows(x, betas, cfg, backend=be)
    x, betas = _rows(8, 16, 4)
    betas[2] = 0.0  # x / 0 = inf
    for be in ("native", "torch"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_rows(x, betas, cfg, backend=be)
    with pytest.raises(ValueError, match="betas must have shape"):
        quantize_rows(x, betas[:3], cfg, backend="native")
    with pytest.raises(ValueError, match=r"shape \(R, k\)"):
        quantize_rows(x[0], None, cfg, backend="native")
    err = QuantizationConfig(lattice_type="D4", q=4, M=2, max_scaling_iterations=1, overload_policy="error")
    for be in ("native", "torch"):
        with pytest.raises(OverloadError):
            quantize_rows(torch.full((4, 8), 1e4), None, err, backend=be)


def test_quantize_rows_uncovered_code_composes():
    """Codes outside the fused kernel (dither, centring, Z^n, q not a power of two) run the composition."""
    x, betas = _rows(20, 24, 3, seed=9)
    for cfg in (
        QuantizationConfig(lattice_type="D4", q=4, M=2, with_dither=True),
        QuantizationConfig(lattice_type="D4", q=3, M=2),
        QuantizationConfig(lattice_type="Z4", q=4, M=2),
    ):
        assert not _ops.rows_applicable(cfg.lattice, cfg)
        nat = quantize_rows(x, betas, cfg, backend="native", return_info=True)
        assert _same(nat, quantize_rows(x, betas, cfg, backend="torch", return_info=True))


def test_quantize_rows_out_native_equals_reference():
    """The fused kernel writes into given tensors (reused across calls) the bits of the reference; the
    fast path switched off (the composition of native ops) writes them too."""
    cfg = QuantizationConfig(lattice_type="E8", q=4, M=2, max_scaling_iterations=4)
    x, betas = _rows(40, 37, 4, seed=11)
    want = quantize_rows(x, betas, cfg, backend="torch", return_info=True)
    nb = -(-37 // 8)
    out = (torch.empty(40, 37), torch.empty(40, nb, dtype=torch.uint8), torch.empty(40, nb, dtype=torch.bool))
    try:
        for fast in (True, True, False):
            _C.set_fast_path(fast)
            got = quantize_rows(x, betas, cfg, backend="native", return_info=True, out=out)
            assert all(a is b for a, b in zip(got, out, strict=True)) and _same(got, want)
    finally:
        _C.set_fast_path(True)
    with pytest.raises(ValueError, match="must not share memory"):
        quantize_rows(x, betas, cfg, backend="native", out=(x, out[1], out[2]))


@pytest.mark.filterwarnings("ignore::coset.quant.ClampWarning")
@pytest.mark.parametrize("lat", ["D4", "E8"])
def test_quantize_rows_overload_densities_equal_reference(lat):
    """The t = 1 recomputation gathers overloaded blocks from many packs and rows into full 8-lane groups: every
    overload density from none to all, rows that end in partial packs and padded blocks, blocks that need
    T >= 2 after it, rejected (boundary) blocks among them, at 1 and 3 threads and with one scale step only."""
    g = torch.Generator().manual_seed(3)
    R, k = 96, 8 * 8 * 3 + 5  # 24 whole packs of D4 blocks and a partial pack + padded block per row
    x = torch.randn(R, k, generator=g)
    x *= torch.linspace(0.2, 9.0, R)[:, None]  # from no overloads to (almost) every block overloaded
    x[::7] = torch.randint(-40, 40, (len(range(0, R, 7)), k), generator=g).float() / 8  # ties of every kind
    betas = (torch.rand(R, generator=g) * 0.3 + 0.85).to(torch.float32)
    cfgs = (
        QuantizationConfig(lattice_type=lat, q=4, M=2, max_scaling_iterations=6),
        QuantizationConfig(lattice_type=lat, q=4, M=2, max_scaling_iterations=1),  # T in {0, 1}, then the clamp
        QuantizationConfig(lattice_type=lat, q=2, M=2, max_scaling_iterations=0),  # no ramp: overloads clamp
    )
    n0 = _ops.get_num_threads()
    try:
        for cfg in cfgs:
            want = quantize_rows(x, betas, cfg, backend="torch", return_info=True)
            T = want[1]
            if cfg.max_scaling_iterations == 6:
                assert 0.05 < float((T > 0).float().mean()) < 0.95 and int(T.max()) >= 2
            for threads in (1, 3):
                _ops.set_num_threads(threads)
                assert _same(quantize_rows(x, betas, cfg, backend="native", return_info=True), want)
    finally:
        _ops.set_num_threads(n0)


@pytest.mark.parametrize("q,M", [(4, 2), (2, 3)])
@pytest.mark.parametrize("k", [128, 200, 68, 37])
@pytest.mark.parametrize("spec", ["given", "rms_rows", "rms_tensor"])
def test_main_pass_packs_of_16_equal_reference(q, M, k, spec):
    """With beta 1 (power-of-two scales) a D4 code's main pass runs in packs of 16 blocks in the AVX-512 build
    (8 elsewhere): rows of 32 or 50 blocks (two packs of 16, or three and an 8-pack and a tail), 17 blocks (one
    pack and a tail) and 10 (no pack of 16) give the reference's bits — ties (rejected lanes), overloads in either
    half of a pack, clamps — with given, per-row and per-tensor rms betas, on 1 and 3 threads."""
    from coset.quant import RmsBetas

    cfg = QuantizationConfig(lattice_type="D4", q=q, M=M, beta=1.0, max_scaling_iterations=4)
    x, betas = _rows(40, k, q, seed=k + q)
    # every eighth block 30x larger (blocks 0 and 8 of each pack of 16): overloads in both halves of a pack, also
    # with rms betas (these blocks stand ~9 betas out)
    x[:20] *= torch.tensor([30.0 if (j // 4) % 8 == 0 else 1.0 for j in range(k)])
    if spec == "rms_tensor":  # (the clamp row's 1e4 entries would set the one beta: no other block overloads)
        x[-1] = x[-2]
    b = {"given": betas, "rms_rows": RmsBetas(0.3), "rms_tensor": RmsBetas(0.3, per_row=False)}[spec]
    want = quantize_rows(x, b, cfg, backend="torch", return_info=True, return_counts=True)
    n0 = _ops.get_num_threads()
    try:
        for threads in (1, 3):
            _ops.set_num_threads(threads)
            got = quantize_rows(x, b, cfg, backend="native", return_info=True, return_counts=True)
            assert _same(got[:-1], want[:-1]) and got[-1] == want[-1]
    finally:
        _ops.set_num_threads(n0)
    T = want[1]
    assert bool((T > 0).any())
    if k >= 64:  # overloads in both halves of a pack of 16
        assert bool((T[:20, :8] > 0).any()) and bool((T[:20, 8:16] > 0).any())
