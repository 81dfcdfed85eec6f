"""QLinear / QConv1d / QConv2d: parity, STE gradients, caching, padding, LUT, compile, state_dict."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coset.nn import QATConfig, QConv1d, QConv2d, QLinear, set_quantization_enabled
from coset.quant import QuantizationConfig, RowQuantizer, from_blocks, quantize, to_blocks

D4 = QuantizationConfig()


def _ql_reference(w: torch.Tensor, beta: float, lattice, f32: bool = False) -> torch.Tensor:
    """beta * Q_L(w / beta) per d-block of the flattened rows, no overload assumed. The division is in
    float64 (as coset.quant does with a config beta) or, with ``f32``, in float32 (per-channel betas)."""
    C = w.shape[0]
    blocks, pad = to_blocks(w.detach().reshape(C, -1), lattice.dim)
    if f32:
        b32 = torch.tensor(beta, dtype=torch.float32)
        q = lattice.closest_point64((blocks / b32).double(), True).float() * b32
    else:
        q = lattice.closest_point64(blocks.double() / beta, True) * beta
    return from_blocks(q, pad).reshape(w.shape).to(w.dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------- parity
def test_nn_quantization_off_equals_float_layers():
    lin = nn.Linear(12, 7)
    q = QLinear.from_float(lin, QATConfig(weight=None))
    x = torch.randn(5, 12)
    assert torch.equal(q(x), lin(x))
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2)
    qc = QConv2d.from_float(conv, QATConfig(weight=None))
    xc = torch.randn(2, 3, 9, 9)
    assert torch.equal(qc(xc), conv(xc))
    # the runtime toggle gives the float forward too
    q2 = QLinear.from_float(lin, QATConfig(activation=D4))
    assert not torch.equal(q2(x), lin(x))
    assert set_quantization_enabled(nn.Sequential(q2), False) == 1
    assert torch.equal(q2(x), lin(x))


@pytest.mark.parametrize("lattice_type", ["D4", "E8", "Z2"])
def test_nn_fixed_beta_weight_equals_lattice_quantizer(lattice_type):
    cfg = QuantizationConfig(lattice_type=lattice_type, beta=0.05)
    q = QLinear(16, 9, qconfig=QATConfig(weight=cfg, granularity="fixed"))
    with torch.no_grad():
        q.weight.uniform_(-0.1, 0.1)  # |w/beta| <= 2 per coordinate: far inside q^M V, no overload
    x = torch.randn(4, 16)
    y = q(x)
    assert int(q.weight_quantizer.T.max()) == 0
    ref = _ql_reference(q.weight, 0.05, cfg.lattice)
    assert torch.equal(q.weight_quantizer.qweight, ref)
    assert torch.equal(y, F.linear(x, ref, q.bias))
    # and it is coset.quant.quantize of the blocks, bit for bit
    blocks, pad = to_blocks(q.weight.detach(), cfg.dim)
    assert torch.equal(q.weight_quantizer.qweight, from_blocks(quantize(blocks, config=cfg), pad))


def test_nn_per_channel_beta_and_overload_blocks():
    q = QLinear(32, 6)
    with torch.no_grad():
        q.weight.mul_(torch.logspace(-3, 1, 6).unsqueeze(1))  # rows of very different scales
        q.weight[0, :4] = 50.0 * q.weight[0].abs().max()  # one outlier block
    q.eval()
    wq = q.quantized_weight()
    betas = q.weight_quantizer.beta.double()
    rms = q.weight.detach().double().pow(2).mean(1).sqrt()
    from coset.quant import beta_min

    assert torch.allclose(betas, rms * 1.25 * beta_min(D4, 1.0), rtol=1e-6)
    assert bool(q.weight_quantizer.T[0, 0] > 0)  # the outlier used the overload ramp
    ref = torch.stack([_ql_reference(q.weight[c : c + 1], float(betas[c]), D4.lattice, f32=True)[0] for c in range(6)])
    ok = (q.weight_quantizer.T == 0).repeat_interleave(4, dim=1)
    assert bool(ok.any()) and torch.equal(wq[ok], ref[ok])
    # relative error per row is scale free
    err = ((wq - q.weight.detach()).pow(2).mean(1) / q.weight.detach().pow(2).mean(1))[1:]
    assert float(err.max()) < 0.05


def test_nn_conv2d_weight_blocks_along_flattened_rows():
    cfg = QuantizationConfig(beta=0.02)
    qc = QConv2d(3, 5, (3, 3), padding=1, qconfig=QATConfig(weight=cfg, granularity="fixed"))
    with torch.no_grad():
        qc.weight.uniform_(-0.04, 0.04)
    x = torch.randn(2, 3, 8, 8)
    y = qc(x)
    assert qc.k == 27 and qc.pad == 1 and qc.weight_quantizer.labels.shape == (5, 7, 2, 4)
    ref = _ql_reference(qc.weight, 0.02, cfg.lattice)
    assert torch.equal(qc.weight_quantizer.qweight, ref)
    assert torch.equal(y, F.conv2d(x, ref, qc.bias, padding=1))
    q1 = QConv1d(3, 4, 5, padding=2)
    assert q1(torch.randn(2, 3, 11)).shape == (2, 4, 11)
    assert q1(torch.randn(3, 11)).shape == (4, 11)


def test_nn_padding_is_tracked_and_stripped():
    q = QLinear(10, 3)  # 10 = 2 blocks of 4 + 2 padded zeros
    x = torch.randn(2, 10)
    q(x)
    assert (
        q.pad == 2 and q.weight_quantizer.labels.shape == (3, 3, 2, 4) and q.weight_quantizer.qweight.shape == (3, 10)
    )
    blocks, pad = to_blocks(q.weight.detach(), 4)
    betas = q.weight_quantizer.beta.reshape(-1, 1, 1)
    unit = quantize(blocks / betas, config=D4) * betas
    assert torch.equal(q.weight_quantizer.qweight, from_blocks(unit, pad))
    # the padded coordinates decode to 0 for blocks without overload
    from coset.quant import decode

    labels, T, _ = q.codes()
    last = decode(labels[:, -1], config=D4, T=T[:, -1], dtype=torch.float64)
    assert torch.equal(
        last[q.weight_quantizer.T[:, -1] == 0][:, 2:], torch.zeros_like(last[q.weight_quantizer.T[:, -1] == 0][:, 2:])
    )
    # bits/weight counts the padding: 3 blocks * (16 label bits + T bits at full width) per 10 weights + betas
    t_bits = D4.max_scaling_iterations.bit_length()
    assert math.isclose(q.bits_per_weight(), (3 * 3 * (16 + t_bits) + 32 * 3) / 30)


def test_nn_activation_quantization_blocks_along_features():
    cfg = QATConfig(weight=None, activation=QuantizationConfig(), act_beta_scale=1.0)
    q = QLinear(6, 3, qconfig=cfg)
    q.eval()
    x = torch.randn(5, 6)
    y = q(x)
    beta = float(q.activation_quantizer.beta) if float(q.activation_quantizer.beta) > 0 else None
    assert beta is None  # never trained: eval used the batch's own beta
    from coset.nn.fake_quant import activation_beta

    b = activation_beta(x, cfg)
    # the spec: blocks / beta rounded to float32, quantized with beta 1, times beta rounded once
    bf = torch.tensor(b, dtype=torch.float32)
    blocks, pad = to_blocks(x, 4)
    xq = from_blocks(quantize(blocks / bf, config=QuantizationConfig()) * bf, pad)
    assert torch.equal(y, F.linear(xq, q.weight, q.bias))
    # conv: blocks along channels at each position
    qc = QConv2d(5, 2, 1, qconfig=cfg)
    qc.train()
    xc = torch.randn(2, 5, 3, 3)
    yc = qc(xc)
    assert float(qc.activation_quantizer.beta) == activation_beta(xc.movedim(1, -1), cfg)
    blocks, pad = to_blocks(xc.movedim(1, -1), 4)
    bf = qc.activation_quantizer.beta.reshape(())
    xq = from_blocks(quantize(blocks / bf, config=QuantizationConfig()) * bf, pad).movedim(-1, 1)
    assert torch.equal(yc, F.conv2d(xq, qc.weight, qc.bias))


def test_nn_activation_running_beta_is_read_from_the_buffer():
    """Eval forwards use the running beta buffer as it is now: after training steps, after an in-place write and
    after load_state_dict (the layer keeps the buffer's value beside it only while the buffer is unchanged)."""
    cfg = QATConfig(weight=None, activation=QuantizationConfig(), act_momentum=0.5)
    q = QLinear(8, 3, qconfig=cfg)
    aq = q.activation_quantizer
    x = torch.randn(16, 8)

    def expect(beta: float) -> torch.Tensor:
        bf = torch.tensor(beta, dtype=torch.float32)
        blocks, pad = to_blocks(x, 4)
        return F.linear(from_blocks(quantize(blocks / bf, config=QuantizationConfig()) * bf, pad), q.weight, q.bias)

    q.train()
    for s in (1.0, 3.0):
        q(x * s)
    b = float(aq.beta)
    q.eval()
    assert torch.equal(q(x), expect(b))
    aq.beta.fill_(2.5)
    assert torch.equal(q(x), expect(2.5))
    q.load_state_dict({**q.state_dict(), "activation_quantizer.beta": torch.tensor(0.75)})
    assert torch.equal(q(x), expect(0.75))
    q.train()
    q(x)  # momentum 0.5 from the loaded 0.75, in float32
    from coset.nn.fake_quant import activation_beta

    want = float(torch.tensor(0.75) * 0.5 + torch.tensor(activation_beta(x, cfg), dtype=torch.float32) * 0.5)
    assert float(aq.beta) == want
    q.eval()
    assert torch.equal(q(x), expect(want))


# ---------------------------------------------------------------------------------------------- STE
def _grads(ste, act=None):
    torch.manual_seed(1)
    q = QLinear(64, 8, qconfig=QATConfig(ste=ste, activation=act))
    with torch.no_grad():
        q.weight[::3, 4:8] *= 40.0  # overloaded blocks
    x = torch.randn(32, 64, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    return q, x, g


def test_nn_identity_ste_gradient_is_dense_gradient_at_qweight():
    q, x, g = _grads("identity")
    w = q.weight_quantizer.qweight.clone().requires_grad_(True)
    F.linear(x.detach(), w, q.bias.detach()).backward(g)
    assert torch.allclose(q.weight.grad, w.grad, rtol=0, atol=1e-6)
    assert float(q.weight.grad.abs().sum()) > 0
    xr = x.detach().requires_grad_(True)
    F.linear(xr, q.weight_quantizer.qweight, q.bias.detach()).backward(g)
    assert torch.allclose(x.grad, xr.grad, atol=1e-6)


def test_nn_clipped_ste_zeroes_exactly_the_overloaded_blocks():
    qi, _, _ = _grads("identity")
    qc, _, _ = _grads("clipped")
    over = ((qc.weight_quantizer.T > 0) | qc.weight_quantizer.clamped).repeat_interleave(4, dim=1)
    assert bool(over.any()) and bool((~over).any())
    assert torch.equal(qc.weight.grad[over], torch.zeros_like(qc.weight.grad[over]))
    assert torch.equal(qc.weight.grad[~over], qi.weight.grad[~over])
    assert bool((qi.weight.grad[over] != 0).all())


def test_nn_smooth_ste_fades_with_block_norm():
    qi, _, _ = _grads("identity")
    qs, _, _ = _grads("smooth")
    ratio = (qs.weight.grad / qi.weight.grad).reshape(8, 16, 4)
    assert bool((ratio > 0).all()) and bool((ratio <= 1 + 1e-6).all())
    norms = qi.weight.detach().reshape(8, 16, 4).norm(dim=-1)
    r = qi.weight_quantizer.beta.reshape(8, 1) * 16 * math.sqrt(0.5)
    small, big = norms < 0.5 * r, norms > 2 * r
    assert bool(small.any()) and bool(big.any())
    assert float(ratio[small].min()) > 0.99 and float(ratio[big].max()) < 0.01


def test_nn_activation_ste_clipped_zeroes_overloaded_input_blocks():
    act = QuantizationConfig()
    q = QLinear(8, 3, qconfig=QATConfig(weight=None, activation=act, ste="clipped"))
    x = torch.randn(64, 8)
    x[0, :4] = 1e3  # overloads at the batch beta
    x.requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad[0, :4], torch.zeros(4))
    assert bool((x.grad[1:] != 0).any())
    assert q.stats()["act_overload_rate"] > 0


@pytest.mark.parametrize("cap", [0, 2])
def test_nn_activation_stats_count_overloads_and_clamps(cap):
    # stats() against the per-block T and clamp mask of the same batch quantized directly
    from coset.nn.fake_quant import activation_beta, quantize_activation

    qat = QATConfig(weight=None, activation=QuantizationConfig(max_scaling_iterations=cap))
    q = QLinear(16, 3, qconfig=qat)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    x[:3] *= 1e3  # clamped at any cap
    with pytest.warns(Warning):
        q(x)
    _, _, T, clamped, _, _ = quantize_activation(x, activation_beta(x, qat), qat)
    st = q.stats()
    assert st["act_overload_rate"] == pytest.approx(float(((T > 0) | clamped).float().mean()), abs=0)
    assert st["act_clamp_rate"] == pytest.approx(float(clamped.float().mean()), abs=0)
    assert 0 < st["act_clamp_rate"] < st["act_overload_rate"] if cap else st["act_clamp_rate"] > 0


def test_nn_training_moves_shadow_weights():
    q = QLinear(8, 4)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    w0 = q.weight.detach().clone()
    x, t = torch.randn(16, 8), torch.randn(16, 4)
    F.mse_loss(q(x), t).backward()
    opt.step()
    assert not torch.equal(q.weight.detach(), w0)


# ---------------------------------------------------------------------------------------------- caching
def _spy(layer):
    calls = []
    wq = layer.weight_quantizer
    orig = wq.requantize

    def wrapped(weight):
        calls.append(1)
        orig(weight)

    wq.requantize = wrapped
    return calls


def test_nn_quantize_every_caches_between_requantizations():
    q = QLinear(8, 4, qconfig=QATConfig(quantize_every=3))
    calls = _spy(q)
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    x = torch.randn(16, 8)
    seen = []
    for _ in range(7):
        opt.zero_grad()
        q(x).pow(2).sum().backward()
        seen.append(q.weight_quantizer.qweight.clone())
        opt.step()
    assert len(calls) == 3  # steps 0, 3, 6
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[5])
    # eval: re-quantizes once because the weight moved since step 6, then reuses the cache
    q.eval()
    with torch.no_grad():
        y1 = q(x)
        y2 = q(x)
    assert len(calls) == 4 and torch.equal(y1, y2)
    fresh = QLinear(8, 4)
    fresh.load_state_dict({"weight": q.weight.detach(), "bias": q.bias.detach()})
    fresh.eval()
    assert torch.equal(fresh(x), y1)


