"""Compressed checkpoints: quantized weights stored as bit-packed labels + bit-packed T + betas (safetensors).

File layout (one safetensors file)
----------------------------------
For every quantized layer ``name`` with weight quantization:

* ``name.labels``: uint8, :func:`coset.quant.pack_labels` of the ``(C_out, nb, M, d)`` labels
  (``ceil(log2 q)`` bits per label; 4 bits per weight for D4 q=4 M=2 up to padding);
* ``name.T``: uint8, the ``(C_out, nb)`` scale steps packed with ``bit_length(max T)`` bits each
  (at least 1 bit);
* ``name.beta``: float32 ``(C_out,)`` or ``(1,)`` betas (absent for ``granularity="fixed"``: the beta is in
  the config).

Everything else in ``model.state_dict()`` that is not a quantized layer's shadow weight or code buffer
(biases, ``act_beta``, norms, float layers) is stored unchanged. The JSON metadata (safetensors
``__metadata__``) holds the format tag and, per layer, its kind, weight shape, k, pad, T bits and
:class:`QATConfig`.

Loading decodes the labels with the same function the layer uses in memory, so the loaded model's eval
outputs equal the in-memory model's bit for bit; the loaded shadow weight is set to the quantized weight.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from coset.quant import pack_labels, packed_nbytes, unpack_labels

from .config import QATConfig
from .convert import _KIND, _SWAP, _set_submodule, quantized_layers
from .layer import _CODE_KEYS, QuantLayerMixin, _version

__all__ = ["save_compressed", "load_compressed", "CheckpointReport", "FORMAT"]

FORMAT = "coset-nn-compressed/1"
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class CheckpointReport:
    """Byte accounting of a compressed checkpoint.

    ``effective_bits_per_weight`` = 8 (label + T + beta + metadata bytes) / quantized weights;
    ``file_bits_per_weight`` = 8 file bytes / quantized weights (includes the float tensors kept as is).
    """

    path: str
    file_bytes: int
    num_quantized_weights: int
    label_bytes: int
    T_bytes: int
    beta_bytes: int
    metadata_bytes: int
    other_bytes: int
    layers: dict

    @property
    def label_bits_per_weight(self) -> float:
        return 8 * self.label_bytes / max(self.num_quantized_weights, 1)

    @property
    def effective_bits_per_weight(self) -> float:
        n = max(self.num_quantized_weights, 1)
        return 8 * (self.label_bytes + self.T_bytes + self.beta_bytes + self.metadata_bytes) / n

    @property
    def file_bits_per_weight(self) -> float:
        return 8 * self.file_bytes / max(self.num_quantized_weights, 1)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "num_quantized_weights": self.num_quantized_weights,
            "label_bytes": self.label_bytes,
            "T_bytes": self.T_bytes,
            "beta_bytes": self.beta_bytes,
            "metadata_bytes": self.metadata_bytes,
            "other_bytes": self.other_bytes,
            "label_bits_per_weight": self.label_bits_per_weight,
            "effective_bits_per_weight": self.effective_bits_per_weight,
            "file_bits_per_weight": self.file_bits_per_weight,
        }


def _skip_keys(name: str, layer: QuantLayerMixin) -> list[str]:
    p = f"{name}." if name else ""
    if layer.qconfig.weight is None:
        return []
    return [p + "weight"] + [p + k for k in _CODE_KEYS]


def save_compressed(model: nn.Module, path: PathLike) -> CheckpointReport:
    """Write the model's quantized weights as packed codes (and everything else as is) to ``path``.

    Layers whose codes are missing or older than their shadow weight are re-quantized first, exactly as an
    eval-mode forward would do, so the file holds the weights the eval-mode model uses.

    Returns
    -------
    CheckpointReport (sizes in bytes, effective bits/weight).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    qlayers = quantized_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    meta_layers: dict[str, dict] = {}
    configs: list[dict] = []  # distinct QATConfigs, referenced by index
    skip: set[str] = set()
    n_q = label_b = t_b = beta_b = 0
    for name, layer in qlayers.items():
        skip.update(_skip_keys(name, layer))
        cfg = layer.qconfig.weight
        cdict = layer.qconfig.to_dict()
        if cdict not in configs:
            configs.append(cdict)
        entry = {"kind": _KIND[type(layer)], "weight_shape": list(layer.weight.shape), "k": layer.k,
                 "pad": layer.pad, "config": configs.index(cdict)}
        if cfg is not None:
            labels, T, _ = layer.codes()  # brought up to date as an eval forward would
            tmax = int(T.max()) if T.numel() else 0
            t_q = max(tmax + 1, 2)
            tensors[f"{name}.labels"] = pack_labels(labels.cpu(), cfg.q)
            tensors[f"{name}.T"] = pack_labels(T.cpu(), t_q)
            entry.update(labels_shape=list(labels.shape), T_q=t_q)
            label_b += tensors[f"{name}.labels"].numel()
            t_b += tensors[f"{name}.T"].numel()
            if layer.qconfig.granularity != "fixed":
                tensors[f"{name}.beta"] = layer.w_beta.detach().cpu().to(torch.float32).contiguous()
                beta_b += tensors[f"{name}.beta"].numel() * 4
            n_q += layer.weight.numel()
        meta_layers[name] = entry
    other_b = 0
    for key, val in model.state_dict().items():
        if key in skip:
            continue
        if key in tensors:
            raise ValueError(f"state_dict key {key!r} collides with a compressed-code key")
        t = val.detach().cpu().contiguous().clone()
        tensors[key] = t
        other_b += t.numel() * t.element_size()
    meta = {"format": FORMAT, "configs": json.dumps(configs, separators=(",", ":")),
            "layers": json.dumps(meta_layers, sort_keys=True, separators=(",", ":"))}
    save_file(tensors, path, metadata=meta)
    meta_b = sum(len(k) + len(v) for k, v in meta.items())
    return CheckpointReport(path, os.path.getsize(path), n_q, label_b, t_b, beta_b, meta_b, other_b, meta_layers)


