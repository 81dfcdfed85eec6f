"""Compressed checkpoints: quantized weights stored as packed HNLQ codes + betas (safetensors).

File layout (one safetensors file, format ``coset-nn-compressed/2``)
-------------------------------------------------------------------
For every quantized layer ``name`` with weight quantization:

* the tensors of :func:`coset.quant.pack_codes` of its ``(C_out, nb, M, d)`` labels and ``(C_out, nb)`` T,
  each under ``name.<key>``: ``name.labels`` (``ceil(log2 q)`` bits per label; 4 bits per weight for D4 q=4
  M=2 up to padding) and, depending on the T coding pack_codes chose, ``name.T`` or
  the sparse tensors (``name.T_index`` or ``name.T_low``/``name.T_high``, with ``name.T_value``; nothing when
  every T is 0);
* ``name.beta``: float32 ``(C_out,)`` or ``(1,)`` betas (absent for ``granularity="fixed"``: the beta is in
  the config);
* ``name.clamped``: 1 bit per block, only when blocks were clamped (so ``stats()`` still counts them).

Everything else in ``model.state_dict()`` that is not a quantized layer's shadow weight or weight-quantizer
state (biases, the activation quantizer's beta, norms, float layers) is stored unchanged. The JSON metadata
(safetensors ``__metadata__``) holds the format tag and, per layer, its kind, weight shape, k, pad, the
pack_codes metadata and the index of its :class:`QATConfig` in the list ``configs``.

Format ``coset-nn-compressed/1`` (labels + T at ``T_q`` levels via ``pack_labels``) still loads.

Every tensor read is validated (dtype, byte count, value range, finiteness); a damaged or mismatched file
raises ``ValueError`` (``FileNotFoundError``/``IsADirectoryError`` for a missing path) naming the file and the
layer or tensor, never an internal error or a silently wrong model.

Loading decodes the labels with the same function the layer uses in memory, so the loaded model's eval
outputs equal the in-memory model's bit for bit; the loaded shadow weight is set to the quantized weight.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coset.quant import CODE_TENSORS, pack_codes, pack_labels, unpack_codes, unpack_labels

from .config import QATConfig
from .convert import _KIND, _SWAP, _set_submodule, module_names, quantized_layers
from .layer import QuantLayerMixin

__all__ = ["save_compressed", "load_compressed", "CheckpointReport", "FORMAT"]

FORMAT = "coset-nn-compressed/2"
#: older formats that still load
OLD_FORMATS = ("coset-nn-compressed/1",)
_CODE_TENSORS = CODE_TENSORS
PathLike = str | os.PathLike


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


def _skip_keys(name: str, layer: QuantLayerMixin) -> set[str]:
    """State-dict keys of a quantized layer that the codes replace (shadow weight, weight-quantizer state)."""
    if layer.weight_quantizer is None:
        return set()
    p = f"{name}." if name else ""
    return {p + "weight"} | {p + "weight_quantizer." + k for k in ("labels", "T", "beta", "clamped", "q_state", "code")}


def save_compressed(model: nn.Module, path: PathLike) -> CheckpointReport:
    """Write the model's quantized weights as packed codes (and everything else as is) to ``path``.

    Layers whose codes are missing or older than their shadow weight are re-quantized first, exactly as an
    eval-mode forward would do, so the file holds the weights the eval-mode model uses.

    Returns
    -------
    CheckpointReport (sizes in bytes, effective bits/weight).

    Raises
    ------
    TypeError if ``model`` is not an ``nn.Module``; ValueError if a state-dict key collides with a code tensor's
    name; OSError if ``path`` cannot be written.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    meta_layers: dict[str, dict] = {}
    configs: list[dict] = []  # distinct QATConfigs, referenced by index
    skip: set[str] = set()
    n_q = label_b = t_b = beta_b = 0
    aliases = module_names(model)
    for name, layer in quantized_layers(model).items():
        for alias in aliases[id(layer)]:  # a layer used at several places is stored once
            skip |= _skip_keys(alias, layer)
        cdict = layer.qconfig.to_dict()
        if cdict not in configs:
            configs.append(cdict)
        entry: dict[str, Any] = {
            "kind": _KIND[type(layer)],
            "weight_shape": list(layer.weight.shape),
            "k": layer.k,
            "pad": layer.pad,
            "config": configs.index(cdict),
        }
        wq = layer.weight_quantizer
        if wq is not None:
            labels, T, betas = layer.codes()  # brought up to date as an eval forward would
            packed, cmeta = pack_codes(labels, T, wq.cfg)
            p = f"{name}." if name else ""
            for key, t in packed.items():
                tensors[p + key] = t
                if key == "labels":
                    label_b += t.numel()
                else:
                    t_b += t.numel()
            entry["codes"] = cmeta
            n_clamped = int(wq.clamped.sum())
            if n_clamped:
                tensors[p + "clamped"] = pack_labels(wq.clamped.to(torch.uint8).cpu(), 2)
                entry["clamped"] = n_clamped
            if layer.qconfig.granularity != "fixed":
                tensors[p + "beta"] = betas.detach().cpu().to(torch.float32).contiguous()
                beta_b += tensors[p + "beta"].numel() * 4
            n_q += layer.weight.numel()
        meta_layers[name] = entry
    other_b = 0
    for key, val in model.state_dict().items():
        if key in skip:
            continue
        if key in tensors:
            raise ValueError(f"state_dict key {key!r} collides with a compressed-code tensor of the same name")
        t = val.detach().cpu().contiguous().clone()
        tensors[key] = t
        other_b += t.numel() * t.element_size()
    meta = {
        "format": FORMAT,
        "configs": json.dumps(configs, separators=(",", ":")),
        "layers": json.dumps(meta_layers, sort_keys=True, separators=(",", ":")),
    }
    save_file(tensors, path, metadata=meta)
    meta_b = sum(len(k) + len(v) for k, v in meta.items())
    return CheckpointReport(path, os.path.getsize(path), n_q, label_b, t_b, beta_b, meta_b, other_b, meta_layers)


