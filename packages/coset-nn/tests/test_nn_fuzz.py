"""Fuzz coset.nn's public entry points (issue 11): random shapes, configs, weight scales and bytes give either a
documented exception with a message or a result with the layer's invariants (finite, shapes, exact round trip
through state_dict)."""

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from coset.nn import ClampWarning, QATConfig, QLinear, load_compressed
from coset.quant import QuantizationConfig

_FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_wcfg = st.builds(
    QuantizationConfig,
    lattice_type=st.sampled_from(["D4", "E8", "Z2", "Z3"]),
    q=st.integers(2, 8),
    M=st.integers(1, 3),
    alpha=st.sampled_from([1 / 3, 0.5, 1.0]),
    max_scaling_iterations=st.integers(0, 12),
    center=st.booleans(),
)


@_FAST
@given(
    wcfg=_wcfg,
    granularity=st.sampled_from(["per_channel", "per_tensor", "fixed"]),
    c_out=st.integers(1, 5),
    k=st.integers(1, 21),
    scale=st.floats(1e-12, 1e12),
    seed=st.integers(0, 2**31),
)
def test_nn_fuzz_layer_invariants(wcfg, granularity, c_out, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    qat = QATConfig(weight=wcfg, granularity=granularity)
    q = QLinear(k, c_out, qconfig=qat).eval()
    with torch.no_grad():
        q.weight.copy_(torch.randn(c_out, k, generator=g) * scale)
    x = torch.randn(3, k, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClampWarning)
        y = q(x)
    assert y.shape == (3, c_out)
    w_hat = q.quantized_weight()
    assert w_hat.shape == q.weight.shape and bool(torch.isfinite(w_hat).all())
    labels, T, betas = q.codes()
    nb = -(-k // wcfg.dim)
    assert labels.shape == (c_out, nb, wcfg.M, wcfg.dim) and int(labels.max()) < wcfg.q
    assert T.shape == (c_out, nb) and int(T.max()) <= wcfg.max_scaling_iterations
    st_ = q.stats()
    assert 0 <= st_["clamped_blocks"] <= st_["overloaded_blocks"] <= st_["blocks"] == c_out * nb
    # the state round-trips exactly into a fresh layer of the same config ...
    fresh = QLinear(k, c_out, qconfig=qat).eval()
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.quantized_weight(), w_hat)
    assert torch.equal(fresh(x), y)


@_FAST
@given(data=st.binary(max_size=200))
def test_nn_fuzz_random_bytes_checkpoint_is_a_clear_error(tmp_path, data):
    p = tmp_path / "r.safetensors"
    p.write_bytes(data)
    try:
        load_compressed(nn.Sequential(nn.Linear(4, 2)), p)
    except ValueError as e:
        assert "r.safetensors" in str(e)
    else:  # only a valid safetensors file without layers could load; random bytes are never one
        raise AssertionError("random bytes loaded as a checkpoint")
