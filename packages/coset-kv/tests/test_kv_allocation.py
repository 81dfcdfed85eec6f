"""Per-layer allocation at an exact mean rate: the DP and the trellis greedy equal brute force; layer
sensitivities on a tiny Llama."""

import itertools
import math

import pytest
import torch

from coset.kv import KVQuantConfig, TrellisCode, allocate_layers, allocate_trellis

OPTS = [KVQuantConfig(bits=2, value_bits=1), KVQuantConfig(bits=3, value_bits=2), KVQuantConfig(bits=4, value_bits=3)]


def model_cost(choice, s, ref=2.0):
    return sum(sl * 4.0 ** -(o.bits_per_element(64) - ref) for sl, o in zip(s, choice, strict=True))


@pytest.mark.parametrize("target", [2.0, 2.4, 3.0, 3.2, 4.0])
def test_allocation_is_the_exact_rate_optimum(target):
    s = [0.03, 0.001, 0.2, 0.0, 0.05]
    got = allocate_layers(s, OPTS, target, reference_bits=2.0)
    assert sum(o.bits_per_element(64) for o in got) == pytest.approx(target * len(s), abs=1e-12)
    feasible = [
        c
        for c in itertools.product(OPTS, repeat=len(s))
        if abs(sum(o.bits_per_element(64) for o in c) - target * len(s)) < 1e-9
    ]
    assert model_cost(got, s) == pytest.approx(min(model_cost(c, s) for c in feasible), rel=1e-12)
    if target == 3.0:  # the most sensitive layer gets the most bits, the insensitive ones the fewest
        assert got[2].bits == 4 and got[3].bits == 2


def test_allocation_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        allocate_layers([0.1, 0.2], OPTS, 4.5, reference_bits=2.0)
    with pytest.raises(ValueError, match="averages"):  # 2 layers of integer rates cannot average 2.25
        allocate_layers([0.1, 0.2], OPTS, 2.25, reference_bits=2.0)
    with pytest.raises(ValueError, match="sensitivity"):
        allocate_layers([0.1, float("nan")], OPTS, 3.0, reference_bits=2.0)
    with pytest.raises(ValueError, match="sensitivity"):
        allocate_layers([], OPTS, 3.0, reference_bits=2.0)
    with pytest.raises(ValueError, match="options"):
        allocate_layers([0.1], [], 3.0, reference_bits=2.0)
    with pytest.raises(ValueError, match="target_bits"):
        allocate_layers([0.1], OPTS, 0.0, reference_bits=2.0)


def test_layer_sensitivity_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    from coset.kv.hf_cache import CosetQuantizedCache, layer_sensitivity, use_coset_attention

    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=192,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    use_coset_attention(model)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    low = layer_sensitivity(model, ids, KVQuantConfig(bits=1))
    high = layer_sensitivity(model, ids, KVQuantConfig(bits=4))
    assert len(low) == len(high) == 2
    assert sum(abs(x) for x in high) < sum(abs(x) for x in low)
    # the measured figure is the loss of a cache coding only that layer, minus that of the exact cache
    with torch.no_grad():

        def loss(configs):
            cache = CosetQuantizedCache(cfg, configs)
            logits = model(ids, past_key_values=cache).logits[:, :-1]
            return float(torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), ids[:, 1:]))

        exact = KVQuantConfig(window=2**31 - 1, prefill="codes")
        coded = KVQuantConfig(bits=1, prefill="codes")
        assert low[1] == pytest.approx(loss([exact, coded]) - loss([exact, exact]), abs=1e-9)
        dense = model(ids).logits[:, :-1]  # the exact cache is the float model
        ref = float(torch.nn.functional.cross_entropy(dense.double().transpose(1, 2), ids[:, 1:]))
        assert loss([exact, exact]) == pytest.approx(ref, abs=1e-5)
    with pytest.raises(TypeError):
        layer_sensitivity(model, ids, None)


def test_allocate_layers_hostile_inputs():
    # regression (fuzz): OverflowError for a huge reference rate, ZeroDivisionError for head_dim 0, unnamed
    # errors for non-numeric sensitivities, and a DP whose time grew as layers^3 (a hang past ~1000 layers)
    opts = [KVQuantConfig(bits=b) for b in (2, 3, 4)]
    a = allocate_layers([1.0, 2.0, 3.0], opts, 3.5, 3.5)
    assert allocate_layers([1.0, 2.0, 3.0], opts, 3.5, 1e300) == a  # the reference rate is a common factor
    assert allocate_layers([1e308, 5e307, 1e308], opts, 3.5, 3.5)  # no inf costs
    for bad in (["a"], None, [[1.0]]):
        with pytest.raises(ValueError, match="sensitivity"):
            allocate_layers(bad, opts, 3.5, 3.5)
    with pytest.raises(ValueError, match="head_dim"):
        allocate_layers([1.0], opts, 3.5, 3.5, head_dim=0)
    with pytest.raises(ValueError, match="512"):
        allocate_layers([1.0] * 513, opts, 3.5, 3.5)
    got = allocate_layers([float(i % 7) for i in range(512)], opts, 3.5, 3.5)  # fast (a few seconds at most)
    assert sum(c.bits_per_element(64) for c in got) == 3.5 * 512


