"""Writes the version-1 fixtures with the coset.nn of commit 8a5ea03 (before the quantizer refactor)."""

import torch
from safetensors.torch import save_file
from torch import nn

from coset.nn import QATConfig, quantize_model, save_compressed
from coset.quant import QuantizationConfig


def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 5))


torch.manual_seed(0)
m = net()
quantize_model(m, {"0": QATConfig(), "2": QATConfig(activation=QuantizationConfig(), granularity="per_tensor")})
opt = torch.optim.SGD(m.parameters(), lr=0.1)
x = torch.randn(6, 3, 4, 4)
for _ in range(2):
    opt.zero_grad()
    m(x).pow(2).mean().backward()
    opt.step()
m.eval()
with torch.no_grad():
    y = m(x)
out = "packages/coset-nn/tests/data/"
save_compressed(m, out + "v1_compressed.safetensors")
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out + "v1_state_dict.safetensors")
save_file({"x": x, "y": y}, out + "v1_reference.safetensors")
print(sorted(m.state_dict()))
