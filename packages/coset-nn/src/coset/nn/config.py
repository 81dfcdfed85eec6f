"""``QATConfig``: the frozen, validated per-layer configuration of quantization-aware training.

A layer quantizes its weight (and optionally its input activation) in blocks of d = lattice dimension
along the input dimension (for convolutions: along the flattened ``in_channels/groups * kh * kw``
dimension). The HNLQ parameters come from :class:`coset.quant.QuantizationConfig`; this object adds what
a layer needs on top: how beta is chosen, which straight-through estimator is used, how often the weight is
re-quantized during training and whether inference goes through the LUT path of :mod:`coset.lut`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from coset.lattice.validate import check_bool, check_int, check_pos
from coset.quant import QuantizationConfig

__all__ = ["QATConfig", "STE_MODES", "GRANULARITIES"]

#: straight-through estimator variants (see :mod:`coset.nn.ste`)
STE_MODES = ("identity", "clipped", "smooth")
#: how the weight's beta is chosen
GRANULARITIES = ("per_channel", "per_tensor", "fixed")


def _check_qconfig(name: str, v) -> None:
    if v is not None and not isinstance(v, QuantizationConfig):
        raise TypeError(f"{name} must be a coset.quant.QuantizationConfig or None, got {type(v).__name__}")


@dataclass(frozen=True)
class QATConfig:
    """Per-layer quantization-aware-training configuration (frozen; validated on construction).

    Parameters
    ----------
    weight : QuantizationConfig or None
        HNLQ parameters of the weight; ``None`` leaves the weight in float (default: D4, q=4, M=2).
    activation : QuantizationConfig or None
        HNLQ parameters of the layer's input; ``None`` (default) leaves activations in float.
    granularity : {"per_channel", "per_tensor", "fixed"}
        How the weight's beta is chosen at each re-quantization. "per_channel": one beta per output
        channel, ``beta_c = beta_scale * beta_min(weight, rms(W[c]))``; "per_tensor": one beta from the
        rms of the whole weight; "fixed": ``weight.beta`` as given (then the quantized weight is exactly
        ``coset.quant.quantize(W blocks, config=weight)``). ``weight.beta`` is used only by "fixed": with the
        other granularities a ``weight.beta`` other than 1.0 raises ``ValueError`` (it would be ignored), and
        ``activation.beta`` must stay 1.0 (the activation beta is always estimated from the input).
    beta_scale : float
        Multiplier of :func:`coset.quant.beta_min` for the automatic betas (1.25 puts D4 q=4 M=2 at
        beta ~ 0.19 sigma: Gaussian MSE 0.0076 sigma^2 with ~25 % of the blocks on T > 0; the MSE optimum,
        0.0070 at ~0.12 sigma, has 70 % of the blocks on T > 0, i.e. more side information).
    act_beta_scale : float
        The same multiplier for activations (per-tensor, from the rms of the batch).
    act_momentum : float in (0, 1]
        Momentum of the running activation beta used in eval mode.
    ste : {"identity", "clipped", "smooth"}
        Straight-through estimator: "identity" passes the gradient unchanged; "clipped" zeroes the
        gradient of every overloaded block (T > 0 or clamped); "smooth" multiplies a block's gradient by
        ``1 / (1 + (||w_blk|| / r)^8)`` with ``r = beta q^M rho`` (rho = packing radius), the radius where
        half of the blocks overload, so gradients fade smoothly past the overload boundary.
    quantize_every : int >= 1
        In training, re-quantize the weight every N training forward passes and reuse the cached
        quantized weight in between (the gradient still reaches the current shadow weight).
    use_lut : bool
        In eval mode, compute ``x @ W_hat.T`` with :func:`coset.lut.lut_linear` straight from the labels
        (needs ``weight.with_dither=False``; convolutions use im2col and need ``groups=1`` and zero padding).
    backend : str
        Kernel backend passed to coset.quant / coset.lut ("auto", "torch" or a registered name).
    """

    weight: QuantizationConfig | None = field(default_factory=QuantizationConfig)
    activation: QuantizationConfig | None = None
    granularity: str = "per_channel"
    beta_scale: float = 1.25
    act_beta_scale: float = 1.25
    act_momentum: float = 0.1
    ste: str = "identity"
    quantize_every: int = 1
    use_lut: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_qconfig("weight", self.weight)
        _check_qconfig("activation", self.activation)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        check_pos("beta_scale", self.beta_scale)
        check_pos("act_beta_scale", self.act_beta_scale)
        check_pos("act_momentum", self.act_momentum)
        if self.act_momentum > 1:
            raise ValueError(f"act_momentum must be in (0, 1], got {self.act_momentum!r}")
        if self.ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, got {self.ste!r}")
        check_int("quantize_every", self.quantize_every, 1)
        check_bool("use_lut", self.use_lut)
        if self.use_lut:
            if self.weight is None:
                raise ValueError("use_lut=True needs a weight config (weight is None)")
            if self.weight.with_dither:
                raise ValueError("use_lut=True needs weight.with_dither=False (LUT products assume no dither)")
        # the code/scale seam: a beta the layer would ignore is refused, never silently dropped
        if self.weight is not None and self.granularity != "fixed" and self.weight.beta != 1.0:
            raise ValueError(
                f"weight.beta={self.weight.beta!r} would be ignored: with granularity={self.granularity!r} the betas "
                "come from the weight's rms (times beta_scale). Use granularity='fixed' to quantize with "
                "weight.beta, or leave weight.beta at 1.0"
            )
        if self.activation is not None and self.activation.beta != 1.0:
            raise ValueError(
                f"activation.beta={self.activation.beta!r} would be ignored: the activation beta is a running "
                "estimate from the input's rms (times act_beta_scale); leave activation.beta at 1.0"
            )
        if not isinstance(self.backend, str) or not self.backend:
            raise TypeError(f"backend must be a non-empty str, got {self.backend!r}")

    @property
    def enabled(self) -> bool:
        """True when weights or activations are quantized."""
        return self.weight is not None or self.activation is not None

    def replace(self, **changes) -> QATConfig:
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested QuantizationConfigs become dicts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QATConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QATConfig fields: {sorted(unknown)}")
        kw = dict(d)
        for key in ("weight", "activation"):
            v = kw.get(key)
            if v is None:
                continue
            if not isinstance(v, dict):
                raise TypeError(f"{key} must be a dict of QuantizationConfig fields or None, got {type(v).__name__}")
            known_q = {f.name for f in fields(QuantizationConfig)}
            bad = set(v) - known_q
            if bad:
                raise ValueError(f"unknown {key} (QuantizationConfig) fields: {sorted(bad)}")
            kw[key] = QuantizationConfig(**v)
        return cls(**kw)
