"""The transformers adapters on a tiny random Llama with SmolLM2's attention shape (9 query heads, 3 KV
heads, head dim 64): append/reorder/crop, attention from codes == attention on the decoded states, generate."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from coset.kv import CodedKVStore, KeyTransform, KVQuantConfig, ScalarKVConfig, ScalarKVStore, TrellisCode  # noqa: E402
from coset.kv.hf_cache import (  # noqa: E402
    CodedKV,
    CosetKVLayer,
    CosetQuantizedCache,
    ScalarQuantizedCache,
    calibrate_key_scales,
    calibrate_key_transforms,
    coset_kv_attention,
    fisher_sensitivity,
    use_coset_attention,
)


def tiny_config(layers=2):
    return LlamaConfig(
        vocab_size=96,
        hidden_size=576,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config()).eval()
    use_coset_attention(m)
    return m


def random_transform(H, D, r, g):
    """A KeyTransform with random orthonormal directions and gains in [0.25, 4]."""
    v = torch.linalg.qr(torch.randn(H, D, r, generator=g))[0]
    gains = torch.exp2(4 * torch.rand(H, r, generator=g) - 2)
    return KeyTransform(v.to(torch.float16), gains.to(torch.float16))


def kv(B=1, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, L, 64, generator=g), torch.randn(B, 3, L, 64, generator=g)


def codes_of(layer):
    k = layer.store.key_codes
    return None if k is None else (k.idx.clone(), k.t.clone(), k.scale.clone())


def same_codes(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_append_token_by_token_equals_one_chunk():
    k, v = kv(B=2, L=11)
    one, many = CosetKVLayer(KVQuantConfig()), CosetKVLayer(KVQuantConfig())
    one.update(k[:, :, :3], v[:, :, :3])  # the first coded chunk fixes the per-head means
    many.update(k[:, :, :3], v[:, :, :3])
    one.update(k[:, :, 3:], v[:, :, 3:])
    for t in range(3, 11):
        h, h2 = many.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert isinstance(h, CodedKV) and h is not None and h2.store is many.store
    assert one.get_seq_length() == many.get_seq_length() == 11
    assert same_codes(codes_of(one), codes_of(many))
    assert one.get_mask_sizes(1) == (12, 0)


def test_window_keeps_the_newest_tokens_exact():
    k, v = kv(L=9)
    layer = CosetKVLayer(KVQuantConfig(window=4, prefill="codes"), return_codes=False)
    K, V = layer.update(k, v)
    assert layer.store.num_coded == 5 and layer.store.num_window == 4
    assert torch.equal(K[:, :, 5:], k[:, :, 5:]) and torch.equal(V[:, :, 5:], v[:, :, 5:])
    assert not torch.equal(K[:, :, :5], k[:, :, :5])
    # a token leaving the window is coded exactly as if it had been coded on arrival
    ref = CosetKVLayer(KVQuantConfig())
    ref.update(k[:, :, :5], v[:, :, :5])
    assert same_codes(codes_of(layer), codes_of(ref))
    assert not layer.is_croppable and ref.is_croppable


@pytest.mark.parametrize("window", [0, 3])
def test_crop_removes_the_newest_tokens(window):
    k, v = kv(L=10)
    layer, ref = CosetKVLayer(KVQuantConfig(window=window)), CosetKVLayer(KVQuantConfig(window=window))
    layer.update(k[:, :, :6], v[:, :, :6])  # e.g. the prompt, then 4 speculative tokens that are rejected
    layer.update(k[:, :, 6:], v[:, :, 6:])
    layer.crop(-4)
    assert layer.get_seq_length() == 6
    ref.update(k[:, :, :6], v[:, :, :6])
    K1, V1 = layer.store.dequantized()
    K2, V2 = ref.store.dequantized()
    if window == 0:
        assert torch.equal(K1, K2) and torch.equal(V1, V2)
    else:  # 7 coded + 3 window, minus 4 = 6 coded; the reference codes 3 and keeps 3 exact
        assert layer.store.num_window == 0 and ref.store.num_window == 3
        assert torch.equal(K1[:, :, :3], K2[:, :, :3]) and torch.equal(V1[:, :, :3], V2[:, :, :3])
        assert torch.equal(K2[:, :, 3:], k[:, :, 3:6])
    layer.crop(2)  # legacy convention: keep 2
    assert layer.get_seq_length() == 2
    with pytest.raises(TypeError):
        layer.crop(1.5)


def test_sink_keeps_the_first_tokens_exact_in_both_stores():
    from coset.kv import ScalarKVStore

    k, v = kv(L=9)
    layer = CosetKVLayer(KVQuantConfig(sink=2, window=3), return_codes=False)
    layer.update(k[:, :, :1], v[:, :, :1])  # the sink fills across chunks
    K, V = layer.update(k[:, :, 1:], v[:, :, 1:])
    st = layer.store
    assert (st.num_sink, st.num_coded, st.num_window) == (2, 4, 3)
    assert torch.equal(K[:, :, :2], k[:, :, :2]) and torch.equal(V[:, :, 7:], v[:, :, 7:])
    # the coded tokens are coded as if the sink were not there (means over the coded tokens only)
    ref = CosetKVLayer(KVQuantConfig())
    ref.update(k[:, :, 2:6], v[:, :, 2:6])
    assert same_codes(codes_of(layer), codes_of(ref))
    layer.crop(-8)  # window, codes, then one sink token
    assert layer.get_seq_length() == 1 and st.num_coded == 0
    assert torch.equal(st.dequantized()[0], k[:, :, :1])
    sc = ScalarKVStore(ScalarKVConfig(bits=2, group_size=4, sink=1))
    sc.append(k, v)
    K2, V2 = sc.dequantized()
    assert torch.equal(K2[:, :, :1], k[:, :, :1]) and torch.equal(V2[:, :, :1], v[:, :, :1])
    assert not torch.equal(V2[:, :, 1:], v[:, :, 1:]) and len(sc) == 9
    nb = sc.nbytes
    assert nb == 2 * 3 * 64 * 4 + 3 * (2 * (4 * 16 + 2 * 64 * 2) + 8 * (16 + 4))  # sink fp32 + 2 key groups + 8 values
    with pytest.raises(ValueError, match="finite"):
        sc.append(k[:, :, :1] * float("nan"), v[:, :, :1])
    assert sc.nbytes == nb


def test_reorder_select_repeat_batch():
    k, v = kv(B=3, L=6)
    layer = CosetKVLayer(KVQuantConfig(window=2, prefill="codes"), return_codes=False)
    K, V = layer.update(k, v)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    K2, V2 = layer.store.dequantized()
    assert torch.equal(K2, K[[2, 0, 1]]) and torch.equal(V2, V[[2, 0, 1]])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.store.dequantized()[0], K[[0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.store.dequantized()[1], V[[0, 0]])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.store.nbytes == 0


def test_mean_subtraction_helps_offset_keys():
    k, v = kv(L=64)
    k = k * 0.1 + torch.linspace(-4, 4, 64)  # a large fixed per-channel bias, small token-varying part
    errs = {}
    for mean in (True, False):
        store = CodedKVStore(KVQuantConfig(bits=3, subtract_mean=mean))
        store.append(k, v)
        K, _ = store.dequantized()
        d = (K - k) - (K - k).mean(dim=2, keepdim=True)  # the part of the error that changes scores
        errs[mean] = float(d.pow(2).mean())
    assert errs[True] < 0.1 * errs[False]


def test_bytes_accounting():
    mc = tiny_config(layers=3)
    cfg = KVQuantConfig(bits=3, t_bits=1, window=2)
    cache = CosetQuantizedCache(mc, cfg)
    k, v = kv(L=7)
    for i in range(3):
        cache.update(k, v, i)
    coded, win = 5, 2
    per_layer = 2 * 3 * (coded * cfg.bytes_per_vector(64) + win * 64 * 4) + 2 * 3 * 64 * 4  # + the two means
    assert cache.nbytes == 3 * per_layer
    sc = ScalarQuantizedCache(mc, ScalarKVConfig(bits=4, group_size=4))
    for i in range(3):
        sc.update(k, v, i)
    # keys: one group of 4 (4*64*4/8 code bytes + 2*64*2 scale/zero bytes) + 3 fp32 tokens; values per token
    keys = 3 * (4 * 32 + 2 * 64 * 2 + 3 * 64 * 4)
    values = 3 * 7 * (32 + 4)
    assert sc.nbytes == 3 * (keys + values)


@pytest.mark.parametrize(
    "window, path, mean, sink",
    [
        (0, "lut", True, 0),
        (0, "decode", True, 0),
        (3, "lut", True, 0),
        (3, "auto", False, 0),
        (0, "lut", True, 2),
        (3, "lut", True, 1),
        (0, "lut", True, 1.0),
        (2, "decode", False, 0.5),
        (0, "lut", True, "split"),
        (3, "decode", True, "split"),
        (0, "lut", True, "fixed"),
        (2, "auto", False, "fixed"),
        (0, "lut", True, "matrix"),
        (3, "decode", False, "matrix"),
    ],
)
def test_attention_from_codes_equals_sdpa_on_decoded_states(window, path, mean, sink):
    # float cases: per-channel key scale std^e, no sink; "split": keys 3 / values 1 bits with a sink;
    # "fixed": a given key_scale (calibrated scales) with keys 2 / values 3 bits; "matrix": a given key
    # transform (3, 64, 64) with a sink
    chan = sink if isinstance(sink, float) else 0.0
    bits, vbits = {"split": (3, 1), "fixed": (2, 3), "matrix": (3, 2)}.get(sink, (2, None))  # type: ignore[call-overload]
    # "matrix" also gives the values their own ramp (4 T bits, alpha 1/4) and 8-bit scales
    vt = {"value_t_bits": 4, "value_alpha": 0.25, "scale_bits": 8} if sink == "matrix" else {}
    g5 = torch.Generator().manual_seed(5)
    key_scale = {
        "fixed": torch.rand(3, 64, generator=g5) + 0.2,
        "matrix": random_transform(3, 64, 12, g5),
    }.get(sink)  # type: ignore[call-overload]
    sink = {"split": 1, "matrix": 1}.get(sink, 0) if not isinstance(sink, int) else sink  # type: ignore[call-overload]
    cfg = KVQuantConfig(
        bits=bits,
        value_bits=vbits,
        window=window,
        score_path=path,
        subtract_mean=mean,
        sink=sink,
        key_channel_scale=chan,
        **vt,  # type: ignore[arg-type]
    )
    store = CodedKVStore(cfg, seed=4, key_scale=key_scale)
    k, v = kv(B=2, L=12, seed=1)
    store.append(k + 3.0, v - 1.0)  # offsets: the mean subtraction must be undone exactly
    K, V = store.dequantized()
    q = torch.randn(2, 9, 4, 64)
    mask = torch.ones(2, 1, 4, 12, dtype=torch.bool)
    mask[1, :, :, :3] = False  # left padding of the second row
    out = store.attend(q, mask, scaling=0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
    # no mask + several queries = causal, the queries being the newest positions
    out = store.attend(q, None, scaling=0.125)
    causal = torch.ones(4, 12, dtype=torch.bool).tril(diagonal=8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=causal, scale=0.125, enable_gqa=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)


def test_model_logits_with_codes_equal_sdpa_on_decoded_cache(model):
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    cfg = KVQuantConfig(bits=2, prefill="codes")  # the first forward reads the codes too
    a = CosetQuantizedCache(model.config, cfg)  # CodedKV handles -> coset_kv attention from codes
    b = CosetQuantizedCache(model.config, cfg, return_codes=False)  # decoded dense states -> plain SDPA
    with torch.no_grad():
        la = [model(ids[:, :8], past_key_values=a).logits]
        lb = [model(ids[:, :8], past_key_values=b).logits]
        for t in range(8, 12):  # decoding steps: the LUT path
            la.append(model(ids[:, t : t + 1], past_key_values=a).logits)
            lb.append(model(ids[:, t : t + 1], past_key_values=b).logits)
    assert torch.allclose(torch.cat(la, 1), torch.cat(lb, 1), atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        KVQuantConfig(bits=3, value_bits=2, sink=2, prefill="codes"),
        KVQuantConfig(sink=1, key_code=TrellisCode(20, 8), value_code=TrellisCode(16, 8), prefill="codes"),
    ],
    ids=["e8-sink-split", "trellis"],
)
def test_one_forward_equals_token_by_token_decoding(model, cfg):
    """The perplexity protocol (one forward over a window, ``prefill="codes"``) computes what decoding the window
    token by token with the cache computes: codes are per token and every position reads the same codes (the
    first chunk is shared, as it fixes the frozen means)."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    one, steps = CosetQuantizedCache(model.config, cfg), CosetQuantizedCache(model.config, cfg)
    with torch.no_grad():
        model(ids[:, :4], past_key_values=one)
        model(ids[:, :4], past_key_values=steps)
        a = model(ids[:, 4:], past_key_values=one).logits
        b = torch.cat([model(ids[:, t : t + 1], past_key_values=steps).logits for t in range(4, 16)], dim=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert one.nbytes == steps.nbytes


def test_float_prefill_attends_in_float_and_stores_the_same_codes(model):
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    cfg = KVQuantConfig(bits=2, sink=1)
    f = CosetQuantizedCache(model.config, cfg)  # prefill="float", the default
    c = CosetQuantizedCache(model.config, KVQuantConfig(bits=2, sink=1, prefill="codes"))
    d = DynamicCache(config=model.config)
    with torch.no_grad():
        lf, lc, ld = (model(ids[:, :10], past_key_values=x).logits for x in (f, c, d))
        assert torch.allclose(lf, ld, atol=1e-5)  # the prompt saw its float keys and values
        assert not torch.allclose(lc, ld, atol=1e-3)  # (2-bit codes do change the logits)
        # every layer stored the codes of the float states of the prompt: those of the fp32 run
        ref = CosetQuantizedCache(model.config, KVQuantConfig(bits=2, sink=1, prefill="codes"))
        for i, (lf_, lr, ld_) in enumerate(zip(f.layers, ref.layers, d.layers, strict=True)):
            lr.update(ld_.keys, ld_.values)
            assert same_codes(codes_of(lf_), codes_of(lr)), i
        assert same_codes(codes_of(f.layers[0]), codes_of(c.layers[0]))  # layer 0 sees the same input
        # later steps read the codes: equal to the cache filled with the same codes
        lf2 = model(ids[:, 10:11], past_key_values=f).logits
        assert torch.allclose(lf2, model(ids[:, 10:11], past_key_values=ref).logits, atol=1e-5)


def test_key_channel_scale_is_frozen_counted_and_helps_outlier_channels():
    k, v = kv(L=64)
    k = k * torch.cat((torch.full((8,), 8.0), torch.full((56,), 0.25)))  # 8 outlier channels
    q = torch.randn(1, 9, 1, 64) * torch.cat((torch.full((8,), 0.25), torch.ones(56)))
    errs = {}
    for e in (0.0, 1.0):
        store = CodedKVStore(KVQuantConfig(bits=3, key_channel_scale=e))
        store.append(k, v)
        K, _ = store.dequantized()
        kr = K.repeat_interleave(3, dim=1)
        errs[e] = float(((q @ (kr - k.repeat_interleave(3, dim=1)).transpose(-1, -2)) ** 2).mean())
        if e:
            chan = store.k_chan
            assert chan is not None and chan.shape == (3, 64)
            assert store.nbytes == 2 * 3 * 64 * KVQuantConfig(bits=3).bytes_per_vector(64) + 3 * (
                3 * 64 * 4
            )  # + mu_k, mu_v, s
            store.append(*kv(L=3, seed=9))
            assert store.k_chan is chan  # frozen at the first coded chunk
    assert errs[1.0] < 0.5 * errs[0.0]


def test_value_bits_store_codes_bytes_crop_and_reorder():
    cfg = KVQuantConfig(bits=4, value_bits=2, t_bits=2, sink=1)
    store = CodedKVStore(cfg, seed=2)
    k, v = kv(B=2, L=9, seed=3)
    store.append(k, v)
    kc, vc = store.key_codes, store.value_codes
    assert kc is not None and vc is not None
    assert kc.idx.shape == (2, 3, 8, 8, 4) and vc.idx.shape == (2, 3, 8, 8, 2)
    # bytes counted from the buffers: the formula per vector, + the fp32 sink token, + the two means
    coded = 2 * 3 * 8 * (cfg.bytes_per_vector(64, "k") + cfg.bytes_per_vector(64, "v"))
    assert store.nbytes == coded + 2 * 2 * 3 * 64 * 4 + 2 * 3 * 64 * 4
    assert kc.nbytes + vc.nbytes == coded
    # each half equals a store of the matching single-rate code (same rotation seed, same means)
    for bits, which in ((4, 0), (2, 1)):
        ref = CodedKVStore(KVQuantConfig(bits=bits, t_bits=2, sink=1), seed=2)
        ref.append(k, v)
        assert torch.equal(store.dequantized()[which], ref.dequantized()[which])
    # the 4-bit keys are more accurate than the 2-bit values (same kind of Gaussian data)
    K, V = store.dequantized()
    assert float((K - k).pow(2).mean()) < 0.25 * float((V - v).pow(2).mean())
    before = store.dequantized()
    store.append(*kv(B=2, L=3, seed=4))
    store.crop(3)
    assert all(torch.equal(a, b) for a, b in zip(store.dequantized(), before, strict=True))
    store.map_batch(lambda t: t.flip(0))
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(store.dequantized(), before, strict=True))


