"""coset.nn: quantization-aware training with HNLQ (Kaplan & Ordentlich 2025).

* :class:`QATConfig`: frozen per-layer configuration (weight/activation HNLQ configs, beta granularity,
  STE variant, ``quantize_every``, ``use_lut``).
* :class:`QLinear`, :class:`QConv1d`, :class:`QConv2d`: drop-in layers with FP32 shadow weights quantized in
  d-blocks along the input dimension.
* :func:`quantize_model` / :func:`dequantize_model`: in-place module swap (torchao ``quantize_`` style) with a
  :class:`ConversionReport`; :func:`set_quantization_enabled`, :func:`quantized_layers`.
* :class:`HNLQWeightQuantizer` / :class:`HNLQActivationQuantizer`: the quantizer submodules of a layer
  (``layer.weight_quantizer``: codes, ``codes()``, ``load_codes()``, ``stats()``; ``layer.activation_quantizer``:
  running activation beta); :class:`ClampWarning` when a quantization clamps.
* :func:`save_compressed` / :func:`load_compressed`: packed-code safetensors checkpoints
  (:class:`CheckpointReport` gives effective bits/weight).
* :func:`ste`: the straight-through estimator used by the layers.
"""

from .checkpoint import CheckpointReport, load_compressed, save_compressed
from .config import QATConfig
from .convert import (
    ConversionReport,
    LayerReport,
    dequantize_model,
    quantize_model,
    quantized_layers,
    set_quantization_enabled,
)
from .qconv import QConv1d, QConv2d
from .qlinear import QLinear
from .quantizer import ClampWarning, HNLQActivationQuantizer, HNLQWeightQuantizer
from .ste import ste

__all__ = [
    "QATConfig",
    "QLinear",
    "QConv1d",
    "QConv2d",
    "HNLQWeightQuantizer",
    "HNLQActivationQuantizer",
    "ClampWarning",
    "quantize_model",
    "dequantize_model",
    "set_quantization_enabled",
    "quantized_layers",
    "ConversionReport",
    "LayerReport",
    "save_compressed",
    "load_compressed",
    "CheckpointReport",
    "ste",
]
__version__ = "0.1.0"