def test_nn_eval_refreshes_after_in_place_weight_change():
    q = QLinear(8, 4).eval()
    x = torch.randn(3, 8)
    y1 = q(x)
    qw1, beta1 = q.weight_quantizer.qweight.clone(), q.weight_quantizer.beta.clone()
    with torch.no_grad():
        q.weight.mul_(2.0)
    y2 = q(x)
    assert not torch.equal(y1, y2)
    # rms and hence beta double exactly, so the codes repeat and the quantized weight doubles exactly
    assert torch.equal(q.weight_quantizer.beta, 2 * beta1) and torch.equal(q.weight_quantizer.qweight, 2 * qw1)


# ---------------------------------------------------------------------------------------------- errors
def test_nn_bad_inputs_raise():
    q = QLinear(8, 4)
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(3, 7))
    with pytest.raises(TypeError, match="input"):
        q([1.0] * 8)
    with torch.no_grad():
        q.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q(torch.randn(3, 8))
    qa = QLinear(8, 4, qconfig=QATConfig(activation=D4, weight=None))
    with pytest.raises(ValueError, match="NaN"):
        qa(torch.full((2, 8), float("inf")))
    with pytest.raises(ValueError, match="input"):
        QConv2d(3, 4, 3)(torch.randn(2, 4, 8, 8))