def test_fixed_key_scale_is_kept_counted_and_validated():
    s = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) + 0.5
    store = CodedKVStore(KVQuantConfig(bits=3), key_scale=s)
    k, v = kv(L=6)
    store.append(k, v)
    assert torch.equal(store.k_chan, s)
    assert store.nbytes == 2 * 3 * 6 * KVQuantConfig(bits=3).bytes_per_vector(64) + 3 * 3 * 64 * 4
    store.reset()
    assert torch.equal(store.k_chan, s)  # a given scale survives reset (it belongs to the model, not the text)
    # keys coded as k / s: the key error follows s channel by channel
    big = torch.cat((torch.full((3, 32), 4.0), torch.full((3, 32), 0.25)), dim=1)
    errs = {}
    for name, ks in (("white", None), ("scaled", big)):
        st = CodedKVStore(KVQuantConfig(bits=3), key_scale=ks)
        kk, vv = kv(L=256, seed=1)
        st.append(kk, vv)
        e = (st.dequantized()[0] - kk).pow(2).mean(dim=(0, 2))
        errs[name] = (float(e[:, :32].mean()), float(e[:, 32:].mean()))
    assert errs["scaled"][0] > 20 * errs["scaled"][1]
    assert 0.5 < errs["white"][0] / errs["white"][1] < 2
    with pytest.raises(ValueError, match="key_scale"):
        CodedKVStore(KVQuantConfig(), key_scale=torch.ones(2, 64)).append(k, v)
    with pytest.raises(ValueError, match="key_scale"):
        CodedKVStore(KVQuantConfig(), key_scale=-torch.ones(3, 64))
    with pytest.raises(ValueError, match="key_scale"):
        CodedKVStore(KVQuantConfig(key_channel_scale=0.5), key_scale=torch.ones(3, 64))
    with pytest.raises(TypeError, match="key_scale"):
        CodedKVStore(KVQuantConfig(), key_scale=torch.ones(3, 64, dtype=torch.int64))


