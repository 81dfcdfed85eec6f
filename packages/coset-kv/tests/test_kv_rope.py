"""Keys centred on their pre-RoPE mean (coset.kv.rope): rotary helpers, the store's exactness (attention from the
codes == SDPA on the decoded states, token-by-token == one chunk, crop), the gain on a rotating mean, and the
calibration moments against brute force."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from coset.kv import CodedKVStore, KVQuantConfig, RotaryTable  # noqa: E402
from coset.kv.hf_cache import CosetQuantizedCache, calibrate_key_transforms, use_coset_attention  # noqa: E402
from coset.kv.rope import apply_rotary, rotate_half, unapply_rotary  # noqa: E402

D = 64


def llama_table(theta: float = 10000.0) -> RotaryTable:
    """The Llama rotary table, written out: angle p * theta^(-2j/D), each frequency twice."""
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

    def fn(pos):
        ang = pos.to(torch.float64)[:, None] * inv[None]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos(), ang.sin()

    return RotaryTable(fn, D)


def rotating_keys(table, B=1, L=40, start=0, noise=0.1, seed=0):
    """Keys ``R_p (m + noise)`` (post-RoPE) with a large fixed pre-RoPE mean m, at positions start..start+L-1."""
    g = torch.Generator().manual_seed(seed)
    m = 3.0 * torch.randn(3, 1, D, generator=g)
    pre = m + noise * torch.randn(B, 3, L, D, generator=g)
    cos, sin = table.get(start, start + L)
    return apply_rotary(pre, cos, sin), torch.randn(B, 3, L, D, generator=g)


def test_rotary_helpers_and_table():
    t = llama_table()
    cos, sin = t.get(0, 300)  # grows past its first 256 rows
    assert cos.shape == (300, D) and cos.dtype == torch.float32
    direct = t.fn(torch.arange(300))
    assert torch.allclose(cos, direct[0].float()) and torch.allclose(sin, direct[1].float())
    c2, s2 = t.get(290, 300)
    assert torch.equal(c2, cos[290:]) and torch.equal(s2, sin[290:])
    assert torch.equal(t.get_cat(3, 9), torch.cat((cos[3:9], sin[3:9]), dim=-1))
    x = torch.randn(2, 3, 300, D)
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(unapply_rotary(y, cos, sin), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # a rotation
    assert torch.equal(rotate_half(rotate_half(x)), -x)
    with pytest.raises(ValueError, match="head_dim"):
        RotaryTable(t.fn, 63)
    with pytest.raises(TypeError, match="callable"):
        RotaryTable(None, D)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start"):
        t.get(5, 4)
    with pytest.raises(TypeError, match="start must be an int"):
        t.get(1.5, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stop must be an int"):
        t.get(0, "9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions a table holds"):
        t.get(0, 10**12)  # would allocate terabytes
    bad = RotaryTable(lambda p: (torch.full((len(p), D), math.nan), torch.zeros(len(p), D)), D)
    with pytest.raises(ValueError, match="non-finite"):
        bad.get(0, 3)


def test_mean_scores_equal_the_rotated_mean_dotted():
    """<q, R_p mu> from the table (the half-width table when both halves share their frequencies, the full one
    otherwise) equals q . apply_rotary(mu) at every position."""
    g = torch.Generator().manual_seed(6)
    freqs = torch.rand(D, generator=g, dtype=torch.float64)  # 64 distinct frequencies: no half table

    def distinct(pos):
        ang = pos.to(torch.float64)[:, None] * freqs[None]
        return ang.cos(), ang.sin()

    q, mu = torch.randn(2, 3, 5, D, generator=g), torch.randn(3, 1, D, generator=g)
    for t, half in ((llama_table(), True), (RotaryTable(distinct, D), False)):
        got = t.mean_scores(q, mu, 7, 300)
        assert (t._half is not None) == half
        cos, sin = t.get(7, 300)
        want = q @ apply_rotary(mu, cos, sin).transpose(-1, -2)  # (2, 3, 5, 293)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_from_model_matches_the_model_rotary():
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=D, rope_theta=5000.0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    t = RotaryTable.from_model(model)
    cos, sin = t.get(0, 20)
    ref_cos, ref_sin = model.model.rotary_emb(torch.zeros(1, 20, D), torch.arange(20)[None])
    assert torch.allclose(cos, ref_cos[0]) and torch.allclose(sin, ref_sin[0])
    assert torch.allclose(cos, llama_table(5000.0).get(0, 20)[0], atol=1e-6)
    with pytest.raises(ValueError, match="rotary_emb"):
        RotaryTable.from_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("window, path, sink", [(0, "lut", 0), (0, "decode", 1), (3, "lut", 2), (2, "auto", 0)])
def test_attention_from_codes_equals_sdpa_on_decoded_states(window, path, sink):
    t = llama_table()
    store = CodedKVStore(KVQuantConfig(bits=2, window=window, score_path=path, sink=sink), seed=4, rope=t)
    k, v = rotating_keys(t, B=2, L=12, seed=1)
    store.append(k[:, :, :7], v[:, :, :7])
    store.append(k[:, :, 7:], v[:, :, 7:])
    K, V = store.dequantized()
    # the decoded keys are the coded residuals plus R_p mu at their positions: error ~ the noise, not the mean
    assert float((K - k).pow(2).mean()) < 0.05 * float(k.pow(2).mean())
    q = torch.randn(2, 9, 4, D)
    mask = torch.ones(2, 1, 4, 12, dtype=torch.bool)
    mask[1, :, :, :3] = False
    out = store.attend(q, mask, scaling=0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-4)


def test_rope_centring_removes_a_rotating_mean():
    """Keys with a large fixed pre-RoPE mean: after RoPE the mean rotates, so the constant (post-RoPE) mean
    leaves it in the coded residual; the rotated pre-RoPE mean takes it out."""
    t = llama_table()
    k, v = rotating_keys(t, L=200, noise=0.3, seed=2)
    err = {}
    for rope in (t, None):
        store = CodedKVStore(KVQuantConfig(bits=3), rope=rope)
        store.append(k, v)
        err[rope is not None] = float((store.dequantized()[0] - k).pow(2).mean())
    assert err[True] < 0.1 * err[False]


def test_positions_token_by_token_window_and_crop():
    """Positions count from the first cached token: token-by-token appends give the one-chunk codes, and a crop
    followed by new tokens codes them at the right positions."""
    t = llama_table()
    k, v = rotating_keys(t, L=20, seed=3)
    for window in (0, 4):
        cfg = KVQuantConfig(bits=3, window=window, sink=1)
        a, b = CodedKVStore(cfg, rope=t), CodedKVStore(cfg, rope=t)
        a.append(k[:, :, :6], v[:, :, :6])  # the first coded chunk fixes the mean
        b.append(k[:, :, :6], v[:, :, :6])
        a.append(k[:, :, 6:], v[:, :, 6:])
        for i in range(6, 20):
            b.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
        ka, kb = a.key_codes, b.key_codes
        assert ka is not None and kb is not None
        assert torch.equal(ka.idx, kb.idx) and torch.equal(ka.t, kb.t) and torch.equal(ka.scale, kb.scale)
        assert torch.allclose(a.dequantized()[0], b.dequantized()[0])
    c = CodedKVStore(KVQuantConfig(bits=3, sink=1), rope=t)
    c.append(k[:, :, :15], v[:, :, :15])
    c.crop(5)
    c.append(k[:, :, 10:], v[:, :, 10:])
    d = CodedKVStore(KVQuantConfig(bits=3, sink=1), rope=t)
    d.append(k[:, :, :15], v[:, :, :15])
    d.append(k[:, :, 15:], v[:, :, 15:])
    assert torch.allclose(c.dequantized()[0], d.dequantized()[0], atol=1e-6)


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=576, intermediate_size=128, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=D, max_position_embeddings=256,
    )  # fmt: skip
    m = LlamaForCausalLM(cfg).eval()
    use_coset_attention(m)
    return m


def test_model_with_rope_cache_and_calibration():
    model = tiny_model()
    table = RotaryTable.from_model(model)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(8))
    mats = calibrate_key_transforms(model, ids, rope=table)
    # brute force of layer 0's key moments: k - R_p mu with mu the pre-RoPE mean (token 0 left out)
    from coset.kv.hf_cache import _attention_moments

    rec = {}
    h = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: rec.setdefault("k", o))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    pre = rec["k"].view(1, 40, 3, D).transpose(1, 2)[0, :, 1:].double()  # (3, 39, D) pre-RoPE, positions 1..39
    cos, sin = (x.double() for x in table.get(1, 40))
    res = apply_rotary(pre - pre.mean(1, keepdim=True), cos, sin)
    want = res.transpose(1, 2) @ res / 39
    got = _attention_moments(model, ids, table)[0]["k"]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    # a cache with the rope centring: attention from the codes == SDPA on the decoded cache, in a model
    cfg = KVQuantConfig(bits=2, value_bits=1, prefill="codes", sink=1)
    a = CosetQuantizedCache(model.config, cfg, key_scales=mats, rope=table)
    b = CosetQuantizedCache(model.config, cfg, return_codes=False, key_scales=mats, rope=table)
    with torch.no_grad():
        la, lb = model(ids[:, :30], past_key_values=a).logits, model(ids[:, :30], past_key_values=b).logits
        la2, lb2 = model(ids[:, 30:31], past_key_values=a).logits, model(ids[:, 30:31], past_key_values=b).logits
    assert torch.allclose(la, lb, atol=1e-4) and torch.allclose(la2, lb2, atol=1e-4)
    out = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, past_key_values=CosetQuantizedCache(
        model.config, KVQuantConfig(bits=4), rope=table))  # fmt: skip
    assert out.shape == (1, 14)


def test_bad_inputs():
    t = llama_table()
    with pytest.raises(ValueError, match="subtract_mean"):
        CodedKVStore(KVQuantConfig(subtract_mean=False), rope=t)
    with pytest.raises(TypeError, match="RotaryTable"):
        CodedKVStore(KVQuantConfig(), rope="llama")  # type: ignore[arg-type]
    model = tiny_model()
    with pytest.raises(TypeError, match="RotaryTable"):
        calibrate_key_transforms(model, torch.zeros(1, 8, dtype=torch.long), rope=object())  # type: ignore[arg-type]


def test_rotary_function_output_and_store_head_dim_are_checked():
    # regression (fuzz): a rotary fn returning the wrong shape or not a pair raised RuntimeError / unpacking
    # errors; a table of another head dim than the states failed inside the store with a RuntimeError
    def pair(pos, D=8):
        a = pos.float()[:, None] * torch.ones(D)
        return a.cos(), a.sin()

    for fn in (lambda p: None, lambda p: pair(p)[0], lambda p: pair(p, 16), lambda p: ("a", "b")):
        with pytest.raises(ValueError, match="rotary function"):
            RotaryTable(fn, 8).get(0, 3)
    store = CodedKVStore(KVQuantConfig(), rope=RotaryTable(pair, 8))
    with pytest.raises(ValueError, match="rope"):
        store.append(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    assert len(store) == 0
    with pytest.raises(TypeError, match="model"):
        RotaryTable.from_model("not a model")
