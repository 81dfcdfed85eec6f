from pathlib import Path

import pytest
import torch

from coset.kv import (
    HeadRotation,
    KVQuantConfig,
    code_tables,
    decode_states,
    encode_states,
    native,
    query_tables,
    scores_lut,
    scores_lut_torch,
    scores_reference,
    values_from_codes,
)
from coset.kv.codes import decode_rotated


def setup(bits=4, t_bits=2, L=37, n=5, seed=0, scale_bits=16):
    g = torch.Generator().manual_seed(seed)
    cfg = KVQuantConfig(bits=bits, t_bits=t_bits, scale_bits=scale_bits)
    rot = HeadRotation(3, 64, seed=seed)
    x = torch.randn(2, 3, L, 64, generator=g) * torch.linspace(0.1, 3, 64)
    q = torch.randn(2, 3, n, 64, generator=g)
    return cfg, rot, encode_states(x, rot, cfg), q


def test_query_tables_brute_force():
    cfg, rot, codes, q = setup()
    tab, cy = query_tables(q, cfg)
    a, c = code_tables(cfg)
    for j in (0, 17, 255):
        assert torch.allclose(tab[1, 2, 3, j, 4], (a[j] * q[1, 2, 4, 24:32]).sum(), atol=1e-5)
    assert torch.allclose(cy[0, 1, 7, 2], (c * q[0, 1, 2, 56:64]).sum(), atol=1e-5)


@pytest.mark.parametrize("bits, t_bits, scale_bits", [(4, 2, 16), (3, 1, 16), (2, 0, 16), (1, 4, 16), (3, 2, 8)])
def test_lut_scores_equal_decode_then_dot(bits, t_bits, scale_bits):
    cfg, rot, codes, q = setup(bits, t_bits, scale_bits=scale_bits)
    qr = rot.rotate(q)
    ref = q @ decode_states(codes, rot, cfg).transpose(-1, -2)  # unrotated: <q, k_hat>
    assert torch.allclose(scores_reference(qr, codes, cfg), ref, atol=1e-4, rtol=1e-5)
    assert torch.allclose(scores_lut_torch(qr, codes, cfg), ref, atol=1e-4, rtol=1e-5)
    assert torch.allclose(scores_lut(qr, codes, cfg, backend="torch"), ref, atol=1e-4, rtol=1e-5)


def test_values_from_codes_equal_decoded_weighted_sum():
    cfg, rot, codes, q = setup()
    p = torch.softmax(torch.randn(2, 3, 5, 37), -1)
    out = rot.unrotate(values_from_codes(p, codes, cfg, backend="torch"))
    assert torch.allclose(out, p @ decode_states(codes, rot, cfg), atol=1e-5)


def test_bad_arguments():
    cfg, rot, codes, q = setup()
    with pytest.raises(ValueError, match="queries"):
        scores_lut(torch.randn(2, 3, 5, 32), codes, cfg)
    with pytest.raises(ValueError, match="backend"):
        scores_lut(q, codes, cfg, backend="gpu")
    with pytest.raises(ValueError, match="p must"):
        values_from_codes(torch.rand(2, 3, 5, 36), codes, cfg)
    with pytest.raises(TypeError):
        values_from_codes(torch.ones(2, 3, 5, 37, dtype=torch.int64), codes, cfg)


@pytest.fixture(scope="module")
def native_backend():
    """The kv kernels of a registered backend (coset-cuda's "native", found through the coset.quant registry)."""
    if not native.available():
        pytest.skip("no registered backend provides kv_scores/kv_values (coset-cuda not installed)")
    return native


# n: queries per KV head (the kernel takes them 4 at a time: 1, 3, 5 and 9 leave 1..3 in the last group);
# L = 301 leaves a partial tile of tokens
@pytest.mark.parametrize(
    "bits, t_bits, n, scale_bits", [(4, 2, 3, 16), (3, 1, 9, 16), (2, 0, 5, 16), (1, 4, 1, 16), (4, 4, 3, 8)]
)
def test_native_kernel_equals_torch_reference(native_backend, bits, t_bits, n, scale_bits):
    cfg, rot, codes, q = setup(bits, t_bits, L=301, n=n, scale_bits=scale_bits)
    qr = rot.rotate(q)
    ref = scores_reference(qr, codes, cfg)
    got = scores_lut(qr, codes, cfg, backend="native")
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5)
    p = torch.softmax(ref, -1)
    assert torch.allclose(values_from_codes(p, codes, cfg, backend="native"), p @ decode_rotated(codes, cfg), atol=1e-5)
    cuda = pytest.importorskip("coset.cuda")  # the kernels' own thread count (not torch's)
    old = cuda.get_num_threads()
    try:  # the multi-threaded split gives the same numbers
        cuda.set_num_threads(1)
        one = values_from_codes(p, codes, cfg, backend="native")
        one_s = scores_lut(qr, codes, cfg, backend="native")
    finally:
        cuda.set_num_threads(old)
    cuda.set_num_threads(2)
    try:
        # fixed token chunks per KV head: the reduction order does not depend on the thread count
        assert torch.equal(one, values_from_codes(p, codes, cfg, backend="native"))
        assert torch.equal(one_s, scores_lut(qr, codes, cfg, backend="native"))
    finally:
        cuda.set_num_threads(old)


def test_native_found_through_the_registry_only():
    """coset.kv reaches the kernels through coset.quant's registry: no ctypes loader, no coset.cuda import."""
    assert not hasattr(native, "load_library")
    src = (Path(native.__file__)).read_text()
    assert "import ctypes" not in src and "from coset.cuda" not in src and "import coset.cuda" not in src


def test_native_bad_arguments(native_backend):
    cfg, rot, codes, q = setup()
    tab, cy = query_tables(rot.rotate(q), cfg)
    with pytest.raises(ValueError, match="do not match"):
        native.kv_scores(codes, torch.ones(4), cfg.t_bits, tab[..., :3], cy)
    with pytest.raises(ValueError, match="steps"):
        native.kv_scores(codes, torch.ones(3), cfg.t_bits, tab, cy)