# ---------------------------------------------------------------------------------------------- LUT
def test_nn_lut_path_matches_dequantized_path():
    x = torch.randn(7, 19)
    ql = QLinear(19, 6, qconfig=QATConfig(use_lut=True)).eval()
    ref = QLinear(19, 6)
    ref.load_state_dict(ql.state_dict())
    ref.eval()
    torch.testing.assert_close(ql(x), ref(x), rtol=1e-5, atol=1e-5)
    for cls, shape, kw in [
        (QConv2d, (2, 3, 7, 6), dict(padding=1, stride=2)),
        (QConv1d, (2, 3, 9), dict(padding=2, dilation=2)),
    ]:
        c = cls(3, 5, 3, qconfig=QATConfig(use_lut=True), **kw).eval()
        r = cls(3, 5, 3, **kw)
        r.load_state_dict(c.state_dict())
        r.eval()
        xc = torch.randn(*shape)
        torch.testing.assert_close(c(xc), r(xc), rtol=1e-5, atol=1e-5)
    # training mode uses the dense STE path (differentiable)
    ql.train()
    ql(x).sum().backward()
    assert ql.weight.grad is not None


# ---------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_nn_torch_compile_forward_backward_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(QLinear(16, 32, qconfig=QATConfig(activation=D4)), nn.ReLU(), QLinear(32, 10))
    x = torch.randn(8, 16)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert torch.equal(y, ref)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------------------------------------- state_dict
