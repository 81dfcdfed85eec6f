"""``QLinear``: a drop-in ``nn.Linear`` that trains through HNLQ-quantized weights (and inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QATConfig
from .layer import QuantLayerMixin

__all__ = ["QLinear"]


class QLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with an FP32 shadow weight quantized by HNLQ in d-blocks along ``in_features``.

    Parameters
    ----------
    in_features, out_features, bias, device, dtype : as for ``nn.Linear``
    qconfig : QATConfig, optional (default ``QATConfig()``: D4 q=4 M=2 weights, per-channel beta,
        identity STE, float activations)

    Shapes
    ------
    input (..., in_features) -> output (..., out_features).

    The forward computes ``F.linear(Q(x), W_hat, bias)`` where ``W_hat`` is the decoded weight (straight-
    through gradient to ``weight``) and ``Q(x)`` the fake-quantized input when ``qconfig.activation`` is set.
    With ``qconfig.use_lut`` the eval-mode product is computed by :func:`coset.lut.lut_linear` from the labels.
    See :mod:`coset.nn.layer` for caching, padding and state_dict behaviour.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        qconfig: QATConfig | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.Linear, qconfig: QATConfig | None = None) -> QLinear:
        """A QLinear sharing ``mod``'s weight and bias Parameters (same device and dtype)."""
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"mod must be an nn.Linear, got {type(mod).__name__}")
        q = cls(
            mod.in_features,
            mod.out_features,
            bias=mod.bias is not None,
            device="meta",
            dtype=mod.weight.dtype,
            qconfig=qconfig,
        )
        q.weight = mod.weight
        q.bias = mod.bias
        q._init_quant(q.qconfig)  # quantizer buffers on the weight's device
        q.train(mod.training)
        return q

    def to_float(self, use_quantized: bool = False) -> nn.Linear:
        """An ``nn.Linear`` with the shadow weight (shared Parameter) or, with ``use_quantized``, a copy of
        the quantized weight (then it reproduces this layer's weight-only quantized eval forward)."""
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=self.weight.dtype
        )
        if use_quantized and self.qconfig.weight is not None:
            lin.weight = nn.Parameter(self.quantized_weight().clone())
        else:
            lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(f"input must have last dimension in_features={self.in_features}, got {tuple(input.shape)}")
        if not self.quant_enabled or not self.qconfig.enabled:
            return F.linear(input, self.weight, self.bias)
        x = self._qinput(input)
        if self._use_lut():
            y = self._lut_matmul(x)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self._qweight(), self.bias)