# ------------------------------------------------------------------------------------------------ loading
def _read_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file, with errors that name the file."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from None
    return meta, tensors


def _json_meta(path: str, meta: dict, key: str, kind: type):
    if key not in meta:
        raise ValueError(f"{path}: metadata key {key!r} is missing")
    try:
        v = json.loads(meta[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata key {key!r} is not valid JSON ({e})") from None
    if not isinstance(v, kind):
        raise ValueError(f"{path}: metadata key {key!r} must hold a JSON {kind.__name__}")
    return v


def _entry_field(path: str, name: str, entry: dict, key: str, kind: type):
    if key not in entry:
        raise ValueError(f"{path}: layer {name!r}: metadata field {key!r} is missing")
    v = entry[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ValueError(f"{path}: layer {name!r}: metadata field {key!r} must be a {kind.__name__}, got {v!r}")
    return v


def _read_codes(path: str, name: str, fmt: str, entry: dict, tensors: dict, layer: QuantLayerMixin):
    """Validated ``(labels, T, betas, clamped, used keys)`` of one layer."""
    wq = layer.weight_quantizer
    assert wq is not None  # only layers that quantize their weight have codes
    cfg = wq.cfg
    p = f"{name}." if name else ""
    lead = tuple(wq.T.shape)
    used: set[str] = set()
    try:
        if fmt == FORMAT:
            cmeta = _entry_field(path, name, entry, "codes", dict)
            sub = {k: tensors[p + k] for k in _CODE_TENSORS if p + k in tensors}
            used |= {p + k for k in sub}
            if tuple(cmeta.get("shape", ())) != lead:
                raise ValueError(f"codes of shape {cmeta.get('shape')!r}, the layer needs {list(lead)}")
            labels, T = unpack_codes(sub, cmeta, config=cfg)
        else:  # coset-nn-compressed/1
            t_q = _entry_field(path, name, entry, "T_q", int)
            if not 2 <= t_q <= 256:
                raise ValueError(f"T_q={t_q} out of [2, 256]")
            for k in ("labels", "T"):
                if p + k not in tensors:
                    raise ValueError(f"tensor {p + k!r} is missing")
                used.add(p + k)
            labels = unpack_labels(tensors[p + "labels"], cfg.q, (*lead, cfg.M, cfg.dim))
            T = unpack_labels(tensors[p + "T"], t_q, lead)
        betas = None
        if layer.qconfig.granularity != "fixed":
            if p + "beta" not in tensors:
                raise ValueError(f"tensor {p + 'beta'!r} is missing")
            betas = tensors[p + "beta"]
            used.add(p + "beta")
            if betas.dtype != torch.float32:
                raise ValueError(f"tensor {p + 'beta'!r} must be float32, got {betas.dtype}")
        clamped = None
        if p + "clamped" in tensors:
            clamped = unpack_labels(tensors[p + "clamped"], 2, lead).to(torch.bool)
            used.add(p + "clamped")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: layer {name!r}: {e}") from None
    return labels, T, betas, clamped, used


def load_compressed(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a file written by :func:`save_compressed` into ``model`` (same architecture) in place.

    Layers that are still float (``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``) are swapped for their quantized
    version with the config stored in the file; already-quantized layers must have the same config. The
    shadow weight of each quantized layer is set to its decoded weight. Files of the older format
    ``coset-nn-compressed/1`` load too. (The old argument order ``load_compressed(path, model)`` still works
    and emits a ``DeprecationWarning``.)

    Returns
    -------
    the model (modified in place).

    Raises
    ------
    TypeError if ``model`` is not an ``nn.Module``; FileNotFoundError / IsADirectoryError for a bad path;
    ValueError naming the file and the layer or tensor for a file that is not a coset-nn checkpoint, is
    truncated or damaged, misses a tensor or a metadata key, holds a tensor of the wrong dtype/shape/range or a
    non-finite value, names a layer the model lacks or one of another kind/shape/config, or an invalid config.
    """
    if isinstance(model, (str, os.PathLike)) and isinstance(path, nn.Module):
        warnings.warn(
            "load_compressed(path, model) is deprecated: call load_compressed(model, path)",
            DeprecationWarning,
            stacklevel=2,
        )
        model, path = path, model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    meta, tensors = _read_file(path)
    fmt = meta.get("format")
    if fmt != FORMAT and fmt not in OLD_FORMATS:
        raise ValueError(f"{path}: not a coset-nn compressed checkpoint (format {fmt!r}; expected {FORMAT!r})")
    layers_meta = _json_meta(path, meta, "layers", dict)
    configs = _json_meta(path, meta, "configs", list)
    modules = dict(model.named_modules())
    aliases = module_names(model)
    plan = []  # (name, entry, layer): the layers to fill once the plain tensors are loaded
    for name, entry in layers_meta.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: layer {name!r}: metadata entry must be a JSON object")
        if name not in modules:
            raise ValueError(f"{path}: layer {name!r} not found in the model")
        ci = _entry_field(path, name, entry, "config", int)
        if not 0 <= ci < len(configs):
            raise ValueError(f"{path}: layer {name!r}: config index {ci} does not exist ({len(configs)} configs)")
        try:
            cfg = QATConfig.from_dict(configs[ci])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: layer {name!r}: invalid config: {e}") from None
        kind = _entry_field(path, name, entry, "kind", str)
        shape = _entry_field(path, name, entry, "weight_shape", list)
        mod = modules[name]
        if not isinstance(mod, QuantLayerMixin):
            if type(mod) not in _SWAP:
                raise ValueError(f"layer {name!r} is a {type(mod).__name__}, expected a Linear/Conv layer")
            if _KIND[_SWAP[type(mod)]] != kind:
                raise ValueError(f"layer {name!r} is a {type(mod).__name__}, the file has a {kind} layer")
            if list(mod.weight.shape) != shape:
                raise ValueError(f"layer {name!r}: weight shape {tuple(mod.weight.shape)} != file {shape}")
            old = mod
            mod = _SWAP[type(mod)].from_float(old, cfg)
            mod.set_name(name)
            for alias in aliases.get(id(old), [name]):  # every use of a shared module object
                _set_submodule(model, alias, mod)
        elif mod.qconfig != cfg:
            raise ValueError(f"layer {name!r} has config {mod.qconfig}, the file has {cfg}")
        if _KIND[type(mod)] != kind:
            raise ValueError(f"layer {name!r} is a {_KIND[type(mod)]} layer, the file has a {kind} layer")
        if list(mod.weight.shape) != shape:
            raise ValueError(f"layer {name!r}: weight shape {tuple(mod.weight.shape)} != file {shape}")
        plan.append((name, entry, mod))
    skip: set[str] = set()
    code_keys: set[str] = set()
    codes = {}
    aliases = module_names(model)
    for name, entry, mod in plan:
        for alias in aliases.get(id(mod), [name]):
            skip |= _skip_keys(alias, mod)
        if mod.weight_quantizer is not None:
            codes[name] = _read_codes(path, name, fmt, entry, tensors, mod)
            code_keys |= codes[name][4]
    others = {k: v for k, v in tensors.items() if k not in code_keys}
    for k, v in others.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{path}: tensor {k!r} holds NaN or Inf")
    try:
        res = model.load_state_dict(others, strict=False)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: the tensors do not fit the model: {e}") from None
    missing = [k for k in res.missing_keys if k not in skip]
    if missing or res.unexpected_keys:
        raise ValueError(f"{path}: state mismatch; missing {missing}, unexpected {list(res.unexpected_keys)}")
    # the codes last: loading the plain tensors resets the quantizers of the layers it visits
    for name, _, mod in plan:
        if name not in codes:
            continue
        labels, T, betas, clamped, _ = codes[name]
        wq = mod.weight_quantizer
        dev = mod.weight.device
        try:
            wq.load_codes(
                labels.to(dev),
                T.to(dev),
                None if betas is None else betas.to(dev),
                clamped=None if clamped is None else clamped.to(dev),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: layer {name!r}: {e}") from None
        with torch.no_grad():
            mod.weight.copy_(wq.dequantize(mod.weight.dtype))
        # the codes stay bound to the decoded weight (binding happens at the next use)
    return model
