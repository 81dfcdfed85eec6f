"""Save and load a model whose linears are :class:`~coset.ptq.layers.HNLQLinear`.

A saved directory holds

* ``model.safetensors`` — the model's state dict: the compressed buffers of every HNLQLinear (packed labels under
  ``<layer>.weight``, compact T, scale, rotation seeds) and every other (float) tensor as is. Tensors that share
  storage (tied embeddings) are written once; the aliases are listed in the file's metadata.
* ``config.json`` — for a ``transformers`` model its config plus a ``quantization_config``; for a plain torch
  model only the ``quantization_config``. ``quantization_config = {"quant_method": "coset", "format_version",
  "coset_ptq_version", "layers": {name: HNLQSpec JSON}, "files": {"model.safetensors": {"bytes", "sha256"}}}``.
* the tokenizer files, when a tokenizer is given.

``load_quantized`` refuses (``OSError`` for a missing/unreadable file, ``ValueError`` for content) a directory that
is not a coset model, a truncated or damaged file (size and SHA-256 are checked), a missing key or a wrong shape,
always naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .layers import HNLQLinear

__all__ = [
    "save_quantized",
    "load_quantized",
    "read_quantization_config",
    "quantized_layers",
    "swap_linears",
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
]

QUANT_METHOD = "coset"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_ALIASES_KEY = "coset_aliases"


# ---------------------------------------------------------------------- helpers
def quantized_layers(model: nn.Module) -> dict[str, HNLQLinear]:
    """{qualified name: module} of every HNLQLinear in ``model`` (``model`` itself under the name "")."""
    from .layers import HNLQLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, HNLQLinear)}


def swap_linears(model: nn.Module, specs: dict, *, device=None) -> None:
    """Replace each listed ``nn.Linear`` of ``model`` by an empty :class:`HNLQLinear` of its spec (in place).

    Parameters
    ----------
    model : nn.Module
    specs : {qualified module name: HNLQSpec}
    device : device of the empty buffers (e.g. "meta" before loading weights)

    Raises
    ------
    ValueError naming the module if it does not exist, is not an nn.Linear, or has other features.
    """
    from .layers import HNLQLinear

    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r} listed in quantization_config") from None
        if not isinstance(old, (nn.Linear, HNLQLinear)):
            raise ValueError(f"module {name!r} is a {type(old).__name__}, expected nn.Linear")
        if (old.in_features, old.out_features) != (spec.in_features, spec.out_features) or (
            old.bias is not None
        ) != spec.bias:
            raise ValueError(
                f"module {name!r} is ({old.in_features} -> {old.out_features}, bias={old.bias is not None}), "
                f"the quantization_config says ({spec.in_features} -> {spec.out_features}, bias={spec.bias})"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, HNLQLinear(spec, device=device))


def _is_transformers_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict") and hasattr(model, "save_pretrained")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors (tied weights) kept once; returns (tensors, {alias: kept key})."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, t in model.state_dict().items():
        t = t.detach()
        key = (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.to("cpu").contiguous()
    return out, aliases


# ---------------------------------------------------------------------- save
def save_quantized(model: nn.Module, out_dir, tokenizer=None) -> Path:
    """Write ``model`` (with HNLQLinear layers) to ``out_dir``.

    Parameters
    ----------
    model : nn.Module containing at least one HNLQLinear (a ``transformers`` model or a plain torch model)
    out_dir : directory, created if needed (existing coset files in it are overwritten)
    tokenizer : optional object with ``save_pretrained(dir)`` (a transformers tokenizer)

    Returns
    -------
    Path of the directory.

    Raises
    ------
    TypeError if ``model`` is not a module; ValueError if it has no HNLQLinear; OSError if ``out_dir`` exists and
    is not a directory.
    """
    from safetensors.torch import save_file

    from . import __version__

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no HNLQLinear layer: quantize it first (nothing coset-specific to save)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OSError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedup_state(model)
    st_path = out / WEIGHTS_NAME
    save_file(tensors, str(st_path), metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "coset_ptq_version": __version__,
        "layers": {n: m.spec.to_json() for n, m in layers.items()},
        "files": {WEIGHTS_NAME: {"bytes": st_path.stat().st_size, "sha256": _sha256(st_path)}},
    }
    if _is_transformers_model(model):
        hf_config: Any = model.config  # a transformers PretrainedConfig (checked by _is_transformers_model)
        cfg = hf_config.to_dict()
        cfg["architectures"] = [type(model).__name__]
    else:
        cfg = {}
    cfg["quantization_config"] = qc
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise TypeError(f"tokenizer must have save_pretrained(dir), got {type(tokenizer).__name__}")
        tokenizer.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------- load
def read_quantization_config(out_dir) -> tuple[dict, dict, dict]:
    """Read and validate a coset directory's ``config.json``.

    Returns
    -------
    (full config dict, quantization_config dict, {layer name: HNLQSpec})

    Raises
    ------
    OSError if the directory or config.json is missing/unreadable; ValueError (naming config.json) if it is not
    a coset model or a layer spec is bad.
    """
    from .layers import HNLQSpec

    d = Path(out_dir)
    if not d.is_dir():
        raise OSError(f"{str(d)!r} is not a directory")
    cp = d / CONFIG_NAME
    if not cp.is_file():
        raise OSError(f"{cp}: missing; {str(d)!r} is not a coset model directory")
    try:
        cfg = json.loads(cp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cp}: not valid JSON ({e})") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{cp}: no quantization_config with quant_method {QUANT_METHOD!r}; not a coset model")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{cp}: format_version {qc.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{cp}: quantization_config.layers must be a non-empty object")
    specs = {}
    for name, sj in layers.items():
        try:
            specs[name] = HNLQSpec.from_json(sj)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cp}: layer {name!r}: {e}") from None
    return cfg, qc, specs


def _check_file(d: Path, qc: dict) -> Path:
    st = d / WEIGHTS_NAME
    if not st.is_file():
        raise OSError(f"{st}: missing")
    want = (qc.get("files") or {}).get(WEIGHTS_NAME)
    if not isinstance(want, dict):
        raise ValueError(f"{d / CONFIG_NAME}: quantization_config.files has no entry for {WEIGHTS_NAME}")
    size = st.stat().st_size
    if size != want.get("bytes"):
        raise ValueError(f"{st}: {size} bytes, config.json says {want.get('bytes')} (truncated or replaced file)")
    if _sha256(st) != want.get("sha256"):
        raise ValueError(f"{st}: SHA-256 does not match config.json (damaged file)")
    return st


def _read_header(st: Path) -> tuple[dict[str, tuple[tuple, str]], dict]:
    """{key: (shape, safetensors dtype)} and the metadata of a safetensors file, from its header only."""
    try:
        with open(st, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            hdr = json.loads(f.read(n))
        if not isinstance(hdr, dict):
            raise ValueError(f"the header is a JSON {type(hdr).__name__}, not an object")
        meta = hdr.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ValueError(f"__metadata__ is a {type(meta).__name__}, not an object")
        out: dict[str, tuple[tuple, str]] = {}
        end = 0
        for k, v in hdr.items():
            if not isinstance(v, dict):
                raise ValueError(f"entry {k!r} is not an object")
            shape, dt, offs = v["shape"], v["dtype"], v["data_offsets"]
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"entry {k!r} has shape {shape!r}")
            if not isinstance(dt, str) or not isinstance(offs, list) or len(offs) != 2:
                raise ValueError(f"entry {k!r} has dtype {dt!r} / data_offsets {offs!r}")
            out[k] = (tuple(shape), dt)
            end = max(end, int(offs[1]))
        if st.stat().st_size < 8 + n + end:
            raise ValueError(f"file is {st.stat().st_size} bytes, the header needs {8 + n + end} (truncated)")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{st}: damaged safetensors header ({e})") from None
    return out, meta


_ST_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bool: "BOOL",
}


def _check_layer_keys(st: Path, header: dict, specs: dict) -> None:
    for name, spec in specs.items():
        for rel, (shape, dt) in spec.buffer_shapes().items():
            key = f"{name}.{rel}" if name else rel
            if key not in header:
                raise ValueError(f"{st}: missing key {key!r}")
            got_shape, got_dt = header[key]
            if tuple(got_shape) != tuple(shape) or got_dt != _ST_DTYPES[dt]:
                raise ValueError(
                    f"{st}: key {key!r} is {got_dt}{list(got_shape)}, expected {_ST_DTYPES[dt]}{list(shape)}"
                )
        if spec.bias:
            key = f"{name}.bias" if name else "bias"
            if key not in header:
                raise ValueError(f"{st}: missing key {key!r}")


def load_quantized(out_dir, model_factory: Callable[[], nn.Module] | None = None, *, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`.

    Parameters
    ----------
    out_dir : the saved directory
    model_factory : for a plain torch model, a callable returning the float model (its nn.Linear layers are
        swapped for HNLQLinear before the state is loaded). ``None`` for a ``transformers`` model: it is loaded
        through ``from_pretrained`` after ``import coset.ptq.hf`` (needs the ``[hf]`` extra).
    verify : check size and SHA-256 of model.safetensors against config.json

    Returns
    -------
    the model in eval mode, with HNLQLinear layers

    Raises
    ------
    OSError for a missing directory/file; ValueError (naming the file) for a directory that is not a coset
    model, a truncated or damaged file, a missing or unexpected key, a wrong shape.
    """
    d = Path(out_dir)
    cfg, qc, specs = read_quantization_config(d)
    st = d / WEIGHTS_NAME
    if verify:
        st = _check_file(d, qc)
    elif not st.is_file():
        raise OSError(f"{st}: missing")
    header, meta = _read_header(st)
    _check_layer_keys(st, header, specs)
    if model_factory is None:
        if not cfg.get("architectures"):
            raise ValueError(f"{d / CONFIG_NAME}: a plain torch model (no 'architectures'); pass model_factory")
        from .hf import load_pretrained_checked

        return load_pretrained_checked(d)
    if not callable(model_factory):
        raise TypeError(f"model_factory must be callable, got {type(model_factory).__name__}")
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory() must return an nn.Module, got {type(model).__name__}")
    swap_linears(model, specs)
    from safetensors.torch import load_file

    try:
        state = load_file(str(st))
    except Exception as e:  # safetensors raises its own error type on a damaged body
        raise ValueError(f"{st}: cannot read tensors ({e})") from None
    try:
        aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
    except (json.JSONDecodeError, TypeError):
        raise ValueError(f"{st}: damaged {_ALIASES_KEY} metadata") from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(f"{st}: damaged {_ALIASES_KEY} metadata (not an object of key names)")
    for alias, kept in aliases.items():
        if kept not in state:
            raise ValueError(f"{st}: alias {alias!r} points to missing key {kept!r}")
        state[alias] = state[kept]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{st}: does not match the model: {e}") from None
    for m in quantized_layers(model).values():
        m.check_seeds()
    return model.eval()
