"""QLinear with the native kernels (the fused quantize_rows pass) trains bit for bit like the torch reference."""

import pytest
import torch

from coset.nn import QATConfig, QLinear
from coset.nn.fake_quant import weight_betas
from coset.quant import QuantizationConfig

pytest.importorskip("coset.cuda")  # the native backend is another package (coset-cuda)


def _step(q: QLinear, x: torch.Tensor):
    q.zero_grad(set_to_none=True)
    y = q(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), q.weight.grad.clone(), x.grad.clone() if x.grad is not None else None


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"granularity": "per_tensor", "activation": QuantizationConfig()},
        {"weight": QuantizationConfig(lattice_type="E8", q=4, M=2, beta=0.05), "granularity": "fixed"},
        {"ste": "clipped", "activation": QuantizationConfig(lattice_type="D8", q=2, M=3)},
    ],
)
def test_nn_native_step_equals_torch(kw):
    torch.manual_seed(0)
    ref = QLinear(37, 19, qconfig=QATConfig(backend="torch", **kw))  # 37: a zero-padded last block
    nat = QLinear(37, 19, qconfig=QATConfig(backend="native", **kw))
    with torch.no_grad():
        ref.weight.mul_(torch.logspace(-2, 1, 19).unsqueeze(1))  # rows of different scales, T > 0 blocks
        ref.weight[0, :8] *= 40.0
    nat.load_state_dict(ref.state_dict())
    x = torch.randn(11, 37)
    for _ in range(2):
        xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = _step(ref, xr), _step(nat, xn)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(xr.grad, xn.grad)
        wr, wn = ref.weight_quantizer, nat.weight_quantizer
        assert torch.equal(wr.T, wn.T) and torch.equal(wr.clamped, wn.clamped)
        assert bool((wr.T > 0).any())
        # the betas the kernel derived while quantizing the rows are the reference's (coset.quant.rms_betas)
        assert torch.equal(wr.beta, wn.beta)
        if nat.qconfig.granularity != "fixed":
            assert torch.equal(wn.beta.to(torch.float64), weight_betas(nat.weight.detach(), nat.qconfig))
        if nat.activation_quantizer is not None:
            assert torch.equal(ref.activation_quantizer.beta, nat.activation_quantizer.beta)
        with torch.no_grad():
            for q in (ref, nat):
                q.weight.sub_(0.01 * q.weight.grad)
    assert torch.equal(ref.codes()[0], nat.codes()[0])  # labels encoded lazily from the weight snapshot
