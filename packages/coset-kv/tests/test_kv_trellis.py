import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from coset.kv import CodedKVStore, HeadRotation, KVQuantConfig, TrellisCode, decode_states, encode_states
from coset.kv.codes import check_codes
from coset.kv.trellis import (
    schedule_tensor,
    trellis_codebook,
    trellis_decode,
    trellis_encode,
    trellis_schedule,
    trellis_states,
    viterbi,
)


def path_cost(x, cb, states):
    return float((x - cb[states]).square().sum())


@pytest.mark.parametrize("block_bits", [8, 10, 13, 18, 26, 32])
def test_schedule_spreads_the_block_bits(block_bits):
    ks = trellis_schedule(block_bits, 64)
    assert len(ks) == 64
    for j in range(0, 64, 8):
        blk = ks[j : j + 8]
        assert sum(blk) == block_bits and max(blk) - min(blk) <= 1


@pytest.mark.parametrize("L", [6, 10, 13])
def test_codebook_is_a_permutation_of_the_gaussian_quantiles(L):
    cb = trellis_codebook(L).double()
    n = 1 << L
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = math.sqrt(2) * torch.erfinv(2 * p - 1)
    assert torch.allclose(cb.sort().values, q, atol=1e-6)
    # the permutation spreads the values: the 2^k successors of a state are not neighbouring quantiles
    succ = cb.view(-1, 8)
    assert float(succ.std(1).mean()) > 0.5


def brute_force(x, cb, ks, L, wrap=None):
    """Min cost over every state path of the bitshift trellis (free start state; or circular through wrap)."""
    best = math.inf
    for s0 in range(1 << L):
        if wrap is not None and s0 >> ks[0] != wrap:
            continue
        for bits in itertools.product(*[range(1 << k) for k in ks[1:]]):
            s, states = s0, [s0]
            for k, b in zip(ks[1:], bits, strict=True):
                s = ((s << k) | b) & ((1 << L) - 1)
                states.append(s)
            if wrap is not None and states[-1] & ((1 << (L - ks[0])) - 1) != wrap:
                continue
            best = min(best, path_cost(x, cb, torch.tensor(states)))
    return best


@pytest.mark.parametrize("ks", [(2, 2, 2, 2, 2), (1, 2, 1, 2, 2), (3, 2, 3, 2)])
def test_viterbi_equals_brute_force(ks):
    L = 5
    cb = trellis_codebook(L)
    g = torch.Generator().manual_seed(sum(ks))
    x = torch.randn(3, len(ks), generator=g)
    st = viterbi(x, cb, ks)
    for i in range(3):
        # a valid path: each state shifts in k_t bits of the next
        for t in range(1, len(ks)):
            assert int(st[i, t]) >> ks[t] == int(st[i, t - 1]) & ((1 << (L - ks[t])) - 1)
        assert path_cost(x[i], cb, st[i]) == pytest.approx(brute_force(x[i], cb, ks, L), rel=1e-6)
    wrap = torch.tensor([0, 1, 3])  # < 2^(L - k_0)
    st = viterbi(x, cb, ks, wrap)
    for i in range(3):
        assert int(st[i, 0]) >> ks[0] == int(wrap[i]) == int(st[i, -1]) & ((1 << (L - ks[0])) - 1)
        want = brute_force(x[i], cb, ks, L, int(wrap[i]))
        assert path_cost(x[i], cb, st[i]) == pytest.approx(want, rel=1e-6)


def all_circular_costs(x, code, D):
    """Cost of every circular stream of a tiny code (decoded through trellis_decode)."""
    nbytes = code.stream_bytes(D)
    streams = torch.arange(1 << (8 * nbytes), dtype=torch.int64)
    by = torch.stack([(streams >> (8 * (nbytes - 1 - i))) & 255 for i in range(nbytes)], 1).to(torch.uint8)
    return (trellis_decode(by, code, D) - x).square().sum(-1)


def test_tail_biting_stream_is_near_the_best_circular_stream():
    code = TrellisCode(block_bits=16, state_bits=6, unbiased=False)  # D = 8: 16-bit streams, 65536 candidates
    g = torch.Generator().manual_seed(0)
    u = torch.randn(24, 8, generator=g)
    s = trellis_encode(u, code)
    got = (trellis_decode(s, code, 8) - u).square().sum(-1)
    ratios = []
    for i in range(24):
        best = float(all_circular_costs(u[i], code, 8).min())
        assert float(got[i]) >= best * (1 - 1e-6)
        ratios.append(float(got[i]) / best)
    # the two-pass approximation loses little (QTIP reports the same)
    assert sum(ratios) / len(ratios) < 1.1


def test_stream_layout_msb_first_and_circular():
    code = TrellisCode(block_bits=16, state_bits=6)  # D = 8, k_t = 2, stream of 16 bits
    stream = torch.tensor([[0b10110001, 0b01110100]], dtype=torch.uint8)
    bits = [int(b) for b in f"{0b10110001:08b}{0b01110100:08b}"]
    st = trellis_states(stream, code, 8)
    for t in range(8):
        end = 2 * (t + 1)  # element t's state ends after its 2 bits
        want = 0
        for j in range(6):
            want = (want << 1) | bits[(end - 6 + j) % 16]
        assert int(st[0, t]) == want


@pytest.mark.parametrize("block_bits, min_snr", [(16, 10.6), (26, 17.4), (32, 21.4)])
def test_gaussian_snr_between_the_e8_code_and_the_bound(block_bits, min_snr):
    code = TrellisCode(block_bits=block_bits, state_bits=10)
    u = torch.randn(1024, 64, generator=torch.Generator().manual_seed(5))
    uh = trellis_decode(trellis_encode(u, code), code, 64)
    snr = 10 * math.log10(float(u.square().sum() / (u - uh).square().sum()))
    rate = block_bits / 8
    assert snr < 6.0206 * rate  # no code beats the distortion-rate bound
    assert snr > min_snr  # ~0.2-0.35 bit from it (the E8 q=2 code with T: ~0.8 bit)


