"""``KVQuantConfig.self_exact``: each appended token reads its own key and value exactly, every earlier token
through the codes; checked against a brute-force attention over per-query key/value matrices, and a one-forward
prefill against token-by-token decoding on a tiny random Llama."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from coset.kv import CodedKVStore, KeyTransform, KVQuantConfig, PerHeadKVStore, TrellisCode  # noqa: E402
from coset.kv.hf_cache import CosetQuantizedCache, use_coset_attention  # noqa: E402

TK = KVQuantConfig(sink=1, key_code=TrellisCode(20, 8), value_code=TrellisCode(16, 8), self_exact=True)
CONFIGS = {
    "e8": KVQuantConfig(bits=2, self_exact=True),
    "e8-sink-split": KVQuantConfig(bits=3, value_bits=2, sink=2, self_exact=True),
    "e8-window": KVQuantConfig(bits=2, window=3, self_exact=True),
    "e8-no-mean-chan": KVQuantConfig(bits=2, subtract_mean=False, key_channel_scale=0.5, self_exact=True),
    "trellis": TK,
}


def states(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, 3, L, 64, generator=g), torch.randn(B, 3, L, 64, generator=g)
    return 2 * k + 1, v - 0.5  # off-centre: the means are subtracted and added back


def transform(seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(3, 64, 8, generator=g))[0]
    return KeyTransform(v.to(torch.float16), torch.exp2(4 * torch.rand(3, 8, generator=g) - 2).to(torch.float16))


def brute_force(store, k_new, v_new, first, q, mask, scaling):
    """Query ``i`` (the last ``Lq`` positions) over the decoded cache with its own column replaced by the
    exact state when that token is one of the new ones (cache index ``first + j``) and coded (not window)."""
    K, V = (x.to(torch.float32) for x in store.dequantized())
    Lq, Lk = q.shape[2], K.shape[2]
    coded = range(store.num_sink, store.num_sink + store.num_coded)
    outs = []
    for i in range(Lq):
        c = Lk - Lq + i
        Ki, Vi = K.clone(), V.clone()
        if c in coded and 0 <= c - first < k_new.shape[2]:
            Ki[:, :, c], Vi[:, :, c] = k_new[:, :, c - first], v_new[:, :, c - first]
        mi = None if mask is None else mask[:, :, i : i + 1, :Lk]
        if mask is None:  # causal: the query at position c sees keys 0..c
            mi = (torch.arange(Lk) <= c).view(1, 1, 1, Lk)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, i : i + 1], Ki, Vi, attn_mask=mi, scale=scaling, enable_gqa=True
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("per_head", [False, True])
def test_self_exact_attention_equals_brute_force(name, per_head):
    cfg = CONFIGS[name]
    key_scale = transform() if cfg.key_code is not None else None
    store = (
        PerHeadKVStore([cfg] * 3, seed=3, key_scale=key_scale)
        if per_head
        else CodedKVStore(cfg, 3, key_scale=key_scale)
    )
    strict = CodedKVStore(dataclasses.replace(cfg, self_exact=False), 3, key_scale=key_scale)
    k, v = states(2, 12, seed=2)
    for s, e in ((0, 7), (7, 12)):
        store.append(k[:, :, s:e], v[:, :, s:e])
        strict.append(k[:, :, s:e], v[:, :, s:e])
    assert store.nbytes == strict.nbytes  # no stored byte changes
    q = torch.randn(2, 9, 4, 64, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 1, 4, 12, dtype=torch.bool)
    mask[1, :, :, :2] = False  # left padding of the second row
    for m in (None, mask):
        out = store.attend(q, m, scaling=0.125)
        ref = brute_force(store, k[:, :, 7:], v[:, :, 7:], 7, q, m, 0.125)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
        # the strict store reads every token from its codes; the difference is the own tokens only
        assert not torch.allclose(out, strict.attend(q, m, scaling=0.125), atol=1e-3)
    # one decoding step: the new token reads itself exactly
    k1, v1 = states(2, 1, seed=9)
    store.append(k1, v1)
    q1 = q[:, :, :1]
    torch.testing.assert_close(store.attend(q1), brute_force(store, k1, v1, 12, q1, None, None), rtol=1e-5, atol=2e-5)


def test_self_exact_after_crop_reorder_and_reset():
    cfg = CONFIGS["e8-sink-split"]
    a, b = CodedKVStore(cfg, 1), CodedKVStore(dataclasses.replace(cfg, self_exact=False), 1)
    k, v = states(2, 9, seed=4)
    for s in (a, b):
        s.append(k, v)
    q = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(6))
    # a reorder moves the fresh states with the batch
    a.map_batch(lambda x: x.flip(0))
    ref = brute_force(a, k.flip(0)[:, :, 2:], v.flip(0)[:, :, 2:], 2, q, None, None)
    torch.testing.assert_close(a.attend(q), ref, rtol=1e-5, atol=2e-5)
    a.map_batch(lambda x: x.flip(0))
    # after a crop the newest token was appended earlier: it reads its codes, as the strict store does
    a.crop(1)
    b.crop(1)
    torch.testing.assert_close(a.attend(q), b.attend(q), rtol=0, atol=0)
    a.reset()
    assert a._fresh is None and len(a) == 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=576,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=256,
    )
    m = LlamaForCausalLM(cfg).eval()
    use_coset_attention(m)
    return m


@pytest.mark.parametrize("self_exact", [True, False])
@pytest.mark.parametrize("name", ["e8-sink-split", "trellis"])
def test_one_forward_equals_token_by_token_decoding(model, name, self_exact):
    """With ``prefill="codes"`` the ppl benchmark's one forward over a window is what decoding it token by
    token with the cache gives (the first chunk is shared: it fixes the frozen means)."""
    cfg = dataclasses.replace(CONFIGS[name], prefill="codes", self_exact=self_exact)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    one, steps = CosetQuantizedCache(model.config, cfg), CosetQuantizedCache(model.config, cfg)
    with torch.no_grad():
        model(ids[:, :4], past_key_values=one)
        model(ids[:, :4], past_key_values=steps)
        a = model(ids[:, 4:], past_key_values=one).logits
        b = torch.cat([model(ids[:, t : t + 1], past_key_values=steps).logits for t in range(4, 16)], dim=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert one.nbytes == steps.nbytes


def test_self_exact_helps_and_is_validated(model):
    """On the tiny Llama at 2 bits, reading the own token exactly moves the logits toward the fp32 cache's."""
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(ids).logits
        err = {}
        for se in (False, True):
            cache = CosetQuantizedCache(model.config, KVQuantConfig(bits=1, prefill="codes", self_exact=se))
            err[se] = float((model(ids, past_key_values=cache).logits - ref).pow(2).mean())
    assert err[True] < err[False]
    with pytest.raises(TypeError, match="self_exact"):
        KVQuantConfig(self_exact=1)  # type: ignore[arg-type]