def assert_codes_equal_decoded(model, ids, key_scales):
    """A cache built with ``key_scales``: logits with attention from the codes equal SDPA on the decoded cache
    (prefill over the codes, then one decoding step). Returns the coded cache."""
    cfg = KVQuantConfig(bits=2, value_bits=1, prefill="codes", sink=1)
    a = CosetQuantizedCache(model.config, cfg, key_scales=key_scales)
    b = CosetQuantizedCache(model.config, cfg, return_codes=False, key_scales=key_scales)
    with torch.no_grad():
        la, lb = model(ids[:, :10], past_key_values=a).logits, model(ids[:, :10], past_key_values=b).logits
        la2, lb2 = model(ids[:, 10:11], past_key_values=a).logits, model(ids[:, 10:11], past_key_values=b).logits
    assert torch.allclose(la, lb, atol=1e-4) and torch.allclose(la2, lb2, atol=1e-4)
    return a


def test_calibrated_key_scales_follow_key_and_query_energy(model):
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(7))
    impl = model.config._attn_implementation
    scales = calibrate_key_scales(model, ids)
    assert model.config._attn_implementation == impl  # restored
    assert len(scales) == 2 and all(s.shape == (3, 64) for s in scales)
    for s in scales:
        assert torch.allclose(s.pow(2).mean(-1), torch.ones(3), atol=1e-5) and bool((s > 0).all())
    # brute force for layer 0: E[k_c^2] (centred, token 0 left out) and E[q_c^2] of the post-RoPE states
    rec = {}

    def grab(module, query, key, value, attention_mask, **kw):
        if module.layer_idx == 0:
            rec["q"], rec["k"] = query.detach(), key.detach()
        return torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), is_causal=True
        ).transpose(1, 2), None

    transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["grab_test"] = grab
    transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["grab_test"] = transformers.masking_utils.sdpa_mask
    model.set_attn_implementation("grab_test")
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(impl)
    k = rec["k"][0, :, 1:]
    ek = (k - k.mean(1, keepdim=True)).pow(2).mean(1)
    eq = rec["q"][0].reshape(3, 3 * 24, 64).pow(2).mean(1)
    want = (ek / eq).pow(0.25)
    want = want / want.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(scales[0], want, rtol=1e-4)
    assert all(torch.allclose(s, torch.ones(3, 64)) for s in calibrate_key_scales(model, ids, exponent=0.0))
    with pytest.raises(ValueError):
        calibrate_key_scales(model, ids, exponent=2.0)
    with pytest.raises(ValueError):
        calibrate_key_scales(model, ids[0])
    # a cache built with them: attention from codes equals SDPA on the decoded cache
    a = assert_codes_equal_decoded(model, ids, scales)
    assert all(torch.equal(layer.store.k_chan, s) for layer, s in zip(a.layers, scales, strict=True))


