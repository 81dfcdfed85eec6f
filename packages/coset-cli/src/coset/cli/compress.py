"""Compress a safetensors checkpoint with HNLQ: packed labels + packed T + one beta per tensor.

File layout (a plain safetensors file, readable by any safetensors loader):

* ``<name>.labels``: uint8, the bit-packed labels (``ceil(log2 q)`` bits each) of the tensor's blocks,
* ``<name>.T``: uint8, the bit-packed per-block scale steps (``ceil(log2(cap+1))`` bits each),
* ``<name>`` itself, unchanged, for tensors that are not compressed (integer tensors, tensors with fewer
  than d elements),
* the metadata key ``coset`` holds JSON: the config and, per compressed tensor, shape, dtype, pad and beta.

Blocks run along the flattened tensor (row-major), so any shape is accepted; the padding of the last block
is recorded and stripped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from coset.quant import (
    QuantizationConfig,
    calibrate_beta,
    decode,
    encode,
    from_blocks,
    pack_labels,
    to_blocks,
    unpack_labels,
)

__all__ = ["TensorReport", "compress_file", "load_compressed", "compress_tensor"]

_META_KEY = "coset"
_CALIB_BLOCKS = 1 << 14  # beta is calibrated on at most this many blocks (a strided sample)


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


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def compress_tensor(w: torch.Tensor, config: QuantizationConfig):
    """Quantize one float tensor. Returns ``(labels_packed, T_packed, meta, w_hat)``."""
    d = config.dim
    blocks, pad = to_blocks(w.detach().reshape(-1).to(torch.float32), d)
    sample = blocks[:: max(1, blocks.shape[0] // _CALIB_BLOCKS)]
    if float(sample.abs().max()) == 0.0:
        beta = 1.0
    else:
        beta, _ = calibrate_beta(sample, config, objective="rd")
    cfg = config.replace(beta=beta)
    b, T = encode(blocks, config=cfg)
    w_hat = from_blocks(decode(b, config=cfg, T=T, dtype=torch.float32), pad).reshape(w.shape).to(w.dtype)
    t_levels = cfg.max_scaling_iterations + 1
    meta = {"shape": list(w.shape), "dtype": _dtype_name(w.dtype), "pad": pad, "beta": beta,
            "blocks": int(blocks.shape[0]), "T_levels": t_levels,
            "overload_rate": float((T > 0).float().mean()) if T.numel() else 0.0}
    return pack_labels(b, cfg.q), pack_labels(T, max(t_levels, 2)), meta, w_hat


def compress_file(src: str | Path, dst: str | Path, config: QuantizationConfig) -> list[TensorReport]:
    """Compress every floating tensor of the safetensors file ``src`` into ``dst``; one report per tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"input checkpoint {str(src)!r} does not exist or is not a file")
    try:
        tensors = load_file(str(src))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(src)!r} as a safetensors file: {e}") from None
    if config.with_dither:
        raise ValueError("config.with_dither must be False for checkpoints (the dither would have to be stored)")
    out: dict[str, torch.Tensor] = {}
    meta: dict = {"config": asdict(config), "tensors": {}}
    reports = []
    for name, w in tensors.items():
        nbytes = w.numel() * w.element_size()
        if not w.dtype.is_floating_point or w.numel() < config.dim:
            out[name] = w.contiguous()
            reports.append(TensorReport(name, tuple(w.shape), False, nbytes, nbytes, 8.0 * w.element_size(), 0.0, 0.0))
            continue
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"tensor {name!r} contains NaN or Inf; refusing to compress it")
        lab, tp, m, w_hat = compress_tensor(w, config)
        out[name + ".labels"] = lab
        out[name + ".T"] = tp
        meta["tensors"][name] = m
        size = lab.numel() + tp.numel()
        err = float((w_hat.double() - w.double()).norm() / max(float(w.double().norm()), 1e-300))
        reports.append(TensorReport(name, tuple(w.shape), True, nbytes, size, 8.0 * size / w.numel(), err,
                                    m["overload_rate"]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst), metadata={_META_KEY: json.dumps(meta)})
    return reports


def load_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a file written by :func:`compress_file` and return the dequantized tensors by name."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        if _META_KEY not in md:
            raise ValueError(f"{str(path)!r} is not a coset-compressed checkpoint (no '{_META_KEY}' metadata)")
        meta = json.loads(md[_META_KEY])
        raw = {k: f.get_tensor(k) for k in f.keys()}
    base = QuantizationConfig(**meta["config"])
    d = base.dim
    result: dict[str, torch.Tensor] = {}
    for name, m in meta["tensors"].items():
        cfg = base.replace(beta=m["beta"])
        nb = m["blocks"]
        b = unpack_labels(raw[name + ".labels"], cfg.q, (nb, cfg.M, d))
        T = unpack_labels(raw[name + ".T"], max(m["T_levels"], 2), (nb,))
        flat = from_blocks(decode(b, config=cfg, T=T, dtype=torch.float32), m["pad"])
        result[name] = flat.reshape(m["shape"]).to(getattr(torch, m["dtype"]))
    for k, v in raw.items():
        if k.endswith(".labels") or k.endswith(".T"):
            if k.rsplit(".", 1)[0] in meta["tensors"]:
                continue
        result[k] = v
    return result