def test_nn_state_dict_keys_and_float_checkpoint_loads():
    q = QLinear(8, 4)
    assert set(q.state_dict()) == {"weight", "bias"}  # never quantized: nothing to save
    lin = nn.Linear(8, 4)
    q.load_state_dict(lin.state_dict(), strict=True)
    q.eval()
    x = torch.randn(5, 8)
    expect = QLinear.from_float(lin).eval()(x)
    assert torch.equal(q(x), expect)
    wq = {"labels", "T", "beta", "clamped", "q_state", "code"}
    assert set(q.state_dict()) == {"weight", "bias"} | {f"weight_quantizer.{k}" for k in wq}


@pytest.mark.parametrize("every", [1, 3])
def test_nn_state_dict_roundtrip_strict_identical_outputs(every):
    def make():
        return nn.Sequential(
            QConv2d(3, 4, 3, qconfig=QATConfig(activation=D4, quantize_every=every, ste="clipped")),
            nn.Flatten(),
            QLinear(4 * 6 * 6, 5, qconfig=QATConfig(quantize_every=every, granularity="per_tensor")),
        )

    src = make()
    opt = torch.optim.SGD(src.parameters(), lr=0.05)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(4):
        opt.zero_grad()
        src(x).pow(2).mean().backward()
        opt.step()
    sd = src.state_dict()
    dst = make()
    dst.load_state_dict(sd, strict=True)
    # train mode: the next step re-quantizes (or not) exactly as the source would
    assert torch.equal(src(x), dst(x))
    src.eval(), dst.eval()
    assert torch.equal(src(x), dst(x))
    with pytest.raises(RuntimeError):
        make().load_state_dict({k: v for k, v in sd.items() if k != "0.weight_quantizer.T"}, strict=True)