def test_encode_decode_states_and_store():
    code = TrellisCode(block_bits=26, state_bits=8)
    rot = HeadRotation(3, 64, seed=1)
    x = torch.randn(2, 3, 5, 64) * 3
    c = encode_states(x, rot, code)
    assert c.idx.shape == (2, 3, 5, 26) and c.t.shape == (2, 3, 5, 0) and c.scale.dtype == torch.uint8
    check_codes(c, code)
    y = decode_states(c, rot, code)
    err = float((y - x).square().sum() / x.square().sum())
    assert err < 10 ** (-1.5)  # ~17 dB
    with pytest.raises(ValueError, match="another code"):
        check_codes(c, TrellisCode(block_bits=26, state_bits=9))


def test_cache_with_trellis_values_attends_like_its_decoded_states():
    cfg = KVQuantConfig(bits=4, sink=1, t_bits=2, alpha=0.5, scale_bits=8, value_code=TrellisCode(28, 8))
    assert cfg.bits_per_element(64) == 4.0
    st = CodedKVStore(cfg, backend="torch")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 3, 20, 64, generator=g), torch.randn(1, 3, 20, 64, generator=g)
    st.append(k, v)
    st.append(k[:, :, :2], v[:, :, :2])
    q = torch.randn(1, 9, 1, 64, generator=g)  # (several queries attend causally over the newest tokens)
    kk, vv = st.dequantized()
    ref = F.scaled_dot_product_attention(q, kk.repeat_interleave(3, 1), vv.repeat_interleave(3, 1))
    assert torch.allclose(st.attend(q).transpose(1, 2), ref, atol=1e-5)
    assert st.nbytes >= 21 * 3 * (cfg.bytes_per_vector(64, "k") + cfg.bytes_per_vector(64, "v"))
    st.crop(3)
    assert len(st) == 19
    kk2, vv2 = st.dequantized()
    assert torch.equal(vv2, vv[:, :, :19])
    st.map_batch(lambda t: t.repeat(2, *([1] * (t.ndim - 1))))
    assert st.dequantized()[1].shape == (2, 3, 19, 64)


@pytest.mark.parametrize("score_path", ["auto", "decode"])
def test_cache_with_trellis_keys_attends_like_its_decoded_states(score_path):
    kc, vc = TrellisCode(31, 8), TrellisCode(29, 8)
    cfg = KVQuantConfig(sink=1, key_code=kc, value_code=vc, score_path=score_path)
    assert cfg.key_config() == kc and cfg.value_config() == vc
    assert cfg.bits_per_element(64) == (31 + 29) / 16 + 0.125
    for backend in ("torch", "auto"):
        st = CodedKVStore(cfg, backend=backend)
        g = torch.Generator().manual_seed(1)
        k, v = torch.randn(1, 3, 20, 64, generator=g), torch.randn(1, 3, 20, 64, generator=g)
        st.append(k, v)
        st.append(k[:, :, :2], v[:, :, :2])
        assert st.key_codes.idx.shape == (1, 3, 21, 31) and st.value_codes.idx.shape == (1, 3, 21, 29)
        kk, vv = st.dequantized()
        assert float((kk - k[:, :, list(range(20)) + [0, 1]]).square().mean()) < 0.02  # ~19 dB on N(0, 1) keys
        for n in (1, 4):  # a decoding step (kernel path) and a chunk of queries
            q = torch.randn(1, 9, n, 64, generator=g)
            pos = 22 - n + torch.arange(n)  # the queries sit on the newest tokens, causally
            mask = torch.where(torch.arange(22) > pos[:, None], float("-inf"), 0.0).view(1, 1, n, 22)
            ref = F.scaled_dot_product_attention(
                q, kk.repeat_interleave(3, 1), vv.repeat_interleave(3, 1), attn_mask=mask
            )
            assert torch.allclose(st.attend(q, mask).transpose(1, 2), ref, atol=1e-5)
    # keys and values in the same code share one encode call; the result is the same as two calls
    same = CodedKVStore(KVQuantConfig(key_code=kc, value_code=kc), backend="torch")
    same.append(k, v)
    rot = same.rotation
    kcodes = encode_states(k - k.mean(dim=(0, 2)).unsqueeze(1), rot, kc)
    assert torch.equal(same.key_codes.idx, kcodes.idx)


def test_config_errors():
    with pytest.raises(TypeError, match="block_bits"):
        TrellisCode(block_bits=26.0)
    with pytest.raises(ValueError, match="block_bits"):
        TrellisCode(block_bits=33)
    with pytest.raises(ValueError, match="state_bits"):
        TrellisCode(block_bits=32, state_bits=4)
    with pytest.raises(ValueError, match="scale_bits"):
        TrellisCode(scale_bits=12)
    with pytest.raises(TypeError, match="value_code"):
        KVQuantConfig(value_code=26)
    with pytest.raises(ValueError, match="value_bits"):
        KVQuantConfig(value_bits=3, value_code=TrellisCode())
    with pytest.raises(ValueError, match="whole bytes"):
        trellis_encode(torch.randn(2, 8), TrellisCode(block_bits=13))
    with pytest.raises(ValueError, match="NaN"):
        trellis_encode(torch.tensor([[float("nan")] * 64]), TrellisCode())
    with pytest.raises(TypeError, match="floating"):
        trellis_encode(torch.zeros(2, 64, dtype=torch.int64), TrellisCode())
    with pytest.raises(ValueError, match="shape"):
        trellis_encode(torch.zeros(64), TrellisCode())
    with pytest.raises(TypeError, match="TrellisCode"):
        trellis_encode(torch.zeros(2, 64), KVQuantConfig())
    with pytest.raises(TypeError, match="key_code"):
        KVQuantConfig(key_code=KVQuantConfig())
    with pytest.raises(ValueError, match="score_path"):
        KVQuantConfig(key_code=TrellisCode(), score_path="lut")
    # E8 values next to trellis keys: the value code is the E8 config without the key code
    mixed = KVQuantConfig(bits=3, key_code=TrellisCode(30, 10))
    assert mixed.value_config() == KVQuantConfig(bits=3) and mixed.bits_per_element(64) == (30 / 8 + 0.125 + 3.5) / 2