BASE = KVQuantConfig(sink=1, key_code=TrellisCode(16, 8), value_code=TrellisCode(16, 8, unbiased=False))


def trellis_cost(cfgs, ks, vs):
    return sum(
        a * 4.0 ** (-c.key_code.block_bits / 8) + b * 4.0 ** (-c.value_code.block_bits / 8)
        for a, b, c in zip(ks, vs, cfgs, strict=True)
    )


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 3.3125])
@pytest.mark.parametrize("seed", [0, 1])
def test_trellis_allocation_is_the_exact_rate_optimum(target, seed):
    g = torch.Generator().manual_seed(seed)
    ks = (torch.rand(2, generator=g) * 10).exp2().tolist()
    vs = (torch.rand(2, generator=g) * 10).exp2().tolist()
    got = allocate_trellis(ks, vs, target, BASE, max_cut=0.25)
    assert sum(c.bits_per_element(64) for c in got) == pytest.approx(2 * target, abs=1e-12)
    for c in got:  # only the block bits change
        assert c.sink == 1 and c.key_code.state_bits == c.value_code.state_bits == 8 and not c.value_code.unbiased
    # brute force over every split of the block bits with the same floor
    total = sum(c.key_code.block_bits + c.value_code.block_bits for c in got)
    floor = -(-(total / 4 - 2) // 1)  # ceil(mean - 8 * 0.25)
    assert min(b for c in got for b in (c.key_code.block_bits, c.value_code.block_bits)) >= floor
    best = min(
        sum(a * 4.0 ** (-b / 8) for a, b in zip(ks + vs, (k0, k1, v0, v1), strict=True))
        for k0, k1, v0 in itertools.product(range(int(floor), 33), repeat=3)
        if int(floor) <= (v1 := total - k0 - k1 - v0) <= 32
    )
    assert trellis_cost(got, ks, vs) == pytest.approx(best, rel=1e-12)


def test_trellis_allocation_floor_and_order():
    ks, vs = [1.0, 0.0, 50.0], [3.0, 2.0, 1.0]
    got = allocate_trellis(ks, vs, 3.0, BASE)  # mean stream rate 23 block bits, floor 19
    kb = [c.key_code.block_bits for c in got]
    vb = [c.value_code.block_bits for c in got]
    assert sum(kb) + sum(vb) == 6 * 23 and kb[1] == 19 and min(kb + vb) >= 19
    assert kb[2] == max(kb + vb)  # the most sensitive unit gets the most bits
    assert vb[0] >= vb[1] >= vb[2]  # and more sensitivity never fewer
    flat = allocate_trellis(ks, vs, 3.0, BASE, max_cut=0.0)  # no room below the mean: uniform
    assert all(c.key_code.block_bits == c.value_code.block_bits == 23 for c in flat)
    top = allocate_trellis(ks, vs, 4.125, BASE)  # every unit at its ceiling
    assert all(c.key_code.block_bits == c.value_code.block_bits == 32 for c in top)


def test_trellis_allocation_errors():
    with pytest.raises(ValueError, match="length"):
        allocate_trellis([1.0, 2.0], [1.0], 3.0, BASE)
    with pytest.raises(ValueError, match="key_sensitivity"):
        allocate_trellis([1.0, -2.0], [1.0, 1.0], 3.0, BASE)
    with pytest.raises(ValueError, match="value_sensitivity"):
        allocate_trellis([1.0], [float("nan")], 3.0, BASE)
    with pytest.raises(ValueError, match="value_sensitivity"):
        allocate_trellis([1.0], [], 3.0, BASE)
    with pytest.raises(ValueError, match="trellis"):
        allocate_trellis([1.0], [1.0], 3.0, KVQuantConfig(bits=3))
    with pytest.raises(TypeError, match="base"):
        allocate_trellis([1.0], [1.0], 3.0, "trellis")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1/16"):
        allocate_trellis([1.0], [1.0], 3.01, BASE)
    with pytest.raises(ValueError, match="outside"):
        allocate_trellis([1.0], [1.0], 4.25, BASE)  # past 32 block bits per unit
    with pytest.raises(ValueError, match="outside"):
        allocate_trellis([1.0], [1.0], 0.5, BASE)
    with pytest.raises(ValueError, match="max_cut"):
        allocate_trellis([1.0], [1.0], 3.0, BASE, max_cut=-0.5)
    with pytest.raises(ValueError, match="target_bits"):
        allocate_trellis([1.0], [1.0], float("inf"), BASE)


def head_cost(cfgs, ks, vs):
    return sum(
        trellis_cost(layer, kl, vl) for layer, kl, vl in zip(cfgs, ks, vs, strict=True)
    )  # per layer: the heads' configs against their sensitivities


def brute_force(sens, total, floor):
    """Least ``sum a 4^(-b/8)`` over every split of ``total`` block bits into ``len(sens)`` units in
    ``[floor, 32]``."""
    n, best = len(sens), float("inf")
    for head in itertools.product(range(floor, 33), repeat=n - 1):
        last = total - sum(head)
        if floor <= last <= 32:
            best = min(best, sum(a * 4.0 ** (-b / 8) for a, b in zip(sens, (*head, last), strict=True)))
    return best


@pytest.mark.parametrize(
    ("layers", "heads", "target", "max_cut"),
    [(1, 2, 2.5, 0.5), (1, 2, 3.0, 1.0), (1, 3, 3.3125, 0.25), (2, 2, 3.875, 0.25), (2, 2, 3.75, 0.25)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_head_allocation_is_the_exact_rate_optimum(layers, heads, target, max_cut, seed):
    from coset.kv import allocate_trellis_heads

    g = torch.Generator().manual_seed(seed)
    ks = (torch.rand(layers, heads, generator=g) * 10).exp2().tolist()
    vs = (torch.rand(layers, heads, generator=g) * 10).exp2().tolist()
    got = allocate_trellis_heads(ks, vs, target, BASE, max_cut=max_cut)
    assert len(got) == layers and all(isinstance(t, tuple) and len(t) == heads for t in got)
    flat = [c for layer in got for c in layer]
    # the exact mean rate over every head of every layer; only the block bits change
    assert sum(c.bits_per_element(64) for c in flat) == pytest.approx(target * layers * heads, abs=1e-12)
    assert all(c.sink == 1 and c.key_code.state_bits == 8 and not c.value_code.unbiased for c in flat)
    bits = [b for c in flat for b in (c.key_code.block_bits, c.value_code.block_bits)]
    floor = math.ceil(sum(bits) / len(bits) - 8 * max_cut - 1e-9)
    assert min(bits) >= floor
    sens = [a for kl, vl in zip(ks, vs, strict=True) for kv in zip(kl, vl, strict=True) for a in kv]
    assert head_cost(got, ks, vs) == pytest.approx(brute_force(sens, sum(bits), floor), rel=1e-12)


def test_head_allocation_of_one_head_per_layer_is_the_layer_allocation():
    from coset.kv import allocate_trellis_heads

    g = torch.Generator().manual_seed(3)
    ks, vs = (torch.rand(5, generator=g) * 8).exp2().tolist(), (torch.rand(5, generator=g) * 8).exp2().tolist()
    for target in (2.0, 3.0, 3.4375):
        per_layer = allocate_trellis(ks, vs, target, BASE)
        per_head = allocate_trellis_heads([[a] for a in ks], [[b] for b in vs], target, BASE)
        assert per_head == [(c,) for c in per_layer]
    # equal heads: each head of a layer gets the layer's bits when the layer's bits split evenly
    same = allocate_trellis_heads([[a] * 2 for a in ks], [[b] * 2 for b in vs], 3.0, BASE)
    assert all(len(set(layer)) <= 2 for layer in same)


def test_head_allocation_errors():
    from coset.kv import allocate_trellis_heads

    with pytest.raises(ValueError, match="differ"):
        allocate_trellis_heads([[1.0, 2.0]], [[1.0]], 3.0, BASE)
    with pytest.raises(ValueError, match="length"):
        allocate_trellis_heads([[1.0], [2.0]], [[1.0]], 3.0, BASE)
    with pytest.raises(ValueError, match=r"key_sensitivity\[1\]"):
        allocate_trellis_heads([[1.0], [-2.0]], [[1.0], [1.0]], 3.0, BASE)
    with pytest.raises(ValueError, match=r"value_sensitivity\[0\]"):
        allocate_trellis_heads([[1.0]], [[]], 3.0, BASE)
    with pytest.raises(ValueError, match="key_sensitivity"):
        allocate_trellis_heads([1.0, 2.0], [[1.0], [2.0]], 3.0, BASE)  # not per-head sequences
    with pytest.raises(ValueError, match="key_sensitivity"):
        allocate_trellis_heads([], [], 3.0, BASE)
    with pytest.raises(ValueError, match="key_sensitivity"):
        allocate_trellis_heads("ab", "ab", 3.0, BASE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="base"):
        allocate_trellis_heads([[1.0]], [[1.0]], 3.0, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1/16"):
        allocate_trellis_heads([[1.0, 1.0]], [[1.0, 1.0]], 3.01, BASE)
    with pytest.raises(ValueError, match="outside"):
        allocate_trellis_heads([[1.0, 1.0]], [[1.0, 1.0]], 4.25, BASE)
