"""Fuzz the coset command (issue 11): random bytes and random tensors either give ``coset: error: ...`` with exit
status 2, or a compressed file that decompresses to finite tensors of the input's names, shapes and dtypes."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from coset.cli.compress import decompress_file
from coset.cli.main import main

_FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FAST
@given(data=st.binary(max_size=256))
def test_cli_fuzz_random_bytes_are_a_user_error(tmp_path, capsys, data):
    src = tmp_path / "in.safetensors"
    src.write_bytes(data)
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    assert main(["compress", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coset: error:") and "Traceback" not in err


_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3)
_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
_names = st.sampled_from(["w", "b", "w.labels", "x.T", "layer.0.weight", "s"])


@_FAST
@given(
    spec=st.dictionaries(_names, st.tuples(_shapes, _dtypes, st.floats(1e-6, 1e3)), min_size=1, max_size=4),
    lattice=st.sampled_from(["D4", "E8", "Z2"]),
    q=st.integers(2, 8),
    M=st.integers(1, 3),
)
def test_cli_fuzz_random_tensors_round_trip(tmp_path, capsys, spec, lattice, q, M):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, dt, scale) in spec.items():
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
        tensors[name] = t.to(dt) if dt.is_floating_point else (t * 10).to(dt)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    save_file(tensors, str(src))
    rc = main(["compress", str(src), str(out), "--lattice", lattice, "--q", str(q), "--M", str(M)])
    err = capsys.readouterr().err
    if rc == 2:  # the only user error possible here: a name that collides with a packed-code name
        assert err.startswith("coset: error:") and "would be stored as" in err
        assert not out.exists()
        return
    assert rc == 0, err
    back = decompress_file(out)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].shape == t.shape and back[name].dtype == t.dtype
        if t.dtype.is_floating_point and t.numel():
            r = back[name].double()
            assert bool(torch.isfinite(r).all())
            # a lattice code never expands the tensor by more than the overload ramp allows
            assert float(r.abs().max()) <= 1e3 * max(float(t.double().abs().max()), 1e-30) + 1e-3
        else:
            assert torch.equal(back[name], t)
    assert not math.isnan(sum(float(v.double().sum()) for v in back.values() if v.numel()))
