"""Hostile-input fuzz of coset.cuda's Python entry points: layouts (non-contiguous, flipped, expanded stride-0,
zero-size), dtypes, devices (meta stands for "a device this build cannot read"), NaN/Inf, int64 sizes and
out-of-range arguments. Every call either raises TypeError/ValueError with a message, or returns what the torch
reference returns (bit for bit where coset.quant promises it). The values-only fuzz of the kernels lives in
test_cuda_fuzz.py; every call that once crashed the interpreter was first found in a subprocess."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coset.cuda
from coset.cuda import _ops, kv
from coset.cuda import bucket_codec as bc
from coset.cuda.lut_gemv import CodedWeight, lut_gemv
from coset.quant import QuantizationConfig, decode, encode, quantize, quantize_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outcomes import documented, outcome, same  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
META = torch.device("meta")


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in a hostile memory layout."""
    if how == "flip" and t.ndim:
        return t.flip(0).contiguous().flip(0)  # a negative-stride-like view over reversed storage
    if how == "transpose" and t.ndim >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "strided" and t.ndim:
        big = torch.zeros((t.shape[0] * 2, *t.shape[1:]), dtype=t.dtype)
        big[::2] = t
        return big[::2]
    return t


def _cfg(name, q, M, cap, policy="clamp", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationConfig(name, q, M, max_scaling_iterations=cap, overload_policy=policy, **kw)


# ------------------------------------------------------------------------------------- quantize / encode / decode
@FUZZ
@given(
    name=st.sampled_from(["D4", "E8", "Z2", "D3"]),
    q=st.integers(2, 9),
    M=st.integers(1, 3),
    cap=st.integers(0, 5),
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.bool]),
    how=st.sampled_from(["flip", "transpose", "strided", "expand", "plain"]),
    special=st.sampled_from([None, "nan", "inf", "huge"]),
    seed=st.integers(0, 2**16),
)
def test_cuda_hostile_layouts_native_equals_reference(name, q, M, cap, lead, dtype, how, special, seed):
    cfg = _cfg(name, q, M, cap)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, cfg.dim, generator=g, dtype=torch.float64) * 3
    if special and x.numel():
        x.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e305}[special]
    x = x.to(dtype) if dtype != torch.bool else x > 0
    if how == "expand" and x.numel():
        x = x[:1].expand(x.shape[0] * 3, *x.shape[1:])  # stride 0 along the rows
    else:
        x = _layout(x, how)
    for fn in (
        lambda be: encode(x, cfg, backend=be, return_clamped=True),
        lambda be: quantize(x, cfg, backend=be, return_info=True),
    ):
        same(outcome(lambda fn=fn: fn("torch")), outcome(lambda fn=fn: fn("native")), f"{how} {dtype}")
    labels = torch.randint(0, q, (*x.shape[:-1], M, cfg.dim), generator=g).to(torch.uint8)
    T = torch.randint(0, cap + 1, x.shape[:-1], generator=g).to(torch.int64)
    labels, T = _layout(labels, how), _layout(T, how)
    same(
        outcome(lambda: decode(labels, cfg, T, dtype=torch.float64, backend="torch")),
        outcome(lambda: decode(labels, cfg, T, dtype=torch.float64, backend="native")),
        "decode",
    )


