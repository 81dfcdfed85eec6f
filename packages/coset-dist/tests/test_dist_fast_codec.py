"""The native bucket codec (served by coset-cuda through coset.quant's backend registry) against the Python
codec of coset.dist: bit for bit.

Skipped when no backend serves the op "bucket_codec" (coset-dist does not depend on coset-cuda; the hook then
takes the Python path, which the other tests cover).
"""

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from coset.dist import HNLQHookState, default_config, hnlq_hook
from coset.dist.codec import (
    choose_sum_packing,
    chunk_block_norms,
    decode_payload,
    encode_payload,
    modular_decode,
    modular_encode,
    modular_scales,
    pack_sum_fields,
    payload_layout,
    unpack_sum_fields,
)
from coset.dist.fast_codec import native_available, native_codec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_bucket import FakeBucket  # noqa: E402

bc = native_codec(default_config())
if bc is None:
    pytest.skip("no backend serves the bucket codec (coset-cuda is not installed)", allow_module_level=True)

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


def test_codec_comes_from_the_registry_not_an_import():
    """coset.dist finds the codec through coset.quant's backend registry and never names coset.cuda."""
    from coset.quant.backend import select_backend

    cfg = default_config()
    be = select_backend("auto", "bucket_codec", torch.zeros(3), cfg.lattice, cfg)
    assert be is not None and be.bucket_codec() is bc
    assert select_backend("auto", "bucket_codec", torch.zeros(3, dtype=torch.float64), cfg.lattice, cfg) is None
    assert native_codec(cfg.replace(with_dither=True)) is None  # random dither: Python path
    import coset.dist as pkg

    src = os.path.dirname(pkg.__file__)
    for name in os.listdir(src):
        if name.endswith(".py"):
            with open(os.path.join(src, name)) as f:
                assert "coset.cuda" not in f.read(), name


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 7, 4096, 10_003])
def test_allgather_payload_bit_exact(name, n):
    cfg = CONFIGS[name]
    x = grad(n, n)
    ref, info = encode_payload(x, cfg)
    out = torch.empty(payload_layout(n, cfg).nbytes, dtype=torch.uint8)
    st = bc.allgather_encode(x, cfg, out)
    assert torch.equal(out, ref)  # labels, T coding, rho and code word: the same bytes
    assert st["rho"] == info["rho"]
    assert st["overloaded"] == int((info["T"] > 0).sum())
    assert st["clamped"] == int(info["clamped"].sum())
    if name.endswith("cap1") and n > 1000:
        assert st["clamped"] > 0  # the clamp branch was exercised


@pytest.mark.parametrize("scale,coding", [(1e-3, "sparse"), (None, "zero"), (0.0, "dense")])
def test_allgather_every_t_coding_bit_exact(scale, coding):
    """The three T codings of pack_codes: zero (T all 0), sparse (few T > 0), dense (many T > 0)."""
    n = 8_191
    if scale is None:  # a flat bucket: every block at its RMS, no overload
        x = torch.full((n,), 0.25)
        x[1::2] = -0.25
    elif scale == 0.0:  # a short ramp with a large beta/overload mix: most blocks need T > 0
        x = grad(n, 5, 1.0)
    else:
        x = grad(n, 3, scale)
    cfg = default_config(4, 2)
    if coding == "dense":
        cfg = cfg.replace(beta=cfg.beta / 8)
    ref, info = encode_payload(x, cfg)
    word = int(ref[-4:].view(torch.int32))
    assert ("zero", "dense", "sparse")[(word >> 1) & 3] == coding
    out = torch.empty_like(ref)
    bc.allgather_encode(x, cfg, out)
    assert torch.equal(out, ref)
    dst = torch.empty(n)
    assert bc.allgather_decode(out.unsqueeze(0), n, cfg, dst) == 0
    assert torch.equal(dst, decode_payload(ref, n, cfg)[0].to(torch.float32))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_allgather_decode_and_residual_bit_exact(name):
    cfg, n, W = CONFIGS[name], 5_001, 3
    xs = [grad(n, 10 + r) for r in range(W)]
    pays = torch.stack([encode_payload(x, cfg)[0] for x in xs])
    decs = [decode_payload(pays[r], n, cfg)[0] for r in range(W)]
    total = torch.zeros(n, dtype=torch.float64)
    for dcd in decs:
        total += dcd  # rank order, as the hook's Python path
    out = torch.empty(n)
    resid = xs[1].clone()  # holds x + old residual after encode
    assert bc.allgather_decode(pays, n, cfg, out, own=1, resid=resid) == 0
    assert torch.equal(out, (total / W).to(torch.float32))
    assert torch.equal(resid, xs[1] - decs[1].to(torch.float32))


