"""coset.ptq: post-training quantization of pretrained models with nested-lattice codes.

* :class:`Rotation`, :class:`LinearCodes` — randomized Hadamard rotation and the HNLQ code of one linear.
* :class:`HNLQLinear` — inference module holding only the compressed code (packed labels, compact T, scale, seeds).
* :func:`save_quantized` / :func:`load_quantized` — ``model.safetensors`` + ``config.json`` (``quant_method: "coset"``).
* :func:`bits_per_weight` — nominal and all-in bits/weight from the saved (or to-be-saved) bytes.
* :func:`quantize_` (:class:`PTQConfig`, :class:`MethodConfig`) — quantize a model's linears in place;
  :func:`quantize_linear` — one layer.
* :func:`finetune_` (:class:`FinetuneConfig`) — tune the norms and per-layer scales end to end against the float
  model (:func:`clone_reference`), at no cost in bits.
* :func:`tune_block_` (:class:`BlockTuneConfig`) — block tuning of the still-float linears during sequential
  quantization (``PTQConfig(block_tune=...)``).
* ``import coset.ptq.hf`` (extra ``[hf]``) registers ``quant_method "coset"`` with transformers' ``from_pretrained``.

Submodules are imported on first attribute access, so ``import coset.ptq`` stays light and never imports
transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Rotation": "codes",
    "LinearCodes": "codes",
    "HNLQLinear": "layers",
    "HNLQSpec": "layers",
    "save_quantized": "serialize",
    "load_quantized": "serialize",
    "read_quantization_config": "serialize",
    "quantized_layers": "serialize",
    "bits_per_weight": "bits",
    "BitsReport": "bits",
    "quantize_": "api",
    "PTQConfig": "api",
    "PTQReport": "api",
    "MethodConfig": "hnlq_block",
    "quantize_linear": "hnlq_block",
    "finetune_": "finetune",
    "FinetuneConfig": "finetune",
    "FinetuneReport": "finetune",
    "clone_reference": "finetune",
    "BlockTuneConfig": "block_tuning",
    "tune_block_": "block_tuning",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'coset.ptq' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
