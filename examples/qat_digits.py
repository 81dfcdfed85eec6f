"""coset.nn step by step on scikit-learn's digits (offline): convert an MLP, train it with HNLQ QAT, save a
compressed checkpoint, load it into a fresh float model and check the outputs are identical.

    uv run python examples/qat_digits.py [--epochs 30]
"""

import argparse
import os
from pathlib import Path

import torch

from coset.cli.data import load_digits
from coset.cli.qat_job import DigitsMLP, evaluate, train_model
from coset.nn import QATConfig, load_compressed, quantize_model, save_compressed
from coset.quant import QuantizationConfig

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=10)
a = p.parse_args()
torch.set_num_threads(1)
out = Path(os.environ.get("COSET_EXAMPLE_OUT", "coset-results"))
out.mkdir(parents=True, exist_ok=True)

data = load_digits()
torch.manual_seed(0)
model = DigitsMLP()

# 1. swap the Linear layers: D4 q=4 M=2 weights everywhere, activations quantized after the first layer
w = QuantizationConfig(lattice_type="D4", q=4, M=2)
report = quantize_model(model, {"fc1": QATConfig(weight=w), "*": QATConfig(weight=w, activation=w)})
print(report)

# 2. train as usual (Adam + cosine); the STE passes gradients to the FP32 shadow weights
curves = train_model(model, data, epochs=a.epochs, batch_size=64, lr=3e-3, seed=0)
print(f"QAT test accuracy after {a.epochs} epochs: {curves['test_acc'][-1]:.2f}%")

# 3. compressed checkpoint: packed labels + packed T + per-channel betas
ck = save_compressed(model, out / "digits_qat.safetensors")
print(
    f"checkpoint: {ck.file_bytes} bytes, {ck.effective_bits_per_weight:.2f} effective bits/weight "
    f"({ck.label_bits_per_weight:.2f} labels), float32 weights would take {4 * ck.num_quantized_weights} bytes"
)

# 4. load into a fresh *float* model: layers are swapped back in with the stored configs
fresh = load_compressed(DigitsMLP(), out / "digits_qat.safetensors").eval()
model.eval()
with torch.no_grad():
    same = torch.equal(fresh(data.x_test), model(data.x_test))
print(
    f"loaded model identical to the in-memory one: {same}; accuracy {evaluate(fresh, data.x_test, data.y_test)[0]:.2f}%"
)
assert same