def load_compressed(path: PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save_compressed` into ``model`` (same architecture) in place.

    Layers that are still float (``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``) are swapped for their quantized
    version with the config stored in the file; already-quantized layers must have the same config. The
    shadow weight of each quantized layer is set to its decoded weight.

    Returns
    -------
    the model (modified in place).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a coset-nn compressed checkpoint (format {meta.get('format')!r})")
    layers_meta = json.loads(meta["layers"])
    configs = json.loads(meta["configs"])
    tensors = load_file(path)
    modules = dict(model.named_modules())
    skip: set[str] = set()
    for name, entry in layers_meta.items():
        if name not in modules:
            raise ValueError(f"{path}: layer {name!r} not found in the model")
        cfg = QATConfig.from_dict(configs[entry["config"]])
        mod = modules[name]
        if not isinstance(mod, QuantLayerMixin):
            if type(mod) not in _SWAP:
                raise ValueError(f"layer {name!r} is a {type(mod).__name__}, expected a Linear/Conv layer")
            mod = _SWAP[type(mod)].from_float(mod, cfg)
            _set_submodule(model, name, mod)
        elif mod.qconfig != cfg:
            raise ValueError(f"layer {name!r} has config {mod.qconfig}, the file has {cfg}")
        if _KIND[type(mod)] != entry["kind"]:
            raise ValueError(f"layer {name!r} is a {_KIND[type(mod)]} layer, the file has a {entry['kind']} layer")
        if list(mod.weight.shape) != entry["weight_shape"]:
            raise ValueError(f"layer {name!r}: weight shape {tuple(mod.weight.shape)} != file {entry['weight_shape']}")
        skip.update(_skip_keys(name, mod))
        if cfg.weight is None:
            continue
        dev = mod.weight.device
        lshape = tuple(entry["labels_shape"])
        labels = unpack_labels(tensors[f"{name}.labels"], cfg.weight.q, lshape).to(dev)
        T = unpack_labels(tensors[f"{name}.T"], int(entry["T_q"]), lshape[:2]).to(dev)
        with torch.no_grad():
            mod._pending = None
            mod.w_labels = labels
            mod.w_T = T
            mod.w_clamped = torch.zeros_like(T, dtype=torch.bool)
            if cfg.granularity != "fixed":
                mod.w_beta = tensors[f"{name}.beta"].to(dev)
            mod._decode_cache()
            mod.weight.copy_(mod.qweight)
        mod._codes_valid = True
        mod._cache_version = _version(mod.weight)
        mod._step = 0
    code_keys = {f"{name}{suffix}" for name in layers_meta for suffix in (".labels", ".T", ".beta")}
    others = {k: v for k, v in tensors.items() if k not in code_keys}
    res = model.load_state_dict(others, strict=False)
    missing = [k for k in res.missing_keys if k not in skip]
    if missing or res.unexpected_keys:
        raise ValueError(f"{path}: state mismatch; missing {missing}, unexpected {list(res.unexpected_keys)}")
    # load_state_dict copies into params (bumping versions only of those it touched; the shadow weights of
    # quantized layers are not in the file), so the codes stay current.
    for name in layers_meta:
        m = model.get_submodule(name) if name else model
        if isinstance(m, QuantLayerMixin) and m.qconfig.weight is not None:
            m._codes_valid = True
            m._cache_version = _version(m.weight)
    return model
