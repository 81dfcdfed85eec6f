"""The ``coset`` command.

``coset``            the main job on embedded defaults: FP32 vs HNLQ QAT of a small CNN on MNIST-1D
``coset rd``         rate-distortion table (and plot) for Z2/D4/E8 against the best uniform scalar quantizer
``coset bench``      encode/decode/quantize/LUT throughput with the backend used
``coset compress``   quantize a safetensors checkpoint's weights, report size and error per tensor
``coset info``       versions, kernel backends, whether CUDA kernels were built
``coset ptq``        post-training quantization of MiniLM / SmolLM2 / a local HF model (coset.ptq)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coset.quant import QuantizationConfig

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user-facing error: printed as ``coset: error: ...`` with exit status 2."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    return v


def _add_config_args(p: argparse.ArgumentParser, lattice: str = "D4", q: int = 4, M: int = 2) -> None:
    p.add_argument("--lattice", default=lattice, help=f"lattice: Z2, D4, E8, Z<n>, D<n> (default {lattice})")
    p.add_argument("--q", type=int, default=q, help=f"base of each layer, 2..16 (default {q})")
    p.add_argument("--M", type=int, default=M, help=f"number of layers, 1..4 (default {M})")
    p.add_argument(
        "--alpha",
        type=_positive_float,
        default=1.0 / 3.0,
        help="overload ramp step: scale beta*2^(alpha*T) (default 1/3)",
    )


def _config(args) -> QuantizationConfig:
    from coset.quant import QuantizationConfig

    try:
        return QuantizationConfig(lattice_type=args.lattice, q=args.q, M=args.M, alpha=args.alpha)
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coset", description="Hierarchical nested-lattice quantization for PyTorch.")
    p.add_argument("--out", default="coset-results", help="folder for plots and result files (default ./coset-results)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="main job: training epochs (default embedded)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command")

    rd = sub.add_parser("rd", help="rate-distortion table and plot: Z2/D4/E8 vs the best scalar quantizer")
    rd.add_argument("--n", type=_positive_int, default=1 << 16, help="N(0,1) samples (default 65536)")
    # also accepted after the subcommand; SUPPRESS keeps the top-level value when it is not repeated here
    rd.add_argument("--out", default=argparse.SUPPRESS, help="as the top-level --out")
    rd.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="as the top-level --seed")

    be = sub.add_parser("bench", help="encode/decode/quantize/LUT throughput and the backend used")
    be.add_argument("--n", type=_positive_int, default=200000, help="vectors (default 200000)")
    be.add_argument("--backend", default="auto", help="auto (native when installed) or torch")
    _add_config_args(be)

    co = sub.add_parser("compress", help="quantize a safetensors checkpoint; report size and error per tensor")
    co.add_argument("input", help="input .safetensors file")
    co.add_argument("output", help="output .safetensors file (packed labels + T + per-tensor beta)")
    _add_config_args(co)

    sub.add_parser("info", help="versions, kernel backends, CUDA build")

    from .ptq_cmd import add_parser as _add_ptq_parser

    _add_ptq_parser(sub)
    return p


# ---------------------------------------------------------------------------------------------- commands
def _cmd_main_job(args) -> int:
    from .qat_job import print_report, run_main_job

    out = Path(args.out)
    result = run_main_job(epochs=args.epochs, seed=args.seed, progress=not args.no_progress, out_dir=out)
    print_report(result)
    return 0


def _cmd_rd(args) -> int:
    from .rd_cmd import rd_table

    out = Path(args.out)
    rows = rd_table(n=args.n, seed=args.seed)
    hdr = f"{'scheme':<22}{'bits/dim':>9}{'eff. rate':>10}{'beta':>9}{'MSE':>11}{'SNR dB':>8}{'overload':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['scheme']:<22}{r['rate']:>9.2f}{r['effective_rate']:>10.2f}{r.get('beta', float('nan')):>9.4f}"
            f"{r['mse']:>11.3e}{r['snr_db']:>8.2f}{100 * r.get('overload_rate', 0.0):>8.1f}%"
        )
    try:
        path = _plot_rd(rows, out)
        print(f"plot: {path}")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    return 0


def _plot_rd(rows, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam in sorted({r["family"] for r in rows}):
        pts = sorted((r["effective_rate"], r["snr_db"]) for r in rows if r["family"] == fam)
        ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=fam)
    rates = sorted({r["rate"] for r in rows})
    ax.plot(rates, [6.0206 * r for r in rates], "k--", lw=0.8, label="Shannon D(R) (6.02 dB/bit)")
    ax.set_xlabel("effective rate (bits/dim, labels + H(T)/d)")
    ax.set_ylabel("SNR (dB), N(0,1) source")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "rate_distortion.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cmd_bench(args) -> int:
    import time

    import torch

    from coset.quant import available_backends, calibrate_beta, decode, encode, quantize

    cfg = _config(args)
    if args.backend != "auto" and args.backend not in available_backends():
        raise CliError(f"unknown backend {args.backend!r}; available: {available_backends()}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, cfg.dim, generator=g)
    beta, _ = calibrate_beta(x[:4096], cfg)
    cfg = cfg.replace(beta=beta)
    used = next((b for b in available_backends()[:-1]), "torch") if args.backend == "auto" else args.backend

    def rate(fn):
        fn()
        t = time.perf_counter()
        fn()
        return args.n / (time.perf_counter() - t)

    b, T = encode(x, config=cfg, backend=args.backend)
    rows = [
        ("encode", rate(lambda: encode(x, config=cfg, backend=args.backend))),
        ("decode", rate(lambda: decode(b, config=cfg, T=T, backend=args.backend))),
        ("quantize", rate(lambda: quantize(x, config=cfg, backend=args.backend))),
    ]
    scale = float(x.abs().max()) / 7.5
    rows.append(
        ("torch fake_quantize (4-bit scalar)", rate(lambda: torch.fake_quantize_per_tensor_affine(x, scale, 0, -8, 7)))
    )
    try:
        from coset.lut import EncodedMatrix, lut_linear  # optional: coset-lut installed

        k = 256
        W = torch.randn(max(args.n * cfg.dim // k, 1), k, generator=g)
        enc = EncodedMatrix.from_dense(W, cfg)
        xq = torch.randn(1, k, generator=g)
        t = time.perf_counter()
        lut_linear(xq, enc)
        dt = time.perf_counter() - t
        rows.append((f"LUT scoring ({W.shape[0]}x{k} encoded, 1 query)", W.shape[0] * k / cfg.dim / dt))
    except ImportError:
        pass
    print(f"config: {cfg.lattice_type} q={cfg.q} M={cfg.M} beta={cfg.beta:.4f}; backend: {used}; n={args.n}")
    for name, r in rows:
        print(f"  {name:<44}{r / 1e6:>10.2f} M vectors/s")
    return 0


def _cmd_compress(args) -> int:
    from .compress import compress_file

    cfg = _config(args)
    try:
        reports = compress_file(args.input, args.output, cfg)
    except (OSError, ValueError) as e:  # bad paths, unreadable input, name collisions
        raise CliError(str(e)) from None
    print(f"{'tensor':<40}{'shape':>18}{'bits/w':>8}{'rel.err':>10}{'overload':>9}{'clamped':>9}")
    tot_in = tot_out = 0
    for r in reports:
        tot_in += r.bytes_in
        tot_out += r.bytes_out
        print(
            f"{r.name[:40]:<40}{str(list(r.shape)):>18}{r.bits_per_weight:>8.2f}{r.rel_error:>10.4f}"
            f"{100 * r.overload_rate:>8.1f}%{100 * r.clamp_rate:>8.2f}%" + ("" if r.compressed else "  (kept)")
        )
    print(
        f"total: {tot_in} bytes -> {tot_out} bytes of tensors ({tot_in / max(tot_out, 1):.2f}x); "
        f"file {Path(args.output).stat().st_size} bytes"
    )
    return 0


def _cmd_info(args) -> int:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from coset.quant import available_backends

    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for pkg in ("coset-lattice", "coset-quant", "coset-lut", "coset-cuda", "coset-nn", "coset-dist", "coset-cli"):
        try:
            v = version(pkg)
        except PackageNotFoundError:
            v = "not installed"
        print(f"  {pkg:<14} {v}")
    print(f"kernel backends (best first): {', '.join(available_backends())}")
    try:
        import coset.cuda as cc

        built = getattr(cc, "WITH_CUDA", None)
        print(f"coset-cuda: native CPU kernels available; CUDA kernels built: {built}")
    except ImportError:
        print("coset-cuda: not installed (pure PyTorch reference path only)")
    return 0


def _cmd_ptq(args) -> int:
    from .ptq_cmd import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmds = {
        None: _cmd_main_job,
        "rd": _cmd_rd,
        "bench": _cmd_bench,
        "compress": _cmd_compress,
        "info": _cmd_info,
        "ptq": _cmd_ptq,
    }
    try:
        return cmds[args.command](args)
    except CliError as e:
        print(f"coset: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave cannot be read or written (e.g. --out names a file)
        print(f"coset: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