def test_nn_torch_save_whole_model_pickles(tmp_path):
    import io

    m = nn.Sequential(QLinear(8, 6, qconfig=QATConfig(activation=D4)), nn.ReLU(), QConv1d(1, 2, 3))
    x = torch.randn(4, 8)
    m.train()
    m[0](x)
    m.eval()
    y = m[0](x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert torch.equal(m2[0](x), y)


def test_nn_overload_policy_error_propagates():
    from coset.quant import OverloadError

    cfg = QuantizationConfig(beta=1e-3, max_scaling_iterations=0, overload_policy="error")
    q = QLinear(8, 2, qconfig=QATConfig(weight=cfg, granularity="fixed"))
    with pytest.raises(OverloadError):
        q(torch.randn(3, 8))


# ---------------------------------------------------------------- re-quantization into reused outputs
def _backends() -> list[str]:
    from coset.quant import available_backends

    return ["torch"] + [b for b in available_backends() if b == "native"]


def _fresh_quantization(w: torch.Tensor, qconfig: QATConfig) -> torch.Tensor:
    q = QLinear(w.shape[1], w.shape[0], bias=False, qconfig=qconfig)
    with torch.no_grad():
        q.weight.copy_(w)
    return q.quantized_weight().clone()


@pytest.mark.parametrize("backend", _backends())
def test_requantize_reuses_outputs_only_when_nothing_holds_them(backend):
    """Each training step writes the quantized weight into the previous step's tensor (no page faults), unless
    something still references it: the autograd graph of an earlier forward of the same step (a layer used
    twice, the weight changed in between), a tensor handed out by ``quantized_weight`` or ``codes``."""
    cfg = QATConfig(backend=backend)
    layer = QLinear(24, 6, bias=False, qconfig=cfg)
    x1, x2 = torch.randn(3, 24, requires_grad=True), torch.randn(3, 24, requires_grad=True)
    layer(x1).sum().backward()  # first quantization; its graph is gone
    p0 = layer.weight_quantizer.qweight.data_ptr()
    w1 = layer.weight.detach().clone()
    y1 = layer(x1)  # graph alive: the backward needs this quantized weight
    assert layer.weight_quantizer.qweight.data_ptr() == p0  # reused: nothing held it
    with torch.no_grad():
        layer.weight.mul_(1.7)
    y2 = layer(x2)
    assert layer.weight_quantizer.qweight.data_ptr() != p0  # the graph of y1 holds it: a new tensor
    x1.grad = None
    (y1 * torch.arange(6.0)).sum().backward()
    want = torch.arange(6.0).expand(3, 6) @ _fresh_quantization(w1, cfg)
    assert torch.equal(x1.grad, want)  # the gradient of the first forward used the first weight
    del y2
    held = layer.quantized_weight()
    labels, T, _ = layer.codes()
    kept = (held.clone(), T.clone())
    with torch.no_grad():
        layer.weight.mul_(-0.3)
    layer(x2)
    assert torch.equal(held, kept[0]) and torch.equal(T, kept[1])  # handed-out tensors are left alone
    assert torch.equal(layer.quantized_weight(), _fresh_quantization(layer.weight.detach(), cfg))


@pytest.mark.parametrize("backend", _backends())
def test_requantize_failure_into_reused_outputs_leaves_no_stale_code(backend):
    """A re-quantization that fails half-way (a NaN weight) has overwritten part of the reused outputs: the
    code is dropped and rebuilt at the next use, never served half old, half new."""
    cfg = QATConfig(backend=backend)
    layer = QLinear(32, 8, bias=False, qconfig=cfg)
    x = torch.randn(2, 32)
    layer(x)
    layer(x)  # the outputs are now reused
    with torch.no_grad():
        good = layer.weight.detach().clone()
        layer.weight.mul_(5.0)
        layer.weight[6, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
    with pytest.raises(ValueError, match="no weight code"):
        layer.weight_quantizer.codes()
    with torch.no_grad():
        layer.weight.copy_(good)
    layer.eval()
    assert torch.equal(layer.quantized_weight(), _fresh_quantization(good, cfg))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", "fixed"])
@pytest.mark.parametrize(
    "kw",
    [
        {"lattice_type": "D4", "q": 4, "M": 2, "max_scaling_iterations": 1},
        {"lattice_type": "E8", "q": 4, "M": 2, "alpha": 0.5, "max_scaling_iterations": 2},
        {"lattice_type": "D8", "q": 8, "M": 1, "max_scaling_iterations": 1},
    ],
)
def test_labels_from_the_quantized_weight_equal_the_encoded_weight(backend, granularity, kw):
    """A training step keeps no copy of the weight for the lazily computed labels: they are recovered from
    the quantized weight and T, bit for bit the labels of encoding the weight itself (T > 0 and clamped
    blocks included); a dithered code keeps the snapshot."""
    from coset.nn.fake_quant import encode_weight

    wcfg = QuantizationConfig(**kw, beta=0.02 if granularity == "fixed" else 1.0)
    qat = QATConfig(backend=backend, weight=wcfg, granularity=granularity)
    layer = QLinear(44, 12, bias=False, qconfig=qat)  # 44: a zero-padded last E8/D8 block
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-1, 1.5, 12).unsqueeze(1))
        layer.weight[3, 0] *= 1e3  # one outlier in a row: past the cap, clamped
        layer.weight[7, 9] *= 1e3
    w = layer.weight.detach().clone()
    layer(torch.randn(2, 44))
    wq = layer.weight_quantizer
    assert wq._pending[2] is True  # no snapshot was taken
    T, clamped = wq.T.clone(), wq.clamped.clone()
    assert bool((T > 0).any()) and bool(clamped.any())
    with torch.no_grad():
        layer.weight.add_(1.0)  # the optimizer moved on; the labels are still those of w
    labels, T2, betas = wq.codes()
    want, wantT, wantc = encode_weight(w.reshape(12, -1), betas.to(torch.float64), qat)
    assert torch.equal(labels, want) and torch.equal(T2, wantT) and torch.equal(clamped, wantc)


