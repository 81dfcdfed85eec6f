"""Fuzz the public API of coset.kv: configs, rotations, codes, the coded and scalar stores, the LUT kernels, key
transforms, rotary tables, the layer allocation and the transformers cache. Every call either raises a
documented exception (TypeError / ValueError with a message) or returns a result that satisfies the package's
invariants: shapes, finite outputs for finite inputs, reconstruction error bounded relative to the input,
``nbytes`` equal to the bytes the layout implies, attention from the codes equal to attention over the decoded
states, exact rates of the allocation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coset.kv import (
    BLOCK,
    CodedKVStore,
    HeadRotation,
    KeyTransform,
    KVCodes,
    KVQuantConfig,
    RotaryTable,
    ScalarKVConfig,
    ScalarKVStore,
    allocate_layers,
    decode_states,
    encode_states,
    key_transform,
    score_error_factor,
    scores_lut,
    scores_reference,
    values_from_codes,
)
from coset.kv.config import _BETA_TABLE

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
JUNK = [None, "4", 4.0, True, -1, 0, float("nan"), float("inf"), [4], 2**40]
#: relative reconstruction error ||x_hat - x|| / ||x|| of the coded part, per label bits (E8, q = 2; measured
#: ~0.55 / 0.3 / 0.15 / 0.08 on Gaussian data, with margin for short chunks and the float16 scale)
REL_ERR = {1: 0.85, 2: 0.5, 3: 0.3, 4: 0.2}


def _documented(e: BaseException) -> None:
    assert isinstance(e, (TypeError, ValueError)), f"undocumented {type(e).__name__}: {e}"
    assert str(e), "an error without a message"


def _raises_documented(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 - the property under test
        _documented(e)
        return None, e


def _needs_beta(cfg_kw: dict) -> bool:
    """True when a config without beta would run the (slow) beta search: keep the fuzz fast."""
    bits, tb, a = cfg_kw.get("bits", 4), cfg_kw.get("t_bits", 2), cfg_kw.get("alpha", 0.5)
    vb = cfg_kw.get("value_bits") or bits
    vt = cfg_kw.get("value_t_bits")
    vt = tb if vt is None else vt
    va = cfg_kw.get("value_alpha") or a
    keys = [(bits, tb, 0.5 if tb == 0 else float(a)), (vb, vt, 0.5 if vt == 0 else float(va))]
    return not all(k in _BETA_TABLE for k in keys)


# ---------------------------------------------------------------------------------------------- configs
@FUZZ
@given(
    field=st.sampled_from(
        ["bits", "t_bits", "alpha", "beta", "window", "sink", "seed", "score_path", "lut_max_queries", "prefill"]
        + ["subtract_mean", "key_channel_scale", "value_bits", "scale_bits", "value_t_bits", "value_alpha"]
    ),
    value=st.one_of(
        st.sampled_from(JUNK),
        st.integers(-3, 20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([1e-300, 1e300, 2.0**-21, 2.0**21, 0.25, "lut", "codes", "decode", 8, 16]),
    ),
    head_dim=st.one_of(st.sampled_from([8, 64, 128]), st.sampled_from([0, -8, 4, 12, 1.5, "64", True])),
)
def test_kv_fuzz_config_fields(field, value, head_dim):
    cfg, err = _raises_documented(KVQuantConfig, **{field: value})
    if err is not None:
        return
    # accepted: the documented domain
    assert isinstance(cfg.bits, int) and 1 <= cfg.bits <= 4 and cfg.t_bits in (0, 1, 2, 4)
    assert cfg.scale_bits in (8, 16) and type(cfg.scale_bits) is int and type(cfg.t_bits) is int
    assert math.isfinite(cfg.alpha) and cfg.alpha > 0 and (cfg.beta is None or 2.0**-20 <= cfg.beta <= 2.0**20)
    assert 0 <= cfg.key_channel_scale <= 2 and isinstance(cfg.subtract_mean, bool)
    bpe, err = _raises_documented(cfg.bits_per_element, head_dim)
    if err is not None:
        assert not (
            isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim >= 8 and head_dim % 8 == 0
        )
        return
    k, v = cfg.key_config(), cfg.value_config()
    K = head_dim // BLOCK  # labels, T packed per vector (whole bytes), scale
    want = sum(K * c.bits + math.ceil(K * c.t_bits / 8) + c.scale_bits // 8 for c in (k, v)) * 8 / (2 * head_dim)
    assert bpe == pytest.approx(want) and isinstance(cfg.bytes_per_vector(head_dim, "k"), int)
    if cfg.beta is not None:  # the step table of a given beta is finite in float32
        steps = torch.tensor(cfg.quant_config().scales, dtype=torch.float32)
        assert bool(torch.isfinite(steps).all()) and bool((steps > 0).all())


@FUZZ
@given(
    field=st.sampled_from(["bits", "group_size", "sink", "value_bits"]),
    value=st.one_of(st.sampled_from(JUNK), st.integers(-2, 70)),
    head_dim=st.sampled_from([8, 64, 0, 12, "8"]),
)
def test_kv_fuzz_scalar_config(field, value, head_dim):
    cfg, err = _raises_documented(ScalarKVConfig, **{field: value})
    if err is None:
        assert 1 <= cfg.bits <= 8 and 1 <= cfg.resolved_value_bits <= 8 and cfg.group_size >= 1
        bpe, err = _raises_documented(cfg.bits_per_element, head_dim)
        if err is None:
            assert bpe == pytest.approx((cfg.bits + 32 / cfg.group_size + cfg.resolved_value_bits + 32 / head_dim) / 2)


# ---------------------------------------------------------------------------------------------- rotation
@FUZZ
@given(
    H=st.one_of(st.integers(-1, 5), st.sampled_from([2**20, 2.0, True, None])),
    D=st.one_of(st.sampled_from([1, 2, 8, 64, 0, -4, 12, 48, 2**14, 2**30, 8.0])),
    seed=st.one_of(st.integers(-1, 2**40), st.sampled_from([1.5, "0", None])),
)
def test_kv_fuzz_head_rotation(H, D, seed):
    rot, err = _raises_documented(HeadRotation, H, D, seed)
    if err is not None:
        return
    R = rot.matrix.double()
    eye = torch.eye(D, dtype=torch.float64).expand(H, D, D)
    assert R.shape == (H, D, D) and torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-5)
    x = torch.randn(H, 3, D, dtype=torch.float64)
    assert torch.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-5)


# ---------------------------------------------------------------------------------------------- codes
@st.composite
def code_configs(draw):
    kw = dict(
        bits=draw(st.integers(1, 4)),
        t_bits=draw(st.sampled_from([0, 1, 2, 4])),
        alpha=draw(st.sampled_from([0.5, 1.0, 0.25])),
        scale_bits=draw(st.sampled_from([8, 16])),
    )
    if _needs_beta(kw):
        kw["beta"] = draw(st.sampled_from([0.3, 0.6, 1.0]))
    return KVQuantConfig(**kw)


def _tensor(g, shape, dtype, log_mag, special):
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 10.0**log_mag
    if special == "zero_vector" and x.numel():
        x[..., 0, :] = 0.0
    elif special == "subnormal" and x.numel():
        x.view(-1)[: x.shape[-1]] = 1e-310 if dtype == torch.float64 else 1e-40
    elif special in ("nan", "inf") and x.numel():
        x.view(-1)[0] = float(special)
    return x.to(dtype)


@FUZZ
@given(
    cfg=code_configs(),
    shape=st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(0, 4), st.sampled_from([8, 16, 64, 4, 12, 48])),
    dtype=st.sampled_from(FLOATS + [torch.int32]),
    log_mag=st.sampled_from([-40, -30, -8, -3, 0, 0, 0, 2, 4, 6, 30]),
    special=st.sampled_from([None, None, "zero_vector", "subnormal", "nan", "inf"]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_encode_decode(cfg, shape, dtype, log_mag, special, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = shape
    x = _tensor(g, shape, torch.float64, log_mag, special).to(dtype) if dtype.is_floating_point else torch.ones(shape)
    x = x if dtype.is_floating_point else x.to(dtype)
    rot = HeadRotation(H, D) if D >= 1 and not D & (D - 1) else HeadRotation(H, 8)
    codes, err = _raises_documented(encode_states, x, rot, cfg)
    if err is not None:
        return
    K = D // BLOCK
    assert codes.idx.shape == (B, H, L, K, cfg.bits) and codes.idx.dtype == torch.uint8
    assert codes.t.shape == (B, H, L, cfg.t_bytes(D)) and codes.scale.shape == (B, H, L)
    assert codes.nbytes == B * H * L * cfg.bytes_per_vector(D)
    xh = decode_states(codes, rot, cfg)
    assert xh.shape == x.shape and bool(torch.isfinite(xh).all())
    x64 = x.to(torch.float64)
    if abs(log_mag) <= 4 and x.numel() and special != "subnormal" and cfg.beta is None:  # a calibrated beta
        # per vector, the error is bounded relative to the vector (a block past the code is clamped radially:
        # at worst ~1.1 |x| at 2 bits without T); over many vectors, by the code's mean error
        err_v = (xh.double() - x64).norm(dim=-1)
        ref = x64.norm(dim=-1)
        assert bool((err_v <= 1.5 * ref + 1e-30).all()), float((err_v / ref).max())
        if ref.numel() >= 8 and cfg.t_bits:
            assert float(err_v.norm()) <= REL_ERR[cfg.bits] * 1.6 * float(ref.norm())
    # the LUT scores from the codes equal decode-then-dot, on every backend
    q = torch.randn(B, H, 2, D, generator=g)
    ref_s = scores_reference(q, codes, cfg)
    for backend in ("torch", "auto"):
        s = scores_lut(q, codes, cfg, backend=backend)
        assert s.shape == (B, H, 2, L) and torch.allclose(
            s, ref_s, rtol=1e-4, atol=1e-4 * max(1.0, float(ref_s.abs().amax()) if ref_s.numel() else 1.0)
        )


@FUZZ
@given(
    cfg=code_configs(),
    other=code_configs(),
    corrupt=st.sampled_from(["none", "t", "scale", "idx_dtype", "idx_dim", "not_codes", "query", "p", "backend"]),
    backend=st.sampled_from(["torch", "auto", "native"]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_lut_mismatched(cfg, other, corrupt, backend, seed):
    """Codes of one config read with another, or with a shape broken: a documented error or the reference."""
    g = torch.Generator().manual_seed(seed)
    rot = HeadRotation(2, 16)
    c = encode_states(torch.randn(1, 2, 5, 16, generator=g), rot, cfg)
    q = torch.randn(1, 2, 3, 16, generator=g)
    p = torch.rand(1, 2, 3, 5, generator=g)
    codes: object = c
    if corrupt == "t":
        codes = KVCodes(
            c.idx, torch.cat((c.t, c.scale.new_zeros(c.scale.shape, dtype=torch.uint8)[..., None]), -1), c.scale
        )
    elif corrupt == "scale":
        codes = KVCodes(c.idx, c.t, c.scale[..., :3])
    elif corrupt == "idx_dtype":
        codes = KVCodes(c.idx.long(), c.t, c.scale)
    elif corrupt == "idx_dim":
        codes = KVCodes(c.idx[..., 0], c.t, c.scale)
    elif corrupt == "not_codes":
        codes = (c.idx, c.t, c.scale)
    elif corrupt == "query":
        q = q[..., :8]
    elif corrupt == "p":
        p = p[..., :4]
    elif corrupt == "backend":
        backend = "fast"
    for read in (cfg, other):
        s, err = _raises_documented(scores_lut, q, codes, read, backend=backend)
        fits = (
            isinstance(codes, KVCodes)
            and codes.idx.dtype == torch.uint8
            and codes.idx.ndim == 5
            and codes.idx.shape[-1] == read.bits
            and codes.t.shape == (1, 2, 5, read.t_bytes(16))
            and codes.scale.shape == (1, 2, 5)
        )
        # codes from encode_states record their code: only the same code may read them; codes assembled by
        # hand (the corruptions) record none and are accepted when laid out as `read` codes them
        fits = fits and (codes.code is None or codes.code == read.code_key())  # type: ignore[union-attr]
        if err is None:
            assert fits and q.shape[-1] == 16 and backend != "fast"
            assert torch.allclose(s, scores_reference(q, codes, read), rtol=1e-4, atol=1e-4)
        v, err = _raises_documented(values_from_codes, p, codes, read, backend=backend)
        if err is None:
            assert (
                fits
                and backend != "fast"
                and p.shape == (1, 2, 3, 5)
                and v.shape == (1, 2, 3, 16)
                and bool(torch.isfinite(v).all())
            )
        d, err = _raises_documented(decode_states, codes, rot, read)
        if err is None:
            assert fits and d.shape == (1, 2, 5, 16) and bool(torch.isfinite(d).all())


# ---------------------------------------------------------------------------------------------- coded store
@st.composite
def store_configs(draw):
    kw = dict(
        bits=draw(st.integers(1, 4)),
        t_bits=draw(st.sampled_from([0, 1, 2])),
        alpha=draw(st.sampled_from([0.5, 1.0])),
        window=draw(st.sampled_from([0, 0, 2, 5])),
        sink=draw(st.sampled_from([0, 0, 1, 3])),
        score_path=draw(st.sampled_from(["auto", "lut", "decode"])),
        subtract_mean=draw(st.booleans()),
        key_channel_scale=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0])),
        scale_bits=draw(st.sampled_from([8, 16])),
        value_bits=draw(st.sampled_from([None, 2, 3])),
    )
    if _needs_beta(kw):
        kw["beta"] = draw(st.sampled_from([0.3, 0.6]))
    return KVQuantConfig(**kw)


def _expected_nbytes(store: CodedKVStore, B: int, H: int, D: int, fp_bytes: int) -> int:
    cfg = store.config
    n = store.num_coded * B * H * (cfg.bytes_per_vector(D, "k") + cfg.bytes_per_vector(D, "v"))
    fp = (store.num_sink + store.num_window) * B * H * D * 2 * fp_bytes
    side = 0
    if store.num_coded or store.k_mean is not None:
        side += 2 * H * D * 4 if cfg.subtract_mean else 0
        side += H * D * 4 if cfg.key_channel_scale else 0
    return n + fp + side


@FUZZ
@given(
    cfg=store_configs(),
    B=st.integers(0, 2),
    H=st.sampled_from([1, 2]),
    D=st.sampled_from([16, 64, 16, 4, 12]),
    chunks=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(FLOATS),
    log_mag=st.sampled_from([-30, -6, 0, 0, 0, 1, 3, 6, 30]),
    special=st.sampled_from([None, None, None, "zero_vector", "subnormal", "nan", "inf"]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_coded_store_append(cfg, B, H, D, chunks, dtype, log_mag, special, seed):
    g = torch.Generator().manual_seed(seed)
    store = CodedKVStore(cfg, seed=seed)
    if dtype == torch.float16:
        log_mag = min(log_mag, 3)
    seen_k, seen_v = [], []
    for i, L in enumerate(chunks):
        k = _tensor(g, (B, H, L, D), dtype, log_mag, special if i == 0 else None)
        v = _tensor(g, (B, H, L, D), dtype, log_mag, None)
        before = (len(store), store.nbytes)
        _, err = _raises_documented(store.append, k, v)
        if err is not None:
            assert (len(store), store.nbytes) == before  # a call that raises changes nothing
            continue
        seen_k.append(k)
        seen_v.append(v)
    assert len(store) == sum(k.shape[2] for k in seen_k)
    if not seen_k:
        return
    assert store.num_sink <= cfg.sink and store.num_window <= cfg.window
    assert store.nbytes == _expected_nbytes(store, B, H, D, torch.finfo(dtype).bits // 8)
    K, V = store.dequantized()
    assert K.shape == V.shape == (B, H, len(store), D) and K.dtype == dtype
    assert bool(torch.isfinite(K).all()) and bool(torch.isfinite(V).all())
    x_k, x_v = torch.cat(seen_k, 2).double(), torch.cat(seen_v, 2).double()
    Ls, Lc = store.num_sink, store.num_coded
    # sink and window tokens are exact; the coded ones within the code's error (reasonable magnitudes)
    assert torch.equal(K[:, :, :Ls].double(), x_k[:, :, :Ls]) and torch.equal(
        K[:, :, Ls + Lc :].double(), x_k[:, :, Ls + Lc :]
    )
    if Lc and abs(log_mag) <= 3 and special != "subnormal" and B and cfg.beta is None:  # a calibrated beta
        # (keys with key_channel_scale: the channel scales of a first chunk of a few tokens are arbitrary, and so
        # is the error they shape; only the values are bounded then)
        for got, x in ((K, x_k), (V, x_v))[1 if cfg.key_channel_scale else 0 :]:
            e = (got[:, :, Ls : Ls + Lc].double() - x[:, :, Ls : Ls + Lc]).norm()
            ref = x[:, :, Ls : Ls + Lc].norm()
            # few vectors, or no T (blocks past the code clamped radially: a heavy tail): the worst case of one
            bound = REL_ERR[cfg.bits] * 2 if B * H * Lc >= 8 and cfg.t_bits else 1.5
            assert float(e) <= bound * float(ref) + 1e-3 * 10.0**log_mag, (float(e), float(ref))


@FUZZ
@given(
    cfg=store_configs(),
    L=st.integers(1, 7),
    G=st.sampled_from([1, 3]),
    Lq=st.sampled_from([1, 1, 2, 0]),
    q_heads=st.sampled_from(["ok", "ok", "not_multiple", "wrong_dim", "wrong_batch"]),
    q_dtype=st.sampled_from(FLOATS + [torch.int64]),
    q_mag=st.sampled_from([-30, 0, 0, 0, 2, 30]),
    q_special=st.sampled_from([None, None, None, "nan", "inf"]),
    mask=st.sampled_from([None, None, "bool", "all_false", "additive", "all_-inf", "nan", "short", "3d", "list"]),
    scaling=st.sampled_from([None, None, 0.0, 0.1, float("nan"), float("inf"), "x", 1e30]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_attend(cfg, L, G, Lq, q_heads, q_dtype, q_mag, q_special, mask, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 1, 2, 16
    store = CodedKVStore(cfg, seed=seed)
    k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    store.append(k, v)
    Hq = H * G + (1 if q_heads == "not_multiple" else 0)
    Dq = 8 if q_heads == "wrong_dim" else D
    Bq = 2 if q_heads == "wrong_batch" else B
    q = torch.randn(Bq, Hq, Lq, Dq, generator=g, dtype=torch.float64) * 10.0**q_mag
    if q_special and q.numel():
        q.view(-1)[0] = float(q_special)
    q = q.to(q_dtype)
    m: object = None
    if mask == "bool":
        m = torch.rand(1, 1, Lq, L, generator=g) < 0.7
        m[..., 0] = True
    elif mask == "all_false":
        m = torch.zeros(1, 1, Lq, L, dtype=torch.bool)
    elif mask == "additive":
        m = torch.where(torch.rand(1, Hq, Lq, L + 2, generator=g) < 0.3, float("-inf"), 0.0)
        m[..., 0] = 0.0
    elif mask == "all_-inf":
        m = torch.full((1, 1, Lq, L), float("-inf"))
    elif mask == "nan":
        m = torch.full((1, 1, Lq, L), float("nan"))
    elif mask == "short":
        m = torch.zeros(1, 1, Lq, L - 1)
    elif mask == "3d":
        m = torch.zeros(1, Lq, L)
    elif mask == "list":
        m = [[0.0] * L]
    out, err = _raises_documented(store.attend, q, m, scaling)
    if err is not None:
        return
    assert q_heads == "ok" and q_dtype.is_floating_point and mask not in ("short", "3d", "list")
    assert mask != "nan" or Lq == 0  # (an empty NaN mask holds no NaN)
    assert out.shape == (B, Lq, Hq, D) and out.dtype == q_dtype
    assert bool(torch.isfinite(out).all())  # finite inputs, finite output (else a ValueError above)
    # attention from the codes equals attention over the decoded states (moderate scores only: softmax of huge
    # scores amplifies float32 rounding differences of the two score paths)
    if q_mag == 0 and scaling in (None, 0.0, 0.1) and Lq:
        Kd, Vd = (t.double() for t in store.dequantized())
        qd = q.double().reshape(B, H, G * Lq, D)
        s = qd @ Kd.transpose(-1, -2) * (D**-0.5 if scaling is None else scaling)
        s = s.view(B, H, G, Lq, L)
        if m is None and Lq > 1:
            causal = torch.arange(L).view(1, L) > torch.arange(Lq).view(Lq, 1) + (L - Lq)
            s = s.masked_fill(causal, -1e300)  # (a row with every key masked: uniform, as the store does)
        elif isinstance(m, torch.Tensor):
            mm = m[..., :L]
            mm = mm.reshape(1, 1, 1, Lq, L) if mm.shape[1] == 1 else mm.reshape(1, H, G, Lq, L)
            if mm.dtype == torch.bool:
                s = s.masked_fill(~mm, -1e300) if mm.any(-1).all() else s.masked_fill(~mm, 0.0) * 0
            else:
                s = s + mm.double().clamp(min=-1e300)
        ref = (torch.softmax(s, -1).view(B, H, G * Lq, L) @ Vd).view(B, H, G, Lq, D).reshape(B, Hq, Lq, D)
        tol = 2e-2 if q_dtype in (torch.float16, torch.bfloat16) else 1e-3
        assert torch.allclose(out.double(), ref.transpose(1, 2), atol=tol * 4, rtol=tol), float(
            (out.double() - ref.transpose(1, 2)).abs().max()
        )


@FUZZ
@given(
    cfg=store_configs(),
    L=st.integers(0, 9),
    n=st.one_of(st.integers(-2, 12), st.sampled_from([2.0, True, None, "1"])),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_coded_store_crop(cfg, L, n, seed):
    g = torch.Generator().manual_seed(seed)
    store = CodedKVStore(cfg)
    k, v = torch.randn(1, 2, L, 16, generator=g), torch.randn(1, 2, L, 16, generator=g)
    store.append(k, v)
    K0, V0 = store.dequantized()
    _, err = _raises_documented(store.crop, n)
    if err is not None:
        assert len(store) == L
        return
    assert len(store) == max(L - n, 0)
    K, V = store.dequantized()  # the remaining tokens are unchanged (codes are per token)
    assert (
        K.shape == (1, 2, len(store), 16)
        and torch.equal(K, K0[:, :, : len(store)])
        and torch.equal(V, V0[:, :, : len(store)])
    )
    if len(store):
        assert bool(torch.isfinite(store.attend(torch.randn(1, 2, 1, 16, generator=g))).all())
    # appending after a crop works
    store.append(k[:, :, :2], v[:, :, :2])
    assert len(store) == max(L - n, 0) + min(L, 2)


@FUZZ
@given(
    kind=st.sampled_from(["scale", "transform"]),
    log_mag=st.sampled_from([-30, -3, 0, 3, 30]),
    shape=st.sampled_from(["ok", "ok", "heads", "dim", "3d"]),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.int32]),
    special=st.sampled_from([None, None, "zero", "neg", "nan"]),
    kcs=st.sampled_from([0.0, 0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_key_scale(kind, log_mag, shape, dtype, special, kcs, seed):
    g = torch.Generator().manual_seed(seed)
    H, D, r = 2, 16, 3
    Hs, Ds = (3 if shape == "heads" else H), (8 if shape == "dim" else D)
    if kind == "scale":
        ks: object = torch.exp(torch.randn(Hs, Ds, generator=g)) * 10.0**log_mag
        ks = ks.unsqueeze(0) if shape == "3d" else ks
        if special == "zero":
            ks[..., 0] = 0.0
        elif special == "neg":
            ks[..., 0] = -1.0
        elif special == "nan":
            ks[..., 0] = float("nan")
        ks = ks.to(dtype)
    else:
        vec = torch.linalg.qr(torch.randn(Hs, Ds, r, generator=g))[0].to(dtype)
        gains = (torch.exp(torch.randn(Hs, r, generator=g)) * 10.0 ** min(log_mag, 4)).to(dtype)
        if special == "zero":
            gains[..., 0] = 0
        ks, err = _raises_documented(KeyTransform, vec.unsqueeze(0) if shape == "3d" else vec, gains)
        if err is not None:
            return
    store, err = _raises_documented(CodedKVStore, KVQuantConfig(key_channel_scale=kcs), key_scale=ks)
    if err is not None:
        return
    k, v = torch.randn(1, H, 6, D, generator=g), torch.randn(1, H, 6, D, generator=g)
    _, err = _raises_documented(store.append, k, v)
    if err is not None:
        assert len(store) == 0
        return
    K, V = store.dequantized()
    assert bool(torch.isfinite(K).all()) and bool(torch.isfinite(V).all())
    out = store.attend(torch.randn(1, H, 1, D, generator=g))
    assert bool(torch.isfinite(out).all()) and out.shape == (1, 1, H, D)


# ---------------------------------------------------------------------------------------------- scalar store
@FUZZ
@given(
    bits=st.integers(1, 8),
    group=st.sampled_from([1, 2, 4]),
    sink=st.sampled_from([0, 1]),
    D=st.sampled_from([8, 16, 4, 12]),
    chunks=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOATS + [torch.int32]),
    log_mag=st.sampled_from([-30, -3, 0, 0, 3, 4.6, 5, 30]),
    special=st.sampled_from([None, None, "zero_vector", "nan"]),
    n=st.integers(-1, 8),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_scalar_store(bits, group, sink, D, chunks, dtype, log_mag, special, n, seed):
    g = torch.Generator().manual_seed(seed)
    store = ScalarKVStore(ScalarKVConfig(bits=bits, group_size=group, sink=sink))
    if dtype == torch.float16:
        log_mag = min(log_mag, 4)
    total = 0
    xs = []
    for i, L in enumerate(chunks):
        k = _tensor(g, (1, 2, L, D), torch.float64, log_mag, special if i == 0 else None)
        k = k.to(dtype) if dtype.is_floating_point else torch.ones(1, 2, L, D, dtype=dtype)
        before = (len(store), store.nbytes)
        _, err = _raises_documented(store.append, k, k)
        if err is not None:
            assert (len(store), store.nbytes) == before
            continue
        total += L
        xs.append(k)
    assert len(store) == total
    if not xs:
        _, err = _raises_documented(store.dequantized)
        assert err is not None
        return
    K, V = store.dequantized()
    assert K.shape == V.shape == (1, 2, total, D) and bool(torch.isfinite(K).all()) and bool(torch.isfinite(V).all())
    x = torch.cat(xs, 2).double()
    if abs(log_mag) <= 3 and total:
        # scalar codes: |error| <= half a step of the group's range (float16 rounding of scale and zero)
        step = (x.amax() - x.amin()) / (2**bits - 1)
        assert float((V.double() - x).abs().max()) <= 0.51 * float(step) + 2e-3 * float(x.abs().max()) + 1e-6
    before = len(store)
    _, err = _raises_documented(store.crop, n)
    if err is None:
        assert len(store) == before - n
        K2, _ = store.dequantized()
        assert torch.equal(K2, K[:, :, : len(store)])
    else:
        assert len(store) == before


# ---------------------------------------------------------------------------------------------- key transforms
@FUZZ
@given(
    D=st.sampled_from([1, 2, 8]),
    lead=st.sampled_from([(), (2,), (0,)]),
    kind=st.sampled_from(["spd", "spd", "zeros", "neg", "nonsym", "nan", "rank1", "mismatch", "int"]),
    log_mag=st.sampled_from([-300, -30, 0, 0, 30, 300]),
    ridge=st.sampled_from([1e-3, 1e-3, 1e-300, 0.5, 0.0, 1.0, float("nan"), "x"]),
    rank=st.sampled_from([None, 1, 2, 8, 0, 9, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_key_transform(D, lead, kind, log_mag, ridge, rank, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, D, D, generator=g, dtype=torch.float64)
    sk = a @ a.transpose(-1, -2) * 10.0**log_mag
    b = torch.randn(*lead, D, D, generator=g, dtype=torch.float64)
    sq = b @ b.transpose(-1, -2)
    if kind == "zeros":
        sk = torch.zeros_like(sk)
    elif kind == "neg":
        sk = -sk
    elif kind == "nonsym":
        sk = torch.triu(sk)
    elif kind == "nan" and sk.numel():
        sk.view(-1)[0] = float("nan")
    elif kind == "rank1":
        u = torch.randn(*lead, D, 1, generator=g, dtype=torch.float64)
        sk = u @ u.transpose(-1, -2) * 10.0**log_mag
    elif kind == "mismatch":
        sq = sq[..., :1, :1] if D > 1 else sq.unsqueeze(0)
    elif kind == "int":
        sk = sk.to(torch.int64)
    t, err = _raises_documented(key_transform, sk, sq, ridge, rank)
    if err is not None:
        return
    r = D if rank is None else rank
    assert t.vectors.shape == (*lead, D, r) and t.gains.shape == (*lead, r)
    assert bool(torch.isfinite(t.gains).all()) and bool((t.gains > 0).all())
    f = score_error_factor(sk, sq, t)
    assert f.shape == lead and bool(torch.isfinite(f).all()) or kind in ("neg", "nonsym")


@FUZZ
@given(
    tkind=st.sampled_from(["none", "diag", "matrix", "zeros", "wrong", "str", "nan", "kt", "int"]),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_score_error_factor(tkind, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    sk, sq = a @ a.transpose(-1, -2), torch.eye(8, dtype=torch.float64).expand(2, 8, 8)
    t: object = {
        "none": None,
        "diag": torch.rand(2, 8, generator=g) + 0.5,
        "matrix": torch.eye(8) + 0.1 * torch.randn(2, 8, 8, generator=g),
        "zeros": torch.zeros(8),
        "wrong": torch.ones(3),
        "str": "x",
        "nan": torch.full((8,), float("nan")),
        "kt": key_transform(sk, sq, rank=2),
        "int": torch.ones(8, dtype=torch.int64),
    }[tkind]
    f, err = _raises_documented(score_error_factor, sk, sq, t)
    if err is None:
        assert f.shape == (2,) and bool(torch.isfinite(f).all()) and bool((f > 0).all())
        # Cauchy-Schwarz: tr(T S_k T^T) tr(T^-T S_q T^-1) >= tr((S_k^1/2 S_q S_k^1/2)^1/2)^2 for every T
        w, v = torch.linalg.eigh(sk)
        half = (v * w.clamp(min=0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)
        m = torch.linalg.eigvalsh(half @ sq @ half).clamp(min=0).sqrt().sum(-1) ** 2
        assert bool((f >= m * (1 - 1e-6)).all())


# ---------------------------------------------------------------------------------------------- rotary tables
def _llama(pos, D=8):
    f = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    a = pos.float()[:, None] * f
    a = torch.cat((a, a), -1)
    return a.cos(), a.sin()


@FUZZ
@given(
    ret=st.sampled_from(
        ["ok", "ok", "none", "single", "three", "wrong_dim", "short", "nan", "lists", "batched", "str"]
    ),
    head_dim=st.sampled_from([8, 8, 7, 0, 8.0]),
    start=st.one_of(st.integers(-1, 300), st.sampled_from([1.0, None])),
    span=st.integers(-2, 600),
)
def test_kv_fuzz_rotary_table(ret, head_dim, start, span):
    def fn(pos):
        c, s = _llama(pos)
        return {
            "ok": (c, s),
            "none": None,
            "single": c,
            "three": (c, s, c),
            "wrong_dim": _llama(pos, 16),
            "short": (c[:1], s[:1]),
            "nan": (c * float("nan"), s),
            "lists": (c.tolist(), s.tolist()),
            "batched": (c[None], s[None]),
            "str": ("a", "b"),
        }[ret]

    rt, err = _raises_documented(RotaryTable, fn, head_dim)
    if err is not None:
        return
    stop = start + span if isinstance(start, int) else 3
    cs, err = _raises_documented(rt.get, start, stop)
    if err is not None:
        return
    cos, sin = cs
    assert ret in ("ok", "lists", "batched") or stop == 0  # (no position asked: fn not called)
    assert cos.shape == sin.shape == (stop - start, 8)
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-5)
    assert torch.allclose(cos, _llama(torch.arange(start, stop))[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- allocation
OPTS = [KVQuantConfig(bits=2), KVQuantConfig(bits=3), KVQuantConfig(bits=4), KVQuantConfig(bits=4, value_bits=3)]


@FUZZ
@given(
    sens=st.one_of(
        st.lists(st.floats(0, 10), min_size=1, max_size=4),
        st.lists(st.sampled_from([0.0, 1e308, 1e-308, 5e-324]), min_size=1, max_size=4),
        st.sampled_from([[], [-1.0], [float("nan")], ["a"], None, 3.0, [[1.0]]]),
    ),
    opts=st.sampled_from([OPTS, OPTS[:1], [], [None], None, OPTS[1:3]]),
    target=st.sampled_from([2.5, 3.5, 4.0, 4.5, 3.0, 3.25, 1.0, 10.0, float("nan"), "3.5", True]),
    ref=st.sampled_from([2.5, 1e300, 1e-300, 0.0, float("inf")]),
    head_dim=st.sampled_from([64, 64, 32, 0, 12, 64.0]),
)
def test_kv_fuzz_allocate_layers(sens, opts, target, ref, head_dim):
    got, err = _raises_documented(allocate_layers, sens, opts, target, ref, head_dim)
    if err is not None:
        return
    s = [float(x) for x in sens]
    assert len(got) == len(s) and all(c in opts for c in got)
    rates = [c.bits_per_element(head_dim) for c in got]
    assert sum(rates) / len(rates) == pytest.approx(target, abs=1e-12)

    def cost(choice):  # the modelled excess, up to the common positive factor 4^ref / max(s)
        top = max(s) or 1.0
        return sum(x / top * 4.0 ** -c.bits_per_element(head_dim) for x, c in zip(s, choice, strict=True))

    feasible = [
        ch
        for ch in itertools.product(opts, repeat=len(s))
        if abs(sum(c.bits_per_element(head_dim) for c in ch) - target * len(s)) < 1e-9
    ]
    assert cost(got) <= min(cost(ch) for ch in feasible) * (1 + 1e-9) + 1e-300


@FUZZ
@given(
    sens=st.one_of(
        st.lists(st.lists(st.floats(0, 1e6), min_size=1, max_size=3), min_size=1, max_size=3),
        st.sampled_from([[], [[]], [[-1.0]], [[float("nan")]], [["a"]], None, 3.0, [1.0, 2.0], "ab", [[1.0], 2.0]]),
    ),
    vshape=st.sampled_from(["same", "same", "same", "short", "long_layer"]),
    target=st.sampled_from([2.0, 2.5, 3.0, 3.0625, 4.125, 4.25, 0.5, float("nan"), "3", True]),
    max_cut=st.sampled_from([0.5, 0.0, 0.25, 2.0, -1.0, float("inf")]),
    base=st.sampled_from(["tk", "tk", "e8", None]),
)
def test_kv_fuzz_allocate_trellis_heads(sens, vshape, target, max_cut, base):
    from coset.kv import TrellisCode, allocate_trellis_heads

    b = {
        "tk": KVQuantConfig(sink=1, key_code=TrellisCode(16, 8), value_code=TrellisCode(16, 8)),
        "e8": KVQuantConfig(bits=3),
        None: None,
    }[base]
    vs = sens
    if isinstance(sens, list) and all(isinstance(x, list) for x in sens) and sens:
        vs = (
            [list(x) for x in sens]
            if vshape == "same"
            else sens[:-1]
            if vshape == "short"
            else [x + [1.0] for x in sens]
        )
    got, err = _raises_documented(allocate_trellis_heads, sens, vs, target, b, max_cut)
    if err is not None:
        return
    assert [len(layer) for layer in got] == [len(x) for x in sens]
    flat = [c for layer in got for c in layer]
    assert sum(c.bits_per_element(64) for c in flat) == pytest.approx(target * len(flat), abs=1e-9)
    bits = [x for c in flat for x in (c.key_code.block_bits, c.value_code.block_bits)]
    assert min(bits) >= math.ceil(sum(bits) / len(bits) - 8 * max_cut - 1e-9) and max(bits) <= 32


# ---------------------------------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


def _tiny():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )


@FUZZ
@given(
    model_config=st.sampled_from(["llama", "llama", 2, 1, 0, -1, 2.0, "x", None, True, 2**40]),
    config=st.sampled_from(
        ["default", "default", "list", "short", "str", 3, None, "scalar", "heads", "heads", "few_heads", "mixed"]
    ),
    key_scales=st.sampled_from([None, None, "ok", "short", 3, "ab"]),
    ops=st.lists(
        st.tuples(st.sampled_from(["update", "crop", "reorder"]), st.integers(-4, 5), st.sampled_from([0, 1, 5])),
        max_size=5,
    ),
    return_codes=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kv_fuzz_hf_cache(model_config, config, key_scales, ops, return_codes, seed):
    from coset.kv.hf_cache import CodedKV, CosetQuantizedCache

    g = torch.Generator().manual_seed(seed)
    mc = _tiny() if model_config == "llama" else model_config
    cfg = {
        "default": KVQuantConfig(sink=1),
        "list": [KVQuantConfig(bits=3), KVQuantConfig(bits=2, beta=0.5, window=2)],
        "short": [KVQuantConfig()],
        "str": "abc",
        3: 3,
        None: None,
        "scalar": ScalarKVConfig(),
        # per-KV-head configs (the tiny Llama has 2 KV heads): right, one head short, a non-config in them
        "heads": [(KVQuantConfig(bits=3), KVQuantConfig(bits=2, beta=0.5)), KVQuantConfig(bits=3)],
        "few_heads": [(KVQuantConfig(),), KVQuantConfig()],
        "mixed": [(KVQuantConfig(), 3), KVQuantConfig()],
    }[config]
    ks = {None: None, "ok": [torch.ones(2, 16), None], "short": [None], 3: 3, "ab": "ab"}[key_scales]
    cache, err = _raises_documented(CosetQuantizedCache, mc, cfg, key_scales=ks, return_codes=return_codes)
    if err is not None:
        return
    n_layers = len(cache.layers)
    lengths = [0] * n_layers
    for op, a, L in ops:
        layer = abs(a) % n_layers
        if op == "update":
            kind = a % 4
            k = torch.randn(1, 2, L, 16, generator=g)
            if kind == 3:
                k = k.to(torch.int32)
            v = k.clone() if kind != 2 else torch.randn(1, 2, L, 8, generator=g)
            before = cache.nbytes
            out, err = _raises_documented(cache.update, k, v, layer)
            if err is not None:
                assert cache.nbytes == before
                continue
            lengths[layer] += L
            kk, vv = out
            if isinstance(kk, CodedKV):
                assert return_codes and kk.store is cache.layers[layer].store
            else:
                assert kk.shape[2] == (L if lengths[layer] == L and L > 1 else lengths[layer])
                assert bool(torch.isfinite(kk).all()) and bool(torch.isfinite(vv).all())
        elif op == "crop":
            _, err = _raises_documented(cache.crop, a)
            if err is None:
                lengths = [max(0, x + a) if a < 0 else min(x, a) for x in lengths]
        else:
            cache.reorder_cache(torch.zeros(1, dtype=torch.long))
        assert [cache.get_seq_length(i) for i in range(n_layers)] == lengths
    assert cache.nbytes >= 0