def test_cuda_hostile_raw_wrappers_refuse_unreadable_arguments():
    cfg = _cfg("D4", 4, 2, 3)
    lat = cfg.lattice
    b = torch.zeros(2, 2, 4, dtype=torch.uint8)
    x = torch.randn(2, 4)
    cases = [
        (lambda: _ops.encode(torch.ones(2, 4, device=META), lat, cfg), ValueError, "x: device meta"),
        (lambda: _ops.encode(x.double().reshape(1, 2, 4), lat, cfg), ValueError, "x must have shape"),
        (lambda: _ops.encode(x.to(torch.int32), lat, cfg), TypeError, "x must be a floating"),
        (lambda: _ops.encode(x, lat, "cfg"), TypeError, "config"),
        (lambda: _ops.decode(b.to(META), torch.zeros(2, dtype=torch.uint8), lat, cfg), ValueError, "b: device"),
        # T on a device the kernel cannot read: refused (was a RuntimeError / NotImplementedError from torch)
        (lambda: _ops.decode(b, torch.zeros(2, dtype=torch.uint8, device=META), lat, cfg), ValueError, "T: device"),
        (lambda: _ops.decode(b, torch.zeros(2, dtype=torch.int64, device=META), lat, cfg), ValueError, "T: device"),
        (lambda: _ops.decode(b, torch.full((2,), 2**40), lat, cfg), ValueError, "T must lie"),
        (lambda: _ops.decode(b, torch.zeros(2), lat, cfg), ValueError, "T must be an integer"),
        (lambda: _ops.decode(b, torch.zeros(2, dtype=torch.uint8), lat, cfg, dtype=torch.int8), TypeError, "dtype"),
        # dither: a device the kernel cannot read, or NaN/Inf that would reach float -> int casts in C++
        (lambda: _ops.encode(x, lat, cfg, torch.zeros(2, 4, dtype=torch.float64, device=META)), ValueError, "dither"),
        (lambda: _ops.encode(x, lat, cfg, torch.full((2, 4), float("nan"), dtype=torch.float64)), ValueError, "dither"),
        (
            lambda: _ops.quantize(x, lat, cfg, torch.full((2, 4), float("inf"), dtype=torch.float64)),
            ValueError,
            "dither",
        ),
        (
            lambda: _ops.decode(b, torch.zeros(2, dtype=torch.uint8), lat, cfg, torch.full((2, 4), float("nan"))),
            ValueError,
            "dither",
        ),
        (lambda: _ops.quantize_rows(torch.randn(3, 8), None, lat, cfg, out=5), TypeError, "out must be"),
        (lambda: _ops.quantize_rows(torch.randn(3, 8), torch.ones(3, device=META), lat, cfg), TypeError, "betas"),
        (lambda: _ops.add_modq(b.to(META), b.to(META), 4), ValueError, "device meta"),
        (lambda: _ops.add_modq(b, b.to(META), 4), ValueError, "same device"),
        (
            lambda: _ops.lut_one_sided(
                torch.zeros(2, 1, 1, dtype=torch.int32), torch.ones(2, 1), torch.ones(1, 1, 3), 17
            ),
            ValueError,
            "q",
        ),  # fmt: skip
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_cuda_hostile_dither_values_still_match_reference():
    # a finite dither passes and stays bit-exact with coset.quant (whose dither comes from the config's seed)
    cfg = _cfg("E8", 4, 2, 4, with_dither=True)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).flip(0)
    same(
        outcome(lambda: quantize(x, cfg, backend="torch", return_info=True)),
        outcome(lambda: quantize(x, cfg, backend="native", return_info=True)),
        "dithered quantize",
    )


@FUZZ
@given(
    name=st.sampled_from(["D4", "E8"]),
    R=st.integers(0, 9),
    k=st.integers(0, 21),
    beta_kind=st.sampled_from(["none", "pos", "neg", "zero", "nan", "inf", "tiny", "expand"]),
    how=st.sampled_from(["plain", "transpose", "strided", "flip"]),
    seed=st.integers(0, 2**16),
)
def test_cuda_hostile_quantize_rows_native_equals_reference(name, R, k, beta_kind, how, seed):
    cfg = _cfg(name, 4, 2, 4)
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(R, k, generator=g) * 2, how)
    betas = None
    if beta_kind != "none":
        betas = torch.rand(R, generator=g) + 0.5
        if R:
            fill = {"neg": -1.0, "zero": 0.0, "nan": float("nan"), "inf": float("inf"), "tiny": 1e-40}
            if beta_kind in fill:
                betas[0] = fill[beta_kind]
            elif beta_kind == "expand":
                betas = betas[:1].expand(R)
    same(
        outcome(lambda: quantize_rows(x, cfg, betas=betas, backend="torch", return_info=True)),
        outcome(lambda: quantize_rows(x, cfg, betas=betas, backend="native", return_info=True)),
        f"quantize_rows {beta_kind} {how}",
    )


# --------------------------------------------------------------------------------------------- set_num_threads
def test_cuda_hostile_set_num_threads():
    n0 = coset.cuda.get_num_threads()
    try:
        for bad, exc in ((True, TypeError), (2.0, TypeError), ("4", TypeError), (0, ValueError), (-1, ValueError),
                         (2**40, ValueError), (_ops.MAX_THREADS + 1, ValueError)):  # fmt: skip
            with pytest.raises(exc, match="^n must be"):
                coset.cuda.set_num_threads(bad)
            assert coset.cuda.get_num_threads() == n0  # a refused call changes nothing
        coset.cuda.set_num_threads(_ops.MAX_THREADS)
        assert coset.cuda.get_num_threads() == _ops.MAX_THREADS
        coset.cuda.set_num_threads(1)
        x = torch.randn(50, 4)
        cfg = _cfg("D4", 4, 2, 3)
        assert torch.equal(quantize(x, cfg, backend="native"), quantize(x, cfg, backend="torch"))
    finally:
        coset.cuda.set_num_threads(n0)


