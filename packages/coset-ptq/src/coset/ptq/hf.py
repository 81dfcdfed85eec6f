"""``transformers`` integration (extra ``[hf]``): ``quant_method: "coset"`` for ``from_pretrained``.

After ``import coset.ptq.hf``, ``AutoModel.from_pretrained(dir)`` / ``AutoModelForCausalLM.from_pretrained(dir)`` on a
directory written by :func:`coset.ptq.save_quantized` returns the model with its listed linears replaced by
:class:`~coset.ptq.layers.HNLQLinear` holding the compressed buffers from the checkpoint.

Registration happens once per process (re-importing or reloading this module does not register twice).
Without it, transformers only warns about the unknown ``quant_method``; the load then fails anyway because each
quantized layer's ``<layer>.weight`` in the checkpoint holds packed labels of a different shape (size mismatch).
"""

from __future__ import annotations

from pathlib import Path

import transformers
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .layers import HNLQSpec
from .serialize import FORMAT_VERSION, QUANT_METHOD, quantized_layers, swap_linears

__all__ = ["CosetQuantizationConfig", "CosetHfQuantizer", "load_pretrained_checked"]


class CosetQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a coset checkpoint (see :mod:`coset.ptq.serialize`).

    Parameters
    ----------
    layers : {module name: HNLQSpec JSON}
    format_version : int, must equal :data:`coset.ptq.serialize.FORMAT_VERSION`
    **kwargs : other recorded fields (``coset_ptq_version``, ``files``), kept verbatim
    """

    def __init__(self, layers=None, format_version=FORMAT_VERSION, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = dict(layers or {})
        self._extra = kwargs
        for k, v in kwargs.items():
            setattr(self, k, v)
        self.post_init()

    def post_init(self):
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"coset quantization_config format_version {self.format_version!r} is not supported (expected {FORMAT_VERSION})"
            )
        if not isinstance(self.layers, dict) or not self.layers:
            raise ValueError("coset quantization_config.layers must be a non-empty object {module name: layer spec}")

    def specs(self) -> dict[str, HNLQSpec]:
        return {n: HNLQSpec.from_json(s) for n, s in self.layers.items()}

    def to_dict(self):
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "layers": self.layers,
            **self._extra,
        }


class CosetHfQuantizer(HfQuantizer):
    """Loads pre-quantized coset checkpoints (quantizing on the fly is not supported: use :mod:`coset.ptq.api`)."""

    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        # The model is on "meta" here; HF then loads the buffers by key into the swapped modules.
        swap_linears(model, self.quantization_config.specs(), device="meta")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in quantized_layers(model).values():
            m.check_seeds()
        return model

    def is_serializable(self, *args, **kwargs):
        # save_pretrained would not record the layer specs: use coset.ptq.save_quantized.
        return False

    @property
    def is_trainable(self):
        return False


# Guard against double registration (transformers raises ValueError on a second register_*).
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
    register_quantization_config(QUANT_METHOD)(CosetQuantizationConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
    register_quantizer(QUANT_METHOD)(CosetHfQuantizer)


def load_pretrained_checked(out_dir) -> transformers.PreTrainedModel:
    """``<architecture>.from_pretrained(out_dir)`` that raises ``ValueError`` on any missing/unexpected/mismatched key.

    (transformers itself only warns about missing keys and initializes them randomly.)
    """
    import json

    d = Path(out_dir)
    cfg = json.loads((d / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{d / 'config.json'}: unknown architecture {arch!r} for this transformers version")
    model, info = cls.from_pretrained(str(d), output_loading_info=True)
    bad = {
        k: sorted(map(str, v))
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if bad:
        raise ValueError(f"{d / 'model.safetensors'}: does not match {arch}: {bad}")
    if not quantized_layers(model):
        raise ValueError(f"{d}: loaded without HNLQLinear layers")
    return model.eval()
