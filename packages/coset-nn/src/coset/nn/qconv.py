"""``QConv1d`` / ``QConv2d``: drop-in convolutions that train through HNLQ-quantized weights (and inputs).

The weight ``(C_out, C_in/groups, *kernel)`` is quantized in d-blocks along its flattened
``C_in/groups * prod(kernel)`` dimension (the im2col row), zero-padded at the end of each row. Input
activations, when quantized, are blocked along the channel dimension at every position (channels
zero-padded to a multiple of d).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import QATConfig
from .layer import QuantLayerMixin

__all__ = ["QConv1d", "QConv2d"]

if TYPE_CHECKING:  # the mixin always sits on a convolution
    from torch.nn.modules.conv import _ConvNd as _ConvBase
else:
    _ConvBase = object


def _meta_conv_args(m: Any) -> dict[str, Any]:
    """Constructor arguments of a convolution like ``m`` (float or quantized), on the meta device."""
    return dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device="meta",
        dtype=m.weight.dtype,
    )


class _QConvMixin(QuantLayerMixin, _ConvBase):
    _feature_dim = 1
    _float_cls: type = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Any = "zeros",
        device=None,
        dtype=None,
        qconfig: QATConfig | None = None,
    ) -> None:
        cast(Any, self._float_cls).__init__(  # the torch convolution this class quantizes
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_quant(qconfig)
        self._check_lut_ok()

    def _check_lut_ok(self) -> None:
        if self.qconfig.use_lut and (self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str)):
            raise ValueError("use_lut=True for convolutions needs groups=1, padding_mode='zeros' and numeric padding")

    @classmethod
    def from_float(cls, mod: Any, qconfig: QATConfig | None = None) -> Any:
        """A quantized convolution sharing ``mod``'s weight and bias Parameters."""
        if type(mod) is not cls._float_cls and not (
            isinstance(mod, cls._float_cls) and not isinstance(mod, QuantLayerMixin)
        ):
            raise TypeError(f"mod must be an nn.{cls._float_cls.__name__}, got {type(mod).__name__}")
        m: Any = mod  # a torch convolution (checked above)
        q = cls(**_meta_conv_args(m), qconfig=qconfig)
        q.weight = m.weight
        q.bias = m.bias
        q._init_quant(q.qconfig)
        q.train(m.training)
        return q

    def to_float(self, use_quantized: bool = False):
        """The float convolution with the shadow weight (shared) or a copy of the quantized weight."""
        conv = self._float_cls(**_meta_conv_args(self))
        if use_quantized and self.qconfig.weight is not None:
            conv.weight = nn.Parameter(self.quantized_weight().clone())
        else:
            conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        nd = len(self.kernel_size)
        if input.ndim not in (nd + 1, nd + 2) or input.shape[-nd - 1] != self.in_channels:
            raise ValueError(
                f"input must have shape (N, {self.in_channels}, ...) with {nd} spatial dims, got {tuple(input.shape)}"
            )
        if not self.quant_enabled or not self.qconfig.enabled:
            return self._conv_forward(input, self.weight, self.bias)
        batched = input.ndim == nd + 2
        x = self._qinput(input if batched else input.unsqueeze(0))  # features on dim 1
        x = x if batched else x.squeeze(0)
        if self._use_lut():
            return self._lut_conv(x)
        return self._conv_forward(x, self._qweight(), self.bias)

    def _lut_conv(self, x):
        """im2col + :func:`coset.lut.lut_linear`: the unfolded rows have the weight rows' (C_in, *kernel) order."""
        batched = x.ndim == len(self.kernel_size) + 2
        x4 = x if batched else x.unsqueeze(0)
        one_d = len(self.kernel_size) == 1
        if one_d:
            x4 = x4.unsqueeze(2)
            ks, st, pd, dl = (1, *self.kernel_size), (1, *self.stride), (0, *self.padding), (1, *self.dilation)
        else:
            ks, st, pd, dl = self.kernel_size, self.stride, self.padding, self.dilation
        N, _, H, W = x4.shape
        cols = F.unfold(x4, ks, dilation=dl, padding=pd, stride=st)  # (N, C*kh*kw, L)
        Ho = (H + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
        Wo = (W + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
        y = self._lut_matmul(cols.transpose(1, 2))  # (N, L, C_out)
        if self.bias is not None:
            y = y + self.bias
        y = y.transpose(1, 2).reshape(N, self.out_channels, Ho, Wo)
        if one_d:
            y = y.squeeze(2)
        return y if batched else y.squeeze(0)


class QConv2d(_QConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with an FP32 shadow weight quantized by HNLQ (see module docstring).

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
    dtype : as for ``nn.Conv2d``
    qconfig : QATConfig, optional

    Shapes
    ------
    input (N, C_in, H, W) or (C_in, H, W) -> output (N, C_out, H_out, W_out) as ``nn.Conv2d``.
    """

    _float_cls = nn.Conv2d


class QConv1d(_QConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with an FP32 shadow weight quantized by HNLQ (see module docstring).

    Shapes
    ------
    input (N, C_in, L) or (C_in, L) -> output (N, C_out, L_out) as ``nn.Conv1d``.
    """

    _float_cls = nn.Conv1d
