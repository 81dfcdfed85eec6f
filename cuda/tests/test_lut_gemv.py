"""GEMV on codes (csrc/lut_gemv.h) against the dequantized weight and against coset.lut's torch path.

The kernels accumulate in float32 in a different order than a dense matmul, so results agree to float32
rounding: |y - x Ŵ^T| <= 1e-5 * (|x| |Ŵ|^T) (a sum of K*M float32 products; 1e-5 ~ 100 ulp is loose).
"""

import pytest
import torch

from coset.cuda.lut_gemv import CodedWeight, lut_gemv
from coset.quant import QuantizationConfig


def _check(y, x, Wd):
    ref = x.double() @ Wd.double().T
    tol = 1e-5 * (x.abs().double() @ Wd.abs().double().T) + 1e-6
    assert bool(((y.double() - ref).abs() <= tol).all())


@pytest.mark.parametrize("lat,q,M", [("D4", 4, 2), ("E8", 2, 4), ("E8", 4, 2), ("D4", 2, 3)])
@pytest.mark.parametrize("B", [1, 3, 8, 11])
def test_lut_gemv_matches_dequantized(lat, q, M, B):
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25)
    g = torch.Generator().manual_seed(B)
    W = torch.randn(37, 70, generator=g) * 2  # k not a multiple of d: padded last block; T > 0 present
    CW = CodedWeight.from_dense(W, cfg)
    assert bool((CW.T > 0).any())
    x = torch.randn(B, 70, generator=g)
    Wd = CW.dequantize()
    _check(lut_gemv(x, CW), x, Wd)
    if q**cfg.dim <= 256:
        _check(lut_gemv(x, CW, method="codebook"), x, Wd)
    _check(lut_gemv(x[0], CW).unsqueeze(0), x[:1], Wd)


@pytest.mark.parametrize("lat,q,M,k", [("D4", 4, 2, 18), ("D4", 3, 2, 17), ("E8", 2, 4, 41), ("E8", 3, 1, 16)])
@pytest.mark.parametrize("B", [1, 2, 4, 8])
def test_lut_gemv_codebook_and_tables_agree(lat, q, M, k, B):
    # odd number of D4 blocks (the pair kernel's tail), q not a power of two (Horner by multiplication)
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25)
    g = torch.Generator().manual_seed(k + B)
    CW = CodedWeight.from_dense(torch.randn(23, k, generator=g) * 2, cfg)
    x = torch.randn(B, k, generator=g)
    Wd = CW.dequantize()
    _check(lut_gemv(x, CW, method="codebook"), x, Wd)
    if q**cfg.dim <= 256:
        _check(lut_gemv(x, CW, method="tables"), x, Wd)


def test_dequantize_equals_reference_decode():
    from coset.quant import decode, to_blocks

    cfg = QuantizationConfig(lattice_type="E8", q=2, M=4, beta=0.5)
    W = torch.randn(9, 24)
    CW = CodedWeight.from_dense(W, cfg)
    from coset.quant import encode

    b, T = encode(to_blocks(W, 8)[0], config=cfg, backend="torch")
    assert torch.equal(CW.dequantize(), decode(b, config=cfg, T=T, backend="torch").reshape(9, -1))


def test_registry_op_one_sided_matches_torch_path():
    # coset.lut sits above coset-cuda: this check of the registry op runs in the workspace, where both are
    # installed (coset-cuda installed alone must not see coset.lut, which .ci/isolated asserts)
    lut = pytest.importorskip("coset.lut", reason="coset-lut is not installed (coset-cuda installed alone)")
    EncodedMatrix, lut_linear = lut.EncodedMatrix, lut.lut_linear

    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    W = torch.randn(50, 64) * 2
    X = EncodedMatrix.from_dense(W, cfg)
    x = torch.randn(5, 64)
    yn = lut_linear(x, X, backend="native")
    yt = lut_linear(x, X, backend="torch")
    tol = 1e-5 * (x.abs() @ X.dequantize().abs().T) + 1e-6
    assert bool(((yn - yt).abs() <= tol).all())