def test_allgather_encode_fuses_error_feedback():
    cfg, n = CONFIGS["D4q4M2"], 999
    x, r = grad(n, 1), grad(n, 2, 1e-4)
    ref, _ = encode_payload(x + r, cfg)
    resid = r.clone()
    out = torch.empty(payload_layout(n, cfg).nbytes, dtype=torch.uint8)
    bc.allgather_encode(x, cfg, out, resid=resid)
    assert torch.equal(resid, x + r)  # float32 add, as torch does it
    assert torch.equal(out, ref)  # the payload of the corrected gradient


def test_allgather_nonfinite_flag_and_damaged_payload():
    cfg, n = CONFIGS["D4q3M3"], 64
    x = grad(n, 3)
    x[5] = float("nan")
    out = torch.empty(payload_layout(n, cfg).nbytes, dtype=torch.uint8)
    assert bc.allgather_encode(x, cfg, out)["nonfinite"]
    ref, _ = encode_payload(x, cfg)
    assert torch.equal(out, ref)
    dst = torch.full((n,), 7.0)
    assert bc.allgather_decode(out.unsqueeze(0), n, cfg, dst) == 1
    assert torch.equal(dst, torch.full((n,), 7.0))  # untouched
    good, _ = encode_payload(grad(n, 4), cfg)
    bad = good.clone()
    bad[0] = 0xFF  # 2-bit labels of q=3: 3 is out of range
    for p in (bad, torch.cat([good[:-8], torch.tensor([0, 0, 0x80, 0xFF], dtype=torch.uint8), good[-4:]])):
        with pytest.raises(ValueError):
            decode_payload(p, n, cfg)  # the Python codec refuses it too
        with pytest.raises(ValueError, match="damaged"):
            bc.allgather_decode(p.unsqueeze(0), n, cfg, dst)
        assert torch.equal(dst, torch.full((n,), 7.0))  # nothing written
    with pytest.raises(ValueError, match="bytes"):
        bc.allgather_decode(good[:-1].unsqueeze(0), n, cfg, dst)
    with pytest.raises(TypeError):
        bc.allgather_encode(x.double(), cfg, out)


@pytest.mark.parametrize(
    "q,chunk,W,lattice",
    [(4, 64, 2, "D4"), (8, 256, 2, "D4"), (16, 256, 2, "D4"), (4, 64, 3, "D4"), (16, 128, 5, "D4")]
    + [(4, 64, 2, "E8"), (8, 256, 3, "E8"), (3, 96, 2, "D4"), (4, 64, 2, "D8")],
)
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("f32_scales", [True, False])
def test_modular_bit_exact(q, chunk, W, lattice, fast, f32_scales):
    """Native modular encode / decode equal the Python codec bit for bit, on the float32 + integer path (D4, D8,
    E8 with q^M a power of two; blocks it cannot certify fall back to float64) and on the float64 kernels, with
    the float32-valued scales of modular_scales (products in float32) and with scales that are not float32."""
    native = importlib.import_module("coset.cuda._C")  # only to switch its fast path off (test only)
    native.set_fast_path(fast)
    try:
        _modular_bit_exact(q, chunk, W, lattice, f32_scales)
    finally:
        native.set_fast_path(True)


