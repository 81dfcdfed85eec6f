"""HNLQLinear: forward equals F.linear with the dequantized code, only compressed state, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coset.ptq.codes import LinearCodes, Rotation
from coset.ptq.layers import HNLQLinear, HNLQSpec
from coset.quant import QuantizationConfig, encode


def make_codes(m, n, cfg, *, rotate=True, per_row=False, seed=0, overload=False, wseed=None) -> LinearCodes:
    """A LinearCodes built by hand: rotate a random W, scale, encode its d-blocks (round to nearest)."""
    g = torch.Generator().manual_seed(seed if wseed is None else wseed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    rin = Rotation(n, 1000 + seed) if rotate else None
    rout = Rotation(m, 2000 + seed) if rotate else None
    Wt = W
    if rin is not None:
        Wt = rin.apply(Wt)
    if rout is not None:
        Wt = rout.apply(Wt.t()).t()
    s = Wt.pow(2).mean(dim=1).sqrt() if per_row else Wt.pow(2).mean().sqrt()
    s = s / (8.0 if overload else 1.0)  # overload=True: a small scale overloads many blocks (T > 0)
    x = Wt / (s[:, None] if per_row else s)
    b, T = encode(x.reshape(m, n // cfg.dim, cfg.dim), config=cfg)
    return LinearCodes(cfg, b, T, s.to(torch.float32), rin, rout, n, m)


E8 = QuantizationConfig(lattice_type="E8", q=4, M=2, beta=1.0)
D4C = QuantizationConfig(lattice_type="D4", q=2, M=3, beta=1.0, center=True)  # generic path (4-bit indices)
D4 = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=1.0)  # direct path, uint8 indices
E8C = QuantizationConfig(lattice_type="E8", q=4, M=1, beta=1.0, center=True)  # direct path, centred


@pytest.mark.parametrize("cfg", [E8, D4C, D4, E8C], ids=["E8q4M2", "D4q2M3c", "D4q4M2", "E8q4M1c"])
@pytest.mark.parametrize("rotate,per_row,overload", [(True, False, False), (True, True, True), (False, True, False)])
def test_forward_equals_linear_with_dequantized(cfg, rotate, per_row, overload):
    codes = make_codes(48, 96, cfg, rotate=rotate, per_row=per_row, overload=overload)
    if overload:
        assert int(codes.T.max()) > 0  # the compact-T path with non-zero T is exercised
    bias = torch.randn(48)
    mod = HNLQLinear.from_codes(codes, bias)
    x = torch.randn(3, 5, 96)
    ref = F.linear(x.double(), codes.dequantize(torch.float64), bias.double())
    for path in ("decode", "lut"):
        y = mod(x, path=path)
        assert y.shape == (3, 5, 48) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod.dequantize(torch.float64), codes.dequantize(torch.float64), rtol=1e-6, atol=1e-6)


def test_unpacked_codes_equal_the_input_codes():
    codes = make_codes(16, 64, E8, overload=True)
    mod = HNLQLinear.from_codes(codes)
    b, T = mod.codes()
    assert torch.equal(b, codes.labels) and torch.equal(T.to(torch.int64), codes.T.to(torch.int64))


def test_no_float_copy_of_the_weight():
    codes = make_codes(64, 128, E8, per_row=True)  # 4 bits/weight nominal
    mod = HNLQLinear.from_codes(codes, torch.zeros(64))
    fp32_bytes = 64 * 128 * 4
    buf_bytes = sum(b.numel() * b.element_size() for b in mod.buffers())
    # 4-bit labels are 1/8 of fp32; a float copy of W (even fp16) would push the state past 0.6x.
    assert buf_bytes < 0.6 * fp32_bytes
    assert buf_bytes < 0.2 * fp32_bytes
    # no tensor of the state has m*n elements of a float dtype
    for name, t in mod.state_dict().items():
        assert not (t.dtype.is_floating_point and t.numel() >= 64 * 128), name
    params = dict(mod.named_parameters())
    assert set(params) == {"bias"}


def test_cache_weight_same_output_and_invalidated_on_load():
    codes = make_codes(32, 64, E8, seed=1)
    a = HNLQLinear.from_codes(codes)
    b = HNLQLinear.from_codes(codes, cache_weight=True)
    x = torch.randn(4, 64)
    assert torch.equal(a(x), b(x)) and torch.equal(b(x), a(x))
    other = HNLQLinear.from_codes(make_codes(32, 64, E8, seed=1, wseed=7))
    assert other.spec.packed == b.spec.packed and not torch.equal(other.weight, b.weight)
    b.load_state_dict(other.state_dict())
    torch.testing.assert_close(b(x), other(x))
    # a state of another layer (other seeds / other compact-T layout) is refused
    third = HNLQLinear.from_codes(make_codes(32, 64, E8, seed=2))
    with pytest.raises(RuntimeError, match="rot_in_seed"):
        b.load_state_dict(third.state_dict())


def test_bad_input():
    codes = make_codes(16, 32, E8)
    with pytest.raises(TypeError, match="codes"):
        HNLQLinear.from_codes(codes.labels)
    with pytest.raises(ValueError, match="bias"):
        HNLQLinear.from_codes(codes, torch.zeros(15))
    mod = HNLQLinear.from_codes(codes)
    with pytest.raises(ValueError, match="last dimension 32"):
        mod(torch.randn(2, 31))
    with pytest.raises(ValueError, match="path"):
        mod(torch.randn(2, 32), path="gpu")
    with pytest.raises(ValueError, match="lut_max_rows"):
        HNLQLinear(mod.spec, lut_max_rows=-1)
    j = mod.spec.to_json()
    del j["code"]
    with pytest.raises(ValueError, match="code"):
        HNLQSpec.from_json(j)


def test_spec_json_round_trip():
    mod = HNLQLinear.from_codes(make_codes(16, 32, D4C, per_row=True, overload=True), torch.ones(16))
    assert HNLQSpec.from_json(mod.spec.to_json()) == mod.spec


@pytest.mark.slow
def test_torch_compile_matches_eager():
    codes = make_codes(48, 96, E8, per_row=True)
    mod = HNLQLinear.from_codes(codes, torch.randn(48)).eval()
    x = torch.randn(2, 7, 96)
    eager = mod(x)
    y = torch.compile(mod)(x)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_package_api_does_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys, coset.ptq as p\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'transformers' not in sys.modules, 'coset.ptq imported transformers'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_out_scale_is_a_float16_channel_gain_after_the_inverse_rotation():
    codes = make_codes(48, 96, E8, overload=True)
    bias = torch.randn(48)
    mod = HNLQLinear.from_codes(codes, bias)
    x = torch.randn(3, 96)
    y0 = mod(x)
    n0 = mod.compressed_nbytes()
    mod.enable_out_scale()
    mod.enable_out_scale()  # idempotent
    assert mod.spec.out_scale and mod.out_scale.dtype == torch.float16
    torch.testing.assert_close(mod(x), y0)  # all ones: unchanged
    assert mod.compressed_nbytes() == n0 + 2 * 48
    g = torch.linspace(0.5, 1.5, 48).half()
    with torch.no_grad():
        mod.out_scale.copy_(g)
    W = codes.dequantize(torch.float64) * g.double()[:, None]
    ref = F.linear(x.double(), W, bias.double())
    for path in ("decode", "lut"):
        torch.testing.assert_close(mod(x, path=path).double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod.dequantize(torch.float64), W, rtol=1e-6, atol=1e-6)
    # the spec says so, round-trips through JSON, and a fresh module from it has the buffer
    assert mod.spec.to_json()["out_scale"] is True and HNLQSpec.from_json(mod.spec.to_json()) == mod.spec
    fresh = HNLQLinear(mod.spec)
    fresh.load_state_dict(mod.state_dict())
    torch.testing.assert_close(fresh(x), mod(x))
    assert "out_scale" not in HNLQLinear.from_codes(codes).spec.to_json()  # absent unless enabled
    with pytest.raises(TypeError, match="out_scale"):
        HNLQSpec(**{**HNLQSpec.from_json(mod.spec.to_json()).__dict__, "out_scale": 1})


@pytest.mark.parametrize("cfg", [E8C, E8, D4, QuantizationConfig(lattice_type="E8", q=8, M=1, beta=1.0, center=True)])
def test_small_batches_use_the_registered_coded_gemv(cfg, monkeypatch):
    # With coset-cuda installed, codes whose packed bytes are label indices and whose representatives fit the
    # int8 codebook (E8 q=4 M=1 centred = the 2-bit code, E8 q=4 M=2, D4 q=4 M=2) are multiplied from the codes
    # by the registered kernel up to DEFAULT_GEMV_MAX_ROWS rows; E8 q=8 (2^24 representatives) never is.
    from coset.ptq.layers import DEFAULT_GEMV_MAX_ROWS
    from coset.quant.backend import available_backends

    codes = make_codes(48, 96, cfg, per_row=True, overload=True)
    mod = HNLQLinear.from_codes(codes, torch.randn(48))
    x = torch.randn(1, 96)
    be = mod._gemv_backend(x)
    if cfg.q == 8 or "native" not in available_backends():
        assert be is None
    else:
        assert be is not None
    calls: list[int] = []
    if be is not None:
        orig = be.coded_gemv
        monkeypatch.setattr(be, "coded_gemv", lambda x, W: calls.append(x.shape[0]) or orig(x, W))
    ref = F.linear(x.double(), codes.dequantize(torch.float64), mod.bias.double())
    y = mod(x)  # auto
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    assert calls == ([1] if be is not None else [])
    xs = torch.randn(2, DEFAULT_GEMV_MAX_ROWS, 96)  # more rows than the threshold: decode + matmul
    calls.clear()
    torch.testing.assert_close(mod(xs), mod(xs, path="decode"))
    assert calls == []
    torch.testing.assert_close(mod(xs[:1, :3]), mod(xs[:1, :3], path="decode"), rtol=1e-4, atol=1e-4)
    assert calls == ([3] if be is not None else [])


def test_coded_gemv_handle_follows_load_state_dict():
    # the cached kernel handle holds the T steps: a state_dict load with other codes must not reuse them
    a = HNLQLinear.from_codes(make_codes(32, 64, E8C, per_row=True, overload=True, seed=1), None)
    b = HNLQLinear.from_codes(make_codes(32, 64, E8C, per_row=True, overload=True, seed=1, wseed=7), None)
    assert a.spec == b.spec and not torch.equal(a._T_u8(), b._T_u8())
    x = torch.randn(1, 64)
    a(x)  # builds the handle (when the kernel is registered)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x, path="decode"), rtol=1e-4, atol=1e-4)


def test_inputs_that_need_a_gradient_get_it_at_small_batches():
    # the coded GEMV kernel has no gradient: an input that requires grad goes through decode + matmul (auto) or the
    # differentiable coset.lut path (path="lut"), so finetune_ can train what lies before the layer
    mod = HNLQLinear.from_codes(make_codes(32, 64, E8C, per_row=True, overload=True), torch.randn(32))
    W = mod.dequantize(torch.float64)
    for path in ("auto", "lut"):
        x = torch.randn(2, 64, requires_grad=True)
        mod(x, path=path).pow(2).sum().backward()
        xd = x.detach().double().requires_grad_(True)
        F.linear(xd, W, mod.bias.detach().double()).pow(2).sum().backward()
        assert x.grad is not None
        torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-3, atol=1e-3)
