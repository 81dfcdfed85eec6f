import shutil
import subprocess
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

CSRC = Path(__file__).resolve().parents[3] / "cuda" / "csrc"


def setup(bits=4, t_bits=2, L=37, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = KVQuantConfig(bits=bits, t_bits=t_bits)
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


@pytest.mark.parametrize("bits, t_bits", [(4, 2), (3, 1), (2, 0), (1, 4)])
def test_lut_scores_equal_decode_then_dot(bits, t_bits):
    cfg, rot, codes, q = setup(bits, t_bits)
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
def native_lib(tmp_path_factory):
    """Build cuda/csrc/kv_cpu.cpp on its own (the file is self-contained) and load it through ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build cuda/csrc/kv_cpu.cpp")
    out = tmp_path_factory.mktemp("kvnative") / "libcosetkv.so"
    subprocess.run(
        [
            cxx,
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            f"-I{CSRC}",
            str(CSRC / "kv_cpu.cpp"),
            "-o",
            str(out),
            "-lpthread",
        ],
        check=True,
    )
    native.load_library(out)
    yield out
    native.unload_library()


@pytest.mark.parametrize("bits, t_bits", [(4, 2), (3, 1), (2, 0), (1, 4)])
def test_native_kernel_equals_torch_reference(native_lib, bits, t_bits):
    cfg, rot, codes, q = setup(bits, t_bits, L=301, n=3)
    qr = rot.rotate(q)
    ref = scores_reference(qr, codes, cfg)
    got = scores_lut(qr, codes, cfg, backend="native")
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5)
    p = torch.softmax(ref, -1)
    assert torch.allclose(values_from_codes(p, codes, cfg, backend="native"), p @ decode_rotated(codes, cfg), atol=1e-5)
    old = torch.get_num_threads()
    try:  # the multi-threaded split gives the same numbers
        torch.set_num_threads(1)
        one = values_from_codes(p, codes, cfg, backend="native")
    finally:
        torch.set_num_threads(old)
    assert torch.allclose(one, values_from_codes(p, codes, cfg, backend="native"), atol=1e-6)


def test_native_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        native.load_library(tmp_path / "missing.so")
    with pytest.raises(TypeError):
        native.load_library(3)
