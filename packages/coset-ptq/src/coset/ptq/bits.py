"""All-in bits per weight of the quantized linears, from the bytes that are (or would be) saved.

``all-in = bytes / number of quantized weights`` where, per quantized linear, ``bytes`` counts

* the data of every compressed tensor: packed labels, compact T, scale(s), rotation seeds;
* the per-tensor metadata as safetensors writes it: the 8-byte header length, the header entry
  (key, dtype, shape, offsets) and the padding of a file holding just that layer's tensors;
* the layer's spec (code identity, pack_codes metadata, shapes, seeds) as compact JSON, as in config.json.

The bias and the unquantized tensors (embeddings, norms) are not counted: they are the same for every method.
The same function reads a saved directory (the safetensors header and config.json, no tensor data) or an
in-memory model: both see the same tensor names, shapes and dtypes, so they give the same number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["BitsReport", "LayerBits", "bits_per_weight"]


@dataclass(frozen=True)
class LayerBits:
    """One quantized linear: ``weights`` = m·n, ``nbytes`` all-in bytes, ``nominal`` = M log2 q."""

    weights: int
    nbytes: int
    nominal: float

    @property
    def all_in(self) -> float:
        return 8.0 * self.nbytes / self.weights


@dataclass(frozen=True)
class BitsReport:
    """Totals over all quantized linears (``all_in`` and ``nominal`` are weighted by number of weights)."""

    layers: dict
    weights: int
    nbytes: int
    all_in: float
    nominal: float

    def __str__(self) -> str:
        return (
            f"{len(self.layers)} quantized linears, {self.weights} weights: nominal {self.nominal:.3f} bits/weight, "
            f"all-in {self.all_in:.3f} bits/weight ({self.nbytes} bytes)"
        )


def _layer_nbytes(tensors: dict[str, tuple[tuple, torch.dtype]], spec_json: dict) -> int:
    from safetensors.torch import save

    # A file holding only this layer's tensors: header + data exactly as safetensors writes them.
    fake = {k: torch.empty(shape, dtype=dt) for k, (shape, dt) in tensors.items()}
    n = len(save(fake))
    return n + len(json.dumps(spec_json, separators=(",", ":"), sort_keys=True).encode())


_FROM_ST = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}


def _collect_dir(d: Path):
    from .serialize import WEIGHTS_NAME, _read_header, read_quantization_config

    _, _, specs = read_quantization_config(d)
    st = d / WEIGHTS_NAME
    if not st.is_file():
        raise OSError(f"{st}: missing")
    header, _ = _read_header(st)
    out = {}
    for name, spec in specs.items():
        ts = {}
        for rel in spec.buffer_shapes():
            key = f"{name}.{rel}" if name else rel
            if key not in header:
                raise ValueError(f"{st}: missing key {key!r}")
            shape, dt = header[key]
            if dt not in _FROM_ST:
                raise ValueError(f"{st}: key {key!r} has unsupported dtype {dt}")
            ts[key] = (tuple(shape), _FROM_ST[dt])
        out[name] = (spec, ts)
    return out


def _collect_model(model: nn.Module):
    from .serialize import quantized_layers

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no HNLQLinear layer")
    out = {}
    for name, m in layers.items():
        state = m.state_dict()
        ts = {}
        for rel in m.spec.buffer_shapes():
            t = state[rel]
            ts[f"{name}.{rel}" if name else rel] = (tuple(t.shape), t.dtype)
        out[name] = (m.spec, ts)
    return out


def bits_per_weight(source) -> BitsReport:
    """Nominal and all-in bits per quantized weight.

    Parameters
    ----------
    source : a directory written by :func:`coset.ptq.save_quantized` (str or Path), or an nn.Module with
        HNLQLinear layers

    Returns
    -------
    BitsReport (per-layer :class:`LayerBits` in ``layers``)

    Raises
    ------
    TypeError for another type; OSError / ValueError for a directory that is not a coset model or a module
    without HNLQLinear layers.
    """
    if isinstance(source, (str, Path)):
        items = _collect_dir(Path(source))
    elif isinstance(source, nn.Module):
        items = _collect_model(source)
    else:
        raise TypeError(f"source must be a directory path or an nn.Module, got {type(source).__name__}")
    layers = {}
    for name, (spec, ts) in items.items():
        layers[name] = LayerBits(spec.num_weights, _layer_nbytes(ts, spec.to_json()), spec.code.rate)
    w = sum(lb.weights for lb in layers.values())
    nb = sum(lb.nbytes for lb in layers.values())
    nominal = sum(lb.nominal * lb.weights for lb in layers.values()) / w
    return BitsReport(layers=layers, weights=w, nbytes=nb, all_in=8.0 * nb / w, nominal=nominal)
