"""``QuantLayerMixin``: the machinery shared by QLinear and QConv1d/QConv2d.

State of a quantized layer
--------------------------
* ``weight`` (and ``bias``): the float32 shadow parameters, trained as usual.
* persistent buffers ``w_labels`` (C_out, nb, M, d) uint8, ``w_T`` (C_out, nb) uint8 and ``w_beta``
  (C_out,) or (1,) float32: the HNLQ code of the weight as last quantized. They appear in ``state_dict``
  only once the layer has quantized its weight (so a never-run layer round-trips exactly), and a float
  checkpoint without them loads with ``strict=True`` (they are then recomputed on the next forward).
* ``act_beta`` (scalar float32, persistent when activations are quantized): running beta of the input;
  0 means "not yet observed" (then eval uses the batch's own beta).
* ``q_state`` (int64 [steps, current]): the training-step counter and whether the codes were computed from
  the current shadow weight (with ``quantize_every > 1`` they may be older), so a loaded layer resumes
  exactly: it re-quantizes when and only when the saved layer would have.
* ``qweight`` (non-persistent): the decoded weight, rebuilt from the codes when needed.

When is the weight re-quantized?
--------------------------------
Training mode: at the first forward and then every ``quantize_every`` training forward passes. Eval mode:
the cached codes are used as long as the shadow weight has not changed since they were computed (checked
with the tensor's version counter), so eval after training sees the final weights, and repeated eval calls
never re-quantize. Codes loaded by ``load_state_dict`` are used as they are.

Padding: when k (in_features, or in_channels/groups*kh*kw) is not a multiple of d, each row gets
``pad = nb d - k`` zeros before encoding; the zeros are part of the code (and of the bits reported) and are
stripped after decoding, so ``qweight`` always has the weight's shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import QATConfig
from coset.quant import encode

from .fake_quant import (
    activation_beta,
    decode_weight,
    quantize_weight,
    overload_radius,
    quantize_activation,
    weight_betas,
)
from .ste import block_grad_scale, ste

__all__ = ["QuantLayerMixin"]

_CODE_KEYS = ("w_labels", "w_T", "w_beta", "q_state")


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except Exception:  # inference tensors have no version counter
        return -1


class QuantLayerMixin:
    """Mixin for an ``nn.Module`` with ``weight``/``bias`` (see module docstring)."""

    qconfig: QATConfig
    #: dimension of the input that holds the features (-1 for Linear, 1 for convolutions)
    _feature_dim: int = -1

    # ------------------------------------------------------------------ setup
    def _init_quant(self, qconfig: Optional[QATConfig]) -> None:
        if qconfig is None:
            qconfig = QATConfig()
        if not isinstance(qconfig, QATConfig):
            raise TypeError(f"qconfig must be a coset.nn.QATConfig, got {type(qconfig).__name__}")
        self.qconfig = qconfig
        self.quant_enabled = True
        self._step = 0
        self._codes_valid = False
        self._pending = None
        self._cache_version = -2
        self._lut_cache = None
        self._w_overload_rate = float("nan")
        self._act_seen = 0
        self._act_overloaded = 0
        dev = self.weight.device
        C = self.weight.shape[0]
        cfg = qconfig.weight
        if cfg is not None:
            d, M = cfg.dim, cfg.M
            nb = -(-self.k // d)
            nbeta = C if qconfig.granularity == "per_channel" else 1
            self.register_buffer("w_labels", torch.zeros((C, nb, M, d), dtype=torch.uint8, device=dev))
            self.register_buffer("w_T", torch.zeros((C, nb), dtype=torch.uint8, device=dev))
            self.register_buffer("w_beta", torch.ones((nbeta,), dtype=torch.float32, device=dev))
            self.register_buffer("w_clamped", torch.zeros((C, nb), dtype=torch.bool, device=dev), persistent=False)
            self.register_buffer("q_state", torch.zeros((2,), dtype=torch.int64, device=dev))
        else:
            self.w_labels = self.w_T = self.w_beta = self.w_clamped = self.q_state = None
        self.register_buffer("qweight", None, persistent=False)
        if qconfig.activation is not None:
            self.register_buffer("act_beta", torch.zeros((), dtype=torch.float32, device=dev))
        else:
            self.act_beta = None

    @property
    def k(self) -> int:
        """Length of a weight row: the dimension quantized in d-blocks."""
        return int(self.weight[0].numel())

    @property
    def pad(self) -> int:
        """Zeros appended to each weight row to reach a multiple of d (0 when no weight quantization)."""
        cfg = self.qconfig.weight
        return 0 if cfg is None else (-self.k) % cfg.dim

    # ------------------------------------------------------------------ weight codes
    def _betas64(self) -> torch.Tensor:
        if self.qconfig.granularity == "fixed":
            return torch.tensor([self.qconfig.weight.effective_beta], dtype=torch.float64, device=self.weight.device)
        return self.w_beta.to(torch.float64)

    @torch.no_grad()
    def requantize(self) -> None:
        """Quantize the current shadow weight now (T, betas and the cached quantized weight).

        Uses the fused ``coset.quant.quantize``; the labels are encoded from the same scaled blocks only when
        something needs them (state_dict, checkpoint, LUT, :meth:`codes`), which gives the same labels and
        saves a decode per training step.
        """
        if self.qconfig.weight is None:
            return
        w2 = self.weight.detach().reshape(self.weight.shape[0], -1)
        betas = weight_betas(w2, self.qconfig)
        wq, T, clamped, pending = quantize_weight(w2, betas, self.qconfig, dtype=self.weight.dtype)
        self.qweight = wq.reshape(self.weight.shape)
        self._pending = pending
        self.w_T = T
        self.w_clamped = clamped
        self.w_beta = betas.to(torch.float32).reshape(self.w_beta.shape)
        self._codes_valid = True
        self._cache_version = _version(self.weight)
        self._w_overload_rate = float(((T > 0) | clamped).float().mean()) if T.numel() else 0.0
        self._lut_cache = None

    @torch.no_grad()
    def _ensure_labels(self) -> None:
        pending = self.__dict__.get("_pending")
        if pending is not None:
            u, cfg = pending
            labels, _ = encode(u, config=cfg, backend=self.qconfig.backend)
            self.w_labels = labels
            self._pending = None

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels (C_out, nb, M, d) uint8, T (C_out, nb) uint8, betas float32)``: the codes an eval-mode
        forward uses (re-quantized first if the shadow weight changed since the last quantization)."""
        if self.qconfig.weight is None:
            raise ValueError("this layer does not quantize its weight (qconfig.weight is None)")
        self._refresh_for_eval()
        self._ensure_labels()
        return self.w_labels, self.w_T, self.w_beta

    @torch.no_grad()
    def _decode_cache(self) -> None:
        self._ensure_labels()
        w = decode_weight(self.w_labels, self.w_T, self._betas64(), self.qconfig, self.k, dtype=self.weight.dtype)
        self.qweight = w.reshape(self.weight.shape)
        self._lut_cache = None

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (detached): decoded codes, or the float weight without weight quantization."""
        if self.qconfig.weight is None:
            return self.weight.detach()
        self._refresh_for_eval()
        return self.qweight

    def _refresh_for_eval(self) -> None:
        if not self._codes_valid or self._cache_version != _version(self.weight):
            self.requantize()
        elif self.qweight is None:
            self._decode_cache()

    def _effective_weight(self) -> torch.Tensor:
        cfg = self.qconfig.weight
        if cfg is None or not self.quant_enabled:
            return self.weight
        if self.training:
            if not self._codes_valid or self._step % self.qconfig.quantize_every == 0:
                self.requantize()
            elif self.qweight is None:
                self._decode_cache()
            self._step += 1
        else:
            self._refresh_for_eval()
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.qweight
        scale = None
        if self.qconfig.ste != "identity":
            from coset.quant import to_blocks

            C = self.weight.shape[0]
            blocks, pad = to_blocks(self.weight.detach().reshape(C, -1), cfg.dim)
            betas = self._betas64().to(blocks.dtype).reshape(-1, 1)
            scale = block_grad_scale(
                self.qconfig.ste, blocks, (self.w_T > 0) | self.w_clamped, betas * overload_radius(cfg), pad
            ).reshape(self.weight.shape)
        return ste(self.weight, self.qweight, scale)

    # ------------------------------------------------------------------ activations
    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.qconfig.activation is None or not self.quant_enabled:
            return x
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("input must be a floating torch.Tensor")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("input contains NaN or Inf; HNLQ cannot quantize non-finite activations")
        xa = x.movedim(self._feature_dim, -1) if self._feature_dim != -1 else x
        if self.training:
            beta = activation_beta(xa, self.qconfig)
            with torch.no_grad():
                if float(self.act_beta) > 0:
                    m = self.qconfig.act_momentum
                    self.act_beta.mul_(1 - m).add_(m * beta)
                else:
                    self.act_beta.fill_(beta)
        else:
            beta = float(self.act_beta) if float(self.act_beta) > 0 else activation_beta(xa, self.qconfig)
        xq, blocks, overloaded, pad = quantize_activation(xa, beta, self.qconfig)
        self._act_seen += overloaded.numel()
        self._act_overloaded += int(overloaded.sum())
        if torch.is_grad_enabled() and xa.requires_grad:
            scale = block_grad_scale(
                self.qconfig.ste, blocks, overloaded, beta * overload_radius(self.qconfig.activation), pad
            )
            xq = ste(xa, xq, scale)
        return xq.movedim(-1, self._feature_dim) if self._feature_dim != -1 else xq

    # ------------------------------------------------------------------ LUT
    def _encoded_matrix(self):
        """The weight codes as a :class:`coset.lut.EncodedMatrix` with beta 1 (betas applied by the caller)."""
        if self._lut_cache is None:
            from coset.lut import EncodedMatrix

            cfg = self.qconfig.weight
            unit = cfg if cfg.beta == 1.0 else cfg.replace(beta=1.0)
            self._ensure_labels()
            self._lut_cache = EncodedMatrix(labels=self.w_labels, T=self.w_T, config=unit, k=self.k)
        return self._lut_cache

    def _lut_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W_hat.T`` via coset.lut for ``x2`` (..., k): no bias."""
        from coset.lut import lut_linear

        self._refresh_for_eval()
        y = lut_linear(x2, self._encoded_matrix(), backend=self.qconfig.backend)
        return y * self._betas64().to(y.dtype)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """``weight_overload_rate`` (blocks with T > 0 or clamped at the last quantization) and
        ``act_overload_rate`` (over all quantized input blocks seen)."""
        return {
            "weight_overload_rate": self._w_overload_rate,
            "act_overload_rate": (self._act_overloaded / self._act_seen) if self._act_seen else float("nan"),
            "steps": self._step,
        }

    def bits_per_weight(self) -> float:
        """Nominal storage per weight: labels (padding included), T at full width and float32 betas."""
        cfg = self.qconfig.weight
        if cfg is None:
            return 32.0
        C, nb = self.weight.shape[0], -(-self.k // cfg.dim)
        t_bits = max(cfg.max_scaling_iterations, 1).bit_length()
        n_beta = C if self.qconfig.granularity == "per_channel" else 1
        bits = C * nb * (cfg.M * cfg.dim * cfg.bits_per_label + t_bits) + 32 * n_beta
        return bits / self.weight.numel()

    # ------------------------------------------------------------------ state_dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.qconfig.weight is not None and self._codes_valid:
            self._ensure_labels()
        if self.q_state is not None:  # [training steps, codes current with the shadow weight]
            current = self._codes_valid and self._cache_version == _version(self.weight)
            self.q_state.copy_(torch.tensor([self._step, int(current)], dtype=torch.int64))
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qconfig.weight is not None and not self._codes_valid:
            for key in _CODE_KEYS:
                destination.pop(prefix + key, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._pending = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        optional = _CODE_KEYS + ("act_beta",)
        for key in optional:
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        if self.qconfig.weight is None:
            return
        present = [prefix + key in state_dict for key in _CODE_KEYS]
        if all(present):
            step, current = (int(v) for v in self.q_state.tolist())
            self._codes_valid = True
            self._cache_version = _version(self.weight) if current else -1
            self.w_clamped = torch.zeros_like(self.w_T, dtype=torch.bool)
            self.qweight = None
            self._lut_cache = None
            self._step = step
        elif any(present):
            error_msgs.append(f"{prefix}: incomplete weight codes (need all of {list(_CODE_KEYS)} or none)")
        else:
            self._codes_valid = False
            self.qweight = None
            self._lut_cache = None

    def _apply(self, fn, *args, **kwargs):
        if self.qconfig.weight is not None and self._codes_valid:
            self._ensure_labels()
        fresh = self._codes_valid and self._cache_version == _version(self.weight)
        dtype = self.weight.dtype
        out = super()._apply(fn, *args, **kwargs)
        self._lut_cache = None
        if fresh:  # moving/casting the module does not make its codes stale
            self._cache_version = _version(self.weight)
        if self.weight.dtype != dtype:
            self.qweight = None  # rebuilt from the codes in the new dtype
        return out

    def extra_repr(self) -> str:
        c = self.qconfig
        w = "float" if c.weight is None else f"{c.weight.lattice_type} q={c.weight.q} M={c.weight.M}"
        a = "float" if c.activation is None else f"{c.activation.lattice_type} q={c.activation.q} M={c.activation.M}"
        return (f"{super().extra_repr()}, weight={w}, act={a}, granularity={c.granularity}, ste={c.ste}, "
                f"quantize_every={c.quantize_every}, use_lut={c.use_lut}")
