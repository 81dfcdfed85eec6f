"""Single-process tests of coset.dist: payload encode/decode, summable code packing, modular exactness and
its bound, byte accounting, state validation and checkpointing, hook signature."""

import inspect
import math
import pickle

import pytest
import torch
import torch.distributed as dist

from coset.dist import HNLQHookState, default_config, hnlq_hook, register
from coset.dist.codec import (
    allgather_bytes,
    choose_sum_packing,
    chunk_block_norms,
    decode_payload,
    encode_payload,
    modular_decode,
    modular_encode,
    modular_margin,
    modular_scales,
    pack_sum_fields,
    payload_layout,
    ring_allreduce_bytes,
    sum_squares,
    unpack_sum_fields,
)
from coset.quant import QuantizationConfig, decode, encode, pack_codes, packed_nbytes, sample_dither, to_blocks


def heavy(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    chi = torch.randn(n, 3, generator=g, dtype=torch.float64).pow(2).sum(-1) / 3
    return scale * t / chi.sqrt()


# ------------------------------------------------------------------------------------ allgather payload
@pytest.mark.parametrize("n", [1, 3, 4, 1003, 4096])
@pytest.mark.parametrize("lat", ["D4", "E8"])
def test_payload_roundtrip_equals_quant_decode(n, lat):
    cfg = default_config(4, 2, lat)
    x = heavy(n, n).to(torch.float32)
    payload, info = encode_payload(x, cfg)
    lay = payload_layout(n, cfg)
    assert payload.dtype == torch.uint8 and payload.numel() == lay.nbytes
    xh, flag = decode_payload(payload, n, cfg)
    assert not flag and xh.shape == (n,)
    # the same numbers as coset.quant on the RMS-normalized, zero-padded blocks
    rho = info["rho"]
    assert rho == pytest.approx(float(x.double().pow(2).mean().sqrt()), rel=1e-7)  # the float32 RMS
    assert rho == float(torch.tensor(rho, dtype=torch.float32))
    blocks, pad = to_blocks(x / torch.tensor(rho, dtype=torch.float32), cfg.dim)  # divided in float32
    b, T = encode(blocks, config=cfg)
    ref = decode(b, cfg, T, dtype=torch.float64).reshape(-1)[:n] * rho
    rho32 = float(torch.tensor(rho, dtype=torch.float32))  # rho travels as float32
    ref32 = decode(b, cfg, T, dtype=torch.float64).reshape(-1)[:n] * rho32
    assert torch.equal(xh, ref32)
    assert torch.equal(info["T"], T)
    assert torch.allclose(xh, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 5, 65_536, 65_539, 200_003])
