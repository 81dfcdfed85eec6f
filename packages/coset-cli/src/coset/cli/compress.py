"""Compress a safetensors checkpoint with HNLQ: packed codes + one beta per tensor.

File layout (a plain safetensors file, readable by any safetensors loader):

* ``<name>.<key>``: the uint8 tensors of :func:`coset.quant.pack_codes` for the tensor's blocks
  (``<name>.labels`` at ``ceil(log2 q)`` bits per label, and the T tensors of the coding pack_codes chose),
* ``<name>`` itself, unchanged, for tensors that are not compressed (integer tensors, tensors with fewer
  than d elements),
* the metadata key ``coset`` holds JSON: ``format`` (:data:`FORMAT`), the config and, per compressed tensor,
  shape, dtype, pad, beta and the pack_codes metadata (``codes``).

Blocks run along the flattened tensor (row-major), so any shape is accepted; the padding of the last block
is recorded and stripped. :func:`decompress_file` reads the file back (validating every tensor it reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from coset.quant import (
    CODE_TENSORS,
    QuantizationConfig,
    calibrate_beta,
    codes_nbytes,
    decode,
    encode,
    from_blocks,
    pack_codes,
    to_blocks,
    unpack_codes,
)

__all__ = ["TensorReport", "compress_file", "decompress_file", "compress_tensor", "FORMAT"]

FORMAT = "coset-compress/2"
_META_KEY = "coset"
_CALIB_BLOCKS = 1 << 14  # beta is calibrated on at most this many blocks (a strided sample)
_CODE_KEYS = CODE_TENSORS


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]
    compressed: bool
    bytes_in: int
    bytes_out: int
    bits_per_weight: float
    rel_error: float
    overload_rate: float
    clamp_rate: float = 0.0


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def compress_tensor(w: torch.Tensor, config: QuantizationConfig):
    """Quantize one float tensor. Returns ``(tensors, meta, w_hat)``: the :func:`coset.quant.pack_codes` tensors,
    the per-tensor metadata (shape, dtype, pad, beta, codes metadata, overload and clamp rates) and the
    dequantized tensor."""
    d = config.dim
    blocks, pad = to_blocks(w.detach().reshape(-1).to(torch.float32), d)
    sample = blocks[:: max(1, blocks.shape[0] // _CALIB_BLOCKS)]
    if float(sample.abs().max()) == 0.0:
        beta = 1.0
    else:
        beta, _ = calibrate_beta(sample, config, objective="rd")
    cfg = config.replace(beta=beta)
    b, T, clamped = encode(blocks, config=cfg, return_clamped=True)
    w_hat = from_blocks(decode(b, config=cfg, T=T, dtype=torch.float32), pad).reshape(w.shape).to(w.dtype)
    tensors, cmeta = pack_codes(b, T, cfg)
    n = max(T.numel(), 1)
    meta = {
        "shape": list(w.shape),
        "dtype": _dtype_name(w.dtype),
        "pad": pad,
        "beta": beta,
        "codes": cmeta,
        "overload_rate": float(((T > 0) | clamped).sum()) / n,
        "clamp_rate": float(clamped.sum()) / n,
    }
    return tensors, meta, w_hat


def _read_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory, not a safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read {str(path)!r} as a safetensors file (truncated or damaged?): {e}") from None
    return md, tensors


def _check_output(dst: Path, src: Path) -> None:
    if dst.is_dir():
        raise IsADirectoryError(f"output {str(dst)!r} is a directory; give a file name such as {str(dst / src.name)!r}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"output {str(dst)!r} is the input file; choose another name")
    parent = dst.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"cannot write {str(dst)!r}: {str(parent)!r} is not a directory")


def compress_file(src: str | Path, dst: str | Path, config: QuantizationConfig) -> list[TensorReport]:
    """Compress every floating tensor of the safetensors file ``src`` into ``dst``; one report per tensor.

    Raises
    ------
    FileNotFoundError / IsADirectoryError / NotADirectoryError for a bad input or output path (an output that
    is a directory included); ValueError for an unreadable input, a config with dither, a non-finite tensor,
    or tensor names that would collide with the packed-code names (e.g. ``w`` and ``w.labels``), naming the
    tensor; OSError when ``dst`` cannot be written.
    """
    from safetensors.torch import save_file

    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    src, dst = Path(src), Path(dst)
    _, tensors = _read_safetensors(src)
    _check_output(dst, src)
    if config.with_dither:
        raise ValueError("config.with_dither must be False for checkpoints (the dither would have to be stored)")
    out: dict[str, torch.Tensor] = {}
    meta: dict = {"format": FORMAT, "config": asdict(config), "tensors": {}}
    reports = []
    names = set(tensors)
    for name, w in tensors.items():
        if w.dtype.is_floating_point and w.numel() >= config.dim:
            for key in _CODE_KEYS:
                if f"{name}.{key}" in names:
                    raise ValueError(
                        f"tensor {name!r} would be stored as {name + '.' + key!r}, which is also a tensor of the input; "
                        "rename one of them (compressing would overwrite data)"
                    )
    for name, w in tensors.items():
        nbytes = w.numel() * w.element_size()
        if not w.dtype.is_floating_point or w.numel() < config.dim:
            out[name] = w.contiguous()
            reports.append(TensorReport(name, tuple(w.shape), False, nbytes, nbytes, 8.0 * w.element_size(), 0.0, 0.0))
            continue
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"tensor {name!r} contains NaN or Inf; refusing to compress it")
        packed, m, w_hat = compress_tensor(w, config)
        for key, t in packed.items():
            out[f"{name}.{key}"] = t
        meta["tensors"][name] = m
        size = codes_nbytes(packed)
        err = float((w_hat.double() - w.double()).norm() / max(float(w.double().norm()), 1e-300))
        reports.append(
            TensorReport(
                name,
                tuple(w.shape),
                True,
                nbytes,
                size,
                8.0 * size / w.numel(),
                err,
                m["overload_rate"],
                m["clamp_rate"],
            )
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst), metadata={_META_KEY: json.dumps(meta)})
    return reports


def _bad(path: Path, msg: str) -> ValueError:
    return ValueError(f"{str(path)!r}: {msg}")


def decompress_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a file written by :func:`compress_file` and return the dequantized tensors by name.

    Raises
    ------
    FileNotFoundError / IsADirectoryError for a bad path; ValueError naming the file and the tensor or metadata
    key when the file is unreadable, not a coset-compressed file, misses a tensor or key, or holds a tensor of
    the wrong dtype/size/range, a non-finite beta or an invalid config.
    """
    path = Path(path)
    md, raw = _read_safetensors(path)
    if _META_KEY not in md:
        raise _bad(path, f"not a coset-compressed checkpoint (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(md[_META_KEY])
    except ValueError as e:
        raise _bad(path, f"metadata '{_META_KEY}' is not valid JSON ({e})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("config"), dict)
        or not isinstance(meta.get("tensors"), dict)
    ):
        raise _bad(path, "metadata must hold 'config' and 'tensors' objects")
    fmt = meta.get("format", "coset-compress/1")
    if fmt not in (FORMAT, "coset-compress/1"):
        raise _bad(path, f"unknown format {fmt!r}")
    try:
        base = QuantizationConfig(**meta["config"])
    except (TypeError, ValueError) as e:
        raise _bad(path, f"invalid config: {e}") from None
    d = base.dim
    result: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, m in meta["tensors"].items():
        try:
            if not isinstance(m, dict):
                raise ValueError("metadata entry must be an object")
            shape, pad, beta, dtype = m["shape"], m["pad"], m["beta"], m["dtype"]
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
                raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
            cfg = base.replace(beta=float(beta))
            if (
                not isinstance(dtype, str)
                or not isinstance(getattr(torch, dtype, None), torch.dtype)
                or not getattr(torch, dtype).is_floating_point
            ):
                raise ValueError(f"dtype must name a floating torch dtype, got {dtype!r}")
            if not isinstance(shape, list) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape
            ):
                raise ValueError(f"shape must be a list of non-negative ints, got {shape!r}")
            numel = math.prod(shape)
            nb = -(-numel // d)
            if pad != nb * d - numel:
                raise ValueError(f"pad={pad!r} does not match shape {shape} (expected {nb * d - numel})")
            if fmt == FORMAT:
                sub = {k: raw[f"{name}.{k}"] for k in _CODE_KEYS if f"{name}.{k}" in raw}
                cmeta = m["codes"]
                if not isinstance(cmeta, dict) or cmeta.get("shape") != [nb]:
                    raise ValueError(f"codes metadata must describe {nb} blocks")
                b, T = unpack_codes(sub, cmeta, config=cfg)
            else:  # coset-compress/1: labels + T at T_levels levels
                from coset.quant import unpack_labels

                sub = {k: raw[f"{name}.{k}"] for k in ("labels", "T") if f"{name}.{k}" in raw}
                if set(sub) != {"labels", "T"} or m["blocks"] != nb:
                    raise ValueError("tensors 'labels' and 'T' of the blocks are required")
                b = unpack_labels(sub["labels"], cfg.q, (nb, cfg.M, d))
                T = unpack_labels(sub["T"], max(int(m["T_levels"]), 2), (nb,))
                if nb and int(T.max()) > cfg.max_scaling_iterations:
                    raise ValueError("T exceeds max_scaling_iterations")
        except KeyError as e:
            raise _bad(path, f"tensor {name!r}: missing metadata key or tensor {e}") from None
        except (TypeError, ValueError) as e:
            raise _bad(path, f"tensor {name!r}: {e}") from None
        used |= {f"{name}.{k}" for k in sub}
        flat = from_blocks(decode(b, config=cfg, T=T, dtype=torch.float32), pad)
        result[name] = flat.reshape(shape).to(getattr(torch, dtype))
    for k, v in raw.items():
        if k in used:
            continue
        if k in result:
            raise _bad(path, f"tensor {k!r} is stored both compressed and as is")
        result[k] = v
    return result
