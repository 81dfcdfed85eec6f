"""Issue 10/11 for coset.dist: no silently ignored config field, no silent wrong result on huge or damaged data,
and a fuzz test of the payload codec (documented exception with a message, or a result with the invariants)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import coset.dist
from coset.dist import HNLQHookState, default_config
from coset.dist.codec import decode_payload, encode_payload, payload_layout
from coset.quant import QuantizationConfig, decode, encode, to_blocks


def test_dist_public_api_is_the_hook_the_state_register_default_config():
    assert sorted(coset.dist.__all__) == sorted(["hnlq_hook", "HNLQHookState", "register", "default_config"])


def test_dist_modular_mode_refuses_the_fields_it_would_ignore():
    with pytest.raises(ValueError, match="beta=0.3 is not used in modular mode"):
        HNLQHookState(config=default_config().replace(beta=0.3), mode="modular")
    with pytest.raises(ValueError, match="center"):
        HNLQHookState(config=default_config().replace(center=True), mode="modular")
    # its defaults (and the plain QuantizationConfig default) are accepted; allgather uses beta (RMS units)
    HNLQHookState(config=default_config(), mode="modular")
    HNLQHookState(config=QuantizationConfig(), mode="modular")
    HNLQHookState(config=default_config().replace(beta=0.3), mode="allgather")


def test_dist_state_dict_with_nonfinite_residuals_is_refused():
    s = HNLQHookState()
    sd = s.state_dict()
    sd["residuals"] = {0: torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match=r"residuals\[0\] holds NaN"):
        HNLQHookState().load_state_dict(sd)
    sd = s.state_dict()
    sd["counters"] = {"bogus": 1}
    with pytest.raises(ValueError, match="bogus"):
        HNLQHookState().load_state_dict(sd)


def test_dist_payload_beyond_float32_is_flagged_not_zeroed():
    # the payload codes float32 (the gradients' wire precision): float64 values beyond its range are flagged
    # non-finite (the hook then raises or falls back to a plain all-reduce), never silently decoded as 0/NaN
    x = torch.tensor([1e200, -3e199, 5e199, 2e200, 0.0, 1e199, -1e200, 4e199], dtype=torch.float64)
    cfg = default_config()
    p, info = encode_payload(x, cfg)
    assert info["nonfinite"]
    _, flag = decode_payload(p, x.numel(), cfg)
    assert flag
    y = x / 1e170  # float32-representable: decoded close to x
    p, info = encode_payload(y, cfg)
    assert not info["nonfinite"] and math.isfinite(info["rho"]) and info["rho"] > 0
    yh, flag = decode_payload(p, y.numel(), cfg)
    assert not flag and bool(torch.isfinite(yh).all())
    assert float((yh - y).norm() / y.norm()) < 0.2
    # squares of float32 values near the top of its range do not overflow the float64 sum of squares
    z = torch.full((8,), 3e38, dtype=torch.float32)
    p, info = encode_payload(z, cfg)
    assert not info["nonfinite"] and info["rho"] == pytest.approx(3e38, rel=1e-6)


_configs = st.builds(
    QuantizationConfig,
    lattice_type=st.sampled_from(["D4", "E8", "Z2"]),
    q=st.integers(2, 8),
    M=st.integers(1, 3),
    alpha=st.sampled_from([1 / 3, 1.0]),
    max_scaling_iterations=st.integers(0, 12),
)


@settings(max_examples=40, deadline=None)
@given(cfg=_configs, n=st.integers(0, 70), scale=st.floats(1e-20, 1e20), seed=st.integers(0, 2**31))
def test_dist_fuzz_payload_round_trip_is_coset_quant(cfg, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    p, info = encode_payload(x, cfg)
    lay = payload_layout(n, cfg)
    assert p.dtype == torch.uint8 and p.numel() == lay.nbytes
    xh, flag = decode_payload(p, n, cfg)
    assert not flag and xh.shape == (n,) and bool(torch.isfinite(xh).all())
    if n:  # exactly coset.quant's codes of the float32 RMS-normalized blocks, scaled by the float32 rho
        blocks, _ = to_blocks(x.float() / torch.tensor(info["rho"], dtype=torch.float32), cfg.dim)
        b, T = encode(blocks, config=cfg)
        rho32 = float(torch.tensor(info["rho"], dtype=torch.float32))
        assert torch.equal(xh, (decode(b, config=cfg, T=T, dtype=torch.float64) * rho32).reshape(-1)[:n])


@settings(max_examples=40, deadline=None)
@given(cfg=_configs, n=st.integers(1, 40), data=st.data())
def test_dist_fuzz_damaged_payload_raises_or_decodes_finite(cfg, n, data):
    lay = payload_layout(n, cfg)
    raw = data.draw(st.binary(min_size=lay.nbytes, max_size=lay.nbytes))
    p = torch.tensor(list(raw), dtype=torch.uint8)
    try:
        xh, flag = decode_payload(p, n, cfg)
    except ValueError as e:
        assert str(e)
        return
    assert xh.shape == (n,) and xh.dtype == torch.float64 and bool(torch.isfinite(xh).all())
    with pytest.raises(ValueError, match="payload"):
        decode_payload(p[:-1], n, cfg)