def _modular_bit_exact(q, chunk, W, lattice, f32_scales=True):
    cfg = default_config(q, 2, lattice)
    lat, d, m, n = cfg.lattice, cfg.dim, q**2, 10_001
    bpc = chunk // d
    nb = -(-n // d)
    xs = [grad(n, 20 + r) for r in range(W)]
    norms = [bc.modular_norms(x, d, bpc)[0] for x in xs]
    for x, nr in zip(xs, norms, strict=False):
        assert torch.allclose(nr, chunk_block_norms(x, d, bpc), rtol=1e-15, atol=0)
    scales = modular_scales(sum(norms), lat, q, 2, W, False)
    assert torch.equal(scales.float().double(), scales)  # float32 values
    if not f32_scales:  # 2^-40 larger (the guarantee holds): the kernels' float64 products
        scales = scales * (1 + 2.0**-40)
        assert not torch.equal(scales.float().double(), scales)
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


def test_modular_kernels_reject_a_modulus_beyond_int32_codes():
    """The kernels keep codes in int32: a modulus other than a config's q^M <= 2^16 is a clear ValueError."""
    native = importlib.import_module("coset.cuda._C")
    for call in (native.bucket_modular_encode, native.bucket_modular_decode):
        with pytest.raises(ValueError, match="modulus"):
            call(1, 4, None, None, None, 1 << 20, *([0] * 9))


def test_native_bindings_reject_counts_that_would_divide_by_zero():
    """The bindings themselves (not only the Python wrappers) refuse blocks_per_chunk < 1 and W < 1: the kernels
    divide by both (a SIGFPE that killed the process)."""
    native = importlib.import_module("coset.cuda._C")
    with pytest.raises(ValueError, match="blocks_per_chunk"):
        native.bucket_modular_norms(0, 0, 4, 4, 0, 0)
    enc = (1, 4, None, None, None, 16, 0, 0, 4, 0, 0, 0, 2, 1, 0)
    with pytest.raises(ValueError, match="blocks_per_chunk"):
        native.bucket_modular_encode(*enc)
    dec = [1, 4, None, None, None, 16, 0, 4, 0, 1, 0, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="blocks_per_chunk"):
        native.bucket_modular_decode(*dec[:9], 0, *dec[10:])
    with pytest.raises(ValueError, match="W must be"):
        native.bucket_modular_decode(*dec)
    with pytest.raises(ValueError, match="n must be"):
        native.bucket_modular_decode(*dec[:7], -1, *dec[8:])


@pytest.mark.parametrize("d", [4, 8])
@pytest.mark.parametrize("bpc", [1, 3, 16])
@pytest.mark.parametrize("n", [1, 7, 1001, 4099])
def test_modular_norms_exact(d, bpc, n):
    """Chunk norms equal sqrt(max_blocks sum_i x_i^2) with the float64 sum in coordinate order (the vector loop
    takes two blocks at a time), resid becomes x + resid exactly, and NaN / Inf anywhere raise the flag."""
    x, r = grad(n, 30), grad(n, 31)
    xe = x + r
    v = xe.tolist() + [0.0] * (-n % d)  # Python floats: IEEE float64, one rounding per operation
    sums = []
    for b in range(len(v) // d):
        acc = 0.0
        for t in v[b * d : (b + 1) * d]:
            acc = acc + t * t
        sums.append(acc)
    want = torch.tensor([math.sqrt(max(sums[c : c + bpc])) for c in range(0, len(sums), bpc)], dtype=torch.float64)
    resid = r.clone()
    got, bad = bc.modular_norms(x, d, bpc, resid=resid)
    assert not bad
    assert torch.equal(got, want)
    assert torch.equal(resid, xe)
    for v in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[n // 2] = v
        assert bc.modular_norms(y, d, bpc)[1]


@pytest.mark.parametrize("lattice,q", [("D4", 4), ("E8", 4), ("D8", 8)])
def test_modular_ties_and_arbitrary_codes_bit_exact(lattice, q):
    """Inputs on decision boundaries (every coordinate a multiple of s/4: rounding ties, D_n parity ties, E8's
    equal-distance cosets) and uniformly random summed codes (any point of the coset table, far from the sums of
    real gradients): the float32 + integer path must certify or hand over, never decide a tie differently."""
    cfg = default_config(q, 2, lattice)
    lat, d, m = cfg.lattice, cfg.dim, q**2
    bpc, nb = 4, 4096
    n = nb * d - 1  # a zero-padded last block too
    g = torch.Generator().manual_seed(7)
    scales = torch.tensor([0.5, 0.25, 1.0, 2.0**-9, 3.0, 1e-3] * (nb // bpc // 6 + 1), dtype=torch.float64)
    scales = scales[: -(-nb // bpc)]
    s_blocks = scales.repeat_interleave(bpc)[:nb].unsqueeze(-1)
    k = torch.randint(-12, 13, (nb, d), generator=g).double()
    x = (k / 4 * s_blocks).reshape(-1)[:n].to(torch.float32)
    pk = choose_sum_packing(m, 1, "auto")
    codes, lam = modular_encode(x, scales, lat, m, bpc, None, True)
    resid = x.clone()
    assert torch.equal(bc.modular_encode(x, scales, cfg, bpc, pk, resid=resid), pack_sum_fields(codes, pk))
    assert torch.equal(resid, x - (lam * s_blocks).reshape(-1)[:n].to(torch.float32))
    c = torch.randint(0, m, (nb * d,), generator=g)
    for W in (1, 2, 3):
        out = torch.empty(n)
        bc.modular_decode(pack_sum_fields(c, pk), n, scales, cfg, bpc, pk, W, out)
        ref = (modular_decode(c, lat, m, True) * s_blocks).reshape(-1)[:n] / W
        assert torch.equal(out, ref.to(torch.float32))


@pytest.mark.parametrize(
    "mode,kw", [("allgather", {}), ("modular", {"chunk_size": 64}), ("modular", {"chunk_size": 256})]
)
def test_hook_native_equals_python(one_rank_group, mode, kw):
    """The hook's two paths give identical buckets, residuals and byte counts, step after step."""
    states = {}
    for native in (True, False):
        st = HNLQHookState(config=default_config(4, 2), mode=mode, start_iter=2, **kw)
        st.native = native
        outs = []
        for step in range(5):
            buf = grad(3001, 100 + step)
            outs.append(hnlq_hook(st, FakeBucket(buf)).wait().clone())
        states[native] = (st, outs)
    (sn, on), (sp, op) = states[True], states[False]
    assert sn.native_buckets == 3 and getattr(sp, "native_buckets", 0) == 0
    for a, b in zip(on, op, strict=False):
        assert torch.equal(a, b)
    assert torch.equal(sn.residuals[0], sp.residuals[0])
    assert sn.stats()["bytes_sent"] == sp.stats()["bytes_sent"]
    assert sn.stats()["blocks_overloaded"] == sp.stats()["blocks_overloaded"]
