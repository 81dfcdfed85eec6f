"""LUT matmul (two-sided, one-sided, lut_linear) against decode-then-matmul in float64; padding; dispatch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coset.lut import EncodedMatrix, kernels, lut_linear, lut_matmul, lut_matmul_one_sided, matmul
from coset.quant import QuantizationConfig, decode, from_blocks, to_blocks
from coset.quant import backend as qbackend

CASES = [("Z2", 4), ("D4", 4), ("E8", 2)]
BETA = {"Z2": 0.3, "D4": 0.3, "E8": 1.0}  # each gives a mix of T = 0 and T > 0 blocks on _mat data


def _mat(n, k, seed):
    """Rows with log-normal per-block magnitudes, so the codes mix T = 0 and T > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    return x * torch.exp(1.2 * torch.randn(n, k, generator=g, dtype=torch.float64))


def _ref_dense(E: EncodedMatrix) -> torch.Tensor:
    """Decode with coset.quant (float64) and strip the padding: the reference Ŵ."""
    xh = decode(E.labels, config=E.config, T=E.T, dtype=torch.float64)
    return from_blocks(xh, E.pad)


def _close(got, ref, absref, rel=2e-6):
    """float32 result vs float64 reference: error within float32 rounding of the sum of |terms|."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref).abs()
    bound = rel * absref + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_matmul_two_sided_matches_decode_then_matmul(name, q, M):
    c = QuantizationConfig(lattice_type=name, q=q, M=M, beta=BETA[name], alpha=0.5)
    k = 8 * 5 + 3  # not a multiple of d: padded last block
    X = EncodedMatrix.from_dense(_mat(23, k, 1), c)
    Y = EncodedMatrix.from_dense(_mat(17, k, 2), c.replace(beta=0.7 * c.beta))
    assert bool((X.T > 0).any()) and bool((X.T == 0).any())
    assert X.pad == (-k) % c.dim and X.shape == (23, k)
    Xh, Yh = _ref_dense(X), _ref_dense(Y)
    _close(lut_matmul(X, Y), Xh @ Yh.T, Xh.abs() @ Yh.abs().T)
    _close(lut_matmul(Y, X), Yh @ Xh.T, Yh.abs() @ Xh.abs().T)  # n < m branch of the fallback


def test_lut_matmul_padding_coordinates_are_removed():
    # D4, k = 5, beta = 1, odd integer data: the padded block (x5, 0, 0, 0) sits on a Voronoi tie (odd x5 is
    # equidistant from (x5 +- 1, 0, 0, 0) and (x5, 0, +-1, 0), ...) and the tie rule picks a point with a
    # nonzero padding coordinate; summing whole blocks would then be wrong. The correction removes it.
    g = torch.Generator().manual_seed(3)
    W = (2 * torch.randint(-2, 3, (30, 5), generator=g) + 1).double()
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=1.0)
    X = EncodedMatrix.from_dense(W, c)
    full = decode(X.labels, config=c, T=X.T, dtype=torch.float64)  # (30, 2, 4)
    assert bool((full[:, -1, 1:] != 0).any())
    naive = full.reshape(30, 8) @ full.reshape(30, 8).T
    Xh = _ref_dense(X)
    assert not torch.allclose(naive, Xh @ Xh.T)
    _close(lut_matmul(X, X), Xh @ Xh.T, Xh.abs() @ Xh.abs().T)
    Y = EncodedMatrix.from_dense(_mat(7, 5, 4), c.replace(beta=0.3))
    Yh = _ref_dense(Y)
    _close(lut_matmul(X, Y), Xh @ Yh.T, Xh.abs() @ Yh.abs().T)
    # one-sided: the float side is zero-padded, so no correction is needed
    _close(lut_matmul_one_sided(X, W), Xh @ W.T, Xh.abs() @ W.abs().T)


@pytest.mark.parametrize("name,q", CASES)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_matmul_one_sided_matches_decode_then_matmul(name, q, M):
    c = QuantizationConfig(lattice_type=name, q=q, M=M, beta=BETA[name], alpha=0.5)
    k = 8 * 4 + 5
    X = EncodedMatrix.from_dense(_mat(31, k, 4), c)
    Y = _mat(9, k, 5)
    Xh = _ref_dense(X)
    _close(lut_matmul_one_sided(X, Y), Xh @ Y.T, Xh.abs() @ Y.abs().T)
    _close(lut_matmul_one_sided(X, Y[0]), Xh @ Y[0], Xh.abs() @ Y[0].abs())


def test_lut_matmul_with_disable_scaling_and_alpha():
    c = QuantizationConfig(lattice_type="D4", q=3, M=2, beta=7.0, alpha=1.0 / 3, disable_scaling=True)
    X = EncodedMatrix.from_dense(_mat(12, 16, 6) * 3, c)
    Xh = _ref_dense(X)
    assert bool((X.T > 0).any())
    _close(lut_matmul(X, X), Xh @ Xh.T, Xh.abs() @ Xh.abs().T)


def test_lut_linear_matches_dense_linear():
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    W = EncodedMatrix.from_dense(_mat(10, 30, 7), c)
    x = _mat(2 * 3, 30, 8).reshape(2, 3, 30)
    bias = torch.randn(10, dtype=torch.float64)
    Wh = _ref_dense(W)
    y = lut_linear(x, W, bias)
    assert y.shape == (2, 3, 10) and y.dtype == torch.float64
    ref = x @ Wh.T + bias
    absref = x.abs() @ Wh.abs().T
    assert bool(((y - ref).abs() <= 2e-6 * absref + 1e-6).all())
    y32 = lut_linear(x.float(), W)
    assert y32.dtype == torch.float32
    _close(y32.reshape(6, 10), (x @ Wh.T).reshape(6, 10), absref.reshape(6, 10))


def test_lut_linear_gradient_is_dense_gradient():
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    W = EncodedMatrix.from_dense(_mat(7, 10, 19).float(), c)
    x = torch.randn(3, 10, requires_grad=True)
    g = torch.randn(3, 7)
    lut_linear(x, W).backward(g)  # "auto" must keep the graph even when a native backend is registered
    assert x.grad is not None
    assert torch.allclose(x.grad, g @ W.dequantize(), rtol=1e-5, atol=1e-5)


def test_lut_matmul_chunked_paths_agree(monkeypatch):
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    X = EncodedMatrix.from_dense(_mat(50, 24, 9), c)
    Y = EncodedMatrix.from_dense(_mat(20, 24, 10), c)
    q = _mat(11, 24, 11)
    two, one = lut_matmul(X, Y), lut_matmul_one_sided(X, q)
    # tiny chunk budgets: several row chunks, table chunks and query chunks
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 6 * 256 * 4 * 3)
    monkeypatch.setattr(matmul, "_TABLE_BYTES", 6 * 256 * 4 * 2)
    assert torch.allclose(lut_matmul(X, Y), two, rtol=1e-5, atol=1e-4)
    assert torch.allclose(lut_matmul_one_sided(X, q), one, rtol=1e-5, atol=1e-4)


def test_lut_matmul_empty_rows():
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    X = EncodedMatrix.from_dense(torch.zeros(0, 8), c)
    Y = EncodedMatrix.from_dense(_mat(3, 8, 12), c)
    assert lut_matmul(X, Y).shape == (0, 3)
    assert lut_matmul(Y, X).shape == (3, 0)
    assert lut_matmul_one_sided(Y, torch.zeros(0, 8)).shape == (3, 0)


class _RecordingBackend:
    """A registered backend that checks the agreed argument layout and answers with the torch fallback."""

    name = "test-lut-recorder"
    priority = 1000
    backend_api = 1

    def __init__(self):
        self.calls = []

    def supports(self, op, tensor, lattice, config):
        return op in ("lut_one_sided", "lut_two_sided") and lattice is None and config is None

    def _check_codes(self, i, s):
        assert i.dtype == torch.int32 and i.ndim == 3 and i.is_contiguous()
        assert s.dtype == torch.float32 and s.shape == i.shape[:2]

    def lut_one_sided(self, ix, sx, tables, q):
        self._check_codes(ix, sx)
        assert tables.dtype == torch.float32 and tables.shape[1] == ix.shape[1] and tables.is_contiguous()
        self.calls.append("lut_one_sided")
        return kernels.torch_one_sided(ix, sx, tables, q)

    def lut_two_sided(self, ix, sx, iy, sy, lut, q):
        self._check_codes(ix, sx)
        self._check_codes(iy, sy)
        assert lut.dtype in (torch.int8, torch.int16, torch.int32) and lut.shape == (tables_q := lut.shape[0], tables_q)
        self.calls.append("lut_two_sided")
        return kernels.torch_two_sided(ix, sx, iy, sy, lut, q)


def test_lut_backend_dispatch_follows_registry():
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    X = EncodedMatrix.from_dense(_mat(8, 12, 13), c)
    Y = EncodedMatrix.from_dense(_mat(5, 12, 14), c)
    qv = _mat(3, 12, 15)
    with pytest.raises(ValueError, match="unknown backend"):
        lut_matmul(X, Y, backend="test-lut-recorder")
    be = _RecordingBackend()
    qbackend.register_backend(be)
    try:
        ref2, ref1 = lut_matmul(X, Y, backend="torch"), lut_matmul_one_sided(X, qv, backend="torch")
        assert be.calls == []  # "torch" forces the fallback
        assert torch.equal(lut_matmul(X, Y), ref2)
        assert torch.equal(lut_matmul_one_sided(X, qv, backend="test-lut-recorder"), ref1)
        lut_linear(qv, X)
        assert be.calls == ["lut_two_sided", "lut_one_sided", "lut_one_sided"]
        lut_linear(qv.requires_grad_(True), X)  # needs autograd: the fallback, not the kernel
        assert len(be.calls) == 3
        with pytest.raises(ValueError, match="no autograd"):
            lut_linear(qv, X, backend="test-lut-recorder")
        qv = qv.detach()
        # unequal M cannot go to the native two-sided op
        Z = EncodedMatrix.from_dense(_mat(5, 12, 16), c.replace(M=1))
        with pytest.raises(ValueError, match="equal M"):
            lut_matmul(X, Z, backend="test-lut-recorder")
        lut_matmul(X, Z)  # auto: falls back to torch
        assert be.calls[-1] == "lut_one_sided"
    finally:
        qbackend.unregister_backend(be.name)


def test_lut_matmul_bad_inputs():
    c = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    X = EncodedMatrix.from_dense(_mat(4, 12, 17), c)
    with pytest.raises(TypeError, match="Y must be an EncodedMatrix"):
        lut_matmul(X, torch.zeros(4, 12))
    with pytest.raises(TypeError, match="X must be an EncodedMatrix"):
        lut_matmul_one_sided(torch.zeros(4, 12), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="same number of columns"):
        lut_matmul(X, EncodedMatrix.from_dense(_mat(4, 16, 1), c))
    with pytest.raises(ValueError, match="share lattice_type, q"):
        lut_matmul(X, EncodedMatrix.from_dense(_mat(4, 12, 1), c.replace(q=3)))
    with pytest.raises(ValueError, match="last dimension k=12"):
        lut_matmul_one_sided(X, torch.zeros(3, 13))
    with pytest.raises(ValueError, match="NaN"):
        lut_matmul_one_sided(X, torch.full((3, 12), float("inf")))
    with pytest.raises(TypeError, match="floating"):
        lut_linear(torch.zeros(3, 12, dtype=torch.int64), X)
    with pytest.raises(ValueError, match="bias must be"):
        lut_linear(torch.zeros(3, 12), X, torch.zeros(5))
    with pytest.raises(ValueError, match="max_entries"):
        lut_matmul(X, X, max_entries=1000)
    with pytest.raises(TypeError, match="backend must be a str"):
        lut_matmul_one_sided(X, torch.zeros(2, 12), backend=None)


def test_lut_encoded_matrix_roundtrip_and_validation():
    c = QuantizationConfig(lattice_type="E8", q=2, M=3, beta=0.3)
    W = _mat(9, 19, 18)
    E = EncodedMatrix.from_dense(W, c)
    assert E.labels.shape == (9, 3, 3, 8) and E.T.shape == (9, 3) and E.pad == 5
    assert E.nbytes == (9 * 3 * 3 * 8 * 1 + 7) // 8 + 9 * 3
    ref = _ref_dense(E)
    assert torch.equal(E.dequantize(torch.float64), ref)
    assert torch.allclose(E.dequantize(), ref.float(), rtol=1e-6, atol=0)
    blocks, _ = to_blocks(W, 8)
    assert blocks.shape[:2] == E.labels.shape[:2]
    with pytest.raises(ValueError, match="with_dither"):
        EncodedMatrix.from_dense(W, c.replace(with_dither=True))
    with pytest.raises(ValueError, match="W must be a 2-D"):
        EncodedMatrix.from_dense(W[0], c)
    with pytest.raises(ValueError, match="k must be an int in"):
        EncodedMatrix(E.labels, E.T, c, 24 + 1)
    with pytest.raises(ValueError, match="T must have shape"):
        EncodedMatrix(E.labels, E.T[:, :2], c, 19)
    with pytest.raises(ValueError, match=r"labels must have shape \(\.\.\., M=3, d=8\)"):
        EncodedMatrix(E.labels[..., :4], E.T, c, 19)
    with pytest.raises(TypeError, match="dtype must be"):
        E.dequantize(torch.int32)


@settings(max_examples=12, deadline=None)
@given(
    case=st.sampled_from([("Z2", 2), ("Z2", 5), ("D4", 2), ("D4", 3), ("D4", 4), ("E8", 2)]),
    M=st.integers(1, 3),
    beta=st.floats(0.05, 2.0),
    alpha=st.sampled_from([1.0 / 3, 0.5, 1.0]),
    k=st.integers(1, 21),
    seed=st.integers(0, 2**16),
)
def test_lut_matmul_property_random_configs(case, M, beta, alpha, k, seed):
    name, q = case
    c = QuantizationConfig(lattice_type=name, q=q, M=M, beta=beta, alpha=alpha)
    X = EncodedMatrix.from_dense(_mat(6, k, seed), c)
    Y = EncodedMatrix.from_dense(_mat(5, k, seed + 1), c)
    Xh, Yh = _ref_dense(X), _ref_dense(Y)
    _close(lut_matmul(X, Y, backend="torch"), Xh @ Yh.T, Xh.abs() @ Yh.abs().T)
    Yf = _mat(4, k, seed + 2)
    _close(lut_matmul_one_sided(X, Yf, backend="torch"), Xh @ Yf.T, Xh.abs() @ Yf.abs().T)


def _cpu_backends(op: str) -> list[str]:
    """Backends that run ``op`` on CPU tensors ("torch" always; coset-cuda's native one-sided GEMV on CPU, its
    two-sided kernel only on CUDA tensors)."""
    probe = torch.zeros(1, dtype=torch.int32)
    return [
        b
        for b in qbackend.available_backends()
        if b == "torch" or qbackend.get_backend(b).supports(op, probe, None, None)
    ]


_CPU_LUT_BACKENDS = _cpu_backends("lut_one_sided")
_CPU_TWO_SIDED = _cpu_backends("lut_two_sided")


@pytest.mark.parametrize("backend", _CPU_LUT_BACKENDS)
@pytest.mark.parametrize("name,q,M", [("D4", 4, 2), ("E8", 2, 3), ("Z2", 5, 1)])
def test_lut_matmul_every_registered_backend_matches_decode(backend, name, q, M):
    """Each installed backend ("torch" always; native kernels when installed) against the float64 reference."""
    c = QuantizationConfig(lattice_type=name, q=q, M=M, beta=BETA[name], alpha=0.5)
    k = 3 * c.dim + 1
    X = EncodedMatrix.from_dense(_mat(37, k, 20), c)
    Y = EncodedMatrix.from_dense(_mat(29, k, 21), c.replace(beta=0.5 * c.beta))
    Yf = _mat(11, k, 22)
    Xh, Yh = _ref_dense(X), _ref_dense(Y)
    two = backend if backend in _CPU_TWO_SIDED else "torch"
    _close(lut_matmul(X, Y, backend=two), Xh @ Yh.T, Xh.abs() @ Yh.abs().T)
    _close(lut_matmul(Y, X, backend=two), Yh @ Xh.T, Yh.abs() @ Xh.abs().T)
    _close(lut_matmul_one_sided(X, Yf, backend=backend), Xh @ Yf.T, Xh.abs() @ Yf.abs().T)
