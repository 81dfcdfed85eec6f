"""The float32 + integer path is compiled three times (AVX-512VL, AVX2, baseline; csrc/fast_quant.cpp) and picked
at run time. The reference tests run whichever the machine picks; here every other build available on this CPU
(``COSET_AVX512=0`` -> AVX2, ``COSET_AVX2=0`` -> baseline), and decode's label index without BMI2 ``pext``
(``COSET_PEXT=0``; the default on AMD Zen 1/2, which microcode it), must give the very same bytes, in subprocesses
(the choice is made once per process): quantize_rows with per-row betas, quantize, encode, decode and the DDP modular
codec, on inputs that hit ties, the beta ramp, the D4 overload table and the clamp.
"""

import hashlib
import json
import os
import subprocess
import sys
import warnings

import torch

from coset.cuda import _C


def _digest() -> dict:
    """sha256 of every kernel's output on fixed inputs (run in the child)."""
    from types import SimpleNamespace

    from coset.cuda import bucket_codec
    from coset.quant import QuantizationConfig, decode, encode, quantize, quantize_rows

    warnings.simplefilter("ignore")  # clamps and degenerate configs are intended here
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = {"isa": _C.fast_path_isa(), "pext": _C.fast_path_pext()}
    h = hashlib.sha256()
    for lat, q, M in (("D4", 4, 2), ("D4", 2, 3), ("E8", 4, 2), ("D8", 2, 2), ("D4", 16, 2), ("E8", 8, 2)):
        cfg = QuantizationConfig(lattice_type=lat, q=q, M=M, beta=0.25, max_scaling_iterations=3)
        d = cfg.dim
        x = torch.randn(3000, d, generator=g) * 0.3
        u = torch.randint(-4 * q * q, 4 * q * q, (1000, d), generator=g).to(torch.float32)
        x[:1000] = u / (2 * q) * 0.25  # boundary classes
        x[-20:] *= 1e3  # clamps
        for t in quantize(x, config=cfg, backend="native", return_info=True):
            h.update(t.numpy().tobytes())
        b, T = encode(x, config=cfg, backend="native")
        h.update(b.numpy().tobytes() + T.numpy().tobytes())
        h.update(decode(b, config=cfg, T=T, backend="native").numpy().tobytes())
        w = torch.randn(96, 200, generator=g)
        betas = w.norm(dim=1) / 200**0.5 * 0.3
        for t in quantize_rows(w, betas, cfg.replace(beta=1.0), backend="native", return_info=True):
            h.update(t.numpy().tobytes())
        if bucket_codec.supports(cfg.replace(beta=1.0)):
            n, bpc = 5000, 16
            xe = torch.randn(n, generator=g)
            resid = xe.clone()
            nb = -(-n // d)
            scales = torch.rand(-(-nb // bpc), generator=g, dtype=torch.float64) * 0.2 + 0.05
            packing = SimpleNamespace(kind="uint8")
            packed = bucket_codec.modular_encode(xe, scales, cfg, bpc, packing, resid=resid)
            dec = torch.empty(n)
            bucket_codec.modular_decode(packed, n, scales, cfg, bpc, packing, 1, dec)
            for t in (packed, resid, dec):
                h.update(t.numpy().tobytes())
    out["sha"] = h.hexdigest()
    return out


def _run(env_extra: dict) -> dict:
    env = dict(os.environ, **env_extra)
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import json, test_isa_dispatch as t; print(json.dumps(t._digest()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_isa_build_gives_the_same_bytes():
    runs = {
        name: _run(env)
        for name, env in (
            ("default", {}),
            ("no512", {"COSET_AVX512": "0"}),
            ("base", {"COSET_AVX2": "0"}),
            ("nopext", {"COSET_PEXT": "0"}),
        )
    }
    assert runs["nopext"]["pext"] is False and runs["base"]["pext"] is False
    assert runs["base"]["isa"] == "baseline"
    assert runs["no512"]["isa"] in ("avx2", "baseline")
    assert runs["default"]["isa"] == _C.fast_path_isa()
    shas = {r["sha"] for r in runs.values()}
    assert len(shas) == 1, runs