def test_key_transform_is_used_as_stored_counted_and_validated():
    t = random_transform(3, 64, 16, torch.Generator().manual_seed(3))
    store = CodedKVStore(KVQuantConfig(bits=4), key_scale=t, backend="torch")
    k, v = kv(L=256, seed=2)
    store.append(k, v)
    assert torch.equal(store.k_mat, t.matrix())  # T from the float16 vectors and gains as stored
    assert torch.allclose(store.q_mat @ store.k_mat, torch.eye(64).expand(3, 64, 64), atol=1e-5)
    codes = 2 * 3 * 256 * KVQuantConfig(bits=4).bytes_per_vector(64)
    assert t.nbytes == 3 * 16 * 65 * 2
    assert store.nbytes == codes + 2 * 3 * 64 * 4 + t.nbytes  # codes, the two means, the transform
    store.reset()
    assert torch.equal(store.k_mat, t.matrix())  # belongs to the model: kept
    # keys coded as T k: the key error is white in the T domain, i.e. shaped by T^-1 in the key domain.
    # Gain 4 on channels 0..31 leaves them 16x less error than the others
    eye = torch.eye(64, dtype=torch.float16)[:, :32].expand(3, 64, 32)
    stretch = KeyTransform(eye.contiguous(), torch.full((3, 32), 4.0, dtype=torch.float16))
    st = CodedKVStore(KVQuantConfig(bits=3), key_scale=stretch)
    st.append(k, v)
    e = (st.dequantized()[0] - k).pow(2).mean(dim=(0, 2))
    assert float(e[:, 32:].mean()) > 8 * float(e[:, :32].mean())
    tiny = torch.full((3, 1), 1e-7, dtype=torch.float16)  # gain ~1e-7 along e_0: cond(T) ~1e7
    with pytest.raises(ValueError, match="key_scale"):
        CodedKVStore(KVQuantConfig(), key_scale=KeyTransform(eye[..., :1].contiguous(), tiny))
    with pytest.raises(ValueError, match="key_scale"):  # wrong head count, found at the first append
        CodedKVStore(KVQuantConfig(), key_scale=random_transform(2, 64, 4, torch.Generator())).append(k, v)
    with pytest.raises(ValueError, match="key_scale"):  # one transform, not one per head
        CodedKVStore(KVQuantConfig(), key_scale=KeyTransform(eye[0], torch.ones(32, dtype=torch.float16)))
    with pytest.raises(ValueError, match="key_scale"):
        CodedKVStore(KVQuantConfig(key_channel_scale=0.5), key_scale=t)
    with pytest.raises(ValueError, match="key_scale"):
        CodedKVStore(KVQuantConfig(), key_scale=torch.ones(3, 64, 64))
    with pytest.raises(TypeError, match="vectors"):
        KeyTransform(eye.float(), torch.ones(3, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="gains"):
        KeyTransform(eye, -torch.ones(3, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="match"):
        KeyTransform(eye, torch.ones(3, 31, dtype=torch.float16))
    with pytest.raises(ValueError, match="finite"):
        KeyTransform(eye * float("nan"), torch.ones(3, 32, dtype=torch.float16))


def test_calibrated_key_transforms_beat_diagonal_scales_on_the_score_error(model):
    from coset.kv import score_error_factor
    from coset.kv.hf_cache import _attention_moments

    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(8))
    impl = model.config._attn_implementation
    mats = calibrate_key_transforms(model, ids)  # rank 8
    assert model.config._attn_implementation == impl
    full = calibrate_key_transforms(model, ids, rank=None)
    scales = calibrate_key_scales(model, ids)
    assert len(mats) == 2 and all(m.vectors.shape == (3, 64, 8) and m.gains.shape == (3, 8) for m in mats)
    assert all(m.rank == 64 for m in full)
    for m, f, s, st in zip(mats, full, scales, _attention_moments(model, ids), strict=True):
        e_full = score_error_factor(st["k"], st["q"], f)
        e_r8 = score_error_factor(st["k"], st["q"], m)
        diag = score_error_factor(st["k"], st["q"], 1 / s)  # keys coded as k / s
        none = score_error_factor(st["k"], st["q"], None)
        # float16 storage costs well under 1%
        assert bool((e_full <= diag * 1.01).all()) and bool((diag <= none * 1.0001).all())
        assert bool((e_full <= e_r8 * 1.01).all()) and bool((e_r8 < none).all())
    assert_codes_equal_decoded(model, ids, mats)
    with pytest.raises(ValueError):
        calibrate_key_transforms(model, ids, ridge=0.0)


def perturbed_loss(model, ids, layer, side, head, tok, delta):
    """Summed next-token log-loss with ``delta (D,)`` added to one key (side 0) or value (side 1) state."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def perturbed(module, query, key, value, attention_mask, **kw):
        if module.layer_idx == layer:
            x = (key if side == 0 else value).clone()
            x[0, head, tok] += delta
            key, value = (x, value) if side == 0 else (key, x)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    impl = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS["perturbed"], ALL_MASK_ATTENTION_FUNCTIONS["perturbed"] = perturbed, sdpa_mask
    model.set_attn_implementation("perturbed")
    try:
        with torch.no_grad():
            lg = model(ids, use_cache=False).logits[0, :-1].double()
    finally:
        model.set_attn_implementation(impl)
    return float(torch.nn.functional.cross_entropy(lg, ids[0, 1:], reduction="sum"))


def test_kv_gradients_match_finite_differences_and_leave_the_model_as_it_was(model):
    from coset.kv.hf_cache import _kv_fisher, _kv_gradients

    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    impl = model.config._attn_implementation
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)  # the flags are restored, whatever they were
    grads = _kv_gradients(model, ids)
    assert model.config._attn_implementation == impl
    assert model.lm_head.weight.requires_grad and not model.model.norm.weight.requires_grad
    assert model.lm_head.weight.grad is None  # no gradient of the weights
    model.model.norm.weight.requires_grad_(True)
    assert len(grads) == 2 and all(g.shape == (1, 3, 12, 64) for pair in grads for g in pair)
    g = torch.Generator().manual_seed(6)
    for layer, side, head, tok in ((1, 0, 0, 4), (0, 1, 2, 7), (1, 1, 1, 0)):
        u = torch.randn(64, generator=g)
        eps = 1e-2

        fd = (
            perturbed_loss(model, ids, layer, side, head, tok, eps * u)
            - perturbed_loss(model, ids, layer, side, head, tok, -eps * u)
        ) / (2 * eps)
        got = float(grads[layer][side][0, head, tok] @ u)
        assert got == pytest.approx(fd, rel=2e-2, abs=1e-4)
    # the Fisher: mean outer product over the tokens after the sink
    f = _kv_fisher(model, ids)
    gv = grads[0][1][0, 1].double()[1:]  # layer 0 values, head 1, tokens 1..11
    assert torch.allclose(f[0]["v"][1], gv.T @ gv / 11, rtol=1e-4, atol=1e-10)


def test_fisher_sensitivity_is_the_second_order_model(model):
    from coset.kv.hf_cache import _attention_moments, _kv_fisher

    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(9))
    g5 = torch.Generator().manual_seed(5)
    scales = [random_transform(3, 64, 8, g5), torch.rand(3, 64, generator=g5) + 0.5]
    ks, vs = fisher_sensitivity(model, ids, key_scales=scales)
    plain_k, plain_v = fisher_sensitivity(model, ids)
    assert plain_v == pytest.approx(vs, rel=1e-9)  # the key transform does not touch the values
    moments, fisher = _attention_moments(model, ids), _kv_fisher(model, ids)
    for layer in range(2):
        st, fi = moments[layer], fisher[layer]
        t = scales[layer].matrix().double() if layer == 0 else torch.diag_embed(1 / scales[layer].double())
        want_k = want_v = want_plain = 0.0
        for h in range(3):  # tr(T S T^T) tr(T^-T F T^-1) / D, summed over the heads
            ti = torch.linalg.inv(t[h])
            want_k += float(torch.trace(t[h] @ st["k"][h] @ t[h].T) * torch.trace(ti.T @ fi["k"][h] @ ti)) / 64
            want_plain += float(torch.trace(st["k"][h]) * torch.trace(fi["k"][h])) / 64
            want_v += float(torch.trace(st["v"][h]) * torch.trace(fi["v"][h])) / 64
        assert ks[layer] == pytest.approx(want_k, rel=1e-6)
        assert plain_k[layer] == pytest.approx(want_plain, rel=1e-6)
        assert vs[layer] == pytest.approx(want_v, rel=1e-6)
    with pytest.raises(ValueError, match="key_scales"):
        fisher_sensitivity(model, ids, key_scales=[None])
    with pytest.raises(ValueError):
        fisher_sensitivity(model, ids[0])


def test_per_layer_configs():
    mc = tiny_config(layers=3)
    cfgs = [KVQuantConfig(bits=4, value_bits=3), KVQuantConfig(bits=2), KVQuantConfig(bits=3, t_bits=0)]
    cache = CosetQuantizedCache(mc, cfgs)
    k, v = kv(L=5)
    for i in range(3):
        cache.update(k, v, i)
    for layer, c in zip(cache.layers, cfgs, strict=True):
        assert layer.store.config is c
        assert layer.store.key_codes.idx.shape[-1] == c.bits
        assert layer.store.value_codes.idx.shape[-1] == c.resolved_value_bits
    assert cache.nbytes == sum(
        3 * 5 * (c.bytes_per_vector(64, "k") + c.bytes_per_vector(64, "v")) + 2 * 3 * 64 * 4 for c in cfgs
    )
    with pytest.raises(TypeError):
        CosetQuantizedCache(mc, cfgs[:2])
    with pytest.raises(TypeError):
        CosetQuantizedCache(mc, [cfgs[0], cfgs[1], ScalarKVConfig()])
    with pytest.raises(ValueError):
        CosetQuantizedCache(mc, cfgs, key_scales=[None])


def test_scalar_value_bits():
    k, v = kv(L=8)
    st = ScalarQuantizedCache(tiny_config(layers=1), ScalarKVConfig(bits=4, value_bits=2, group_size=4))
    st.update(k, v, 0)
    s = st.layers[0].store
    assert s._bufs["v_code"].tensor.shape[-1] == 64 * 2 // 8 and s._bufs["k_code"].tensor.shape[-1] == 64 * 4 // 8
    K, V = s.dequantized()
    ref = ScalarQuantizedCache(tiny_config(layers=1), ScalarKVConfig(bits=2, group_size=4))
    ref.update(k, v, 0)
    assert torch.equal(V, ref.layers[0].store.dequantized()[1])  # values: the 2-bit per-token code
    # per-token 2-bit values: error within half a step (range / 3 / 2) per element
    step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / 3
    assert bool(((V - v).abs() <= step / 2 + 1e-2).all())


@pytest.mark.slow
def test_generate_runs_and_high_rate_matches_fp32_greedy(model):
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=16, do_sample=False)
        # the highest rate without mean subtraction: its error cannot flip this random model's greedy choices
        hi = model.generate(
            ids,
            past_key_values=CosetQuantizedCache(model.config, KVQuantConfig(bits=4, t_bits=4, subtract_mean=False)),
            max_new_tokens=16,
            do_sample=False,
        )
        # the default (mean of the first chunk subtracted): this random model has top-1/top-2 logit gaps down to
        # ~0.03, so a near-tie may flip; it must still agree on most tokens
        hi_mean = model.generate(
            ids,
            past_key_values=CosetQuantizedCache(model.config, KVQuantConfig(bits=4, t_bits=4)),
            max_new_tokens=16,
            do_sample=False,
        )
        lo_cache = CosetQuantizedCache(model.config, KVQuantConfig(bits=1, window=2))
        lo = model.generate(ids, past_key_values=lo_cache, max_new_tokens=16, do_sample=False)
        kivi = model.generate(
            ids,
            past_key_values=ScalarQuantizedCache(model.config, ScalarKVConfig(bits=8, group_size=4)),
            max_new_tokens=16,
            do_sample=False,
        )
        # values in the trellis code (4 bits per element, L = 12), keys at the highest E8 rate
        tv = model.generate(
            ids,
            past_key_values=CosetQuantizedCache(
                model.config,
                KVQuantConfig(bits=4, t_bits=4, subtract_mean=False, value_code=TrellisCode(32, 12)),
            ),
            max_new_tokens=16,
            do_sample=False,
        )
        # keys and values in the trellis code (4 bits per element, L = 12): keys scored from the streams
        tk = model.generate(
            ids,
            past_key_values=CosetQuantizedCache(
                model.config,
                KVQuantConfig(subtract_mean=False, key_code=TrellisCode(32, 12), value_code=TrellisCode(32, 12)),
            ),
            max_new_tokens=16,
            do_sample=False,
        )
    assert torch.equal(hi, ref)
    assert float((tk == ref).float().mean()) >= 0.8
    assert float((hi_mean == ref).float().mean()) >= 0.8
    assert float((tv == ref).float().mean()) >= 0.8
    assert torch.equal(kivi, ref)
    assert lo.shape == ref.shape and lo_cache.get_seq_length() == 6 + 15


def test_bad_inputs(model):
    with pytest.raises(TypeError):
        CosetQuantizedCache("llama")
    with pytest.raises(ValueError):
        CosetQuantizedCache(0)
    with pytest.raises(TypeError):
        CosetQuantizedCache(2, ScalarKVConfig())
    with pytest.raises(TypeError):
        ScalarQuantizedCache(2, KVQuantConfig())
    layer = CosetKVLayer()
    k, v = kv()
    with pytest.raises(ValueError, match="NaN"):
        layer.update(k * float("nan"), v)
    layer.update(k, v)
    with pytest.raises(ValueError, match="heads"):
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    with pytest.raises(ValueError, match="batch"):
        layer.update(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64))
    with pytest.raises(ValueError, match="differ"):
        layer.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 2, 64))
    with pytest.raises(ValueError, match="empty"):
        CodedKVStore().attend(torch.randn(1, 9, 1, 64))
    with pytest.raises(ValueError, match="does not fit"):
        layer.store.attend(torch.randn(1, 4, 1, 64))
    with pytest.raises(ValueError, match="dropout"):
        coset_kv_attention(
            None, torch.randn(1, 9, 1, 64), CodedKV(layer.store), CodedKV(layer.store), None, dropout=0.1
        )
    sc = ScalarQuantizedCache(1, ScalarKVConfig(bits=4, group_size=4))
    sc.update(*kv(L=6), 0)
    with pytest.raises(ValueError, match="cannot crop"):
        sc.crop(-3)
    sc.crop(-2)
    assert sc.get_seq_length() == 4


def test_hostile_appends_and_reads_of_the_stores():
    """Regressions found by tests/test_kv_fuzz.py."""
    # an empty chunk froze NaN means (every later append raised), or IndexError with key_channel_scale
    for cfg in (KVQuantConfig(), KVQuantConfig(key_channel_scale=1.0), KVQuantConfig(window=2)):
        s = CodedKVStore(cfg)
        s.append(torch.zeros(1, 3, 0, 64), torch.zeros(1, 3, 0, 64))
        assert s.k_mean is None and s.nbytes == 0 and s.dequantized()[0].shape == (1, 3, 0, 64)
        k, v = kv(L=4)
        s.append(k, v)
        assert bool(torch.isfinite(s.dequantized()[0]).all()) and len(s) == 4
    # tiny (or zero) keys with key_channel_scale decoded to NaN; huge ones raised from coset.quant
    for mag in (1e-30, 0.0):
        s = CodedKVStore(KVQuantConfig(key_channel_scale=1.0))
        k, v = kv(L=4)
        s.append(k * mag, v)
        K, _ = s.dequantized()
        assert bool(torch.isfinite(K).all()) and float((K - k * mag).abs().max()) < 1e-20
    # a first chunk of one token: channels of zero spread; later keys stay codable (scale floor)
    s = CodedKVStore(KVQuantConfig(key_channel_scale=2.0, subtract_mean=False))
    k, v = kv(L=6)
    k[:, :, 0, 5] = 0.0
    s.append(k[:, :, :1], v[:, :, :1])
    s.append(k[:, :, 1:], v[:, :, 1:])
    assert len(s) == 6
    # keys past the scale range: ValueError, and the cache (window included) is left as it was
    s = CodedKVStore(KVQuantConfig(window=2, sink=1))
    k, v = kv(L=3)
    s.append(k, v)
    before = (len(s), s.nbytes, s.dequantized()[0].clone())
    with pytest.raises(ValueError, match="key_states has a head vector of rms"):
        s.append(k * 1e6, v)
    assert (len(s), s.nbytes) == before[:2] and torch.equal(s.dequantized()[0], before[2])
    # head dims that are not whole E8 blocks, batch 0, other dtypes into the window: clear errors
    for shape in ((1, 3, 2, 4), (0, 3, 2, 64)):
        with pytest.raises(ValueError):
            CodedKVStore().append(torch.randn(shape), torch.randn(shape))
    with pytest.raises(ValueError, match="dtype|float16"):
        s.append(k.half(), v.half())
    # attend: scaling and masks
    s = CodedKVStore(KVQuantConfig())
    s.append(*kv(L=3))
    q = torch.randn(1, 9, 1, 64)
    for scaling in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="scaling"):
            s.attend(q, scaling=scaling)
    with pytest.raises(ValueError, match="NaN"):
        s.attend(q, torch.full((1, 1, 1, 3), float("nan")))
    out = s.attend(q, torch.full((1, 1, 1, 3), float("-inf")))  # all masked: uniform, as a boolean mask
    assert torch.allclose(out, s.attend(q, torch.zeros(1, 1, 1, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="not finite"):
        s.attend(q * 1e38)
    # the scalar store: float16 overflow of the scale / zero point gave NaN; empty reads failed in torch.cat
    sc = ScalarKVStore(ScalarKVConfig(group_size=2))
    with pytest.raises(ValueError, match="float16"):
        sc.append(torch.full((1, 3, 2, 64), 7e4), torch.zeros(1, 3, 2, 64))
    sc.append(torch.zeros(1, 3, 0, 64), torch.zeros(1, 3, 0, 64))
    assert sc.dequantized()[0].shape == (1, 3, 0, 64)
    with pytest.raises(ValueError, match="empty"):
        ScalarKVStore().dequantized()


def test_hostile_cache_arguments():
    # regression (fuzz): non-iterable config / key_scales raised "object is not iterable", a huge layer count
    # hung building stores, update(None) an AttributeError, float / out-of-vocabulary ids errors from inside
    for bad in (3, "abc"):
        with pytest.raises(TypeError, match="config must be"):
            CosetQuantizedCache(2, bad)
        with pytest.raises(TypeError, match="key_scales"):
            CosetQuantizedCache(2, key_scales=bad)
    with pytest.raises(ValueError, match="number of layers"):
        CosetQuantizedCache(2**40)
    layer = CosetKVLayer(KVQuantConfig())
    with pytest.raises(TypeError, match="key_states"):
        layer.update(None, None)
    assert not layer.is_initialized
    k, v = kv(L=0)
    assert CosetQuantizedCache(2, return_codes=False).update(k, v, 0)[0].shape == (1, 3, 0, 64)


def test_calibration_checks_the_token_ids(model):
    # regression (fuzz): float ids raised a RuntimeError and out-of-vocabulary ids an IndexError from the embedding
    ids = torch.randint(0, 96, (1, 8))
    with pytest.raises(TypeError, match="input_ids"):
        calibrate_key_scales(model, ids.float())
    for bad in (ids + 96, ids - 97):
        with pytest.raises(ValueError, match="input_ids"):
            calibrate_key_transforms(model, bad)


def test_fisher_sensitivity_per_head_sums_to_the_layer_figures(model):
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(9))
    scales = calibrate_key_transforms(model, ids)
    ks, vs = fisher_sensitivity(model, ids, key_scales=scales)
    hk, hv = fisher_sensitivity(model, ids, key_scales=scales, per_head=True)
    assert len(hk) == len(hv) == 2 and all(len(x) == 3 for x in hk + hv)
    assert all(x >= 0 for layer in hk + hv for x in layer)
    for layer in range(2):
        assert sum(hk[layer]) == pytest.approx(ks[layer], rel=1e-12)
        assert sum(hv[layer]) == pytest.approx(vs[layer], rel=1e-12)
    assert len({round(x, 12) for x in hk[0]}) == 3  # the heads differ: a real per-head figure, not a share
    with pytest.raises(TypeError, match="per_head"):
        fisher_sensitivity(model, ids, per_head=1)  # type: ignore[call-overload]


TK = KVQuantConfig(sink=1, key_code=TrellisCode(25, 10), value_code=TrellisCode(21, 10), prefill="codes")


def head_codes(store, h):
    """The stored tensors of KV head ``h`` of a CodedKVStore (its slice) or a PerHeadKVStore (its head's store)."""
    from coset.kv import PerHeadKVStore

    s = store.heads[h] if isinstance(store, PerHeadKVStore) else store
    sl = slice(0, 1) if isinstance(store, PerHeadKVStore) else slice(h, h + 1)
    out = [b.data[:, sl] for b in s._bufs.values() if b.data is not None]
    out += [m[sl] for m in (s.k_mean, s.v_mean, s.k_chan) if m is not None]
    return out


@pytest.mark.parametrize(
    "cfg",
    [TK, KVQuantConfig(prefill="codes"), KVQuantConfig(bits=3, prefill="codes", window=4)],
    ids=["trellis", "e8", "e8-window"],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_per_head_store_with_equal_configs_is_the_joint_store(model, cfg, batch):
    """Per-head stores with one config for every head store the same bytes (codes, scales, means, sink, window)
    as the layer's joint store, and attend to the same outputs up to float32 rounding: the matrix products run
    on (B, 1, n, D) slices instead of (B, H, n, D), and BLAS rounds them differently (in the last bit)."""
    from coset.kv import PerHeadKVStore, RotaryTable

    ids = torch.randint(0, 96, (batch, 40), generator=torch.Generator().manual_seed(1))
    rope = RotaryTable.from_model(model) if cfg.key_code is not None else None
    keys = calibrate_key_transforms(model, ids[:1], rope=rope) if cfg.key_code is not None else None
    joint = CosetQuantizedCache(model.config, cfg, key_scales=keys, rope=rope)
    heads = CosetQuantizedCache(model.config, [(cfg,) * 3] * 2, key_scales=keys, rope=rope)
    assert all(isinstance(layer.store, PerHeadKVStore) for layer in heads.layers)
    with torch.no_grad():
        steps = [(0, 30)] + [(t, t + 1) for t in range(30, 40)]
        for s, e in steps:
            a = model(ids[:, s:e], past_key_values=joint).logits
            b = model(ids[:, s:e], past_key_values=heads).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert joint.nbytes == heads.nbytes and joint.get_seq_length() == heads.get_seq_length() == e
            # layer 0 sees the same states (layer 1 the attention output of layer 0, equal up to rounding)
            lj, lh = joint.layers[0].store, heads.layers[0].store
            for h in range(3):
                assert all(torch.equal(x, y) for x, y in zip(head_codes(lj, h), head_codes(lh, h), strict=True))
        # scores and outputs of one query block on the same stored codes
        q = torch.randn(batch, 9, 5, 64, generator=torch.Generator().manual_seed(2))
        mask = torch.rand(batch, 9, 5, 40, generator=torch.Generator().manual_seed(3)) > 0.3
        for lj, lh in zip(joint.layers, heads.layers, strict=True):
            for m in (None, mask, mask[:, :1]):
                torch.testing.assert_close(lj.store.attend(q, m), lh.store.attend(q, m), rtol=1e-5, atol=1e-5)
            for x, y in zip(lj.store.dequantized(), lh.store.dequantized(), strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [TK, KVQuantConfig(), KVQuantConfig(bits=3, value_bits=2, window=3, sink=2)],
    ids=["trellis", "e8", "e8-window-sink"],
)
def test_per_head_store_stores_the_joint_stores_bytes(cfg):
    """(Not with ``key_channel_scale``: its per-channel std is reduced over (B, 1, L) instead of (B, H, L), in
    another order, and may differ in the last bit.)"""
    from coset.kv import PerHeadKVStore

    key_scale = random_transform(3, 64, 8, torch.Generator().manual_seed(1)) if cfg.key_code is not None else None
    k, v = kv(B=2, L=20, seed=6)
    k = 3 * k + 1  # off-centre keys: the means matter
    joint = CodedKVStore(cfg, seed=7, key_scale=key_scale)
    heads = PerHeadKVStore([cfg] * 3, seed=7, key_scale=key_scale)
    for s, e in ((0, 7), (7, 8), (8, 9), (9, 20)):
        joint.append(k[:, :, s:e], v[:, :, s:e])
        heads.append(k[:, :, s:e], v[:, :, s:e])
        assert joint.nbytes == heads.nbytes and len(joint) == len(heads) == e
        for h in range(3):
            assert all(torch.equal(x, y) for x, y in zip(head_codes(joint, h), head_codes(heads, h), strict=True))
    q = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(joint.attend(q), heads.attend(q), rtol=1e-5, atol=1e-5)


def per_head_cache(mc, layers=2):
    """Per-head configs that differ by head (trellis bits, an E8 head) and by layer."""
    tk = [
        KVQuantConfig(sink=1, key_code=TrellisCode(20 + h, 8), value_code=TrellisCode(16 + 2 * h, 8)) for h in range(3)
    ]
    e8 = KVQuantConfig(bits=3, value_bits=2, sink=1)
    cfgs = [tuple(tk), (tk[0], e8, tk[2])][:layers]
    return CosetQuantizedCache(mc, cfgs), cfgs


def test_per_head_cache_append_crop_reorder_bytes():
    cache, cfgs = per_head_cache(tiny_config())
    k, v = kv(B=3, L=9, seed=4)
    for i in range(2):
        cache.update(k[:, :, :6], v[:, :, :6], i)
        for t in range(6, 9):  # token by token equals one chunk: the codes are per token
            cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], i)
    one, _ = per_head_cache(tiny_config())
    for i in range(2):
        one.update(k[:, :, :6], v[:, :, :6], i)
        one.update(k[:, :, 6:], v[:, :, 6:], i)
    for a, b in zip(cache.layers, one.layers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.store.dequantized(), b.store.dequantized(), strict=True))
    # bytes: each head's codes at its own rate (8 coded tokens x batch 3), its fp32 sink token (key and value)
    # and its two frozen float32 means
    want = 0
    for layer in cfgs:
        for c in layer:
            want += 3 * 8 * (c.bytes_per_vector(64, "k") + c.bytes_per_vector(64, "v")) + 3 * 2 * 64 * 4 + 2 * 64 * 4
    assert cache.nbytes == want
    # the heads are coded with their own codes: head 2 of layer 0 has 22-bit keys, 8 of them per 8 elements
    assert cache.layers[0].store.heads[2].key_codes.idx.shape == (3, 1, 8, 22)
    K, V = cache.layers[0].store.dequantized()
    assert K.shape == V.shape == (3, 3, 9, 64) and torch.equal(K[:, :, :1], k[:, :, :1])  # the sink is exact
    # crop: the same as a cache that never saw the dropped tokens
    cache.crop(-2)
    short, _ = per_head_cache(tiny_config())
    for i in range(2):
        short.update(k[:, :, :6], v[:, :, :6], i)
        short.update(k[:, :, 6:7], v[:, :, 6:7], i)
    assert cache.get_seq_length() == 7
    for a, b in zip(cache.layers, short.layers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.store.dequantized(), b.store.dequantized(), strict=True))
    # reorder / select / repeat act on every head's buffers
    layer = cache.layers[1]
    K, V = layer.store.dequantized()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    K2, V2 = layer.store.dequantized()
    assert torch.equal(K2, K[[2, 0, 1]]) and torch.equal(V2, V[[2, 0, 1]])
    q = torch.randn(3, 9, 1, 64, generator=torch.Generator().manual_seed(5))
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.store.dequantized()[0], K[[0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.store.dequantized()[1], V[[0, 0]])
    out = layer.store.attend(q[:1].expand(2, -1, -1, -1))  # the same query over the repeated batch entry
    # the same output up to rounding: BLAS rounds the rows of one matmul differently by their place in its tiles
    assert out.shape == (2, 1, 9, 64)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=2e-6)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.store.nbytes == 0


