import pytest
import torch

from coset.kv import HeadRotation, KVQuantConfig, decode_states, encode_states
from coset.kv.codes import decode_reference, scale_values, unpack_t
from coset.quant import encode


def states(B=2, H=3, L=9, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # uneven channel energies, like real keys
    return torch.randn(B, H, L, D, generator=g) * torch.linspace(0.05, 4.0, D)


@pytest.mark.parametrize("bits, t_bits, scale_bits", [(4, 2, 16), (3, 1, 16), (2, 0, 16), (1, 4, 16), (4, 4, 8)])
def test_decode_equals_coset_quant_decode(bits, t_bits, scale_bits):
    cfg = KVQuantConfig(bits=bits, t_bits=t_bits, scale_bits=scale_bits)
    rot = HeadRotation(3, 64, seed=1)
    c = encode_states(states(), rot, cfg)
    assert torch.allclose(decode_states(c, rot, cfg), decode_reference(c, rot, cfg), atol=1e-4)


def test_label_bytes_are_the_coset_quant_labels():
    cfg = KVQuantConfig(bits=3)
    rot = HeadRotation(3, 64, seed=2)
    x = states()
    c = encode_states(x, rot, cfg)
    xr = rot.rotate(x)
    u = xr / c.scale.float().unsqueeze(-1)
    b, T = encode(u.reshape(2, 3, 9, 8, 8), config=cfg.quant_config())
    bits = (c.idx.unsqueeze(-1).int() >> torch.arange(8)) & 1
    assert torch.equal(bits.to(torch.uint8), b)
    assert torch.equal(unpack_t(c.t, cfg, 8), T)


def test_error_falls_with_rate_and_codes_are_per_token():
    rot = HeadRotation(3, 64, seed=3)
    x = states(L=64)
    errs = []
    for bits in (1, 2, 3, 4):
        cfg = KVQuantConfig(bits=bits)
        xh = decode_states(encode_states(x, rot, cfg), rot, cfg)
        errs.append(float((xh - x).pow(2).sum() / x.pow(2).sum()))
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.02  # 4 bits: better than 17 dB
    # encoding a prefix gives the prefix of the codes (appendable: no state across tokens)
    cfg = KVQuantConfig()
    full, part = encode_states(x, rot, cfg), encode_states(x[:, :, :10], rot, cfg)
    assert torch.equal(full.idx[:, :, :10], part.idx) and torch.equal(full.t[:, :, :10], part.t)


def test_eight_bit_log_scale():
    x = states(L=40)
    x[0, 0, 3] = 0.0  # a zero vector: code 0, decoded exactly
    rot = HeadRotation(3, 64, seed=2)
    c8 = encode_states(x, rot, KVQuantConfig(bits=4, scale_bits=8))
    c16 = encode_states(x, rot, KVQuantConfig(bits=4))
    assert c8.scale.dtype == torch.uint8 and c16.scale.dtype == torch.float16
    assert c8.nbytes == c16.nbytes - c16.scale.numel()  # one byte a vector less
    assert KVQuantConfig(bits=4, scale_bits=8).bits_per_element(64) == 4.375
    assert int(c8.scale[0, 0, 3]) == 0 and bool((scale_values(c8.scale[0, 0, 3:4]) == 0).all())
    rms = x.pow(2).mean(-1).sqrt()  # the rotation keeps the rms
    rho = scale_values(c8.scale)
    nz = rms > 0
    # the nearest step of 2^(1/8): within a factor 2^(1/16) of the rms
    assert bool((rho[nz] / rms[nz]).log2().abs().max() <= 1 / 16 + 1e-6)
    assert torch.equal(decode_states(c8, rot, KVQuantConfig(bits=4, scale_bits=8))[0, 0, 3], torch.zeros(64))
    # the scale code costs little accuracy at 4 bits
    e8 = float((decode_states(c8, rot, KVQuantConfig(bits=4, scale_bits=8)) - x).pow(2).sum())
    e16 = float((decode_states(c16, rot, KVQuantConfig(bits=4)) - x).pow(2).sum())
    assert e8 < 1.1 * e16
    with pytest.raises(ValueError):
        KVQuantConfig(scale_bits=12)


def test_nbytes_counts_every_byte():
    cfg = KVQuantConfig(bits=4, t_bits=2)
    assert cfg.bytes_per_vector(64) == 32 + 2 + 2
    assert cfg.bits_per_element(64) == 4.5
    assert KVQuantConfig(bits=3, t_bits=1).bits_per_element(64) == 3.375
    c = encode_states(states(), HeadRotation(3, 64), cfg)
    assert c.nbytes == 2 * 3 * 9 * 36
    assert c.idx.dtype == torch.uint8 and c.t.dtype == torch.uint8 and c.scale.dtype == torch.float16


def test_zero_vectors_and_large_values():
    rot = HeadRotation(3, 64)
    cfg = KVQuantConfig()
    x = torch.zeros(1, 3, 2, 64)
    x[0, 1, 1] = 3e3
    xh = decode_states(encode_states(x, rot, cfg), rot, cfg)
    assert torch.equal(xh[0, 0], torch.zeros(2, 64))
    assert float((xh - x).norm() / x.norm()) < 0.2


@pytest.mark.parametrize(
    "x, exc",
    [
        (torch.randn(3, 4, 64), ValueError),
        (torch.randn(1, 3, 4, 32), ValueError),
        (torch.randn(1, 2, 4, 64), ValueError),
        (torch.full((1, 3, 4, 64), float("nan")), ValueError),
        (torch.zeros(1, 3, 4, 64, dtype=torch.int32), TypeError),
        ([1.0], TypeError),
    ],
)
def test_encode_bad_input(x, exc):
    with pytest.raises(exc):
        encode_states(x, HeadRotation(3, 64), KVQuantConfig())


def test_codes_that_do_not_match_the_config_are_rejected():
    # regression (fuzz): codes read with another config were decoded silently wrong (other bits) or raised
    # RuntimeError from inside (other t_bits, broken shapes); an empty chunk did not decode
    from coset.kv import KVCodes, scores_lut, values_from_codes

    rot, cfg = HeadRotation(2, 64), KVQuantConfig(bits=3)
    c = encode_states(torch.randn(1, 2, 5, 64), rot, cfg)
    q, p = torch.randn(1, 2, 1, 64), torch.rand(1, 2, 1, 5)
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match="bits=2"):
            scores_lut(q, c, KVQuantConfig(bits=2), backend=backend)
        with pytest.raises(ValueError, match="codes.t"):
            values_from_codes(p, c, KVQuantConfig(bits=3, t_bits=4), backend=backend)
        with pytest.raises(ValueError, match="codes.scale"):
            scores_lut(q, KVCodes(c.idx, c.t, c.scale[..., :2]), cfg, backend=backend)
        with pytest.raises(TypeError, match="KVCodes"):
            scores_lut(q, (c.idx, c.t, c.scale), cfg, backend=backend)
    with pytest.raises(ValueError, match="bits=4"):
        decode_states(c, rot, KVQuantConfig(bits=4))
    with pytest.raises(TypeError, match="rotation"):
        encode_states(torch.randn(1, 2, 5, 64), "rot", cfg)
    empty = encode_states(torch.randn(1, 2, 0, 64), rot, cfg)
    assert decode_states(empty, rot, cfg).shape == (1, 2, 0, 64)