def test_bad_inputs():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    CW = CodedWeight.from_dense(torch.randn(4, 8), cfg)
    with pytest.raises(ValueError):
        lut_gemv(torch.randn(2, 9), CW)
    with pytest.raises(ValueError):
        lut_gemv(torch.full((8,), float("nan")), CW)
    with pytest.raises(TypeError):
        lut_gemv(torch.randn(8), "W")
    with pytest.raises(ValueError):
        CodedWeight(idx=CW.idx, T=CW.T, config=cfg, k=99)


# ---------------------------------------------------------------- the CUDA twin's shared core (lut_gemv_cuda.cu)
# The GPU kernel runs lut_gemv.h's __host__ __device__ block functions, one warp per row (lane l: blocks l, l+32,
# ...; then a fixed shuffle tree). _gemv_core_cpu runs those very functions in that order on the CPU, and
# gemv_reference spells the order out in torch: equal bit for bit means the GPU result is pinned down too.
from coset.cuda import _C  # noqa: E402
from coset.cuda.lut_gemv import _gemv_core_cpu, _lane_sum, _tables_blocks, gemv_reference  # noqa: E402


@pytest.mark.parametrize(
    "lat,q,M,k",
    [("D4", 4, 2, 150), ("D4", 3, 3, 9), ("D4", 8, 1, 260), ("E8", 2, 4, 301), ("E8", 4, 2, 77), ("E8", 3, 2, 8)],
)
@pytest.mark.parametrize("B", [1, 3, 8, 11])
def test_gpu_core_equals_torch_reference_bit_for_bit(lat, q, M, k, B):
    # K from 1 to 65 blocks: lanes with 0, 1, 2 and 3 blocks, the tree over all 32 lanes; T > 0 present;
    # E8 q=4 has uint16 indices in an int16 tensor (>= 2^15 included) and a 512 KiB codebook (global memory)
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25)
    g = torch.Generator().manual_seed(k * 16 + B)
    CW = CodedWeight.from_dense(torch.randn(45, k, generator=g) * 2, cfg)
    assert bool((CW.T > 0).any())
    x = torch.randn(B, k, generator=g)
    methods = ["codebook", "tables"] if q**cfg.dim <= 256 else ["codebook"]
    if cfg.q**cfg.dim > 2**15:
        assert int((CW.idx.to(torch.int32) & 0xFFFF).max()) >= 2**15
    Wd = CW.dequantize()
    for method in methods:
        y = _gemv_core_cpu(x, CW, method)
        assert torch.equal(y, gemv_reference(x, CW, method)), method
        _check(y, x, Wd)


def test_gpu_core_one_sided_int32_scales_bit_for_bit():
    # the registry op lut_one_sided on CUDA tensors: int32 indices, float per-block scales, tables given
    g = torch.Generator().manual_seed(5)
    n, K, M, Q, q = 29, 70, 3, 16, 2
    ix = torch.randint(0, Q, (n, K, M), generator=g, dtype=torch.int32)
    sx = torch.rand(n, K, generator=g) * 3
    for B in (1, 2, 4, 8):
        tab = torch.randn(K, Q, B, generator=g)
        res = torch.empty(n, B)
        _C.lut_gemv_core_cpu(
            ix.data_ptr(), 4, 0, 0, sx.data_ptr(), 0, 0, 0, 0, tab.data_ptr(), Q, n, K, M, q, B, res.data_ptr(), 0
        )
        ref = _lane_sum(_tables_blocks(ix.long(), sx, tab, q))
        assert torch.equal(res, ref)
        # and the value: sum_k sx * sum_m q^m tab[k, ix]
        kk = torch.arange(K).view(1, K, 1)
        w = torch.tensor([float(q) ** m for m in range(M)]).view(1, 1, M, 1)
        exact = (sx.double().unsqueeze(-1) * (tab.double()[kk, ix.long()] * w.double()).sum(2)).sum(1)
        assert torch.allclose(res.double(), exact, rtol=1e-5, atol=1e-4)


