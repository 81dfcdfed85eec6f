"""FP32 vs HNLQ quantization-aware training of a small 1-D CNN on MNIST-1D (generated offline).

    uv run python examples/qat_mnist1d.py              # quick run (8 epochs, under a minute)
    uv run python examples/qat_mnist1d.py --epochs 30  # the benchmark budget

Writes qat_mnist1d.png / .json and the compressed checkpoints to $COSET_EXAMPLE_OUT (default ./coset-results).
"""

import argparse
import os

from coset.cli.qat_job import print_report, run_qat_comparison
from coset.quant import QuantizationConfig

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

out = os.environ.get("COSET_EXAMPLE_OUT", "coset-results")
result = run_qat_comparison(
    "mnist1d",
    epochs=a.epochs,
    seed=a.seed,
    config=QuantizationConfig(lattice_type="D4", q=4, M=2),  # 4 bits/weight of labels
    progress=False,
    out_dir=out,
)
print_report(result)