def test_sum_squares_fixed_order(n):
    """sum_squares is the documented order (four lanes per 2^16-segment, segments left to right), checked
    against a plain Python loop of float64 additions."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 8).float()
    v = [float(t) ** 2 for t in x.double()]
    total = 0.0
    for s0 in range(0, n, 1 << 16):
        lanes = [0.0, 0.0, 0.0, 0.0]
        for i in range(s0, min(n, s0 + (1 << 16))):
            lanes[(i - s0) % 4] += v[i]
        total += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
    assert sum_squares(x) == total
    assert sum_squares(x) == pytest.approx(math.fsum(v), rel=1e-12)


def test_payload_bytes_match_rate():
    cfg = default_config(4, 2)  # 4 bits/label-coordinate, T in [0, 7] -> 3 bits per 4-block
    n = 1000
    lay = payload_layout(n, cfg)
    assert lay.label_bytes == packed_nbytes(250 * 2 * 4, 2**2) == 500
    assert lay.t_bytes == math.ceil(250 * 3 / 8) == 94
    assert lay.nbytes == 500 + 94 + 8
    # 4.75 bits per value + 8 bytes: more than 6x smaller than float32
    assert 4 * n / lay.nbytes > 6.5


def _bitstream(vals, k):
    """Little-endian bit stream with value i at bits [i k, (i+1) k), built with one Python integer."""
    acc = 0
    for i, v in enumerate(vals):
        acc |= int(v) << (i * k)
    n = math.ceil(len(vals) * k / 8)
    return acc.to_bytes(n, "little") if n else b""


@pytest.mark.parametrize("q", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_payload_bytes_are_the_quant_bit_stream(q, n):
    """The payload stores labels and T with coset.quant's packer: check the bytes against an independent
    big-integer bit stream, and the round trip of the labels through decode_payload."""
    cfg = QuantizationConfig("D4", q, 2, beta=0.5, alpha=1.0, max_scaling_iterations=6)
    x = heavy(n, 50 + q + n)
    p, info = encode_payload(x, cfg)
    lay = payload_layout(n, cfg)
    blocks, _ = to_blocks(x.float() / torch.tensor(info["rho"], dtype=torch.float32), cfg.dim)
    b, T = encode(blocks, config=cfg)
    k = (q - 1).bit_length()
    assert bytes(p[: lay.label_bytes].tolist()) == _bitstream(b.reshape(-1).tolist(), k)
    # then the T tensors of coset.quant.pack_codes (one packed-code format), zero-padded to the T section
    tensors, meta = pack_codes(b, T, cfg, codings=("zero", "dense", "sparse"))
    t = b"".join(bytes(tensors[key].tolist()) for key in ("T", "T_index", "T_value") if key in tensors)
    section = bytes(p[lay.label_bytes : lay.label_bytes + lay.t_bytes].tolist())
    assert section == t + bytes(lay.t_bytes - len(t))
    if meta["T_coding"] == "dense":
        assert t == _bitstream(T.tolist(), meta["T_bits"])
    xh, flag = decode_payload(p, n, cfg)
    rho32 = float(torch.tensor(info["rho"], dtype=torch.float32))  # the header stores rho as float32
    ref = (decode(b, cfg, T, dtype=torch.float64) * rho32).reshape(-1)[:n]
    assert not flag and torch.equal(xh, ref)


def test_payload_zero_empty_and_nonfinite():
    cfg = default_config()
    z = torch.zeros(10)
    p, info = encode_payload(z, cfg)
    xh, flag = decode_payload(p, 10, cfg)
    assert not flag and torch.equal(xh, torch.zeros(10, dtype=torch.float64))
    p, _ = encode_payload(torch.zeros(0), cfg)
    xh, flag = decode_payload(p, 0, cfg)
    assert xh.numel() == 0 and not flag
    bad = torch.ones(9)
    bad[3] = float("inf")
    p, info = encode_payload(bad, cfg)
    _, flag = decode_payload(p, 9, cfg)
    assert info["nonfinite"] and flag


def test_payload_rejects_bad_input():
    cfg = default_config()
    with pytest.raises(TypeError):
        encode_payload(torch.ones(2, 4), cfg)
    with pytest.raises(TypeError):
        encode_payload(torch.ones(4, dtype=torch.int32), cfg)
    p, _ = encode_payload(torch.ones(8), cfg)
    with pytest.raises(ValueError, match="payload"):
        decode_payload(p[:-1], 8, cfg)
    with pytest.raises(ValueError, match="numel"):
        payload_layout(-1, cfg)


def test_allgather_error_bound_per_block():
    """No-overload blocks: ||x - x_hat|| <= R_cov * s_T, and s_T <= max(s_0, 2^alpha ||x|| / r_safe)."""
    cfg = default_config(4, 2)
    lat = cfg.lattice
    x = heavy(4096, 11)
    p, info = encode_payload(x, cfg)
    xh, _ = decode_payload(p, x.numel(), cfg)
    assert int(info["clamped"].sum()) == 0
    err = torch.linalg.vector_norm((xh - x).reshape(-1, 4), dim=-1)
    s0 = info["rho"] * cfg.beta
    r = (1 - cfg.q ** (1 - cfg.M)) / (cfg.q - 1)
    r_safe = 0.99 * (lat.packing_radius * cfg.q**cfg.M * (1 - r) - lat.covering_radius)
    nrm = torch.linalg.vector_norm(x.reshape(-1, 4), dim=-1)
    bound = lat.covering_radius * torch.clamp(2**cfg.alpha * nrm / r_safe, min=s0)
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float(err.max()) > 0.2 * float(bound.max())  # the bound is not vacuous


# ------------------------------------------------------------------------------------ summable packing
@pytest.mark.parametrize("modulus,W", [(16, 2), (16, 3), (16, 8), (256, 2), (64, 2), (4, 5), (9, 2), (256, 16)])
def test_sum_packing_is_exact(modulus, W):
    pk = choose_sum_packing(modulus, W)
    n = 1237
    g = torch.Generator().manual_seed(modulus * 31 + W)
    codes = [torch.randint(0, modulus, (n,), generator=g) for _ in range(W)]
    bufs = [pack_sum_fields(c, pk) for c in codes]
    if pk.kind == "uint8":
        total = bufs[0].clone()
        for b in bufs[1:]:
            total += b  # uint8 wraps mod 256, like gloo's SUM
    else:
        total = torch.stack(bufs).sum(0)
        assert bool((total >= 0).all())  # no int64 overflow
    got = unpack_sum_fields(total, n, pk)
    assert torch.equal(got, torch.remainder(torch.stack(codes).sum(0), modulus))
    assert bufs[0].numel() * bufs[0].element_size() == pk.nbytes(n)


def test_sum_packing_choice_and_errors():
    pk = choose_sum_packing(16, 2)
    assert (pk.kind, pk.width, pk.fields) == ("int64", 5, 12)  # 4 code bits + 1 guard bit
    assert pk.nbytes(1200) == 800  # 2/3 byte per coordinate
    assert choose_sum_packing(256, 2).kind == "uint8"
    assert choose_sum_packing(16, 2, "uint8").nbytes(1200) == 1200
    with pytest.raises(ValueError, match="256"):
        choose_sum_packing(9, 2, "uint8")
    with pytest.raises(ValueError, match="code_packing"):
        choose_sum_packing(16, 2, "zip")
    with pytest.raises(ValueError, match="world_size"):
        choose_sum_packing(16, 0)


def test_naive_nibble_packing_would_be_wrong():
    """Why the guard bits: two 4-bit codes per byte, summed mod 256, corrupt the high nibble by the carry."""
    a = torch.tensor([[9, 1]])
    b = torch.tensor([[9, 1]])
    pack = lambda c: (c[:, 0] + 16 * c[:, 1]).to(torch.uint8)  # noqa: E731
    s = pack(a) + pack(b)
    assert int(s[0]) // 16 != (1 + 1) % 16  # the carry from 9 + 9 leaked
    pk = choose_sum_packing(16, 2)
    got = unpack_sum_fields(pack_sum_fields(a[0], pk) + pack_sum_fields(b[0], pk), 2, pk)
    assert got.tolist() == [(9 + 9) % 16, 2]


# ------------------------------------------------------------------------------------ modular code
def _simulate_modular(xs, cfg, W, bpc, dither=False, scale_factor=1.0):
    lat, modulus = cfg.lattice, cfg.q**cfg.M
    norm_sum = sum(chunk_block_norms(x, lat.dim, bpc) for x in xs)
    s = modular_scales(norm_sum, lat, cfg.q, cfg.M, W, dither) * scale_factor
    nb = -(-xs[0].numel() // lat.dim)
    zs = [sample_dither(nb, lat, 100 + r) if dither else None for r in range(W)]
    pairs = [modular_encode(x, s, lat, modulus, bpc, z) for x, z in zip(xs, zs, strict=True)]
    code_sum = torch.remainder(sum(c for c, _ in pairs), modulus)
    return s, [lam for _, lam in pairs], modular_decode(code_sum, lat, modulus), zs


@pytest.mark.parametrize(
    "lat,q,M,W",
    [
        ("D4", 4, 2, 2),
        ("D4", 4, 2, 8),
        ("D4", 2, 4, 2),
        ("D4", 16, 2, 4),
        ("E8", 4, 2, 2),
        ("Z2", 4, 2, 2),
        ("E8", 8, 2, 16),
    ],
)
@pytest.mark.parametrize("dither", [False, True])
def test_modular_sum_is_exact_and_bounded(lat, q, M, W, dither):
    cfg = QuantizationConfig(lattice_type=lat, q=q, M=M)
    if modular_margin(cfg.lattice, q, M, W, dither) <= 0:
        with pytest.raises(ValueError, match="too small"):
            _simulate_modular([heavy(8, 0)] * W, cfg, W, 4, dither)
        return
    n = 1001
    xs = [heavy(n, 7 * W + r, scale=10.0 ** (r % 3 - 1)) for r in range(W)]
    bpc = 16
    s, lams, dec, zs = _simulate_modular(xs, cfg, W, bpc, dither)
    assert torch.equal(dec, torch.stack(lams).sum(0))  # exact: the code of the sum is the sum of the codes
    # error of the average per d-block <= s * R_cov (each rank's Q_L error is at most the covering radius)
    d = cfg.dim
    nb = dec.shape[0]
    s_b = s.repeat_interleave(bpc)[:nb].unsqueeze(-1)
    est = dec - (torch.stack(zs).sum(0) if dither else 0)
    avg_hat = (est * s_b) / W
    avg = to_blocks(torch.stack(xs).sum(0) / W, d)[0]
    err = torch.linalg.vector_norm(avg_hat - avg, dim=-1)
    assert bool((err <= s_b.squeeze(-1) * cfg.lattice.covering_radius * (1 + 1e-9)).all())


def test_modular_scale_is_needed():
    """A quarter of the agreed scale puts the sum past q^M V (norm > q^M * covering radius): decoding fails."""
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    W = 4
    # the same gradient on every rank: the sum is as long as the triangle-inequality bound allows
    xs = [heavy(4000, 0).abs()] * W
    _, lams, dec, _ = _simulate_modular(xs, cfg, W, 1000, scale_factor=0.25)
    assert not torch.equal(dec, torch.stack(lams).sum(0))
    _, lams, dec, _ = _simulate_modular(xs, cfg, W, 1000, scale_factor=1.0)
    assert torch.equal(dec, torch.stack(lams).sum(0))


def test_modular_scales_zero_chunks_and_bad_modulus():
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    s = modular_scales(torch.tensor([0.0, 2.0], dtype=torch.float64), cfg.lattice, 4, 2, 2, False)
    assert s[0] == 1.0
    assert float(s[1]) == pytest.approx(2.0 / (0.99 * 16 * math.sqrt(0.5) - 2.0))
    with pytest.raises(ValueError, match="too small"):
        modular_scales(torch.ones(1, dtype=torch.float64), cfg.lattice, 2, 1, 2, False)


def test_modular_scales_are_the_next_float32_up():
    """Each scale is the smallest float32 >= norm_sum / budget (a larger scale keeps the no-overload guarantee);
    a value beyond float32 range stays float64."""
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2)
    g = torch.Generator().manual_seed(0)
    ns = torch.cat(
        [
            torch.rand(1000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (1000,), generator=g),
            torch.tensor([1e300]),
        ]
    )
    budget = modular_margin(cfg.lattice, 4, 2, 2, False)
    s = modular_scales(ns, cfg.lattice, 4, 2, 2, False)
    exact = ns / budget
    f = s[:-1].float()
    assert torch.equal(f.double(), s[:-1])  # float32 values
    assert bool((s[:-1] >= exact[:-1]).all())
    below = torch.nextafter(f, torch.tensor(float("-inf"))).double()
    assert bool((below < exact[:-1]).all())  # the next float32 down would be too small
    assert s[-1] == exact[-1]


# ------------------------------------------------------------------------------------ bytes
def test_ring_byte_model():
    assert ring_allreduce_bytes(4000, 2) == 4000
    assert ring_allreduce_bytes(4000, 4) == 6000
    assert ring_allreduce_bytes(4000, 1) == 0
    assert allgather_bytes(500, 2) == 500
    assert allgather_bytes(500, 8) == 3500


# ------------------------------------------------------------------------------------ state
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"mode": "sum"}, ValueError, "mode"),
        ({"config": {"q": 4}}, TypeError, "config"),
        ({"config": QuantizationConfig(overload_policy="error")}, ValueError, "overload_policy"),
        ({"config": QuantizationConfig(disable_overload_protection=True)}, ValueError, "disable_overload"),
        ({"error_feedback": True, "start_iter": 1}, ValueError, "start_iter"),
        ({"error_feedback": 1}, TypeError, "error_feedback"),
        ({"start_iter": -1, "error_feedback": False}, ValueError, "start_iter"),
        ({"start_iter": 2.0}, TypeError, "start_iter"),
        ({"chunk_size": 6}, ValueError, "chunk_size"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"code_packing": "nibble"}, ValueError, "code_packing"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"seed": -3}, ValueError, "seed"),
        ({"process_group": "world"}, TypeError, "process_group"),
    ],
)
def test_state_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HNLQHookState(**kwargs)


def test_state_checkpoint_roundtrip():
    st = HNLQHookState(mode="modular", start_iter=3, chunk_size=64, seed=9)
    st.iter = 17
    st.residuals[0] = torch.randn(10)
    st.residuals[2] = torch.randn(3)
    st.bucket_scales[0] = torch.tensor([0.5, 2.0], dtype=torch.float64)
    st._counters["bytes_sent"] = 123
    for restored in (pickle.loads(pickle.dumps(st)), HNLQHookState()):
        if restored.iter == 0:
            restored.load_state_dict(st.state_dict())
        assert restored.iter == 17 and restored.mode == "modular" and restored.chunk_size == 64
        assert restored.process_group is None and restored.seed == 9 and restored.start_iter == 3
        assert restored.config == st.config
        assert set(restored.residuals) == {0, 2}
        assert all(torch.equal(restored.residuals[k], st.residuals[k]) for k in (0, 2))
        assert restored.stats()["bytes_sent"] == 123 and restored.stats()["scales"][0] == (0.5, 2.0)
    sd = st.state_dict()
    sd["residuals"] = {0: torch.ones(3, dtype=torch.float64)}
    with pytest.raises(TypeError, match="residuals"):
        HNLQHookState().load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        HNLQHookState().load_state_dict({"mode": "modular"})


def test_hook_signature_matches_ddp_contract():
    ann = inspect.get_annotations(hnlq_hook)
    assert ann["bucket"] is dist.GradBucket
    assert ann["return"] == torch.futures.Future[torch.Tensor]
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register(torch.nn.Linear(2, 2), mode="modular")


def test_default_config_is_calibrated():
    cfg = default_config()
    assert (cfg.lattice_type, cfg.q, cfg.M, cfg.max_scaling_iterations) == ("D4", 4, 2, 7)
    # unit-RMS Gaussian data: relative MSE near the 4-bit regime (< 1 %), and no clamping
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0))
    p, info = encode_payload(x, cfg)
    xh, _ = decode_payload(p, x.numel(), cfg)
    rel = float(((xh - x.double()) ** 2).mean() / (x.double() ** 2).mean())
    assert rel < 0.01 and int(info["clamped"].sum()) == 0