def test_codes_record_their_code():
    # regression (fuzz): two codes can share every tensor shape (t_bits 1 and 2 at head_dim 32: one T byte per
    # vector; another beta or alpha); codes read with the other one decoded to wrong vectors without an error
    from coset.kv import KVCodes, scores_lut, values_from_codes

    rot, cfg = HeadRotation(2, 32), KVQuantConfig(bits=3, t_bits=1, alpha=1.0)
    x = torch.randn(1, 2, 7, 32)
    c = encode_states(x, rot, cfg)
    assert c.code == cfg.code_key() == (3, 1, 1.0, cfg.resolved_beta, 16)
    q, p = torch.randn(1, 2, 1, 32), torch.rand(1, 2, 1, 7)
    others = {"t_bits": KVQuantConfig(bits=3, t_bits=2, alpha=1.0), "beta": KVQuantConfig(bits=3, t_bits=1, beta=0.7)}
    for field, other in others.items():
        assert other.t_bytes(32) == cfg.t_bytes(32)  # the same layout: only the recorded code tells them apart
        with pytest.raises(ValueError, match=f"another code.*{field}"):
            decode_states(c, rot, other)
        for backend in ("torch", "auto"):
            with pytest.raises(ValueError, match=field):
                scores_lut(q, c, other, backend=backend)
            with pytest.raises(ValueError, match=field):
                values_from_codes(p, c, other, backend=backend)
    # the same tensors without the record are read as the caller says (the layout checks still apply)
    bare = KVCodes(c.idx, c.t, c.scale)
    assert torch.equal(decode_states(bare, rot, cfg), decode_states(c, rot, cfg))
    assert not torch.equal(decode_states(bare, rot, others["t_bits"]), decode_states(c, rot, cfg))


def test_head_vectors_past_the_scale_range_raise():
    # regression (fuzz): an rms past float16 (or the 8-bit log scale) was clamped: 100% error, silently
    rot = HeadRotation(1, 16)
    for scale_bits in (16, 8):
        cfg = KVQuantConfig(scale_bits=scale_bits)
        with pytest.raises(ValueError, match="rms"):
            encode_states(torch.full((1, 1, 1, 16), 1e5), rot, cfg)
        x = torch.randn(1, 1, 3, 16) * 1e4  # within range: coded with the usual relative error
        err = (decode_states(encode_states(x, rot, cfg), rot, cfg) - x).norm() / x.norm()
        assert float(err) < 0.2
    with pytest.raises(ValueError, match="2\\^26"):
        HeadRotation(1, 2**14)  # a (1, 16384, 16384) matrix: not an attention layer
