"""``quantize_rows``: per-row scaled quantization of a matrix in zero-padded d-blocks (the reference)."""

import pytest
import torch

from coset.quant import QuantizationConfig, RmsBetas, quantize, quantize_rows


def test_rows_equal_per_row_quantize():
    """Row r is beta_r * quantize(x[r] / beta_r) on its own zero-padded blocks, padding stripped."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x = torch.randn(6, 10, generator=g)
    betas = torch.rand(6, generator=g) + 0.1
    out, T, clamped = quantize_rows(x, betas, cfg, backend="torch", return_info=True)
    assert out.shape == (6, 10) and T.shape == (6, 3) and clamped.shape == (6, 3)
    for r in range(6):
        row = torch.cat([x[r], torch.zeros(2)]).reshape(3, 4) / betas[r]
        want, Tr, cr = quantize(row, cfg, backend="torch", return_info=True)
        assert torch.equal(out[r], (want * betas[r]).reshape(-1)[:10])
        assert torch.equal(T[r], Tr) and torch.equal(clamped[r], cr)


def test_rows_without_betas_is_quantize_of_the_blocks():
    g = torch.Generator().manual_seed(1)
    cfg = QuantizationConfig(lattice_type="E8", q=2, M=3, beta=0.5)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    out = quantize_rows(x, None, cfg, backend="torch")
    assert out.dtype == torch.float64
    assert torch.equal(out, quantize(x.reshape(5, 2, 8), cfg, backend="torch").reshape(5, 16))


def test_rows_argument_errors():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize_rows([[1.0] * 8])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        quantize_rows(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(R, k\)"):
        quantize_rows(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"betas must have shape \(3,\)"):
        quantize_rows(x, torch.ones(4))
    with pytest.raises(TypeError, match="betas"):
        quantize_rows(x, torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rows(x, torch.tensor([1.0, 0.0, 1.0]), backend="torch")
    with pytest.raises(TypeError, match="backend must be a str"):
        quantize_rows(x, None, backend=["native"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        quantize_rows(x, None, backend="no-such-backend")


def test_rows_out_tensors_are_written_and_returned():
    """``out=``: the same bits as fresh outputs, written into (and returned as) the given tensors, reused."""
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, max_scaling_iterations=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, generator=g) * torch.tensor([0.1, 1, 3, 10, 30, 1e3])[:, None]  # T > 0 and clamps
    betas = torch.full((6,), 0.5)
    want = quantize_rows(x, betas, cfg, backend="torch", return_info=True)
    out = (torch.full((6, 10), float("nan")), torch.full((6, 3), 99, dtype=torch.uint8), torch.ones(6, 3).bool())
    for _ in range(2):  # the second call overwrites the first call's results in place
        got = quantize_rows(x, betas, cfg, backend="torch", return_info=True, out=out)
        assert all(a is b for a, b in zip(got, out, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert bool((want[1] > 0).any()) and bool(want[2].any())
    assert quantize_rows(x, betas, cfg, backend="torch", out=out) is out[0]  # without return_info


def test_rows_out_argument_errors():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x = torch.randn(4, 8)

    def outs(**kw):
        o = {"r": torch.empty(4, 8), "T": torch.empty(4, 2, dtype=torch.uint8), "c": torch.empty(4, 2).bool()}
        o.update(kw)
        return (o["r"], o["T"], o["c"])

    with pytest.raises(TypeError, match="out must be a tuple of three tensors"):
        quantize_rows(x, None, cfg, out=[torch.empty(4, 8)] * 3)
    with pytest.raises(TypeError, match=r"out\[0\] must have dtype torch.float32"):
        quantize_rows(x, None, cfg, out=outs(r=torch.empty(4, 8, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"out\[2\] must have dtype torch.bool"):
        quantize_rows(x, None, cfg, out=outs(c=torch.empty(4, 2, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"out\[1\] must be a contiguous \(4, 2\)"):
        quantize_rows(x, None, cfg, out=outs(T=torch.empty(2, 4, dtype=torch.uint8).t()))
    with pytest.raises(ValueError, match=r"out\[0\] must be a contiguous \(4, 8\)"):
        quantize_rows(x, None, cfg, out=outs(r=torch.empty(4, 9)))
    with pytest.raises(ValueError, match="must not share memory"):
        quantize_rows(x, None, cfg, out=outs(r=x))
    with pytest.raises(ValueError, match=r"out\[0\] requires grad"):
        quantize_rows(x, None, cfg, out=outs(r=torch.empty(4, 8, requires_grad=True)))
    buf = torch.zeros(4, 2, dtype=torch.uint8)  # T and clamped on the same bytes
    with pytest.raises(ValueError, match="must not share memory"):
        quantize_rows(x, None, cfg, out=outs(T=buf, c=buf.view(torch.bool)))


def test_rows_backend_choice_follows_the_registry():
    """quantize_rows caches its backend choice per (backend, op, device, dtype, lattice, config); registering or
    removing a backend invalidates it (a backend registered after a first call is used by the next one)."""
    from coset.quant.backend import register_backend, registry_generation, unregister_backend

    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    x = torch.randn(3, 8)
    want = quantize_rows(x, None, cfg, backend="torch")
    calls = []

    class Spy:
        name = "spy-rows"
        priority = 10_000  # ahead of every real backend for "auto"
        backend_api = 1

        def supports(self, op, tensor, lattice, config):
            return op in ("quantize_rows", "quantize_rows_rms")

        def quantize_rows(self, x, betas, lattice, config, out=None):
            calls.append((tuple(x.shape), betas is None if not isinstance(betas, RmsBetas) else "rms"))
            res = quantize_rows(x, betas, config, backend="torch", return_info=True)
            return res if not isinstance(betas, RmsBetas) else (*res[:3], res[3].to(torch.float32))

    assert torch.equal(quantize_rows(x, None, cfg), want)  # the choice without the spy, cached
    g0 = registry_generation()
    register_backend(Spy())
    try:
        assert registry_generation() != g0
        assert torch.equal(quantize_rows(x, None, cfg), want)
        assert calls == [((3, 8), True)]
        assert torch.equal(quantize_rows(x, None, cfg, backend="spy-rows"), want) and len(calls) == 2
        # "auto" finds a backend for the rms op too (the op runs the backend's quantize_rows method)
        got = quantize_rows(x, RmsBetas(1.5), cfg, return_info=True)
        ref = quantize_rows(x, RmsBetas(1.5), cfg, backend="torch", return_info=True)
        assert calls[2] == ((3, 8), "rms")  # the spy computed the betas itself (not the reference, then the spy)
        assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    finally:
        unregister_backend("spy-rows")
    assert torch.equal(quantize_rows(x, None, cfg), want) and len(calls) == 3  # gone again


def _mask_counts(T: torch.Tensor, clamped: torch.Tensor) -> tuple[int, int]:
    return int(((T > 0) | clamped).sum()), int(clamped.sum())


def test_rows_counts_equal_the_masks():
    """return_counts appends (blocks with T > 0 or clamped, clamped blocks), counted from the masks here."""
    g = torch.Generator().manual_seed(3)
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, max_scaling_iterations=1)
    x = torch.randn(8, 20, generator=g)
    x[2] *= 30.0  # T > 0
    x[5, :4] *= 1e4  # clamped at the cap
    res, T, clamped, counts = quantize_rows(x, None, cfg, backend="torch", return_info=True, return_counts=True)
    assert counts == _mask_counts(T, clamped) and counts[1] >= 1 and counts[0] > counts[1]
    only = quantize_rows(x, None, cfg, backend="torch", return_counts=True)
    assert torch.equal(only[0], res) and only[1] == counts
    r = quantize_rows(x, RmsBetas(1.0), cfg, backend="torch", return_info=True, return_counts=True)
    assert len(r) == 5 and r[-1] == _mask_counts(r[1], r[2])


@pytest.mark.parametrize("betas", [None, "rms"])
def test_row_quantizer_equals_quantize_rows(betas):
    """The prepared quantizer returns quantize_rows's results, its rms betas in the work dtype and the counts,
    for arguments it takes as they are and for those it hands to quantize_rows (non-contiguous x, float64 x)."""
    from coset.quant import RowQuantizer

    g = torch.Generator().manual_seed(4)
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    spec = RmsBetas(0.7) if betas == "rms" else None
    rq = RowQuantizer((6, 10), cfg, betas=spec, backend="torch")
    for x in (torch.randn(6, 10, generator=g), torch.randn(10, 6, generator=g).t()):
        b = None if spec is not None else torch.rand(6, generator=g) + 0.2
        res, T, clamped, derived, counts = rq(x, b)
        want = quantize_rows(x, spec if spec is not None else b, cfg, backend="torch", return_info=True)
        assert torch.equal(res, want[0]) and torch.equal(T, want[1]) and torch.equal(clamped, want[2])
        assert counts == _mask_counts(T, clamped)
        if spec is None:
            assert derived is None
        else:
            assert derived.dtype == torch.float32 and torch.equal(derived.double(), want[3])
        out = tuple(torch.empty_like(t) for t in (res, T, clamped))
        again = rq(x, b, out=out)
        assert all(a is o for a, o in zip(again[:3], out, strict=True)) and torch.equal(again[0], res)


def test_row_quantizer_argument_errors():
    from coset.quant import RowQuantizer

    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    with pytest.raises(ValueError, match="shape"):
        RowQuantizer((3,), cfg)
    with pytest.raises(ValueError, match="shape"):
        RowQuantizer((3, -1), cfg)
    with pytest.raises(TypeError, match="dtype"):
        RowQuantizer((3, 8), cfg, dtype=torch.float16)
    with pytest.raises(TypeError, match="betas"):
        RowQuantizer((3, 8), cfg, betas=torch.ones(3))  # type: ignore[arg-type]
    rq = RowQuantizer((3, 8), cfg, betas=RmsBetas(1.0), backend="torch")
    with pytest.raises(ValueError, match="derives its betas"):
        rq(torch.randn(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):  # quantize_rows's own errors for what the quantizer cannot take
        RowQuantizer((3, 8), cfg, backend="torch")(torch.randn(3, 8), torch.ones(4))
    with pytest.raises(ValueError, match="NaN|finite"):
        rq(torch.full((3, 8), float("nan")))
