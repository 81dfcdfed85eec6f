"""Encode / decode demo: HNLQ on Gaussian data, the telescoping identity, packing and the rate.

Run: uv run python examples/encode_decode.py
"""

import torch

from coset.lattice import get_lattice
from coset.quant import (
    QuantizationConfig,
    Quantizer,
    calibrate_beta,
    decode,
    encode,
    pack_labels,
    to_blocks,
    from_blocks,
)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(10_000, 64)  # any shape: quantization runs over blocks of d along the last dim
    for name in ("Z2", "D4", "E8"):
        cfg = QuantizationConfig(lattice_type=name, q=4, M=2, alpha=1 / 3)
        blocks, pad = to_blocks(x, cfg.dim)  # (10000, 64/d, d)
        beta, _ = calibrate_beta(blocks[:2000], cfg)
        cfg = cfg.replace(beta=beta)
        qz = Quantizer(cfg)
        b, T = qz.encode(blocks)  # b: (10000, 64/d, M, d) uint8, T: (10000, 64/d) uint8
        x_hat = from_blocks(qz.decode(b, T), pad)
        mse = float(((x_hat - x) ** 2).mean())
        packed = pack_labels(b, cfg.q)
        print(f"{name}: beta={beta:.4f} rate={cfg.rate:.1f} bits/dim  MSE={mse:.5f}  SNR={10 * torch.log10(1 / torch.tensor(mse)):.2f} dB  "
              f"labels {packed.numel()} bytes for {x.numel()} floats ({8 * packed.numel() / x.numel():.2f} bits/dim)  "
              f"stats={ {k: round(v, 4) for k, v in qz.stats().items()} }")

    # Algorithm 1/2 identity: without overload, decode(encode(x)) is exactly the nearest lattice point.
    L = get_lattice("D4")
    cfg = QuantizationConfig(lattice_type="D4", q=4, M=2, disable_scaling=True)
    y = torch.randn(5, 4, dtype=torch.float64) * 3
    b, T = encode(y, cfg)
    print("labels of 5 D4 vectors (M=2 layers of base-4 digits):\n", b)
    print("decode == Q_L(y) where T == 0:", bool(torch.equal(decode(b, cfg, T, dtype=torch.float64)[T == 0],
                                                             L.closest_point(y)[T == 0])))


if __name__ == "__main__":
    main()
