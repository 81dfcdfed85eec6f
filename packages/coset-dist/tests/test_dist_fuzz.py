"""Hostile-input fuzz of coset.dist: the hook state (constructor, state dicts, pickling), the hook itself on a
one-process gloo group (random buckets: dtypes, sizes, magnitudes up to float32's limit, NaN/Inf, bad buffers),
and the codec functions of coset.dist.codec (and the native bucket codec when a backend serves it). Every call
raises a documented TypeError/ValueError with a message, or returns a result with the package's invariants:
finite averages of finite buckets, the Python and native paths equal bit for bit, exact round trips."""

import math
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    ring_allreduce_bytes,
    unpack_sum_fields,
)
from coset.dist.fast_codec import native_codec
from coset.quant import QuantizationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_bucket import FakeBucket  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
BC = native_codec(default_config())  # the native bucket codec, or None without coset-cuda


def _documented(e: BaseException) -> None:
    assert isinstance(e, (TypeError, ValueError)), f"undocumented {type(e).__name__}: {e}"
    assert str(e), "an error without a message"


# --------------------------------------------------------------------------------------------------- the state
_any = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.just(2**70), st.just(1.5), st.just("x"))


@st.composite
def _state_kwargs(draw):
    kw = {}
    if draw(st.booleans()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kw["config"] = default_config(
                    draw(st.integers(2, 16)), draw(st.integers(1, 4)), draw(st.sampled_from(["D4", "E8", "Z2"]))
                ).replace(
                    overload_policy=draw(st.sampled_from(["clamp", "clamp", "error"])),
                    beta=draw(st.sampled_from([None, 0.3, 1.0])) or default_config().beta,
                    center=draw(st.booleans()),
                )
        except (TypeError, ValueError) as e:
            _documented(e)
    for name, strat in (
        ("mode", st.sampled_from(["allgather", "modular", "decode", "bogus", 3])),
        ("error_feedback", st.one_of(st.booleans(), st.just(1))),
        ("start_iter", _any),
        ("chunk_size", _any),
        ("code_packing", st.sampled_from(["auto", "uint8", "int64", "int32", None])),
        ("nonfinite", st.sampled_from(["raise", "allreduce", "ignore"])),
        ("seed", _any),
        ("process_group", st.sampled_from([None, "group", 0])),
    ):
        if draw(st.booleans()):
            kw[name] = draw(strat)
    return kw


@FUZZ
@given(kw=_state_kwargs())
def test_dist_fuzz_state_constructor_and_checkpoint_round_trip(kw):
    try:
        s = HNLQHookState(**kw)
    except Exception as e:  # noqa: BLE001 - the property under test
        _documented(e)
        return
    for k, v in kw.items():
        if k != "process_group":
            assert getattr(s, k) == v
    s.residuals = {3: torch.randn(5), -1: torch.zeros(0)}
    s.iter = 7
    s2 = pickle.loads(pickle.dumps(s))
    t = HNLQHookState()
    t.load_state_dict(s.state_dict())
    for u in (s2, t):
        assert u.config == s.config and u.mode == s.mode and u.iter == 7 and u.chunk_size == s.chunk_size
        assert sorted(u.residuals) == [-1, 3] and torch.equal(u.residuals[3], s.residuals[3])


@FUZZ
@given(
    key=st.sampled_from(["config", "mode", "iter", "residuals", "bucket_scales", "counters", "chunk_size", "seed"]),
    val=st.one_of(
        _any,
        st.just({}),
        st.just({"q": -1}),
        st.just({"a": torch.zeros(3)}),
        st.just({0: torch.tensor([1.0, float("inf")])}),
        st.just({0: torch.zeros(2, 2)}),
        st.just({0: torch.zeros(3, dtype=torch.float64)}),
        st.just({"2": torch.zeros(3)}),
        st.just({1.5: torch.zeros(3)}),
        st.just({"bytes_sent": -1}),
        st.just({"bytes_sent": 5}),
        st.just({"blocks": 1.0}),
        st.just([torch.zeros(3)]),
    ),
    drop=st.booleans(),
)
def test_dist_fuzz_load_corrupted_state_dict(key, val, drop):
    sd = HNLQHookState(mode="modular").state_dict()
    if drop:
        sd.pop(key, None)
    else:
        sd[key] = val
    s = HNLQHookState()
    try:
        s.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    # accepted: a state the hook can run with
    assert isinstance(s.config, QuantizationConfig) and s.mode in ("allgather", "modular", "decode")
    assert isinstance(s.iter, int) and s.iter >= 0
    for k, r in s.residuals.items():
        assert isinstance(k, int) and r.ndim == 1 and r.dtype == torch.float32 and bool(torch.isfinite(r).all())
    assert all(isinstance(v, int) and v >= 0 for v in s.stats().values() if isinstance(v, int))


def test_dist_fuzz_state_dict_keys_are_named():
    sd = HNLQHookState().state_dict()
    for key, bad, exc, match in (
        ("config", "x", TypeError, "'config' must be a dict"),  # was: "argument after ** must be a mapping"
        ("residuals", {"a": torch.zeros(3)}, TypeError, "'residuals' keys"),  # was: "invalid literal for int()"
        ("bucket_scales", {1.5: torch.zeros(3)}, TypeError, "'bucket_scales' keys"),
    ):
        d = dict(sd)
        d[key] = bad
        with pytest.raises(exc, match=match):
            HNLQHookState().load_state_dict(d)


# ---------------------------------------------------------------------------------------------------- the hook
def _run(buf, native, **kw):
    st_ = HNLQHookState(start_iter=2, **kw)
    st_.native, st_.iter = native, 2  # past the warm-up
    out = buf.clone()
    try:
        res = hnlq_hook(st_, FakeBucket(out)).wait()
    except RuntimeError as e:  # a failed future re-raises the callback's ValueError inside a RuntimeError
        assert "ValueError: hnlq_hook: gradient bucket 0 holds NaN/Inf" in str(e)
        return "nonfinite", st_
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return "refused", st_
    assert res is out
    return res, st_


@FUZZ
@given(
    mode=st.sampled_from(["allgather", "modular", "decode"]),
    n=st.integers(0, 300),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    log_mag=st.floats(-44, 38.4),
    special=st.sampled_from([None, None, "nan", "inf", "fmax"]),
    ef=st.booleans(),
    nonfinite=st.sampled_from(["raise", "allreduce"]),
    q=st.sampled_from([2, 4, 16]),
    chunk=st.sampled_from([None, 8, 256]),
    seed=st.integers(0, 2**16),
)
def test_dist_fuzz_hook_one_rank(one_rank_group, mode, n, dtype, log_mag, special, ef, nonfinite, q, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 10.0**log_mag).clamp(-3.4e38, 3.4e38)
    if special and n:
        x[int(torch.randint(0, n, (1,), generator=g))] = {"nan": math.nan, "inf": -math.inf, "fmax": 3.4e38}[special]
    buf = x.to(dtype)
    kw = dict(mode=mode, error_feedback=ef, nonfinite=nonfinite, chunk_size=chunk, config=default_config(q, 2))
    outs = [_run(buf, native, **kw) for native in (True, False)]
    finite = bool(torch.isfinite(buf.float()).all())  # the wire precision is float32
    for res, s in outs:
        if not finite:
            if nonfinite == "raise" and n:
                assert res == "nonfinite"
            else:  # a plain all-reduce over one rank: the bucket itself, NaN/Inf in place
                assert torch.equal(res.isnan(), buf.isnan()) and torch.equal(res[~buf.isnan()], buf[~buf.isnan()])
            continue
        assert not isinstance(res, str), res
        assert res.dtype == buf.dtype and res.shape == buf.shape
        assert bool(torch.isfinite(res.float()).all()), "a finite bucket was averaged to NaN/Inf"
        for r in s.residuals.values():
            assert bool(torch.isfinite(r).all())
    (rn, sn), (rp, sp) = outs
    if isinstance(rn, torch.Tensor):
        assert torch.equal(rn.isnan(), rp.isnan()) and torch.equal(rn[~rn.isnan()], rp[~rp.isnan()])
        assert sorted(sn.residuals) == sorted(sp.residuals)
        for k in sn.residuals:
            assert torch.equal(sn.residuals[k], sp.residuals[k])
        assert sn.stats()["bytes_sent"] == sp.stats()["bytes_sent"]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("q,M", [(4, 2), (2, 1), (2, 2)])
def test_dist_modular_scales_beyond_float32_fall_back_to_a_plain_allreduce(one_rank_group, native, q, M):
    """Regression: finite gradients whose block norms overflow the float32 header (|x| ~ 3e38) got an infinite
    shared scale and decoded to NaN (0 * inf) on both paths; now the bucket takes a plain all-reduce (exact)."""
    buf = torch.tensor([3e38, 3e38, 3e38, 3e38, 1.0, 2.0, 3.0, 4.0, 1e38, -1e38, 0.0, 5.0])
    s = HNLQHookState(config=default_config(q, M), mode="modular", start_iter=2, chunk_size=None)
    s.native, s.iter = native, 2
    s.residuals[0] = torch.ones(12)
    out = hnlq_hook(s, FakeBucket(buf.clone())).wait()
    assert torch.equal(out, buf)  # one rank: the average is the bucket
    st_ = s.stats()
    assert st_["buckets_uncompressed"] == 1 and st_["buckets_compressed"] == 0 and 0 not in s.residuals
    # a bucket whose norms fit float32 is still compressed, and decodes finite
    s2 = HNLQHookState(config=default_config(q, M), mode="modular", start_iter=2)
    s2.native, s2.iter = native, 2
    out = hnlq_hook(s2, FakeBucket(buf / 10)).wait()
    assert bool(torch.isfinite(out).all()) and s2.stats()["buckets_compressed"] == 1


def test_dist_hook_refuses_bad_buckets_and_states(one_rank_group):
    s = HNLQHookState(start_iter=0, error_feedback=False)
    for buf, match in (
        (torch.arange(8, dtype=torch.int32), "1-D floating"),  # was: integer gradients quantized silently
        (torch.randn(2, 4), "1-D floating"),  # was: RuntimeError (Python path) / "with None elements" (native)
        (torch.zeros(4, dtype=torch.bool), "1-D floating"),
        ([1.0, 2.0], "1-D floating"),
    ):
        with pytest.raises(TypeError, match=match):
            hnlq_hook(s, FakeBucket(buf))
    with pytest.raises(TypeError, match="HNLQHookState"):
        hnlq_hook(object(), FakeBucket(torch.zeros(4)))
    # the strided view of a float bucket (not DDP's, but legal) takes the Python path and is written in place
    base = torch.randn(32, generator=torch.Generator().manual_seed(0))
    view = base[::2]
    out = hnlq_hook(s, FakeBucket(view)).wait()
    assert out is view and bool(torch.isfinite(base).all())


# ------------------------------------------------------------------------------------------------- the codecs
@FUZZ
@given(
    n=st.integers(0, 200),
    bpc=st.one_of(st.integers(-2, 9), st.just(1.5), st.just(None)),
    scale_kind=st.sampled_from(["ok", "zero", "neg", "nan", "inf", "short", "long", "2d"]),
    W=st.integers(1, 9),
    lat=st.sampled_from(["D4", "E8"]),
    q=st.sampled_from([2, 3, 4, 8]),
    M=st.integers(1, 3),
    kind=st.sampled_from(["auto", "uint8", "int64"]),
    seed=st.integers(0, 2**16),
)
def test_dist_fuzz_modular_codec(n, bpc, scale_kind, W, lat, q, M, kind, seed):
    cfg = default_config(q, M, lat)
    L, d, m = cfg.lattice, cfg.dim, q**M
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g) for _ in range(W)]
    try:
        pk = choose_sum_packing(m, W, kind)
        nb = -(-n // d)
        norms = sum(chunk_block_norms(x, d, bpc) for x in xs)
        scales = modular_scales(norms, L, q, M, W, False)
    except Exception as e:  # noqa: BLE001
        _documented(e)
        return
    assert isinstance(bpc, int) and bpc >= 1
    assert scales.numel() == -(-nb // bpc) and bool(torch.isfinite(scales).all() and (scales > 0).all())
    hostile = {
        "zero": lambda s: s * 0,
        "neg": lambda s: -s,
        "nan": lambda s: s * math.nan,
        "inf": lambda s: s * math.inf,
        "short": lambda s: s[:-1],
        "long": lambda s: torch.cat([s, s[:1]]),
        "2d": lambda s: s.view(1, -1),
    }
    if scale_kind in hostile:
        bad = hostile[scale_kind](scales)
        if scale_kind in ("short", "long", "2d") or bad.numel():
            with pytest.raises(ValueError, match="scales"):
                modular_encode(xs[0], bad, L, m, bpc)
            if BC is not None and bad.ndim == 1:
                with pytest.raises(ValueError, match="scales"):
                    BC.modular_encode(xs[0], bad.contiguous(), cfg, bpc, pk)
                with pytest.raises(ValueError, match="scales"):
                    BC.modular_decode(pack_sum_fields(torch.zeros(nb * d, dtype=torch.int64), pk), n,
                                      bad.contiguous(), cfg, bpc, pk, W, torch.empty(n))  # fmt: skip
    codes = [modular_encode(x, scales, L, m, bpc) for x in xs]
    total = sum(pack_sum_fields(c, pk) for c, _ in codes)
    lam_sum = modular_decode(unpack_sum_fields(total, nb * d, pk), L, m)
    assert torch.equal(lam_sum, sum(lam for _, lam in codes))  # the sum of codes is the code of the sum
    if BC is not None:  # the native codec: the same packed codes and the same average, bit for bit
        for x, (c, _) in zip(xs, codes, strict=True):
            assert torch.equal(BC.modular_encode(x, scales, cfg, bpc, pk), pack_sum_fields(c, pk))
        out = torch.empty(n)
        BC.modular_decode(total, n, scales, cfg, bpc, pk, W, out)
        s_blocks = scales.repeat_interleave(bpc)[:nb].unsqueeze(-1)
        assert torch.equal(out, ((lam_sum * s_blocks).reshape(-1)[:n] / W).to(torch.float32))


@FUZZ
@given(
    modulus=st.sampled_from([2, 4, 9, 16, 256, 65536]),
    W=st.integers(1, 40),
    n=st.integers(0, 50),
    bad=st.sampled_from([None, "neg", "high", "float", "packing", "buf_dtype", "short"]),
    seed=st.integers(0, 2**16),
)
def test_dist_fuzz_sum_packing(modulus, W, n, bad, seed):
    try:
        pk = choose_sum_packing(modulus, W)
    except ValueError as e:
        _documented(e)
        return
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, modulus, (n,), generator=g) for _ in range(W)]
    if bad in ("neg", "high", "float", "packing") and n:
        c = codes[0].clone()
        if bad == "neg":
            c[0] = -1
        elif bad == "high":
            c[0] = modulus  # was packed silently, spilling into the neighbouring field of the sum
        elif bad == "float":
            c = c.double()
        with pytest.raises((TypeError, ValueError)) as ei:
            pack_sum_fields(c, "uint8" if bad == "packing" else pk)
        _documented(ei.value)
        return
    total = sum(pack_sum_fields(c, pk) for c in codes)
    if bad == "buf_dtype":
        with pytest.raises(TypeError, match="buf must be"):
            unpack_sum_fields(total.double(), n, pk)
        return
    if bad == "short" and n:
        with pytest.raises(ValueError, match="fewer than n"):
            unpack_sum_fields(total[:0], n, pk)
        return
    assert torch.equal(unpack_sum_fields(total, n, pk), sum(codes) % modulus)


