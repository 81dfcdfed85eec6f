"""Centred codes (QuantizationConfig.center): the native backend equals the PyTorch reference bit for bit,
including overload steps, clamping and dither (the offset reaches the kernels through the dither argument)."""

from __future__ import annotations

import pytest
import torch

import coset.cuda  # noqa: F401  (registers the "native" backend through the entry point)
from coset.lattice import get_lattice
from coset.quant import QuantizationConfig, decode, encode, quantize


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["Z2", "D4", "E8"])
@pytest.mark.parametrize("q,M", [(2, 4), (3, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("dither", [False, True])
def test_center_native_backend_bit_exact(name, q, M, dither):
    cfg = QuantizationConfig(
        name, q, M, beta=0.3, alpha=1.0, max_scaling_iterations=3, center=True, with_dither=dither, dither_seed=9
    )
    L = get_lattice(name)
    g = _gen(q * 10 + M)
    x = torch.cat([torch.randn(3000, L.dim, generator=g) * s for s in (0.5, 3.0, 40.0)])  # T > 0 and clamped
    for be in ("native",):
        b1, T1, c1 = encode(x, config=cfg, backend=be, return_clamped=True)
        b0, T0, c0 = encode(x, config=cfg, backend="torch", return_clamped=True)
        assert bool(c0.any()) and bool((T0 > 0).any())
        assert torch.equal(b1, b0) and torch.equal(T1, T0) and torch.equal(c1, c0)
        for dt in (torch.float32, torch.float64):
            assert torch.equal(
                decode(b0, config=cfg, T=T0, dtype=dt, backend=be),
                decode(b0, config=cfg, T=T0, dtype=dt, backend="torch"),
            )
        assert torch.equal(quantize(x, config=cfg, backend=be), quantize(x, config=cfg, backend="torch"))
