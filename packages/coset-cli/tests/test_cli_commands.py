"""The coset command: argument errors, info, compress round trip against coset.quant directly."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from coset.cli.compress import compress_file, load_compressed
from coset.cli.main import main
from coset.quant import QuantizationConfig, from_blocks, quantize, to_blocks


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "coset-quant" in out and "kernel backends" in out


@pytest.mark.parametrize("argv", [["compress", "/nonexistent.safetensors", "/tmp/x.st"],
                                  ["bench", "--q", "1", "--n", "10"],
                                  ["bench", "--lattice", "A7", "--n", "10"]])
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
    tensors = {"w": torch.randn(33, 10, generator=g) * 0.05, "b": torch.randn(7, generator=g),
               "steps": torch.arange(5), "tiny": torch.randn(2, generator=g)}
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src))
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, alpha=1 / 3)
    reports = {r.name: r for r in compress_file(src, dst, cfg)}
    loaded = load_compressed(dst)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["steps"], tensors["steps"]) and torch.equal(loaded["tiny"], tensors["tiny"])
    import json

    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        meta = json.loads(f.metadata()["coset"])
    for name in ("w", "b"):
        beta = meta["tensors"][name]["beta"]
        blocks, pad = to_blocks(tensors[name].reshape(-1), 4)
        ref = from_blocks(quantize(blocks, config=cfg.replace(beta=beta)), pad).reshape(tensors[name].shape)
        assert torch.equal(loaded[name], ref)
        assert reports[name].rel_error < 0.2
    # the stored size is the rate: 4 bits/weight of labels + ceil(log2 11)=4 bits per 4-block of T
    r = reports["w"]
    nblocks = -(-330 // 4)
    assert r.bytes_out == -(-nblocks * 2 * 4 * 2 // 8) + -(-nblocks * 4 // 8)
    raw = load_file(str(dst))
    assert raw["w.labels"].dtype == torch.uint8


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "coset.cli.main", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_rd_table_lattices_beat_scalar_at_equal_effective_rate():
    from coset.cli.rd_cmd import rd_table

    rows = rd_table(n=1 << 13, seed=1, lattices=("D4",))
    by = {(r["family"], r["rate"]): r for r in rows}
    for rate in (4.0, 6.0):
        s, h = by[("uniform scalar", rate)], by[("HNLQ D4", rate)]
        # pay for the side information at 6.02 dB per bit (high-rate slope) and still win
        assert h["snr_db"] - 6.02 * (h["effective_rate"] - rate) > s["snr_db"]
        assert h["effective_rate"] >= rate