@pytest.fixture(scope="module")
def native_trellis():
    """The trellis kernels of a registered backend (coset-cuda's "native", found through the registry)."""
    from coset.kv import native

    if not native.trellis_available():
        pytest.skip("no registered backend provides the trellis kernels (coset-cuda not installed)")
    return native


@pytest.mark.parametrize("block_bits, L, D", [(26, 10, 64), (16, 6, 8), (32, 12, 32), (10, 8, 64), (13, 9, 128)])
def test_native_encode_equals_reference_bit_for_bit(native_trellis, block_bits, L, D):
    code = TrellisCode(block_bits=block_bits, state_bits=L)
    g = torch.Generator().manual_seed(block_bits + L)
    u = torch.randn(300, D, generator=g)
    u[0] = 0.0  # ties everywhere: the first-minimum rule decides
    u[1] = trellis_codebook(L)[:D]  # exact codebook values: zero-cost paths
    u[2] *= 1e3  # far outside the codebook
    ref = trellis_encode(u, code, backend="torch")
    got = trellis_encode(u, code, backend="native")
    assert torch.equal(got, ref)
    cuda = pytest.importorskip("coset.cuda")
    old = cuda.get_num_threads()
    try:
        cuda.set_num_threads(2)
        assert torch.equal(trellis_encode(u, code, backend="native"), ref)
    finally:
        cuda.set_num_threads(old)


def test_native_values_equal_decode_then_matmul(native_trellis):
    from coset.kv import values_from_codes
    from coset.kv.codes import decode_rotated

    code = TrellisCode(block_bits=26, state_bits=10)
    rot = HeadRotation(3, 64, seed=4)
    x = torch.randn(2, 3, 77, 64, generator=torch.Generator().manual_seed(9))
    x[0, 1, 5] = 0.0  # a zero vector (scale code 0)
    c = encode_states(x, rot, code)
    p = torch.softmax(torch.randn(2, 3, 5, 77), -1)
    want = p @ decode_rotated(c, code)
    assert torch.allclose(values_from_codes(p, c, code, backend="native"), want, atol=1e-5)
    assert torch.allclose(values_from_codes(p, c, code, backend="torch"), want, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_native_scores_equal_decode_then_dot(native_trellis, n):
    from coset.kv import scores_lut, scores_reference

    code = TrellisCode(block_bits=31, state_bits=10)
    rot = HeadRotation(3, 64, seed=2)
    x = torch.randn(2, 3, 45, 64, generator=torch.Generator().manual_seed(n))
    x[1, 2, 7] = 0.0  # a zero vector (scale code 0): score 0
    c = encode_states(x, rot, code)
    q = torch.randn(2, 3, n, 64, generator=torch.Generator().manual_seed(50 + n)) * 4
    want = scores_reference(q, c, code)
    assert torch.all(want[1, 2, :, 7] == 0)
    got = scores_lut(q, c, code, backend="native")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.all(got[1, 2, :, 7] == 0)
    assert torch.equal(scores_lut(q, c, code, backend="torch"), want)
    cuda = pytest.importorskip("coset.cuda")
    old = cuda.get_num_threads()
    try:  # rows split over threads: the same sums
        cuda.set_num_threads(2)
        assert torch.equal(scores_lut(q, c, code, backend="native"), got)
    finally:
        cuda.set_num_threads(old)


def test_native_wrappers_reject_bad_arguments(native_trellis):
    kv = pytest.importorskip("coset.cuda.kv")
    ks = torch.full((64,), 3, dtype=torch.uint8)
    cb = trellis_codebook(8)
    u = torch.randn(4, 64)
    for bad_ks in (ks[:63], ks.to(torch.int32), torch.full((64,), 5, dtype=torch.uint8), ks.clone().fill_(0)):
        with pytest.raises(ValueError, match="ks must"):
            kv.trellis_encode(u, bad_ks, cb)
    with pytest.raises(ValueError, match="cb must"):
        kv.trellis_encode(u, ks, cb[:100])
    with pytest.raises(ValueError, match="u must"):
        kv.trellis_encode(u.to(torch.int64), ks, cb)
    s = kv.trellis_encode(u, ks, cb)
    assert s.shape == (4, 24)
    with pytest.raises(ValueError, match="bytes per vector"):
        kv.trellis_values(s[:, :23].reshape(1, 4, 23), torch.ones(1, 4), torch.ones(1, 1, 4), ks, cb)
    with pytest.raises(ValueError, match="p must"):
        kv.trellis_values(s.reshape(1, 4, 24), torch.ones(1, 4), torch.ones(1, 1, 5), ks, cb)
    with pytest.raises(ValueError, match="q must"):
        kv.trellis_scores(s.reshape(1, 4, 24), torch.ones(1, 4), torch.ones(1, 1, 63), ks, cb)
    with pytest.raises(ValueError, match="rho must"):
        kv.trellis_scores(s.reshape(1, 4, 24), torch.ones(1, 3), torch.ones(1, 1, 64), ks, cb)
    with pytest.raises(ValueError, match="bytes per vector"):
        kv.trellis_scores(s[:, :23].reshape(1, 4, 23), torch.ones(1, 4), torch.ones(1, 1, 64), ks, cb)


@pytest.mark.parametrize("key", [(26, 10), (10, 10), (18, 12)])
def test_gain_table_entries_are_recomputed(key):
    from coset.kv import trellis

    trellis.trellis_gain.cache_clear()
    saved = trellis._GAIN_TABLE.pop(key)
    try:
        assert trellis.trellis_gain(*key) == saved
    finally:
        trellis._GAIN_TABLE[key] = saved
        trellis.trellis_gain.cache_clear()


def test_unbiased_decode_is_unbiased_along_u():
    u = torch.randn(512, 64, generator=torch.Generator().manual_seed(11))
    for bb in (10, 26):
        shrunk, unb = TrellisCode(bb, 8, unbiased=False), TrellisCode(bb, 8)
        s = trellis_encode(u, shrunk)
        assert torch.equal(s, trellis_encode(u, unb))  # the same streams: only the decoder's table differs
        for code, lo, hi in ((shrunk, 0.75, 0.99), (unb, 0.98, 1.02)):
            uh = trellis_decode(s, code, 64)
            c = float((u * uh).sum() / u.square().sum())
            assert lo < c < hi, (bb, code.unbiased, c)


def _llama_rope(D: int = 64, same_halves: bool = True):
    """The Llama rotary table (both halves of the channels share their frequencies), or one whose halves differ
    (the cache then scores the mean against the full [cos | sin] table)."""
    from coset.kv import RotaryTable

    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))

    def fn(pos):
        f = pos.to(torch.float32)[:, None] * inv[None]
        e = torch.cat((f, f if same_halves else 1.5 * f), dim=-1)
        return e.cos(), e.sin()

    return RotaryTable(fn, D)


