"""The coset command: argument errors, info, compress round trip against coset.quant directly."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from coset.cli.compress import compress_file, decompress_file
from coset.cli.main import build_parser, main
from coset.quant import QuantizationConfig, from_blocks, quantize, to_blocks


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "coset-quant" in out and "kernel backends" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "/nonexistent.safetensors", "/tmp/x.st"],
        ["bench", "--q", "1", "--n", "10"],
        ["bench", "--lattice", "A7", "--n", "10"],
    ],
)
def test_bad_arguments_give_exit_2_and_a_message(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("coset: error:")


def test_argparse_rejects_non_positive_counts():
    with pytest.raises(SystemExit) as e:
        main(["bench", "--n", "0"])
    assert e.value.code == 2


def test_unreadable_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    assert main(["compress", str(bad), str(tmp_path / "o.st")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_compress_round_trip_matches_quantize(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(33, 10, generator=g) * 0.05,
        "b": torch.randn(7, generator=g),
        "steps": torch.arange(5),
        "tiny": torch.randn(2, generator=g),
    }
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src))
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, alpha=1 / 3)
    reports = {r.name: r for r in compress_file(src, dst, cfg)}
    loaded = decompress_file(dst)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["steps"], tensors["steps"]) and torch.equal(loaded["tiny"], tensors["tiny"])
    import json

    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        meta = json.loads(f.metadata()["coset"])
    assert meta["format"] == "coset-compress/2"
    for name in ("w", "b"):
        beta = meta["tensors"][name]["beta"]
        blocks, pad = to_blocks(tensors[name].reshape(-1), 4)
        ref = from_blocks(quantize(blocks, config=cfg.replace(beta=beta)), pad).reshape(tensors[name].shape)
        assert torch.equal(loaded[name], ref)
        assert reports[name].rel_error < 0.2
    # the stored size is the rate: 4 bits/weight of labels + the T tensors pack_codes chose for these codes
    from coset.quant import codes_nbytes, encode, pack_codes

    r = reports["w"]
    nblocks = -(-330 // 4)
    blocks, _ = to_blocks(tensors["w"].reshape(-1), 4)
    b, T = encode(blocks, config=cfg.replace(beta=meta["tensors"]["w"]["beta"]))
    assert r.bytes_out == codes_nbytes(pack_codes(b, T, cfg)[0])
    assert r.bytes_out >= -(-nblocks * 2 * 4 * 2 // 8)
    raw = load_file(str(dst))
    assert raw["w.labels"].dtype == torch.uint8


@pytest.mark.slow
def test_installed_console_script_runs():
    # the `coset` script that installing coset-cli puts next to the interpreter (not `python -m`)
    script = shutil.which("coset", path=os.path.dirname(sys.executable))
    assert script is not None, f"no installed `coset` script next to {sys.executable}"
    r = subprocess.run([script, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kernel backends" in r.stdout
    r = subprocess.run(
        [script, "compress", "/nonexistent.safetensors", "/tmp/o.st"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.startswith("coset: error:") and "Traceback" not in r.stderr


def test_global_options_before_the_subcommand_are_kept():
    # regression: rd redefined --out/--seed and its defaults overwrote the top-level values
    a = build_parser().parse_args(["--out", "X", "--seed", "5", "rd"])
    assert a.out == "X" and a.seed == 5
    a = build_parser().parse_args(["rd", "--out", "Y", "--seed", "7"])
    assert a.out == "Y" and a.seed == 7
    a = build_parser().parse_args(["rd"])
    assert a.out == "coset-results" and a.seed == 0


def test_compress_output_directory_is_a_user_error(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(src))
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    assert main(["compress", str(src), str(outdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coset: error:") and "is a directory" in err
    assert list(outdir.iterdir()) == []
    assert main(["compress", str(tmp_path), str(tmp_path / "o.st")]) == 2  # input is a directory
    assert "is a directory" in capsys.readouterr().err
    assert main(["compress", str(src), str(src)]) == 2  # would overwrite the input
    assert "is the input" in capsys.readouterr().err
    assert main(["compress", str(src), str(src / "o.st")]) == 2  # parent is a file
    assert capsys.readouterr().err.startswith("coset: error:")


def test_compress_refuses_name_collisions(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(8, 8), "w.labels": torch.randn(8)}, str(src))
    out = tmp_path / "o.safetensors"
    assert main(["compress", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "'w'" in err and "'w.labels'" in err and not out.exists()


@pytest.mark.slow
def test_top_level_out_that_is_a_file_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--out", str(f / "sub"), "rd", "--n", "64"]) == 2  # the plot folder cannot be made
    assert capsys.readouterr().err.startswith("coset: error:")


def test_decompress_file_validates_what_it_reads(tmp_path):
    import json

    from safetensors import safe_open

    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"w": torch.randn(16, 8)}, str(src))
    compress_file(src, dst, QuantizationConfig())
    with safe_open(str(dst), framework="pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}

    def variant(tensors=None, meta=None):
        t2, m2 = dict(ts), json.loads(md["coset"])
        if tensors:
            tensors(t2)
        if meta:
            meta(m2)
        p = tmp_path / "v.safetensors"
        save_file(t2, str(p), metadata={"coset": json.dumps(m2)})
        return p

    with pytest.raises(ValueError, match=r"v\.safetensors.*'w'.*labels"):
        decompress_file(variant(tensors=lambda t: t.pop("w.labels")))
    with pytest.raises(ValueError, match=r"v\.safetensors.*'w'.*beta"):
        decompress_file(variant(meta=lambda m: m["tensors"]["w"].update(beta=float("nan"))))
    with pytest.raises(ValueError, match=r"v\.safetensors.*'w'.*pad"):
        decompress_file(variant(meta=lambda m: m["tensors"]["w"].update(shape=[3, 3])))
    with pytest.raises(ValueError, match=r"v\.safetensors.*invalid config"):
        decompress_file(variant(meta=lambda m: m["config"].update(q=99)))
    raw = dst.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) - 5])
    with pytest.raises(ValueError, match=r"t\.safetensors"):
        decompress_file(tmp_path / "t.safetensors")
    with pytest.raises(IsADirectoryError):
        decompress_file(tmp_path)


@pytest.mark.slow
def test_rd_table_lattices_beat_scalar_at_equal_effective_rate():
    from coset.cli.rd_cmd import rd_table

    rows = rd_table(n=1 << 13, seed=1, lattices=("D4",))
    by = {(r["family"], r["rate"]): r for r in rows}
    for rate in (4.0, 6.0):
        s, h = by[("uniform scalar", rate)], by[("HNLQ D4", rate)]
        # pay for the side information at 6.02 dB per bit (high-rate slope) and still win
        assert h["snr_db"] - 6.02 * (h["effective_rate"] - rate) > s["snr_db"]
        assert h["effective_rate"] >= rate


def test_compress_reports_clamped_blocks_separately(tmp_path, capsys):
    # one huge outlier among small weights: a short overload ramp (alpha=0.05: 2x over 20 steps) clamps it
    w = torch.randn(4096) * 0.01
    w[7] = 1e4
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"w": w}, str(src))
    reports = compress_file(src, dst, QuantizationConfig(alpha=0.05))
    assert reports[0].clamp_rate > 0 and reports[0].overload_rate >= reports[0].clamp_rate
    assert main(["compress", str(src), str(tmp_path / "o2.safetensors"), "--alpha", "0.05"]) == 0
    assert "clamped" in capsys.readouterr().out
