"""The CMake build: the CUDA sources compile with COSET_CUDA=ON (needs nvcc, not a GPU), and the
COSET_CUDA=ON switch fails loudly without a CUDA compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import coset.cuda as cc

ROOT = Path(__file__).resolve().parents[1]  # cuda/
NVCC = shutil.which("nvcc")


def _cmake(*args, env=None, cwd=None, timeout=240):
    return subprocess.run(["cmake", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: the CUDA build cannot be checked here")
def test_cuda_build_cuda_sources_compile(tmp_path):
    """Configure + build the kernel library with COSET_CUDA=ON for one arch (sm_80) into a temp dir."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    r = _cmake(
        "-S",
        str(ROOT),
        "-B",
        str(tmp_path),
        *gen,
        "-DCOSET_CUDA=ON",
        "-DCOSET_BUILD_PYTHON=OFF",
        "-DCMAKE_CUDA_ARCHITECTURES=80-real",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building CUDA kernels for 80-real" in r.stdout
    # nvcc on kernels_cuda.cu alone takes minutes on a loaded 2-core machine (measured ~6 min at load 9)
    r = _cmake("--build", str(tmp_path), "-j", "2", timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in ("kernels_cuda.cu.o", "lut_gemv_cuda.cu.o", "trellis_cuda.cu.o"):  # quantize, GEMV, trellis twins
        objs = list(tmp_path.rglob(name))
        assert objs and objs[0].stat().st_size > 10_000, name
        # the object really holds sm_80 device code for the kernels
        if shutil.which("cuobjdump"):
            r = subprocess.run(["cuobjdump", "--list-elf", str(objs[0])], capture_output=True, text=True)
            assert "sm_80" in r.stdout, name


def _twin_compiles_for_sm80_and_sm90(tmp_path, source: str, kernels: tuple[str, ...]) -> None:
    """nvcc on one CUDA twin alone with the module's flags (--fmad=false, C++17), SASS for A100 and H100;
    cuobjdump lists the kernels in both ELFs."""
    obj = tmp_path / (source + ".o")
    cmd = [NVCC, "-c", str(ROOT / "csrc" / source), "-o", str(obj), "-std=c++17", "-O3", "--fmad=false"]
    cmd += [
        "-I",
        str(ROOT / "csrc"),
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    if shutil.which("cuobjdump"):
        r = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True)
        assert "sm_80" in r.stdout and "sm_90" in r.stdout
        r = subprocess.run(["cuobjdump", "--dump-resource-usage", str(obj)], capture_output=True, text=True)
        for k in kernels:
            assert k in r.stdout, k


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: the CUDA build cannot be checked here")
def test_lut_gemv_cuda_compiles_for_sm80_and_sm90(tmp_path):
    """The GEMV twin alone (lut_gemv_cuda.cu + the shared lut_gemv.h)."""
    _twin_compiles_for_sm80_and_sm90(tmp_path, "lut_gemv_cuda.cu", ("gemv_codebook_kernel", "gemv_tables_kernel"))


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: the CUDA build cannot be checked here")
def test_trellis_cuda_compiles_for_sm80_and_sm90(tmp_path):
    """The trellis twin alone (trellis_cuda.cu + the shared trellis_core.inc that trellis_cpu.cpp runs here)."""
    _twin_compiles_for_sm80_and_sm90(tmp_path, "trellis_cuda.cu", ("trellis_encode_kernel", "trellis_values_kernel"))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cuda_build_on_without_nvcc_fails_clearly(tmp_path):
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:/bin"  # hide nvcc (it lives in /usr/local/bin here)
    env.pop("CUDACXX", None)
    env.pop("CUDA_PATH", None)
    if shutil.which("nvcc", path=env["PATH"]):
        pytest.skip("nvcc is on the system PATH; cannot hide it")
    r = _cmake(
        "-S",
        str(ROOT),
        "-B",
        str(tmp_path),
        "-DCOSET_CUDA=ON",
        "-DCOSET_BUILD_PYTHON=OFF",
        "-DCMAKE_CUDA_COMPILER=",
        env=env,
    )
    assert r.returncode != 0
    assert "COSET_CUDA=ON but no CUDA compiler" in r.stdout + r.stderr
    r = _cmake("-S", str(ROOT), "-B", str(tmp_path / "auto"), "-DCOSET_CUDA=AUTO", "-DCOSET_BUILD_PYTHON=OFF", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building the CPU kernels only" in r.stdout


def test_cuda_build_flags_reported():
    """The installed module says whether it has CUDA kernels: with nvcc at build time it must, and the CUDA
    entry points of the extension exist exactly then."""
    built_with_nvcc = NVCC is not None and os.environ.get("COSET_CUDA", "AUTO").upper() != "OFF"
    if built_with_nvcc:
        assert cc.WITH_CUDA is True
    from coset.cuda import _C

    assert hasattr(_C, "encode_cuda") == cc.WITH_CUDA
    assert hasattr(_C, "lut_gemv_cuda") == cc.WITH_CUDA  # the GEMV twin (also the one-sided LUT op on CUDA)
    assert not hasattr(_C, "lut_one_sided_cpu")  # the CPU LUT kernels were removed
    assert not hasattr(_C, "lut_one_sided_cuda")  # replaced by lut_gemv_cuda
    if not cc.WITH_CUDA:
        assert not cc.cuda_available()