def test_dist_codec_functions_name_their_arguments():
    cfg = default_config()
    for fn, exc, match in (
        (lambda: payload_layout(8, "cfg"), TypeError, "config must be a QuantizationConfig"),  # was AttributeError
        (lambda: encode_payload(torch.zeros(8), None), TypeError, "config"),
        (lambda: decode_payload(torch.zeros(16, dtype=torch.uint8), 8, 4), TypeError, "config"),
        (lambda: chunk_block_norms(torch.zeros(8), 4, 0), ValueError, "blocks_per_chunk"),  # was ZeroDivisionError
        (lambda: modular_encode(torch.zeros(8), torch.ones(2), cfg.lattice, 16, 0), ValueError, "blocks_per_chunk"),
        (lambda: ring_allreduce_bytes(100, 0), ValueError, "world_size"),  # was ZeroDivisionError
        (lambda: unpack_sum_fields(torch.zeros(2, dtype=torch.uint8), 2, None), TypeError, "packing"),
        (lambda: pack_sum_fields(torch.zeros(2, dtype=torch.int64), "uint8"), TypeError, "packing"),
    ):
        with pytest.raises(exc, match=match):
            fn()


@pytest.mark.skipif(BC is None, reason="no backend serves the bucket codec (coset-cuda is not installed)")
@FUZZ
@given(
    n=st.integers(0, 300),
    log_mag=st.floats(-44, 38.4),
    special=st.sampled_from([None, "nan", "inf", "fmax"]),
    cfg_i=st.integers(0, 3),
    W=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_dist_fuzz_native_allgather_codec_equals_python(n, log_mag, special, cfg_i, W, seed):
    cfg = [default_config(), default_config(8, 2), default_config(4, 2, "E8"), default_config(3, 3)][cfg_i]
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, generator=g, dtype=torch.float64) * 10.0**log_mag).clamp(-3.4e38, 3.4e38).float()
          for _ in range(W)]  # fmt: skip
    if special and n:
        xs[0][0] = {"nan": math.nan, "inf": math.inf, "fmax": 3.4e38}[special]
    lay = payload_layout(n, cfg)
    assert BC.allgather_nbytes(n, cfg) == lay.nbytes
    payloads = torch.empty(W, lay.nbytes, dtype=torch.uint8)
    for r, x in enumerate(xs):
        info = BC.allgather_encode(x, cfg, payloads[r])
        ref, rinfo = encode_payload(x, cfg)
        assert torch.equal(payloads[r], ref) and info["nonfinite"] == rinfo["nonfinite"]
    out = torch.full((n,), 7.0)
    rc = BC.allgather_decode(payloads, n, cfg, out)
    flags = [decode_payload(p, n, cfg)[1] for p in payloads]
    assert rc == int(any(flags))
    if not rc:
        total = sum(decode_payload(p, n, cfg)[0] for p in payloads)
        assert torch.equal(out, (total / W).float()) and bool(torch.isfinite(out).all())