# ----------------------------------------------------------------------------------------------- bucket codec
def _pk(kind="uint8", width=8, fields=1, modulus=16):
    return types.SimpleNamespace(kind=kind, width=width, fields=fields, modulus=modulus)


def test_cuda_hostile_bucket_codec_modular_arguments():
    """Regressions: blocks_per_chunk=0 was an integer division by zero in C++ (SIGFPE), a short ``scales`` was read
    past its end, a ``packed`` buffer on another device was dereferenced (segfault), world_size <= 0 and bogus
    packings gave garbage; all are refused now, naming the argument."""
    cfg = _cfg("D4", 4, 2, 7)
    n, d = 64, 4
    nb = n // d
    x = torch.randn(n)
    ones = torch.ones(nb, dtype=torch.float64)
    packed = torch.ones(nb * d, dtype=torch.uint8)
    out = torch.empty(n)
    good = _pk()
    cases = [
        (lambda: bc.modular_decode(packed, n, ones, cfg, 0, good, 2, out), ValueError, "blocks_per_chunk"),
        (lambda: bc.modular_decode(packed, n, ones, cfg, -1, good, 2, out), ValueError, "blocks_per_chunk"),
        (lambda: bc.modular_decode(packed, n, ones[:1], cfg, 1, good, 2, out), ValueError, "scales must have"),
        (lambda: bc.modular_decode(packed, n, ones * 0, cfg, 1, good, 2, out), ValueError, "scales must be finite"),
        (lambda: bc.modular_decode(packed, n, ones * float("nan"), cfg, 1, good, 2, out), ValueError, "finite"),
        (lambda: bc.modular_decode(packed, n, ones, cfg, 1, good, 0, out), ValueError, "world_size"),
        (lambda: bc.modular_decode(packed, n, ones, cfg, 1, good, -3, out), ValueError, "world_size"),
        (lambda: bc.modular_decode(packed, n, ones, cfg, 1, good, 2.5, out), TypeError, "world_size"),
        (lambda: bc.modular_decode(packed.to(META), n, ones, cfg, 1, good, 2, out), TypeError, "packed must be a CPU"),
        (lambda: bc.modular_decode(packed, n, ones, cfg, 1, _pk("bogus"), 2, out), ValueError, "packing"),
        (lambda: bc.modular_decode(packed, n, ones, "cfg", 1, good, 2, out), TypeError, "config"),
        (lambda: bc.modular_encode(x, ones, cfg, 0, good), ValueError, "blocks_per_chunk"),
        (lambda: bc.modular_encode(x, ones, cfg, 1.5, good), TypeError, "blocks_per_chunk"),
        (lambda: bc.modular_encode(x, ones * 0, cfg, 1, good), ValueError, "scales must be finite"),
        (lambda: bc.modular_encode(x, -ones, cfg, 1, good), ValueError, "scales must be finite"),
        (lambda: bc.modular_encode(x, ones[:3], cfg, 1, good), ValueError, "scales must have"),
        (lambda: bc.modular_encode(x, ones, cfg, 1, _pk("bogus")), ValueError, "packing"),
        (lambda: bc.modular_encode(x, ones, cfg, 1, _pk("int64", 1, 1000)), ValueError, "packing"),
        (lambda: bc.modular_encode(x, ones, cfg, 1, _pk("int64", 70, 1)), ValueError, "packing.width"),
        (lambda: bc.modular_encode(x, ones, cfg, 1, _pk("int64", 0, 5)), ValueError, "packing.width"),
        (lambda: bc.modular_encode(x, ones, cfg, 1, _pk("int64", 2, 5)), ValueError, "packing"),  # < 4 bits
        (lambda: bc.modular_encode(x, ones, cfg, 1, _pk("int64", 8, 10**9)), ValueError, "packing.fields"),
        (lambda: bc.modular_encode(x, ones, _cfg("D4", 3, 2, 7), 1, _pk("uint8")), ValueError, "divide 256"),
        (lambda: bc.modular_norms(x, 0, 1), ValueError, "^d must be"),
        (lambda: bc.modular_norms(x, -4, 1), ValueError, "^d must be"),
        (lambda: bc.modular_norms(x, 2**40, 1), ValueError, "^d must be"),
        (lambda: bc.modular_norms(x, 4, 1.5), TypeError, "blocks_per_chunk"),
        (lambda: bc.modular_norms(x, 4, 0), ValueError, "blocks_per_chunk"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    # the accepted calls still agree with each other: encode then decode of one rank is the lattice point
    codes = bc.modular_encode(x, ones, cfg, 1, good)
    bc.modular_decode(codes, n, ones, cfg, 1, good, 1, out)
    assert bool(torch.isfinite(out).all())


def test_cuda_hostile_bucket_codec_allgather_arguments():
    cfg = _cfg("D4", 4, 2, 7)
    n = 40
    nbytes = bc.allgather_nbytes(n, cfg)
    p = torch.empty(nbytes, dtype=torch.uint8)
    bc.allgather_encode(torch.randn(n), cfg, p)
    out = torch.empty(n)
    cases = [
        (lambda: bc.allgather_nbytes(-5, cfg), ValueError, "^n must be"),  # was: 8 bytes
        (lambda: bc.allgather_nbytes(5.0, cfg), TypeError, "^n must be"),
        (lambda: bc.allgather_nbytes(5, "cfg"), TypeError, "config"),  # was: AttributeError
        (lambda: bc.allgather_nbytes(4 << 25, cfg), ValueError, "too large"),
        (lambda: bc.allgather_decode(p.view(1, -1), n, cfg, out, own=0.5), TypeError, "own"),
        (lambda: bc.allgather_decode(p.view(1, -1), n, cfg, out, own=1), ValueError, "own"),
        (lambda: bc.allgather_decode(p.view(1, -1), n, cfg, out, own=-2), ValueError, "own"),
        # no payload at all: was "success" with ``out`` left uninitialized
        (lambda: bc.allgather_decode(p[:0].view(0, nbytes), n, cfg, out), ValueError, "W >= 1"),
        (lambda: bc.allgather_decode(p.view(1, -1).to(META), n, cfg, out), TypeError, "CPU"),
        (lambda: bc.allgather_decode(p.view(1, -1), -1, cfg, out), ValueError, "^n must be"),
        (lambda: bc.allgather_encode(torch.randn(n)[::2], cfg, p), TypeError, "contiguous"),
        (lambda: bc.allgather_encode(torch.randn(n).to(META), cfg, p), TypeError, "CPU"),
        (lambda: bc.allgather_encode(torch.randn(n), cfg, p[:-1]), ValueError, "payload"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    # an expanded (stride-0) payloads tensor is made dense: W copies of one payload average to that payload
    out1, out3 = torch.empty(n), torch.empty(n)
    assert bc.allgather_decode(p.view(1, -1), n, cfg, out1) == 0
    assert bc.allgather_decode(p.view(1, -1).expand(3, -1), n, cfg, out3) == 0
    assert torch.equal(out1, out3)


# ------------------------------------------------------------------------------------------------- lut_gemv
@FUZZ
@given(
    name=st.sampled_from(["D4", "E8"]),
    M=st.integers(1, 3),
    n=st.integers(0, 12),
    K=st.integers(1, 5),
    B=st.integers(0, 10),
    how=st.sampled_from(["expand", "strided", "transpose", "flip"]),
    method=st.sampled_from(["auto", "tables"]),
    seed=st.integers(0, 2**16),
)
def test_cuda_hostile_lut_gemv_layouts(name, M, n, K, B, how, method, seed):
    """Regression: CodedWeight kept non-contiguous idx/T views and the kernels read them as dense arrays (wrong
    scores; an expanded view was read past the end of its storage). Now any layout gives the dense result."""
    cfg = _cfg(name, 4 if name == "D4" else 2, M, 3)
    if method == "tables" and (cfg.center or M > 1):
        method = "auto"
    g = torch.Generator().manual_seed(seed)
    k = K * cfg.dim
    dense = CodedWeight.from_dense(torch.randn(max(n, 1), k, generator=g), cfg)
    idx, T = dense.idx[:n], dense.T[:n]
    if how == "expand":
        idx, T = idx[:1].expand(n * 4, -1, -1) if n else idx, T[:1].expand(n * 4, -1) if n else T
    else:
        idx, T = _layout(idx, how), _layout(T, how)
    w = CodedWeight(idx=idx, T=T, config=cfg, k=k)
    ref = CodedWeight(idx=idx.contiguous(), T=T.contiguous(), config=cfg, k=k)
    x = _layout(torch.randn(B, k, generator=g), how)
    y = lut_gemv(x, w, method=method)
    assert y.shape == (B, w.n) and y.dtype == torch.float32
    assert torch.equal(y, lut_gemv(x.contiguous(), ref, method=method))
    if B and w.n:
        exact = x.double() @ w.dequantize().double().T
        tol = 1e-4 * (x.double().abs() @ w.dequantize().double().abs().T) + 1e-6
        assert bool(((y.double() - exact).abs() <= tol).all())


def test_cuda_hostile_lut_gemv_arguments():
    cfg = _cfg("D4", 4, 2, 3)
    w = CodedWeight.from_dense(torch.randn(4, 8), cfg)
    with pytest.raises(ValueError, match="CPU or CUDA"):  # was: RuntimeError from .item() on meta
        CodedWeight(idx=w.idx.to(META), T=w.T.to(META), config=cfg, k=8)
    with pytest.raises(ValueError, match="float32"):  # finite float64 beyond float32: was NaN scores
        lut_gemv(torch.full((1, 8), 1e300, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="NaN"):
        lut_gemv(torch.full((1, 8), float("nan")), w)
    with pytest.raises(TypeError, match="floating"):
        lut_gemv(torch.ones(1, 8, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="shape"):
        lut_gemv(torch.ones(2, 3, 8), w)
    with pytest.raises(ValueError, match="idx entries"):
        CodedWeight(idx=torch.full((1, 2, 2), 255, dtype=torch.uint8), T=torch.zeros(1, 2, dtype=torch.uint8),
                    config=_cfg("D4", 3, 2, 3), k=8)  # fmt: skip


# ------------------------------------------------------------------------------------------- lut_one_sided (CPU)
@FUZZ
@given(
    n=st.integers(0, 9),
    K=st.integers(0, 4),
    M=st.integers(0, 3),
    m=st.integers(0, 11),
    q=st.integers(2, 5),
    Q=st.integers(1, 20),
    how=st.sampled_from(["plain", "strided", "transpose", "flip"]),
    bad=st.sampled_from([None, "neg", "high"]),
    seed=st.integers(0, 2**16),
)
def test_cuda_hostile_lut_one_sided_cpu(n, K, M, m, q, Q, how, bad, seed):
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, Q, (n, K, M), generator=g, dtype=torch.int32)
    if bad and ix.numel():
        ix.view(-1)[0] = -1 if bad == "neg" else Q
    sx = torch.rand(n, K, generator=g)
    tab = torch.randn(m, K, Q, generator=g)
    ixl, sxl, tabl = _layout(ix, how), _layout(sx, how), _layout(tab, how)
    try:
        out = _ops.lut_one_sided(ixl, sxl, tabl, q)
    except Exception as e:  # noqa: BLE001 - the property under test
        documented(e)
        assert bad and ix.numel()
        return
    assert not (bad and ix.numel())
    assert out.shape == (n, m) and out.dtype == torch.float32
    assert torch.equal(out, _ops.lut_one_sided(ix, sx, tab, q))  # the layout does not matter
    w = torch.tensor([float(q**i) for i in range(M)], dtype=torch.float64)
    t64 = tab.double()
    ref = torch.zeros(n, m, dtype=torch.float64)
    for k in range(K):
        v = (t64[:, k, :][:, ix[:, k, :].long()] * w).sum(-1)  # (m, n)
        ref += sx[:, k, None].double() * v.T
    tol = 1e-4 * (1 + ref.abs())
    assert bool(((out.double() - ref).abs() <= tol).all())


# ------------------------------------------------------------------------------------------------- add_modq
@FUZZ
@given(shape=st.lists(st.integers(0, 5), max_size=3), q=st.integers(0, 18), how=st.sampled_from(["plain", "expand"]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_cuda_hostile_add_modq(shape, q, how, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 16, shape, generator=g).to(torch.uint8)
    b = torch.randint(0, 16, shape, generator=g).to(torch.uint8)
    if how == "expand" and a.ndim:
        a = a[..., :1].expand_as(b) if b.shape[-1] else a
    try:
        out = _ops.add_modq(a, b, q)
    except Exception as e:  # noqa: BLE001
        documented(e)
        assert not 2 <= q <= 16 or (a.numel() and (int(a.max()) >= q or int(b.max()) >= q))
        return
    assert out.dtype == torch.uint8 and torch.equal(out.long(), (a.long() + b.long()) % q)


# ------------------------------------------------------------------------------------------------------ kv
def _kv_args(BH=2, L=3, K=2, M=2, n=3, t_bits=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (BH, L, K, M), generator=g).to(torch.uint8)
    t = torch.randint(0, 256, (BH, L, -(-K * t_bits // 8)), generator=g).to(torch.uint8)
    rho = torch.rand(BH, L, generator=g)
    steps = torch.rand(2**t_bits, generator=g)
    tab = torch.randn(BH, K, 256, n, generator=g)
    cy = torch.randn(BH, K, n, generator=g)
    p = torch.rand(BH, n, L, generator=g)
    a, c = torch.randn(256, 8, generator=g), torch.randn(8, generator=g)
    return idx, t, rho, steps, t_bits, tab, cy, p, a, c


def test_cuda_hostile_kv_arguments():
    """Regression: a ``t`` tensor on a device the kernel cannot read was dereferenced (segfault)."""
    idx, t, rho, steps, tb, tab, cy, p, a, c = _kv_args()
    cases = [
        (lambda: kv.kv_scores(idx, t.to(META), rho, steps, tb, tab, cy), ValueError, "^t must be a CPU"),
        (lambda: kv.kv_values(idx, t.to(META), rho, steps, tb, p, a, c), ValueError, "^t must be a CPU"),
        (lambda: kv.kv_scores(idx, t, rho, steps, 2.0, tab, cy), ValueError, "t_bits"),
        (lambda: kv.kv_scores(idx, t, rho, steps, True, tab, cy), ValueError, "t_bits"),
        (lambda: kv.kv_scores(idx, t, rho, steps, tb, tab.to(torch.complex64), cy), TypeError, "tab must be a real"),
        (lambda: kv.kv_scores(idx.to(META), t, rho, steps, tb, tab, cy), ValueError, "idx"),
        (lambda: kv.kv_scores(idx, t, rho.to(META), steps, tb, tab, cy), ValueError, "rho"),
        (lambda: kv.kv_scores(idx, t, rho, steps, tb, tab[..., :1, :], cy), ValueError, "tab"),
        (lambda: kv.kv_values(idx, t, rho, steps, tb, p[:, :, :1], a, c), ValueError, "p must have"),
        (lambda: kv.kv_values(idx[..., :0], t, rho, steps, tb, p, a, c), ValueError, "M <= 4"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


@FUZZ
@given(
    BH=st.integers(0, 3),
    L=st.integers(0, 5),
    K=st.integers(1, 4),
    M=st.integers(1, 4),
    n=st.integers(0, 4),
    t_bits=st.sampled_from([0, 1, 2, 4]),
    how=st.sampled_from(["strided", "transpose", "flip"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_cuda_hostile_kv_layouts_do_not_change_results(BH, L, K, M, n, t_bits, how, dtype, seed):
    idx, t, rho, steps, tb, tab, cy, p, a, c = _kv_args(BH, L, K, M, n, t_bits, seed)
    s = kv.kv_scores(idx, t, rho, steps, tb, tab, cy)
    v = kv.kv_values(idx, t, rho, steps, tb, p, a, c)
    assert s.shape == (BH, n, L) and v.shape == (BH, n, K * 8)
    assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(v).all())
    lay = [_layout(u, how) for u in (idx, t, rho, steps)]
    assert torch.equal(s, kv.kv_scores(*lay, tb, _layout(tab, how), _layout(cy, how)))
    assert torch.equal(v, kv.kv_values(*lay, tb, _layout(p, how), _layout(a, how), _layout(c, how)))
    # other real dtypes are converted to float32 first: the same as converting them by hand
    conv = [u.to(dtype) for u in (tab, cy)]
    assert torch.equal(
        kv.kv_scores(idx, t, rho.to(dtype), steps, tb, *conv),
        kv.kv_scores(idx, t, rho.to(dtype).float(), steps, tb, *[u.float() for u in conv]),
    )