def test_dithered_code_keeps_a_snapshot_for_its_labels():
    from coset.nn.fake_quant import encode_weight

    qat = QATConfig(backend="torch", weight=QuantizationConfig(lattice_type="D4", q=4, M=2, with_dither=True))
    layer = QLinear(16, 4, bias=False, qconfig=qat)
    w = layer.weight.detach().clone()
    layer(torch.randn(2, 16))
    assert layer.weight_quantizer._pending[2] is False  # a dithered reconstruction is off the lattice
    with torch.no_grad():
        layer.weight.add_(1.0)
    labels, _, betas = layer.weight_quantizer.codes()
    assert torch.equal(labels, encode_weight(w, betas.to(torch.float64), qat)[0])


def test_bfloat16_weight_keeps_a_snapshot_and_plain_float32_none():
    """The labels follow from the quantized weight only when it is kept in the work dtype: a bfloat16 layer's
    quantized weight is rounded again, so its labels come from a snapshot of the weight."""
    from coset.nn.fake_quant import encode_weight

    layer = QLinear(16, 4, bias=False, qconfig=QATConfig(backend="torch")).to(torch.bfloat16)
    w = layer.weight.detach().clone()
    layer(torch.randn(2, 16, dtype=torch.bfloat16))
    wq = layer.weight_quantizer
    assert wq._pending[2] is False and wq._snapshot is not None
    with torch.no_grad():
        layer.weight.add_(1.0)
    labels, _, betas = wq.codes()
    assert torch.equal(labels, encode_weight(w, betas.to(torch.float64), layer.qconfig)[0])
    plain = QLinear(16, 4, bias=False, qconfig=QATConfig(backend="torch"))
    plain(torch.randn(2, 16))
    assert plain.weight_quantizer._snapshot is None  # no 4-byte-per-weight copy kept


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_training_steps_with_the_previous_results_as_hint_equal_fresh_quantizations(backend, granularity, monkeypatch):
    """From the second step on, re-quantization passes the last results as coset.quant.quantize_rows's
    previous_betas hint (only blocks whose point may have moved are quantized again): every step's quantized
    weight still equals a fresh quantization. Writing into the kept outputs (their version counters move)
    drops the hint."""
    import coset.nn.fake_quant as fq

    hints: list[bool] = []
    real = fq.quantize_rows

    def spy(*args, **kwargs):
        if kwargs.get("out") is not None or not hints:  # (the fresh quantizations below have no out)
            hints.append(kwargs.get("previous_betas") is not None)
        return real(*args, **kwargs)

    real_call = RowQuantizer.__call__

    def spy_call(self, *args, **kwargs):  # the layer's prepared quantizer (the same results, checked once)
        if kwargs.get("out") is not None or not hints:
            hints.append(kwargs.get("previous_betas") is not None)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(fq, "quantize_rows", spy)
    monkeypatch.setattr(RowQuantizer, "__call__", spy_call)
    cfg = QATConfig(backend=backend, granularity=granularity)
    torch.manual_seed(0)
    layer = QLinear(64, 16, bias=False, qconfig=cfg)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x, target = torch.randn(32, 64), torch.randn(32, 16)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(layer(x), target).backward()
        opt.step()
        with torch.no_grad():
            layer(x)  # re-quantizes the stepped weight (the graph of this forward is dropped at once)
        assert torch.equal(layer.weight_quantizer.qweight, _fresh_quantization(layer.weight.detach(), cfg))
    assert hints[0] is False and len(hints) == 8 and all(hints[1:])
    # the int8 workspace of t = 0 points only for a backend that uses the hint
    assert (layer.weight_quantizer.__dict__.get("_ws") is not None) == (backend == "native")
    with torch.no_grad():
        layer.weight_quantizer.T.zero_()  # a write into the kept outputs
        layer.weight.add_(0.01)
    n = len(hints)
    layer(x)
    assert hints[n:] == [False]
    assert torch.equal(layer.weight_quantizer.qweight, _fresh_quantization(layer.weight.detach(), cfg))
