import pytest

from coset.kv import KVQuantConfig, ScalarKVConfig
from coset.kv.config import _BETA_TABLE, search_beta


@pytest.mark.parametrize(
    "kw, exc",
    [
        ({"bits": 5}, ValueError),
        ({"bits": 0}, ValueError),
        ({"bits": 2.0}, TypeError),
        ({"t_bits": 3}, ValueError),
        ({"alpha": 0.0}, ValueError),
        ({"beta": -1.0}, ValueError),
        ({"window": -1}, ValueError),
        ({"score_path": "fast"}, ValueError),
        ({"subtract_mean": 1}, TypeError),
        ({"prefill": "dense"}, ValueError),
        ({"key_channel_scale": -0.5}, ValueError),
        ({"key_channel_scale": float("nan")}, ValueError),
        ({"key_channel_scale": True}, ValueError),
        ({"value_bits": 0}, ValueError),
        ({"value_bits": 5}, ValueError),
        ({"value_bits": 3.0}, TypeError),
        ({"value_t_bits": 3}, ValueError),
        ({"value_t_bits": True}, ValueError),
        ({"value_alpha": 0.0}, ValueError),
        ({"value_alpha": float("inf")}, ValueError),
    ],
)
def test_bad_config(kw, exc):
    with pytest.raises(exc):
        KVQuantConfig(**kw)


def test_scalar_config_bits():
    assert ScalarKVConfig(bits=4, group_size=64).bits_per_element(64) == 4.5
    assert ScalarKVConfig(bits=2, group_size=128).bits_per_element(64) == (2.25 + 2.5) / 2
    with pytest.raises(ValueError):
        ScalarKVConfig(bits=9)
    with pytest.raises(ValueError):
        ScalarKVConfig(group_size=0)


def test_value_bits_split_reaches_integer_rates_exactly():
    # keys M and values M - 1 at t_bits = 2 (0.5 b of side information each): exactly M all-in
    for kb, vb, want in ((4, 3, 4.0), (3, 2, 3.0), (2, 1, 2.0), (4, 4, 4.5)):
        cfg = KVQuantConfig(bits=kb, value_bits=vb)
        assert cfg.bits_per_element(64) == want
        assert cfg.bytes_per_vector(64, "k") == 8 * kb + 2 + 2 and cfg.bytes_per_vector(64, "v") == 8 * vb + 4
        assert cfg.key_config().bits == kb and cfg.value_config().bits == vb
        assert cfg.value_config().value_bits is None and cfg.value_config().t_bits == cfg.t_bits
    one = KVQuantConfig(bits=4)
    assert one.value_config() is one and one.key_config() is one  # the store then encodes K and V in one call
    with pytest.raises(ValueError):
        KVQuantConfig().bytes_per_vector(64, "q")
    # KIVI: (4 + 32/64 + 3 + 32/64) / 2 = 4.0
    assert ScalarKVConfig(bits=4, value_bits=3).bits_per_element(64) == 4.0
    assert ScalarKVConfig(bits=2, value_bits=1).bits_per_element(64) == 2.0
    with pytest.raises(ValueError):
        ScalarKVConfig(value_bits=9)


def test_value_t_bits_and_alpha_give_the_values_their_own_ramp():
    # keys 4 label bits + 4 T bits + 8-bit scale (4.625), values 3 + 2 T bits + 8-bit scale (3.375): 4.0
    cfg = KVQuantConfig(bits=4, t_bits=4, alpha=0.25, scale_bits=8, value_bits=3, value_t_bits=2, value_alpha=0.5)
    assert cfg.bits_per_element(64) == 4.0
    assert cfg.bytes_per_vector(64, "k") == 32 + 4 + 1 and cfg.bytes_per_vector(64, "v") == 24 + 2 + 1
    k, v = cfg.key_config(), cfg.value_config()
    assert (k.bits, k.t_bits, k.alpha) == (4, 4, 0.25) and (v.bits, v.t_bits, v.alpha) == (3, 2, 0.5)
    assert all(c.value_bits is None and c.value_t_bits is None and c.value_alpha is None for c in (k, v))
    assert k.quant_config().max_scaling_iterations == 15 and v.quant_config().max_scaling_iterations == 3
    # the calibrated beta follows each side's own code
    assert v.resolved_beta == KVQuantConfig(bits=3, t_bits=2, alpha=0.5).resolved_beta
    # T bits alone differ: same label bits, different T bytes
    only_t = KVQuantConfig(bits=3, value_t_bits=4, value_alpha=0.25)
    assert only_t.key_config() is not only_t.value_config()
    assert only_t.bytes_per_vector(64, "v") - only_t.bytes_per_vector(64, "k") == 2


def test_quant_config_is_e8_q2_centred():
    qc = KVQuantConfig(bits=3, t_bits=2, alpha=0.5).quant_config()
    assert (qc.lattice_type, qc.q, qc.M, qc.center, qc.max_scaling_iterations) == ("E8", 2, 3, True, 3)
    assert qc.beta == _BETA_TABLE[(3, 2, 0.5)]


@pytest.mark.slow
def test_beta_table_entry_is_the_grid_search_result():
    assert search_beta(4, 2, 0.5) == _BETA_TABLE[(4, 2, 0.5)]


def test_config_rejects_float_choices_and_out_of_range_beta():
    # regression (fuzz): t_bits=2.0 / scale_bits=8.0 were accepted and failed later inside coset.quant, or gave
    # float byte counts; beta=1e300 decoded to NaN, beta=1e-300 raised from the encoder at the first append
    for kw in ({"t_bits": 2.0}, {"scale_bits": 8.0}, {"value_t_bits": 1.0}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            KVQuantConfig(**kw)
    for beta in (1e300, 1e-300, 2.0**21):
        with pytest.raises(ValueError, match="beta"):
            KVQuantConfig(beta=beta)
    with pytest.raises(ValueError, match="alpha"):
        KVQuantConfig(alpha=10.0, t_bits=4)  # top step 2^150: past float32
    # head dims that are not whole E8 blocks: a clear error instead of ZeroDivisionError / nonsense rates
    for bad in (0, -8, 4, 12):
        with pytest.raises(ValueError, match="head_dim"):
            KVQuantConfig().bits_per_element(bad)
        with pytest.raises(ValueError, match="head_dim"):
            ScalarKVConfig().bits_per_element(bad)