def test_coded_weight_device_checks():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, beta=0.25)
    CW = CodedWeight.from_dense(torch.randn(4, 8), cfg)
    with pytest.raises(ValueError, match="device"):
        lut_gemv(torch.randn(8, device="meta"), CW)
    with pytest.raises(ValueError, match="reference|method"):
        gemv_reference(torch.randn(1, 8), CW, method="auto")
    assert torch.equal(CW.to("cpu").idx, CW.idx)


@pytest.mark.parametrize(
    "lat,q,M,pair",
    [("E8", 2, 1, False), ("E8", 2, 3, False), ("E8", 2, 4, False), ("E8", 2, 4, True), ("E8", 4, 2, False),
     ("E8", 2, 2, True), ("D4", 4, 2, False), ("D4", 4, 2, True), ("D4", 2, 3, False), ("D4", 8, 1, False)],
)  # fmt: skip
@pytest.mark.parametrize("B", [1, 2, 4, 8])
def test_codebook_fast_loop_equals_generic_bit_for_bit(lat, q, M, pair, B):
    # The AVX2 codebook loops (scales of 8 blocks from registers, per-block float scales specialised) must return
    # the generic codebook kernel's floats exactly: random labels and all 16 T steps (the blend of the two scale
    # registers), K = 27 blocks (three 8-block steps, one pair, one single block: D4's odd tail); n_scales = 0
    # selects the generic loop. Per-block float scales sx = scales[T] must give the same floats as T.
    from coset.cuda import _C
    from coset.cuda.lut_gemv import _kernel_tables

    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25)
    _, ai8, h, scales, a2, _ = _kernel_tables(cfg)
    g = torch.Generator().manual_seed(q * 100 + M * 10 + B)
    n, K, d = 13, 27, cfg.dim
    Q = q**d
    labels = torch.randint(0, Q, (n, K, M), generator=g)
    T = torch.randint(0, scales.numel(), (n, K), generator=g).to(torch.uint8)
    assert int(T.max()) >= 8
    if pair:
        A = a2
        idx = labels.to(torch.uint8).view(torch.int16).contiguous()
        ib, Mk, qk = 2, M // 2, q * q
    else:
        A = ai8
        idx = (labels.to(torch.uint8) if Q <= 256 else labels.to(torch.int32).to(torch.int16)).contiguous()
        ib, Mk, qk = idx.element_size(), M, q
    x = (torch.randn(B, K * d, generator=g) / h).contiguous()
    sx = scales[T.long()].contiguous()

    def run(n_scales, sx_ptr=0, hc_ptr=0):
        out = torch.full((n, B), float("nan"))
        _C.lut_gemv_codebook_cpu(
            idx.data_ptr(), ib, T.data_ptr(), scales.data_ptr(), sx_ptr, A.data_ptr(), d, x.data_ptr(), K * d,
            n, K, Mk, qk, B, out.data_ptr(), n_scales, hc_ptr,
        )  # fmt: skip
        return out

    generic, fast, fast_sx = run(0), run(scales.numel()), run(scales.numel(), sx.data_ptr())
    assert bool(torch.isfinite(generic).all())
    assert torch.equal(fast, generic)
    assert torch.equal(fast_sx, generic)
    if Mk == 1:  # the centring offset h c (any floats) enters both loops alike
        hc = torch.randn(d, generator=g)
        gen_c = run(0, 0, hc.data_ptr())
        assert not torch.equal(gen_c, generic)
        assert torch.equal(run(scales.numel(), 0, hc.data_ptr()), gen_c)
        assert torch.equal(run(scales.numel(), sx.data_ptr(), hc.data_ptr()), gen_c)
    # and both are the dequantized product up to float32 rounding
    A32 = A.to(torch.float64)[idx.long() if ib == 1 else idx.view(torch.int16).long() & 0xFFFF]  # (n, K, Mk, d)
    v = sum(A32[:, :, m] * qk**m for m in range(Mk))
    Wd = (v * sx.double().unsqueeze(-1)).reshape(n, K * d)
    ref = x.double() @ Wd.T
    tol = 1e-5 * (x.abs().double() @ Wd.abs().T) + 1e-6
    assert bool(((fast.double().T - ref).abs() <= tol).all())


