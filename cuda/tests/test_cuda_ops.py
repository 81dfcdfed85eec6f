"""torch.library ops coset::quantize / encode / decode: schema, fake tensors, autograd (STE), torch.compile."""

from __future__ import annotations

import pytest
import torch

from coset.cuda import ops
from coset.quant import QuantizationConfig, decode, encode, quantize

CFG = QuantizationConfig("D4", q=4, M=2, beta=0.3, with_dither=True, dither_seed=3)
CFG_C = CFG.replace(q=2, M=3, center=True)


def test_cuda_ops_match_library():
    x = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(0))
    xh, T, cl = ops.quantize(x, CFG)
    r = quantize(x, config=CFG, backend="torch", return_info=True)
    assert torch.equal(xh, r[0]) and torch.equal(T, r[1]) and torch.equal(cl, r[2])
    b, T2, _ = ops.encode(x, CFG)
    rb, rT = encode(x, config=CFG, backend="torch")
    assert torch.equal(b, rb) and torch.equal(T2, rT)
    y = ops.decode(b, T2, CFG, torch.float64)
    assert torch.equal(y, decode(rb, config=CFG, T=rT, dtype=torch.float64, backend="torch"))


def test_cuda_ops_opcheck():
    from coset.cuda.ops import config_args

    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.coset.quantize.default, (x, *config_args(CFG)))
    xe = torch.randn(16, 4)
    torch.library.opcheck(torch.ops.coset.encode.default, (xe, *config_args(CFG)))
    b, T, _ = ops.encode(xe, CFG)
    torch.library.opcheck(torch.ops.coset.decode.default, (b, T, torch.float32, *config_args(CFG)))


def test_cuda_ops_straight_through_gradient():
    x = torch.randn(32, 4, requires_grad=True)
    w = torch.randn(32, 4)
    xh, _, _ = ops.quantize(x, CFG)
    (xh * w).sum().backward()
    assert torch.equal(x.grad, w)


@pytest.mark.slow
def test_cuda_ops_torch_compile_matches_eager():
    def fn(x):
        xh, T, _ = ops.quantize(x * 2.0, CFG)
        return xh.sum(-1) + T.float()

    x = torch.randn(257, 4, generator=torch.Generator().manual_seed(1))
    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, eager)
    x2 = torch.randn(100, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(compiled(x2), fn(x2))


def test_cuda_ops_bad_config():
    with pytest.raises(TypeError, match="config"):
        ops.quantize(torch.zeros(2, 4), {"q": 4})
    with pytest.raises(ValueError, match="q"):
        torch.ops.coset.quantize(
            torch.zeros(2, 4), "D4", 99, 2, 1.0, 1.0, 4, True, False, False, False, "clamp", 0, False
        )


def test_cuda_ops_centered_config():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(4))
    xh, T, cl = ops.quantize(x, CFG_C)
    r = quantize(x, config=CFG_C, backend="torch", return_info=True)
    assert torch.equal(xh, r[0]) and torch.equal(T, r[1]) and torch.equal(cl, r[2])


def test_cuda_ops_schemas_follow_the_config_fields():
    """The three op schemas carry every QuantizationConfig field, in order and with its type (issue 10 §4)."""
    import dataclasses

    from coset.cuda.ops import _check_schemas, _schema_config_args, config_args

    want = [f.name for f in dataclasses.fields(QuantizationConfig)]
    for op in (torch.ops.coset.quantize, torch.ops.coset.encode, torch.ops.coset.decode):
        assert [n for n, _ in _schema_config_args(op)] == want
    assert len(config_args(CFG)) == len(want)
    _check_schemas()  # what runs at import


def test_cuda_ops_schema_drift_is_detected(monkeypatch):
    import coset.cuda.ops as ops_mod

    real = ops_mod._schema_config_args
    monkeypatch.setattr(ops_mod, "_schema_config_args", lambda op: real(op)[:-1])  # an op missing `center`
    with pytest.raises(RuntimeError, match="QuantizationConfig has fields"):
        ops_mod._check_schemas()