def test_per_head_cache_generates_on_a_tiny_llama(model):
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    hi = KVQuantConfig(subtract_mean=False, key_code=TrellisCode(32, 10), value_code=TrellisCode(32, 10))
    lo = KVQuantConfig(key_code=TrellisCode(8, 8), value_code=TrellisCode(8, 8))
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=8, do_sample=False)
        cache = CosetQuantizedCache(model.config, [(hi, hi, hi), (hi, lo, hi)])
        out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert out.shape == ref.shape and cache.get_seq_length() == 6 + 7
    assert float((out == ref).float().mean()) >= 0.8


def test_per_head_configs_bad_inputs():
    from coset.kv import PerHeadKVStore

    mc = tiny_config()
    c = KVQuantConfig()
    with pytest.raises(ValueError, match="config"):  # 2 head configs, the model has 3 KV heads
        CosetQuantizedCache(mc, [(c, c), (c, c, c)])
    with pytest.raises(TypeError, match="config"):  # mixed types in a layer's entry
        CosetQuantizedCache(mc, [(c, ScalarKVConfig(), c), c])
    with pytest.raises(TypeError, match="config"):
        CosetQuantizedCache(mc, [(c, c, c), "abc"])
    with pytest.raises(ValueError, match="config.*window"):  # the heads must share window / sink / prefill / seed
        CosetQuantizedCache(mc, [(c, KVQuantConfig(window=2), c), c])
    with pytest.raises(ValueError, match="config"):
        CosetQuantizedCache(mc, [(), c])
    with pytest.raises(TypeError, match="config"):
        CosetKVLayer([c, 3])
    with pytest.raises(ValueError, match="seed"):
        CosetKVLayer([c, KVQuantConfig(seed=1)])
    layer = CosetKVLayer([c, c])  # an int model config does not know the heads: checked at the first append
    with pytest.raises(ValueError, match="key_states.*2"):
        layer.update(*kv())
    assert layer.get_seq_length() == 0 and layer.store.nbytes == 0
    with pytest.raises(ValueError, match="key_scale"):
        PerHeadKVStore([c] * 3, key_scale=torch.ones(2, 64))
    with pytest.raises(ValueError, match="key_scale"):
        PerHeadKVStore([c] * 3, key_scale=random_transform(2, 64, 4, torch.Generator()))
    with pytest.raises(TypeError, match="key_scale"):
        PerHeadKVStore([c] * 3, key_scale="scales")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="configs"):
        PerHeadKVStore(c)  # type: ignore[arg-type]
    # a call that raises in one head's store leaves every head as it was
    st = PerHeadKVStore([c] * 3)
    k, v = kv(L=4)
    st.append(k, v)
    nb = st.nbytes
    bad = k[:, :, :1].clone()
    bad[0, 2] = 1e30  # head 2 only: past the per-vector scale's range
    with pytest.raises(ValueError, match="key_states"):
        st.append(bad, v[:, :, :1])
    assert st.nbytes == nb and len(st) == 4 and all(len(s) == 4 for s in st.heads)
    with pytest.raises(ValueError, match="does not fit"):
        st.attend(torch.randn(1, 4, 1, 64))
    with pytest.raises(NotImplementedError):
        CosetKVLayer([c, c, c])._quantize(k)