@pytest.mark.parametrize("lat,q", [("E8", 4), ("E8", 2), ("D4", 4), ("D4", 2)])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_centred_codes_m1(lat, q, B):
    # center=True with M = 1 (the PTQ 2-bit code is E8 q=4 M=1 centred): x_hat = s (a - c); the kernels keep the
    # int8 codebook of a and subtract h c per block. Against the dequantized weight (which must equal
    # coset.quant.decode), the tables path, the generic loop (bit for bit) and the GPU-order core / reference.
    from coset.cuda.lut_gemv import _gemv_core_cpu, gemv_reference
    from coset.quant import decode, encode, to_blocks

    cfg = QuantizationConfig(lattice_type=lat, q=q, M=1, beta=0.3, center=True)
    g = torch.Generator().manual_seed(q + B)
    W = torch.randn(21, 83, generator=g)  # K = 11 (E8) / 21 (D4) blocks: 8-block steps, pairs, odd tails
    CW = CodedWeight.from_dense(W, cfg)
    blocks, _ = to_blocks(W, cfg.dim)
    b, T = encode(blocks, config=cfg, backend="torch")
    ref_w = decode(b, config=cfg, T=T, backend="torch").reshape(21, -1)[:, :83].to(torch.float32)
    assert torch.allclose(CW.dequantize(), ref_w, rtol=0, atol=1e-6)
    x = torch.randn(B, 83, generator=g)
    Wd = CW.dequantize()
    y = lut_gemv(x, CW)
    _check(y, x, Wd)
    if q**cfg.dim <= 256:
        _check(lut_gemv(x, CW, method="tables"), x, Wd)
    assert torch.equal(_gemv_core_cpu(x, CW, "codebook"), gemv_reference(x, CW, "codebook"))
    _check(gemv_reference(x, CW, "codebook"), x, Wd)


@pytest.mark.parametrize("lat,q,M", [("E8", 4, 2), ("E8", 2, 4), ("D4", 4, 2), ("D4", 2, 3)])
def test_centred_codes_several_layers(lat, q, M):
    # one offset c for the whole M-layer point (x_hat = s (sum_m q^m a_m - c)): the codebook kernels subtract h c
    # after the layers are combined (pair tables included); the one-sided tables cannot (per-layer entries)
    from coset.cuda.lut_gemv import _gemv_core_cpu, gemv_reference
    from coset.quant import decode, encode, to_blocks

    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.3, center=True)
    g = torch.Generator().manual_seed(q * M)
    W = torch.randn(19, 83, generator=g)
    CW = CodedWeight.from_dense(W, cfg)
    b, T = encode(to_blocks(W, cfg.dim)[0], config=cfg, backend="torch")
    ref_w = decode(b, config=cfg, T=T, backend="torch").reshape(19, -1)[:, :83].to(torch.float32)
    assert torch.allclose(CW.dequantize(), ref_w, rtol=0, atol=1e-6)
    for B in (1, 8):
        x = torch.randn(B, 83, generator=g)
        _check(lut_gemv(x, CW), x, ref_w)
        assert torch.equal(_gemv_core_cpu(x, CW, "codebook"), gemv_reference(x, CW, "codebook"))
    with pytest.raises(ValueError, match="M = 1"):
        lut_gemv(x, CW, method="tables")