def _key_transform(H: int, D: int, g: torch.Generator):
    from coset.kv import KeyTransform

    v = torch.linalg.qr(torch.randn(H, D, 8, generator=g))[0].half()
    return KeyTransform(v, (torch.rand(H, 8, generator=g) * 3 + 0.5).half())


@pytest.mark.parametrize(
    "sink, window, B, mean, rope, kt",
    [(1, 0, 1, True, "half", True), (0, 0, 1, True, None, False), (2, 5, 2, True, "full", False),
     (1, 0, 2, False, None, True), (0, 3, 1, False, None, False), (1, 0, 1, True, None, True)],
)  # fmt: skip
def test_fused_decode_attention_equals_attention_over_decoded_states(
    native_trellis, monkeypatch, sink, window, B, mean, rope, kt
):
    """A decoding step (one query position, no mask) of a trellis cache with 8-bit scales takes the fused native
    call (scores, rotary key mean, softmax with the dense tokens, values in one pass): it equals SDPA over the
    decoded states, with zero vectors (scale code 0), sink and window tokens, and a batch."""
    g = torch.Generator().manual_seed(7)
    cfg = KVQuantConfig(
        sink=sink, window=window, subtract_mean=mean, key_code=TrellisCode(32, 10), value_code=TrellisCode(22, 8)
    )
    key_scale = _key_transform(3, 64, g) if kt else None
    table = _llama_rope(same_halves=rope == "half") if rope else None
    st = CodedKVStore(cfg, backend="auto", key_scale=key_scale, rope=table)
    k, v = torch.randn(B, 3, 40, 64, generator=g) + 0.3, torch.randn(B, 3, 40, 64, generator=g)
    k[:, 1, 17] = 0.0  # a zero key: scale code 0 when the keys are not centred
    st.append(k[:, :, :30], v[:, :, :30])
    st.append(k[:, :, 30:], v[:, :, 30:])
    for _ in range(3):
        st.append(k[:, :, :1] * 0.5, v[:, :, :1] * 0.5)  # token by token, as decoding appends
    calls = []
    fused = native_trellis.trellis_attend_step
    monkeypatch.setattr(native_trellis, "trellis_attend_step", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    kk, vv = st.dequantized()
    q = torch.randn(B, 9, 1, 64, generator=g)
    ref = F.scaled_dot_product_attention(q, kk.repeat_interleave(3, 1), vv.repeat_interleave(3, 1))
    got = st.attend(q)
    assert len(calls) == 1
    assert torch.allclose(got.transpose(1, 2), ref, atol=1e-5)
    # a mask (or several query positions) takes the general path, with the same result
    mask = torch.ones(B, 1, 1, len(st), dtype=torch.bool)
    assert torch.allclose(st.attend(q, mask), got, atol=1e-6) and len(calls) == 1
    with pytest.raises(ValueError, match="not finite"):
        st.attend(q * float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        st.attend(q, scaling=1e38)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_fused_decode_step_with_half_precision_states(native_trellis, monkeypatch, dtype, atol):
    """States in bfloat16 / float16 (sink and window tokens kept in that dtype): the one-call decoding step reads
    them as float32 and returns the query's dtype, equal to SDPA over the decoded states up to that dtype's
    rounding of the output."""
    g = torch.Generator().manual_seed(9)
    cfg = KVQuantConfig(sink=2, window=3, key_code=TrellisCode(32, 10), value_code=TrellisCode(22, 8))
    st = CodedKVStore(cfg, backend="auto")
    k = (torch.randn(2, 3, 40, 64, generator=g) + 0.3).to(dtype)
    v = torch.randn(2, 3, 40, 64, generator=g).to(dtype)
    st.append(k[:, :, :30], v[:, :, :30])
    for t in range(30, 40):
        st.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    calls = []
    step = native_trellis.trellis_attend_step
    monkeypatch.setattr(native_trellis, "trellis_attend_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    kk, vv = (t.float().repeat_interleave(3, 1) for t in st.dequantized())
    q = torch.randn(2, 9, 1, 64, generator=g).to(dtype)
    got = st.attend(q)
    assert calls == [1] and got.dtype == dtype
    ref = F.scaled_dot_product_attention(q.float(), kk, vv)
    assert torch.allclose(got.float().transpose(1, 2), ref, atol=atol)


@pytest.mark.parametrize("same_halves", [True, False])
def test_fused_attention_over_several_token_chunks(native_trellis, monkeypatch, same_halves):
    """With the rotary key mean scored in the kernel's stream pass (a Llama table: D columns), the coded tokens are
    scored in chunks of 256 across the rows (KV heads); a table whose halves differ takes the per-row path. A cache
    of 2 x 3 rows and 601 coded tokens (two whole chunks and an odd tail) attends as SDPA over its decoded states
    either way."""
    g = torch.Generator().manual_seed(3)
    cfg = KVQuantConfig(sink=1, subtract_mean=True, key_code=TrellisCode(32, 10), value_code=TrellisCode(30, 10))
    st = CodedKVStore(cfg, backend="auto", rope=_llama_rope(same_halves=same_halves))
    k, v = torch.randn(2, 3, 602, 64, generator=g) + 0.3, torch.randn(2, 3, 602, 64, generator=g)
    st.append(k[:, :, :300], v[:, :, :300])
    for s0 in (300, 301):  # one token at a time, as decoding appends (the native encoder)
        st.append(k[:, :, s0 : s0 + 1], v[:, :, s0 : s0 + 1])
    st.append(k[:, :, 302:], v[:, :, 302:])
    assert st.num_coded == 601
    calls = []
    fused = native_trellis.trellis_attend_step
    monkeypatch.setattr(native_trellis, "trellis_attend_step", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    kk, vv = st.dequantized()
    q = torch.randn(2, 9, 1, 64, generator=g)
    ref = F.scaled_dot_product_attention(q, kk.repeat_interleave(3, 1), vv.repeat_interleave(3, 1))
    got = st.attend(q)
    assert len(calls) == 1
    assert torch.allclose(got.transpose(1, 2), ref, atol=1e-5)


def test_fused_attention_reads_the_buffers_in_place(native_trellis):
    """The kernel reads the cache's buffers (rows a capacity apart) where they are: the same result as from
    contiguous copies; and it rejects arguments that do not fit."""
    kv = pytest.importorskip("coset.cuda.kv")
    from coset.kv.codes import log_scale_table

    g = torch.Generator().manual_seed(3)
    st = CodedKVStore(KVQuantConfig(key_code=TrellisCode(26, 9), value_code=TrellisCode(18, 9)), backend="auto")
    st.append(torch.randn(2, 3, 50, 64, generator=g), torch.randn(2, 3, 50, 64, generator=g))
    st.crop(7)  # spare capacity past the used part
    kc, vc = st.key_codes, st.value_codes
    assert not kc.idx.is_contiguous()
    q, extra = torch.randn(2, 3, 4, 64, generator=g), torch.randn(2, 3, 4, 2, generator=g)
    args = (st._tables("k")[0], st._tables("k")[1])
    vargs = (st._tables("v")[0], st._tables("v")[1])
    tab = log_scale_table()
    got = kv.trellis_attend(kc.idx, kc.scale, *args, vc.idx, vc.scale, *vargs, tab, q, 0.125, extra)
    want = kv.trellis_attend(
        kc.idx.contiguous(), kc.scale.contiguous(), *args, vc.idx.contiguous(), vc.scale.contiguous(), *vargs, tab, q,
        0.125, extra,
    )  # fmt: skip
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # against the two kernels and a softmax in torch
    rho_k, rho_v = tab[kc.scale.long()], tab[vc.scale.long()]
    s = kv.trellis_scores(kc.idx.reshape(6, 43, -1), rho_k.reshape(6, 43), q.reshape(6, 4, 64), *args) * 0.125
    p = torch.softmax(torch.cat((extra.reshape(6, 4, 2), s), dim=-1), dim=-1)
    acc = kv.trellis_values(vc.idx.reshape(6, 43, -1), rho_v.reshape(6, 43), p[..., 2:].contiguous(), *vargs)
    assert torch.allclose(got[0].reshape(6, 4, 64), acc, atol=1e-6)
    assert torch.allclose(got[1].reshape(6, 4, 2), p[..., :2], atol=1e-6)
    assert torch.allclose(got[2].reshape(6, 4), p[..., 2:].sum(-1), atol=1e-6)
    with pytest.raises(ValueError, match="bias_mode"):
        kv.trellis_attend(kc.idx, kc.scale, *args, vc.idx, vc.scale, *vargs, tab, q, 0.125, extra, 3)
    with pytest.raises(ValueError, match="tab must"):
        kv.trellis_attend(
            kc.idx, kc.scale, *args, vc.idx, vc.scale, *vargs, tab, q, 0.125, extra, 2, q, torch.zeros(10, 64)
        )
    with pytest.raises(ValueError, match="share"):
        kv.trellis_attend(kc.idx, kc.scale, *args, vc.idx[:, :, :5], vc.scale, *vargs, tab, q, 0.125, extra)
    with pytest.raises(ValueError, match="q must"):
        kv.trellis_attend(kc.idx, kc.scale, *args, vc.idx, vc.scale, *vargs, tab, q[..., :8], 0.125, extra)


def test_decoding_step_kernel_equals_its_parts(native_trellis):
    """``trellis_attend_step`` (one call per layer and decoding step) equals its parts in torch: the query maps, the
    dense tokens' scores, ``trellis_attend`` on the codes, the output map and the dense values; it reads the
    buffers in place (capacity past ``L``), gives repeated batch entries the same output, re-checks a map changed
    in place, and rejects arguments that do not fit with a named error."""
    kv = pytest.importorskip("coset.cuda.kv")
    from coset.kv.codes import log_scale_table

    g = torch.Generator().manual_seed(5)
    st = CodedKVStore(KVQuantConfig(key_code=TrellisCode(26, 9), value_code=TrellisCode(18, 9)), backend="auto")
    x = torch.randn(1, 2, 60, 64, generator=g)
    st.append(x.expand(2, -1, -1, -1), torch.randn(1, 2, 60, 64, generator=g).expand(2, -1, -1, -1))
    st.crop(9)  # L = 51 of a larger capacity
    b = st._bufs
    L, H, D, n = 51, 2, 64, 3
    assert b["k_idx"].storage.shape[2] > L
    kt, vt, tab = st._tables("k"), st._tables("v"), log_scale_table()
    q = torch.randn(1, H, n, D, generator=g).expand(2, -1, -1, -1).contiguous()
    pos = torch.randn(80, 16, generator=g)  # a bias table: mode 2 with tdim = 16
    qmap = torch.randn(H, D, D + 16, generator=g) / 8
    omap = torch.randn(H, D + 1, D, generator=g) / 8
    dk, dv = torch.randn(2, H, 7, D, generator=g), torch.randn(2, H, 7, D, generator=g)  # 4 sink + 2 window used
    dk[1], dv[1] = dk[0], dv[0]
    win = (dk[:, :, 4:].contiguous(), dv[:, :, 4:].contiguous(), 2)  # a buffer of its own

    def step(
        qm=qmap,
        om=omap,
        mode=2,
        L=L,
        sink=(dk, dv, 4),
        window=win,
        t=pos,
    ):
        return kv.trellis_attend_step(
            b["k_idx"].storage, b["k_scale"].storage, b["v_idx"].storage, b["v_scale"].storage, L, *kt, *vt, tab,
            q, qm, om, 0.125, sink, window, mode, t, 3,
        )  # fmt: skip

    got = step()
    qin = torch.einsum("bhnd,hdc->bhnc", q, qmap)
    dense_k = torch.cat((dk[:, :, :4], dk[:, :, 4:6]), dim=2)
    dense_v = torch.cat((dv[:, :, :4], dv[:, :, 4:6]), dim=2)
    extra = q @ dense_k.transpose(-1, -2) * 0.125
    kc, vc = st.key_codes, st.value_codes
    acc, pe, psum = kv.trellis_attend(
        kc.idx, kc.scale, *kt, vc.idx, vc.scale, *vt, tab, qin[..., :D].contiguous(), 0.125, extra, 2,
        qin[..., D:].contiguous(), pos, 3,
    )  # fmt: skip
    want = torch.einsum("bhnc,hcd->bhnd", torch.cat((acc, psum.unsqueeze(-1)), dim=-1), omap) + pe @ dense_v
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[0], got[1])  # the same rows for a repeated batch entry
    # bias mode 1 (one bias column) and no dense tokens; then mode 0 with omap of D rows
    qm1 = qmap[..., : D + 1].contiguous()
    got1 = step(qm=qm1, mode=1, sink=None, window=None, t=None)
    qin1 = torch.einsum("bhnd,hdc->bhnc", q, qm1)
    acc, pe, psum = kv.trellis_attend(
        kc.idx, kc.scale, *kt, vc.idx, vc.scale, *vt, tab, qin1[..., :D].contiguous(), 0.125,
        q.new_empty(2, H, n, 0), 1, qin1[..., D].contiguous(),
    )  # fmt: skip
    want1 = torch.einsum("bhnc,hcd->bhnd", torch.cat((acc, psum.unsqueeze(-1)), dim=-1), omap)
    assert torch.allclose(got1, want1, atol=1e-5)
    got0 = step(qm=qmap[..., :D].contiguous(), om=omap[:, :D].contiguous(), mode=0, sink=None, window=None, t=None)
    assert got0.shape == (2, H, n, D) and bool(torch.isfinite(got0).all())
    # a map changed in place (its version moves) is checked and read again, not served from the remembered checks
    qmap.mul_(2.0)
    assert not torch.allclose(step(), got, atol=1e-3)
    for kw, match in (
        ({"mode": 3}, "bias_mode"),
        ({"t": pos[:40]}, "tab must hold"),
        ({"om": omap[:, :10].contiguous()}, "omap"),
        ({"L": 10_000}, "does not hold"),
        ({"sink": (dk, dv)}, "triple"),
        ({"sink": (dk, dv, 8)}, "does not hold"),
        ({"qm": qmap.transpose(1, 2)}, "qmap"),
    ):
        with pytest.raises(ValueError, match=match):
            step(**kw)
    with pytest.raises(ValueError, match="not finite"):
        kv.trellis_attend_step(
            b["k_idx"].storage, b["k_scale"].storage, b["v_idx"].storage, b["v_scale"].storage, L, *kt, *vt, tab,
            q * float("inf"), qmap, omap, 0.125, None, None, 2, pos, 3,
        )  # fmt: skip


def test_fused_softmax_of_peaked_rows_flushes_tiny_weights(native_trellis):
    """Rows whose weights span more than e^87 (a dominant sink token, large queries): weights below e^-87 of the
    largest are exactly 0 (no subnormals, whose products take microcode assists), everything else as a float64
    softmax; a row all but one dense token flushed has psum and acc exactly 0."""
    kv = pytest.importorskip("coset.cuda.kv")
    from coset.kv.codes import log_scale_table

    g = torch.Generator().manual_seed(11)
    st = CodedKVStore(KVQuantConfig(key_code=TrellisCode(26, 9), value_code=TrellisCode(18, 9)), backend="auto")
    st.append(torch.randn(1, 2, 300, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g))
    kc, vc = st.key_codes, st.value_codes
    args, vargs, tab = st._tables("k"), st._tables("v"), log_scale_table()
    q = torch.randn(1, 2, 3, 64, generator=g) * 4  # scores spread over ~+-100
    rho_k, rho_v = tab[kc.scale.long()], tab[vc.scale.long()]
    s = kv.trellis_scores(kc.idx.reshape(2, 300, -1), rho_k.reshape(2, 300), q.reshape(2, 3, 64), *args)
    assert float(s.max(-1).values.min() - s.min()) > 150  # every row has weights far below e^-87
    extra = torch.full((1, 2, 3, 1), 20.0)
    acc, pe, psum = kv.trellis_attend(kc.idx, kc.scale, *args, vc.idx, vc.scale, *vargs, tab, q, 1.0, extra)
    logits = torch.cat((extra.reshape(2, 3, 1), s), dim=-1).double()
    p = torch.softmax(logits, dim=-1)
    vals = kv.trellis_values(
        vc.idx.reshape(2, 300, -1), rho_v.reshape(2, 300), torch.eye(300).expand(2, 300, 300).contiguous(), *vargs
    )
    want = p[..., 1:] @ vals.double()
    assert torch.allclose(acc.reshape(2, 3, 64).double(), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(pe.reshape(2, 3).double(), p[..., 0], atol=1e-6)
    assert torch.allclose((psum + pe[..., 0]).double(), torch.ones(1, 2, 3, dtype=torch.float64), atol=1e-6)
    # a dense token 95 above every coded score: the coded weights (e^-95 and less, subnormal) are exactly 0
    top = torch.full((1, 2, 3, 1), float(s.max()) + 95.0)
    acc, pe, psum = kv.trellis_attend(kc.idx, kc.scale, *args, vc.idx, vc.scale, *vargs, tab, q, 1.0, top)
    assert bool((psum == 0).all()) and bool((acc == 0).all()) and bool((pe == 1).all())


@pytest.mark.parametrize(
    "sink, window, mean, rope, kt, chan",
    [(1, 0, True, "half", True, 0.0), (0, 3, True, None, False, 0.5), (2, 0, False, None, False, 0.0),
     (1, 0, True, "full", False, 0.0)],
)  # fmt: skip
def test_native_append_codes_as_the_reference_path(native_trellis, monkeypatch, sink, window, mean, rope, kt, chan):
    """After the first chunk (means and channel scale frozen), a cache's new tokens are coded by one native call per
    side: centring on the (rotating) key mean, channel scale, key transform and rotation as one matrix, 8-bit scale,
    Viterbi. Against the reference path (a backend="torch" store fed the same tokens): the same scale codes but
    for vectors at a rounding boundary (then one step apart), the same streams for nearly every vector, and the
    decoded states as close to the input."""
    g = torch.Generator().manual_seed(21)
    cfg = KVQuantConfig(
        sink=sink, window=window, subtract_mean=mean, key_channel_scale=chan,
        key_code=TrellisCode(32, 10), value_code=TrellisCode(30, 10),
    )  # fmt: skip
    key_scale = _key_transform(3, 64, g) if kt else None
    table = _llama_rope(same_halves=rope == "half") if rope else None
    fast = CodedKVStore(cfg, backend="auto", key_scale=key_scale, rope=table)
    ref = CodedKVStore(cfg, backend="torch", key_scale=key_scale, rope=table)
    k = torch.randn(2, 3, 100, 64, generator=g) * 2 + 0.5
    v = torch.randn(2, 3, 100, 64, generator=g)
    k[0, 1, 70] = 0.0  # a zero key (scale code 0 when not centred)
    calls = []  # sides coded natively: one per trellis_normalise_encode, two per trellis_append (no window)
    enc, both = native_trellis.trellis_normalise_encode, native_trellis.trellis_append
    monkeypatch.setattr(native_trellis, "trellis_normalise_encode", lambda *a, **kw: calls.append(1) or enc(*a, **kw))
    monkeypatch.setattr(native_trellis, "trellis_append", lambda *a, **kw: calls.extend((2, 2)) or both(*a, **kw))
    for st in (fast, ref):
        st.append(k[:, :, :40], v[:, :, :40])
        for t in range(40, 60):  # token by token, as decoding appends
            st.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        st.append(k[:, :, 60:], v[:, :, 60:])  # and a chunk
    assert len(calls) == 2 * 21  # keys and values of each append after the first (none for the reference)
    assert set(calls) == ({1} if window else {2})  # in place into the buffers unless a window is kept
    for side in ("key_codes", "value_codes"):
        a, b = getattr(fast, side), getattr(ref, side)
        n0 = 40 - sink - window  # the first chunk's coded tokens: the same path in both
        assert torch.equal(a.idx[:, :, :n0], b.idx[:, :, :n0]) and torch.equal(a.scale[:, :, :n0], b.scale[:, :, :n0])
        da, db = a.scale[:, :, n0:].int(), b.scale[:, :, n0:].int()
        assert int((da - db).abs().max()) <= 1 and float((da != db).float().mean()) < 0.02
        same = (a.idx[:, :, n0:] == b.idx[:, :, n0:]).all(-1)
        assert float(same.float().mean()) > 0.9
    kf, vf = fast.dequantized()
    kr, vr = ref.dequantized()
    for got, want, x in ((kf, kr, k), (vf, vr, v)):
        err_got, err_want = (got - x).square().mean(), (want - x).square().mean()
        assert float(err_got) < 1.05 * float(err_want)


def test_native_append_falls_back_to_the_named_error(native_trellis):
    """A vector past the range of the 8-bit scale after the first chunk: the native encoder reports it and the
    reference path raises its ValueError naming the argument; the cache is unchanged."""
    cfg = KVQuantConfig(key_code=TrellisCode(32, 10), value_code=TrellisCode(30, 10))
    st = CodedKVStore(cfg, backend="auto")
    g = torch.Generator().manual_seed(2)
    st.append(torch.randn(1, 3, 8, 64, generator=g), torch.randn(1, 3, 8, 64, generator=g))
    before = [t.clone() for t in st.dequantized()]
    big = torch.randn(1, 3, 1, 64, generator=g)
    with pytest.raises(ValueError, match="value_states has a head vector"):
        st.append(big, big * 1e6)
    with pytest.raises(ValueError, match="key_states has a head vector"):
        st.append(big * 1e6, big)
    nan = big.clone()
    nan[0, 2, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="value_states contains NaN"):
        st.append(big, nan)
    st.stage(big, big * 2)  # staged, never committed: written past the used part only
    assert len(st) == 8 and all(torch.equal(a, b) for a, b in zip(before, st.dequantized(), strict=True))
    st.stage(big, big * 2)()
    assert len(st) == 9 and all(torch.equal(a, b[:, :, :8]) for a, b in zip(before, st.dequantized(), strict=True))


def test_native_append_writes_into_the_buffers_in_place(native_trellis):
    """``trellis_append``: keys and values coded in one call straight into a cache's buffers at token ``t0`` (the
    tokens before and after untouched), the same codes as ``trellis_normalise_encode`` per side; the first bad row
    counts the keys' rows first; arguments that do not fit raise named errors."""
    kv = pytest.importorskip("coset.cuda.kv")
    from coset.kv.codes import log_scale_table

    g = torch.Generator().manual_seed(4)
    kks, kcb, vks, vcb = schedule_tensor(32, 64), trellis_codebook(10), schedule_tensor(20, 64), trellis_codebook(9)
    A_k, A_v = torch.randn(2, 64, 64, generator=g) / 8, torch.eye(64).expand(2, 64, 64).contiguous()
    mu_k, mu_v, chan = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g), torch.rand(2, 64) + 0.5
    cs = torch.randn(50, 128, generator=g)
    tab = log_scale_table()
    xk, xv = torch.randn(3, 2, 4, 64, generator=g), torch.randn(3, 2, 4, 64, generator=g)
    out = [torch.full((3, 2, 20, 32), 7, dtype=torch.uint8), torch.full((3, 2, 20), 7, dtype=torch.uint8),
           torch.full((3, 2, 20, 20), 7, dtype=torch.uint8), torch.full((3, 2, 20), 7, dtype=torch.uint8)]  # fmt: skip
    k_side, v_side = (A_k, kks, kcb, 2, mu_k, chan), (A_v, vks, vcb, 1, mu_v)
    assert kv.trellis_append(xk, xv, k_side, v_side, tab, 1e4, *out, 5, cs, 11) == -1
    sk, ck, _ = kv.trellis_normalise_encode(xk, A_k, kks, kcb, tab, 1e4, 2, mu_k, cs, 11, chan)
    sv, cv, _ = kv.trellis_normalise_encode(xv, A_v, vks, vcb, tab, 1e4, 1, mu_v)
    for buf, want in zip(out, (sk, ck, sv, cv), strict=True):
        assert torch.equal(buf[:, :, 5:9], want)
        assert bool((buf[:, :, :5] == 7).all()) and bool((buf[:, :, 9:] == 7).all())
    bad_v = xv.clone()
    bad_v[1, 0, 2, 0] = float("inf")
    assert kv.trellis_append(xk, bad_v, k_side, v_side, tab, 1e4, *out, 5, cs, 11) == 3 * 2 * 4 + 1 * 8 + 2
    assert kv.trellis_append(xk * 1e6, xv, k_side, v_side, tab, 1e4, *out, 5, cs, 11) == 0
    for args, match in (
        ((xk, xv, k_side, v_side, tab, 1e4, *out, 17, cs, 11), "do not hold"),
        ((xk, xv, k_side, v_side, tab, 1e4, *out, 5, cs, 47), "cs must hold"),
        ((xk, xv, (A_k, kks, kcb, 3, mu_k, chan), v_side, tab, 1e4, *out, 5, cs, 11), "mean_mode"),
        ((xk, xv, (A_k[:1], kks, kcb, 2, mu_k, chan), v_side, tab, 1e4, *out, 5, cs, 11), "A_k must"),
        ((xk, xv, k_side, v_side, tab, 1e4, out[0], out[1], out[0], out[3], 5, cs, 11), "vstream must"),
        ((xk, xv[:2], k_side, v_side, tab, 1e4, *out, 5, cs, 11), "xv must"),
    ):
        with pytest.raises(ValueError, match=match):
            kv.trellis_append(*args)


def test_native_normalise_encode_rejects_bad_arguments(native_trellis):
    kv = pytest.importorskip("coset.cuda.kv")
    from coset.kv.codes import log_scale_table

    ks, cb = schedule_tensor(32, 64), trellis_codebook(10)
    x, A = torch.randn(1, 2, 3, 64), torch.eye(64).expand(2, 64, 64)
    tab = log_scale_table()
    s, c, bad = kv.trellis_normalise_encode(x, A, ks, cb, tab, 1e4)
    assert bad == -1 and s.shape == (1, 2, 3, 32) and c.shape == (1, 2, 3)
    # with A = I and no mean: the reference normalisation and encoder, vector by vector
    rms = x.square().mean(-1).sqrt()
    want_c = torch.round(8.0 * torch.log2(rms) + 128.0).to(torch.uint8)
    assert torch.equal(c, want_c)
    u = x / tab[c.long()].unsqueeze(-1)
    assert torch.equal(s.reshape(6, 32), trellis_encode(u.reshape(6, 64), TrellisCode(32, 10), backend="torch"))
    assert kv.trellis_normalise_encode(x * 1e6, A, ks, cb, tab, 1e4)[2] == 0
    with pytest.raises(ValueError, match="A must"):
        kv.trellis_normalise_encode(x, A[:1], ks, cb, tab, 1e4)
    with pytest.raises(ValueError, match="mean_mode"):
        kv.trellis_normalise_encode(x, A, ks, cb, tab, 1e4, 3)
    with pytest.raises(ValueError, match="cs must"):
        kv.trellis_normalise_encode(x, A, ks, cb, tab, 1e4, 2, torch.zeros(2, 64), torch.zeros(2, 128), 0)
