"""``QuantLayerMixin``: what QLinear and QConv1d/QConv2d share.

A quantized layer is its float module (``weight``/``bias``: the float32 shadow parameters, trained as usual)
plus two optional quantizer submodules (torchao's ``FakeQuantizedLinear`` layout):

* ``weight_quantizer``: :class:`coset.nn.quantizer.HNLQWeightQuantizer` (``None`` when ``qconfig.weight`` is
  None); it owns the code (labels, T, betas, clamp mask), the step counter and the staleness rules;
* ``activation_quantizer``: :class:`coset.nn.quantizer.HNLQActivationQuantizer` (``None`` when
  ``qconfig.activation`` is None); it owns the running activation beta.

The forward is then ``F.linear(activation_quantizer(x), weight_quantizer(weight), bias)`` (or the
convolution), or the LUT product from the labels in eval mode with ``use_lut``.

State dict layout, version 2: the quantizers' state under ``weight_quantizer.`` and
``activation_quantizer.``. Version 1 (the layer held ``w_labels``, ``w_T``, ``w_beta``, ``q_state`` and
``act_beta`` itself) still loads: the keys are renamed on load. A version-1 state carries no code identity,
so it is checked only for shapes, dtypes and value ranges.

Padding: when k (in_features, or in_channels/groups*kh*kw) is not a multiple of d, each row gets
``pad = nb d - k`` zeros before encoding; the zeros are part of the code (and of the bits reported) and are
stripped after decoding, so the quantized weight always has the weight's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import QATConfig
from .quantizer import HNLQActivationQuantizer, HNLQWeightQuantizer

__all__ = ["QuantLayerMixin"]

#: version-1 keys (on the layer) -> version-2 keys (on the quantizers)
_V1_KEYS = {
    "w_labels": "weight_quantizer.labels",
    "w_T": "weight_quantizer.T",
    "w_beta": "weight_quantizer.beta",
    "q_state": "weight_quantizer.q_state",
    "act_beta": "activation_quantizer.beta",
}


if TYPE_CHECKING:  # the mixin always sits on an nn.Module
    _Base = nn.Module
else:
    _Base = object


class QuantLayerMixin(_Base):
    """Mixin for an ``nn.Module`` with ``weight``/``bias`` (see module docstring)."""

    qconfig: QATConfig
    weight: torch.Tensor
    weight_quantizer: HNLQWeightQuantizer | None
    activation_quantizer: HNLQActivationQuantizer | None
    #: dimension of the input that holds the features (-1 for Linear, 1 for convolutions)
    _feature_dim: int = -1
    #: state_dict layout version (nn.Module records it in the state_dict metadata)
    _version: int = 2

    def _init_quant(self, qconfig: QATConfig | None, name: str = "") -> None:
        if qconfig is None:
            qconfig = QATConfig()
        if not isinstance(qconfig, QATConfig):
            raise TypeError(f"qconfig must be a coset.nn.QATConfig, got {type(qconfig).__name__}")
        self.qconfig = qconfig
        self.quant_enabled = True
        dev = self.weight.device
        wq = None if qconfig.weight is None else HNLQWeightQuantizer(qconfig, self.weight.shape, dev, name=name)
        aq = None if qconfig.activation is None else HNLQActivationQuantizer(qconfig, self._feature_dim, dev, name=name)
        self.register_module("weight_quantizer", wq)
        self.register_module("activation_quantizer", aq)

    @property
    def k(self) -> int:
        """Length of a weight row: the dimension quantized in d-blocks."""
        return int(self.weight[0].numel())

    @property
    def pad(self) -> int:
        """Zeros appended to each weight row to reach a multiple of d (0 when no weight quantization)."""
        return 0 if self.weight_quantizer is None else self.weight_quantizer.pad

    # ------------------------------------------------------------------ weight code
    def _wq(self) -> HNLQWeightQuantizer:
        if self.weight_quantizer is None:
            raise ValueError("this layer does not quantize its weight (qconfig.weight is None)")
        return self.weight_quantizer

    def set_name(self, name: str) -> None:
        """The name the quantizers use in warnings (``quantize_model`` passes the qualified module name)."""
        for q in (self.weight_quantizer, self.activation_quantizer):
            if q is not None:
                q.name = name

    def requantize(self) -> None:
        """Quantize the current shadow weight now."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.requantize(self.weight)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels (C_out, nb, M, d) uint8, T (C_out, nb) uint8, betas float32)``: the codes an eval-mode
        forward uses (re-quantized first if the shadow weight changed since the last quantization)."""
        return self._wq().codes(self.weight)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The weight the eval forward uses (detached): decoded codes, or the float weight without weight quantization."""
        if self.weight_quantizer is None:
            return self.weight.detach()
        self.weight_quantizer.refresh(self.weight)
        qw = self.weight_quantizer.qweight
        assert qw is not None  # refresh() decodes it
        return qw.detach()  # an alias: while it is held, the next re-quantization leaves its memory alone

    def to_float(self, use_quantized: bool = False) -> nn.Module:
        """The float module (shadow weight shared, or a copy of the quantized weight); see the subclasses."""
        raise NotImplementedError

    def _use_lut(self) -> bool:
        return self.qconfig.use_lut and not self.training and self.weight_quantizer is not None

    def _qweight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def _qinput(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation_quantizer is None else self.activation_quantizer(x)

    @torch.compiler.disable
    def _lut_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W_hat.T`` via coset.lut for ``x2`` (..., k): no bias."""
        from coset.lut import lut_linear

        wq = self._wq()
        wq.refresh(self.weight)
        y = lut_linear(x2, wq.encoded_matrix(), backend=self.qconfig.backend)
        return y * wq.lut_scale().to(y.dtype)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """Weight statistics (:meth:`HNLQWeightQuantizer.stats`: blocks, overloaded and clamped blocks and their
        rates, steps) and activation statistics (:meth:`HNLQActivationQuantizer.stats`); nan when the layer does
        not quantize that tensor."""
        nan = float("nan")
        out: dict = {
            "weight_overload_rate": nan,
            "weight_clamp_rate": nan,
            "clamped_blocks": 0,
            "steps": 0,
            "act_overload_rate": nan,
            "act_clamp_rate": nan,
        }
        if self.weight_quantizer is not None:
            out.update(self.weight_quantizer.stats())
        if self.activation_quantizer is not None:
            out.update(self.activation_quantizer.stats())
        return out

    def bits_per_weight(self) -> float:
        """Nominal storage per weight: labels (padding included), T at full width and float32 betas."""
        return 32.0 if self.weight_quantizer is None else self.weight_quantizer.bits_per_weight()

    # ------------------------------------------------------------------ state_dict / moves
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.weight_quantizer is not None:  # saved before the quantizer: tell it whether its code is current
            self.weight_quantizer._current_at_save = self.weight_quantizer.is_current(self.weight)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for old, new in _V1_KEYS.items():  # version-1 layout: the code lived on the layer
            if prefix + old in state_dict:
                value = state_dict.pop(prefix + old)
                state_dict.setdefault(prefix + new, value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, *args, **kwargs):
        wq = self.weight_quantizer
        fresh = wq is not None and wq.is_current(self.weight)
        dtype = self.weight.dtype
        out = super()._apply(fn, *args, **kwargs)
        if fresh:  # moving/casting the module does not make its code stale
            wq.bind(self.weight)
        if wq is not None and self.weight.dtype != dtype:
            wq.qweight = None  # decoded again in the new dtype
        return out

    def extra_repr(self) -> str:
        c = self.qconfig
        w = "float" if c.weight is None else f"{c.weight.lattice_type} q={c.weight.q} M={c.weight.M}"
        a = "float" if c.activation is None else f"{c.activation.lattice_type} q={c.activation.q} M={c.activation.M}"
        return (
            f"{super().extra_repr()}, weight={w}, act={a}, granularity={c.granularity}, ste={c.ste}, "
            f"quantize_every={c.quantize_every}, use_lut={c.use_lut}"
        )
