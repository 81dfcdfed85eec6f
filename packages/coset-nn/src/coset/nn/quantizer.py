"""The two quantizer submodules of a QAT layer (torchao ``FakeQuantizedLinear`` style).

* :class:`HNLQWeightQuantizer` owns the HNLQ code of one weight: labels, T, betas, the clamp mask, the step
  counter and the staleness logic (``quantize_every``, re-quantize in eval only when the shadow weight
  changed). Its forward maps the float shadow weight to the quantized weight with a straight-through gradient.
* :class:`HNLQActivationQuantizer` owns the running activation beta and fake-quantizes a layer's input.

State (``state_dict`` keys under ``weight_quantizer.`` / ``activation_quantizer.``)
--------------------------------------------------------------------------------
* ``labels`` (C_out, nb, M, d) uint8, ``T`` (C_out, nb) uint8, ``beta`` (C_out,) or (1,) float32, ``clamped``
  (C_out, nb) bool: the code of the weight as last quantized. They appear only once the weight has been
  quantized (a never-run layer round-trips exactly, and a float checkpoint without them loads with
  ``strict=True``; they are then computed at the next forward).
* ``q_state`` int64 ``[training steps, codes current with the shadow weight]``, so a loaded layer re-quantizes
  when and only when the saved layer would have.
* ``code`` uint8: the UTF-8 JSON of the code the labels belong to (lattice, q, M, alpha, cap, tie rule,
  dither, centring; beta too with ``granularity="fixed"``; the beta granularity). Loading labels made with
  another code raises ``ValueError`` naming the differing fields, instead of decoding them with the wrong code.
* ``activation_quantizer.beta`` scalar float32: running beta of the input; 0 = not yet observed.

When is the weight re-quantized?
--------------------------------
Training mode: at the first forward and then every ``quantize_every`` training forward passes. Eval mode: the
codes are used as long as the shadow weight has not changed since they were computed (checked with the
tensor's version counter). Codes from ``load_state_dict`` / :meth:`HNLQWeightQuantizer.load_codes` are used as
they are: they are bound to the shadow weight at the next forward.

Clamps
------
A block still overloaded at the largest scale step is clamped (data loss). Every quantization that clamps
warns once per quantizer (:class:`ClampWarning`, naming the layer and the count) and ``stats()`` reports
clamped blocks separately from blocks with ``T > 0``; the mask persists in the state.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import torch
from torch import nn

from coset.lattice.validate import check_int
from coset.quant import ClampWarning, QuantizationConfig, RowQuantizer, to_blocks

from .config import QATConfig
from .fake_quant import (
    _layer_warns,
    act_rows,
    decode_weight,
    encode_weight,
    fake_quantize_activation,
    labels_from_quantized,
    labels_need_weight,
    overload_radius,
    quantize_weight,
    weight_rows,
)
from .ste import block_grad_scale, ste

__all__ = ["HNLQWeightQuantizer", "HNLQActivationQuantizer", "ClampWarning", "code_identity"]

_CODE_KEYS = ("labels", "T", "beta", "q_state")  # required together; "clamped" and "code" are optional
_ALL_KEYS = _CODE_KEYS + ("clamped", "code")
_CODE_FIELDS = (
    "lattice_type",
    "q",
    "M",
    "alpha",
    "max_scaling_iterations",
    "with_tie_dither",
    "with_dither",
    "dither_seed",
    "disable_scaling",
    "center",
)


def _storage_uses(tensors) -> tuple[int, ...]:
    """How many tensors (and storage handles) reference each tensor's memory."""
    return tuple(torch._C._storage_Use_Count(t.untyped_storage()._cdata) for t in tensors)


# a private torch function: without it the outputs are never reused (always correct, slower)
_CAN_REUSE = hasattr(torch._C, "_storage_Use_Count")


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except Exception:  # inference tensors have no version counter
        return -1


def _weight_config(qconfig: QATConfig) -> QuantizationConfig:
    if qconfig.weight is None:
        raise ValueError("this quantizer needs a QATConfig with a weight config (qconfig.weight is None)")
    return qconfig.weight


def code_identity(qconfig: QATConfig) -> dict:
    """What the stored labels of a weight depend on: the code fields of ``qconfig.weight``, the beta when it is
    fixed, and the beta granularity. Two layers can exchange codes iff these dicts are equal."""
    cfg = _weight_config(qconfig)
    ident = {f: getattr(cfg, f) for f in _CODE_FIELDS}
    ident["lattice_type"] = cfg.lattice_type.strip().upper()
    ident["granularity"] = qconfig.granularity
    if qconfig.granularity == "fixed":
        ident["beta"] = cfg.beta
    return ident


def _ident_tensor(ident: dict, device) -> torch.Tensor:
    raw = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return torch.tensor(list(raw), dtype=torch.uint8, device=device)


class HNLQWeightQuantizer(nn.Module):
    """Owns the HNLQ code of one ``(C_out, ...)`` weight (see the module docstring).

    Parameters
    ----------
    qconfig : QATConfig with ``weight`` set
    weight_shape : shape of the weight; rows are ``weight[c].flatten()`` (k values), split in d-blocks
    device : device of the buffers
    name : layer name used in warnings and errors (``quantize_model`` sets the qualified module name)

    Forward: ``weight -> W_hat`` (the decoded weight, of the weight's shape and dtype; gradient to ``weight``
    through the configured straight-through estimator).
    """

    labels: torch.Tensor
    T: torch.Tensor
    beta: torch.Tensor
    clamped: torch.Tensor
    q_state: torch.Tensor
    qweight: torch.Tensor | None

    def __init__(self, qconfig: QATConfig, weight_shape, device=None, name: str = "") -> None:
        super().__init__()
        if not isinstance(qconfig, QATConfig) or qconfig.weight is None:
            raise ValueError("HNLQWeightQuantizer needs a QATConfig with a weight config")
        self.qconfig = qconfig
        self.cfg: QuantizationConfig = qconfig.weight  # the weight's HNLQ config
        self.name = name
        cfg = self.cfg
        shape = tuple(int(s) for s in weight_shape)
        self.weight_shape = shape
        self.k = math.prod(shape[1:])
        C, d, M = shape[0], cfg.dim, cfg.M
        nb = -(-self.k // d)
        nbeta = C if qconfig.granularity == "per_channel" else 1
        self.register_buffer("labels", torch.zeros((C, nb, M, d), dtype=torch.uint8, device=device))
        self.register_buffer("T", torch.zeros((C, nb), dtype=torch.uint8, device=device))
        self.register_buffer("beta", torch.ones((nbeta,), dtype=torch.float32, device=device))
        self.register_buffer("clamped", torch.zeros((C, nb), dtype=torch.bool, device=device))
        self.register_buffer("q_state", torch.zeros((2,), dtype=torch.int64, device=device))
        self.register_buffer("qweight", None, persistent=False)
        self._identity = code_identity(qconfig)
        self._step = 0
        self._valid = False  # labels/T/beta hold a code
        self._key: int | None = None  # weight version the code is current for; None: bind at next use
        self._stale = False  # loaded codes marked as older than the weight: re-quantize at the next use
        self._pending = None  # (source, betas, quantized): labels are derived lazily (quantize_weight)
        self._snapshot: torch.Tensor | None = None  # the snapshot buffer, reused across re-quantizations
        self._outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see _reusable_outputs
        self._out_uses: tuple[int, ...] | None = None
        self._lut_cache = None
        self._warned = False
        self._quantizations = 0
        self._clamp_total = 0

    # ------------------------------------------------------------------ geometry
    @property
    def pad(self) -> int:
        """Zeros appended to each row to reach a multiple of d."""
        return (-self.k) % self.cfg.dim

    def bits_per_weight(self) -> float:
        """Nominal storage per weight: labels (padding included), T at full width and float32 betas."""
        cfg = self.cfg
        C, nb = self.T.shape
        t_bits = max(cfg.max_scaling_iterations, 1).bit_length()
        bits = C * nb * (cfg.M * cfg.dim * cfg.bits_per_label + t_bits) + 32 * self.beta.numel()
        return bits / (C * self.k)

    # ------------------------------------------------------------------ staleness
    def is_current(self, weight: torch.Tensor) -> bool:
        """True when the stored code was computed from (or loaded for) the weight's present value."""
        if not self._valid or self._stale:
            return False
        return self._key is None or self._key == _version(weight)

    def bind(self, weight: torch.Tensor) -> None:
        """Declare the stored code current for the weight's present value (after moving/casting it)."""
        if self._valid:
            self._key = _version(weight)
            self._stale = False

    def _betas64(self) -> torch.Tensor:
        if self.qconfig.granularity == "fixed":
            return torch.tensor([self.cfg.effective_beta], dtype=torch.float64, device=self.T.device)
        return self.beta.to(torch.float64)

    # ------------------------------------------------------------------ quantization
    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` now (T, betas, clamp mask and the cached quantized weight; labels lazily)."""
        self._check_weight(weight)
        w2 = weight.detach().reshape(weight.shape[0], -1)
        snap = None  # a copy of the weight for the labels, only where they do not follow from the result
        if labels_need_weight(self.qconfig, weight.dtype):
            snap = self.__dict__.get("_snapshot")  # reused: a fresh 4 MB tensor per step costs page faults
            if snap is None or snap.shape != w2.shape or snap.dtype != w2.dtype or snap.device != w2.device:
                snap = self._snapshot = torch.empty_like(w2)
        outs = self._reusable_outputs(w2)
        # the outputs still hold the last results (nothing wrote into them: version counters unchanged), so the
        # kernel may keep the blocks whose point did not move (coset.quant.quantize_rows's previous_betas)
        prev = self.__dict__.get("_row_betas") if outs is not None else None
        if prev is not None and outs is not None:
            versions = tuple(_version(t) for t in outs)  # (-1: an inference tensor, which has no counter)
            if -1 in versions or versions != self.__dict__.get("_out_versions"):
                prev = None
        try:
            # the automatic betas are computed in the quantizer's native call (coset.quant.RmsBetas)
            wq, T, clamped, pending, (_, n) = quantize_weight(
                w2,
                None,
                self.qconfig,
                dtype=weight.dtype,
                snapshot=snap,
                out=outs,
                previous_betas=prev,
                workspace=self._workspace(w2),
                return_counts=True,  # (the clamp count from the kernel: no scan of the mask every step)
                rows=self._rows(w2),
            )
        except Exception:
            if outs is not None:  # the stored code was being overwritten: gone, re-quantize at the next use
                self._valid, self.qweight, self._pending, self._outs = False, None, None, None
            self.__dict__["_row_betas"] = None
            raise
        # straight into the buffer and attribute dicts: nn.Module.__setattr__ costs ~10 us a call, and this runs
        # every training step (the buffers keep their names, dtypes and devices)
        buffers = self._buffers
        buffers["qweight"] = wq if wq.shape == weight.shape else wq.reshape(weight.shape)
        buffers["T"], buffers["clamped"] = T, clamped
        beta = pending[1].to(torch.float32)
        buffers["beta"] = beta if beta.shape == self.beta.shape else beta.reshape(self.beta.shape)
        self.__dict__.update(
            _pending=pending,
            _valid=True,
            _stale=False,
            _key=_version(weight),
            _lut_cache=None,
            _quantizations=self._quantizations + 1,
        )
        self._remember_outputs(wq, beta, w2.shape[0], same=prev is not None)
        if n:
            self._clamp_total += n
            self._warn_clamp(n)

    # The fused quantizer's outputs (quantized weight, T, clamped) are written into the previous step's tensors
    # when nothing but this quantizer references their memory any more: a fresh 4 MB output per training step
    # costs page faults (perf: ~1 ms a step on a loaded machine, little on an idle one). An autograd graph that
    # saved the quantized weight, a view, a ``detach()``ed alias or a state_dict entry keeps a reference to the storage,
    # which the count sees: then new tensors are allocated, as before. (A Python name bound to the buffer
    # attributes themselves sees them updated in place, as with BatchNorm's running statistics.)
    def _reusable_outputs(self, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        outs, uses = self.__dict__.get("_outs"), self.__dict__.get("_out_uses")
        if outs is None or uses is None or not _CAN_REUSE:
            return None
        o, T, clamped = outs
        if T is not self.T or clamped is not self.clamped or o.shape != w2.shape or o.device != w2.device:
            return None
        return outs if _storage_uses(outs) == uses else None

    def _rows(self, w2: torch.Tensor) -> RowQuantizer | None:
        """The prepared row quantizer of this weight (automatic betas; float32 / float64 weights), made once: the
        checks and the backend's constants of quantize_rows cost ~0.2 ms a call on a training step's cold caches."""
        if self.qconfig.granularity == "fixed" or w2.dtype not in (torch.float32, torch.float64):
            return None
        shape = (int(w2.shape[0]), int(w2.shape[1]))
        key = (shape, w2.dtype, w2.device)
        rq = self.__dict__.get("_rq")
        if rq is None or rq[0] != key:
            rq = self.__dict__["_rq"] = (key, weight_rows(shape, w2.dtype, w2.device, self.qconfig))
        return rq[1]

    def _workspace(self, w2: torch.Tensor) -> torch.Tensor | None:
        """The hint's int8 scratch (coset.quant.quantize_rows's workspace), private to this quantizer; none for a
        backend that ignores the hint."""
        if not _CAN_REUSE or w2.dtype != torch.float32 or w2.device.type != "cpu":
            return None
        rows = self._rows(w2)
        if rows is None or not rows.takes_previous_betas:
            return None
        d = self.cfg.dim
        n = w2.shape[0] * -(-w2.shape[1] // d) * d
        ws = self.__dict__.get("_ws")
        if ws is None or ws.numel() != n:
            ws = self.__dict__["_ws"] = torch.empty(n, dtype=torch.int8)
        return ws

    def _remember_outputs(self, wq: torch.Tensor, beta: torch.Tensor, rows: int, same: bool = False) -> None:
        """Keep the outputs for reuse and the hint. ``same``: the call wrote into the kept outputs, found unchanged
        (use counts and versions as remembered); a kernel writing through pointers leaves the versions as they were,
        and then the use counts need no new count either."""
        d = self.__dict__
        outs = None
        if _CAN_REUSE and wq.dtype == torch.float32:  # the kernel's own float32 output (not a cast of it)
            outs = (wq, self.T, self.clamped)
        # the per-row betas of these results, for the next call's hint (float32, as the kernel used them)
        row_betas = None
        if outs is not None and beta.numel() == rows and beta.dim() == 1:
            row_betas = beta
        elif outs is not None and beta.numel() in (1, rows):
            row_betas = beta.reshape(-1).expand(rows).contiguous()
        kept = d.get("_outs")
        versions = None if outs is None else tuple(_version(t) for t in outs)
        if (
            same
            and outs is not None
            and kept is not None
            and all(a is b for a, b in zip(outs, kept, strict=True))
            and versions == d.get("_out_versions")
        ):
            d["_row_betas"] = row_betas
            return
        # (into __dict__: nn.Module.__setattr__ costs microseconds a call, and this runs every training step)
        d.update(
            _outs=outs,
            _out_uses=None if outs is None else _storage_uses(outs),
            _out_versions=versions,
            _row_betas=row_betas,
        )

    def __getstate__(self):
        state = dict(self.__dict__)  # a copy (deepcopy, pickle) starts without reusable outputs
        state["_outs"] = state["_out_uses"] = state["_out_versions"] = state["_row_betas"] = state["_ws"] = None
        state.pop("_rq", None)  # (made again at the next quantization)
        return state

    def _warn_clamp(self, n: int) -> None:
        if self._warned:
            return
        self._warned = True
        cfg = self.cfg
        warnings.warn(
            f"layer {self.name or '<unnamed>'}: {n} of {self.T.numel()} weight blocks were clamped (still "
            f"overloaded at the largest scale step T={cfg.max_scaling_iterations}, so their large weights lost "
            "magnitude); raise weight.max_scaling_iterations or weight.alpha, or beta_scale "
            "(warned once per layer; see stats()['clamped_blocks'])",
            ClampWarning,
            stacklevel=3,
        )

    def _check_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight must have shape {self.weight_shape}, got {tuple(weight.shape)}")

    @torch.no_grad()
    def _ensure_labels(self) -> None:
        pending = self.__dict__.get("_pending")
        if pending is not None:
            source, betas, quantized = pending
            with _layer_warns():  # the clamps were counted (and warned) when T was computed
                if quantized:
                    labels = labels_from_quantized(source, self.T, betas, self.qconfig)
                else:
                    labels, _, _ = encode_weight(source, betas, self.qconfig)
            self.labels = labels
            self._pending = None

    @torch.no_grad()
    def _decode_cache(self, dtype: torch.dtype) -> None:
        self.qweight = self.dequantize(dtype).reshape(self.weight_shape)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored code decoded to a ``weight_shape`` tensor of ``dtype`` (no re-quantization)."""
        if not self._valid:
            raise ValueError(f"layer {self.name or '<unnamed>'}: no weight code yet (run a forward or load_codes)")
        self._ensure_labels()
        w = decode_weight(self.labels, self.T, self._betas64(), self.qconfig, self.k, dtype=dtype)
        return w.reshape(self.weight_shape)

    def refresh(self, weight: torch.Tensor) -> None:
        """Bring the code up to date for an eval-mode use: re-quantize if the weight changed, else decode."""
        if not self.is_current(weight):
            self.requantize(weight)
        else:
            if self._key is None:
                self._key = _version(weight)
            if self.qweight is None or self.qweight.dtype != weight.dtype:
                self._decode_cache(weight.dtype)

    def codes(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels (C_out, nb, M, d) uint8, T (C_out, nb) uint8, betas float32)``.

        With ``weight``, the code is first brought up to date as an eval-mode forward would do; without it,
        the stored code is returned as is (``ValueError`` if there is none).
        """
        if weight is not None:
            self.refresh(weight)
        elif not self._valid:
            raise ValueError(f"layer {self.name or '<unnamed>'}: no weight code yet (pass the weight)")
        self._ensure_labels()
        return self.labels, self.T.detach(), self.beta  # an alias: keeps the next re-quantization off T's memory

    @torch.no_grad()
    def load_codes(
        self,
        labels: torch.Tensor,
        T: torch.Tensor,
        betas: torch.Tensor | None = None,
        *,
        clamped: torch.Tensor | None = None,
        steps: int = 0,
    ) -> None:
        """Use the given code as the weight's code (bound to the shadow weight at the next forward).

        Parameters
        ----------
        labels : (C_out, nb, M, d) uint8 in [0, q)
        T : (C_out, nb) uint8 in [0, max_scaling_iterations]
        betas : (C_out,) (per_channel) or (1,) (per_tensor) finite positive floats; ignored (may be None) with
            ``granularity="fixed"``
        clamped : (C_out, nb) bool or None (no clamps)
        steps : training-step counter to resume from

        Raises
        ------
        TypeError / ValueError naming the argument for a wrong type, dtype, shape or value.
        """
        dev = self.T.device
        want = {"labels": (self.labels.shape, torch.uint8), "T": (self.T.shape, torch.uint8)}
        for arg, val in (("labels", labels), ("T", T)):
            shp, dt = want[arg]
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"{arg} must be a torch.Tensor, got {type(val).__name__}")
            if val.dtype != dt or tuple(val.shape) != tuple(shp):
                raise ValueError(
                    f"{arg} must be a {dt} tensor of shape {tuple(shp)}, got {val.dtype} {tuple(val.shape)}"
                )
        cfg = self.cfg
        if labels.numel() and int(labels.max()) >= cfg.q:
            raise ValueError(f"labels must lie in [0, q={cfg.q})")
        if T.numel() and int(T.max()) > cfg.max_scaling_iterations:
            raise ValueError(f"T must lie in [0, max_scaling_iterations={cfg.max_scaling_iterations}]")
        if self.qconfig.granularity != "fixed" or betas is not None:
            if not isinstance(betas, torch.Tensor) or not betas.is_floating_point():
                raise TypeError("betas must be a floating torch.Tensor")
            if tuple(betas.shape) != tuple(self.beta.shape):
                raise ValueError(f"betas must have shape {tuple(self.beta.shape)}, got {tuple(betas.shape)}")
            b32 = betas.detach().to(torch.float32)
            if not bool(torch.isfinite(b32).all()) or not bool((b32 > 0).all()):
                raise ValueError("betas must be finite and > 0")
            self.beta = b32.to(dev).clone()
        if clamped is None:
            clamped = torch.zeros_like(self.T, dtype=torch.bool)
        elif not isinstance(clamped, torch.Tensor) or clamped.dtype != torch.bool or clamped.shape != self.T.shape:
            raise ValueError(f"clamped must be a bool tensor of shape {tuple(self.T.shape)}")
        check_int("steps", steps, 0)
        self.labels = labels.to(dev).clone()
        self.T = T.to(dev).clone()
        self.clamped = clamped.to(dev).clone()
        self._pending = None
        self.qweight = None
        self._lut_cache = None
        self._valid, self._stale, self._key = True, False, None
        self._step = steps

    # ------------------------------------------------------------------ forward
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self._forward(weight)

    @torch.compiler.disable  # data-dependent loops: torch.compile graph-breaks around the quantizer
    def _forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self._valid and self._key is None:  # loaded codes: bound to the weight they are first used with
                self._key = _version(weight)
            if not self._valid or self._step % self.qconfig.quantize_every == 0:
                self.requantize(weight)
            elif self.qweight is None or self.qweight.dtype != weight.dtype:
                self._decode_cache(weight.dtype)
            self.__dict__["_step"] = self._step + 1  # (not nn.Module.__setattr__: every training step)
        else:
            self.refresh(weight)
        qw = self.qweight
        assert qw is not None  # set by requantize / _decode_cache above
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return qw.detach()  # an alias: while it is held, the next re-quantization leaves its memory alone
        scale = None
        if self.qconfig.ste != "identity":
            cfg = self.cfg
            blocks, pad = to_blocks(weight.detach().reshape(weight.shape[0], -1), cfg.dim)
            betas = self._betas64().to(blocks.dtype).reshape(-1, 1)
            s = block_grad_scale(
                self.qconfig.ste, blocks, (self.T > 0) | self.clamped, betas * overload_radius(cfg), pad
            )
            scale = None if s is None else s.reshape(weight.shape)
        return ste(weight, qw, scale)

    # ------------------------------------------------------------------ LUT
    def encoded_matrix(self):
        """The code as a :class:`coset.lut.EncodedMatrix` with beta 1 (multiply the output by ``betas``)."""
        if self._lut_cache is None:
            from coset.lut import EncodedMatrix

            cfg = self.cfg
            unit = cfg if cfg.beta == 1.0 else cfg.replace(beta=1.0)
            self._ensure_labels()
            self._lut_cache = EncodedMatrix(labels=self.labels, T=self.T, config=unit, k=self.k)
        return self._lut_cache

    def lut_scale(self) -> torch.Tensor:
        """Per-output factor applied after the beta-1 LUT product: the betas (float64)."""
        return self._betas64()

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """Statistics of the last quantization: ``blocks``, ``overloaded_blocks`` (T > 0 or clamped),
        ``clamped_blocks`` (still overloaded at the cap and clamped), the rates ``weight_overload_rate`` and
        ``weight_clamp_rate`` (nan before the first quantization), ``steps`` (training forwards),
        ``quantizations`` and ``clamped_blocks_total`` (summed over this object's quantizations)."""
        n = self.T.numel()
        over = int(((self.T > 0) | self.clamped).sum()) if self._valid else 0
        clamp = int(self.clamped.sum()) if self._valid else 0
        nan = float("nan")
        return {
            "blocks": n,
            "overloaded_blocks": over,
            "clamped_blocks": clamp,
            "weight_overload_rate": (over / n if n else 0.0) if self._valid else nan,
            "weight_clamp_rate": (clamp / n if n else 0.0) if self._valid else nan,
            "steps": self._step,
            "quantizations": self._quantizations,
            "clamped_blocks_total": self._clamp_total,
        }

    # ------------------------------------------------------------------ state_dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._valid:
            self._ensure_labels()
        # [training steps, codes current with the shadow weight]; the owning layer notes the weight's state
        # just before (see QuantLayerMixin._save_to_state_dict); alone, an unbound code counts as current
        current = self.__dict__.pop("_current_at_save", self._valid and not self._stale)
        self.q_state.copy_(torch.tensor([self._step, int(current)], dtype=torch.int64))
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self._valid:
            for key in _ALL_KEYS:
                destination.pop(prefix + key, None)
            return
        destination[prefix + "code"] = _ident_tensor(self._identity, self.T.device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        present = [prefix + key in state_dict for key in _CODE_KEYS]
        if any(present) and not all(present):
            error_msgs.append(f"{prefix}: incomplete weight codes (need all of {list(_CODE_KEYS)} or none)")
            return
        if all(present):
            self._check_loaded(state_dict, prefix)
        if prefix + "clamped" not in state_dict and all(present):  # version-1 state: no clamp mask stored
            state_dict[prefix + "clamped"] = torch.zeros_like(self.clamped)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key in _ALL_KEYS:
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        if prefix + "code" in unexpected_keys:
            unexpected_keys.remove(prefix + "code")
        self._pending = None
        self.qweight = None
        self._lut_cache = None
        if all(present):
            step, current = (int(v) for v in self.q_state.tolist())
            self._valid, self._stale, self._key = True, not current, None
            self._step = step
        else:
            self._valid, self._stale, self._key = False, False, None

    def _check_loaded(self, sd, prefix) -> None:
        """Refuse a state made with another code, or tensors with a wrong dtype/shape/range (ValueError)."""
        where = f"{prefix.rstrip('.') or 'weight_quantizer'}"
        code = sd.get(prefix + "code")
        if code is not None:
            try:
                got = json.loads(bytes(code.detach().cpu().to(torch.uint8).tolist()).decode())
            except Exception:
                raise ValueError(f"{where}.code: damaged code identity") from None
            if got != self._identity:
                diff = sorted(k for k in set(got) | set(self._identity) if got.get(k) != self._identity.get(k))
                detail = ", ".join(f"{k}: state {got.get(k)!r} vs layer {self._identity.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{where}: the stored weight code was made with another code ({detail}); its labels cannot be "
                    "decoded by this layer. Load it into a layer with the same config, or drop the code keys "
                    "from the state to re-quantize from the shadow weight"
                )
        cfg = self.cfg
        specs = {
            "labels": (torch.uint8, self.labels.shape),
            "T": (torch.uint8, self.T.shape),
            "beta": (None, self.beta.shape),
            "clamped": (torch.bool, self.clamped.shape),
            "q_state": (torch.int64, self.q_state.shape),
        }
        for key, (dt, shp) in specs.items():
            t = sd.get(prefix + key)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}.{key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(shp):
                raise ValueError(f"{where}.{key} has shape {tuple(t.shape)}, this layer needs {tuple(shp)}")
            if dt is not None and t.dtype != dt:
                raise ValueError(f"{where}.{key} has dtype {t.dtype}, expected {dt}")
        if sd[prefix + "labels"].numel() and int(sd[prefix + "labels"].max()) >= cfg.q:
            raise ValueError(f"{where}.labels holds labels >= q={cfg.q} (made with another code, or damaged)")
        if sd[prefix + "T"].numel() and int(sd[prefix + "T"].max()) > cfg.max_scaling_iterations:
            raise ValueError(f"{where}.T exceeds max_scaling_iterations={cfg.max_scaling_iterations}")
        b = sd[prefix + "beta"]
        if not b.is_floating_point() or not bool(torch.isfinite(b).all()) or not bool((b > 0).all()):
            raise ValueError(f"{where}.beta must hold finite floats > 0")
        if bool((sd[prefix + "q_state"] < 0).any()):
            raise ValueError(f"{where}.q_state must be non-negative")

    def _apply(self, fn, *args, **kwargs):
        if self._valid:
            self._ensure_labels()
        out = super()._apply(fn, *args, **kwargs)
        self._lut_cache = None
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"{c.lattice_type} q={c.q} M={c.M}, granularity={self.qconfig.granularity}, ste={self.qconfig.ste}, "
            f"quantize_every={self.qconfig.quantize_every}"
        )


class HNLQActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input in d-blocks along ``feature_dim`` with a running per-tensor beta.

    Parameters
    ----------
    qconfig : QATConfig with ``activation`` set
    feature_dim : dimension of the input holding the features (-1 for Linear, 1 for convolutions)

    Training forwards update ``beta`` (momentum ``qconfig.act_momentum``); eval forwards use it (or the batch's
    own beta before any training forward). ``stats()`` counts blocks with T > 0 and clamped blocks separately.
    """

    beta: torch.Tensor

    def __init__(self, qconfig: QATConfig, feature_dim: int = -1, device=None, name: str = "") -> None:
        super().__init__()
        if not isinstance(qconfig, QATConfig) or qconfig.activation is None:
            raise ValueError("HNLQActivationQuantizer needs a QATConfig with an activation config")
        self.qconfig = qconfig
        self.cfg: QuantizationConfig = qconfig.activation
        self.feature_dim = feature_dim
        self.register_buffer("beta", torch.zeros((), dtype=torch.float32, device=device))
        self._seen = self._overloaded = self._clamped = 0
        self.name = name  # layer name used in warnings (quantize_model sets the qualified module name)
        self._warned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    @torch.compiler.disable
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("input must be a floating torch.Tensor")
        fd = self.feature_dim
        xa = x.movedim(fd, -1) if fd != -1 else x
        running = self._running()
        batch = self.training or not running > 0  # the batch's own beta (computed in the quantizer's call)
        try:  # the quantizer checks finiteness in its own pass (no separate isfinite pass over the input)
            xq, T, clamped, beta, (n_over, n_clamped) = fake_quantize_activation(
                xa, None if batch else running, self.qconfig, return_counts=True, rows=self._rows(xa) if batch else None
            )
        except ValueError:
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError("input contains NaN or Inf; HNLQ cannot quantize non-finite activations") from None
            raise
        if self.training:  # the running beta moves only once the batch quantized
            if running > 0:  # float32 arithmetic, as beta.mul_(1 - m).add_(m * beta): one fill instead of two ops
                m = self.qconfig.act_momentum
                beta_new = float(np.float32(np.float32(running) * np.float32(1 - m)) + np.float32(m * beta))
            else:
                beta_new = float(np.float32(beta))
            self.beta.fill_(beta_new)
            self.__dict__["_shadow"] = (self.beta, _version(self.beta), beta_new)  # (not nn.Module.__setattr__)
        # (overloaded = T > 0 or clamped: counted by the kernel as it wrote the masks)
        # the counters straight into __dict__ (nn.Module.__setattr__ costs microseconds a call, every forward)
        self.__dict__.update(
            _seen=self._seen + T.numel(), _overloaded=self._overloaded + n_over, _clamped=self._clamped + n_clamped
        )
        if n_clamped and not self._warned:
            self._warned = True
            warnings.warn(
                f"layer {self.name or '<unnamed>'}: {n_clamped} of {clamped.numel()} input blocks were clamped "
                f"(overloaded at the largest scale step T={self.cfg.max_scaling_iterations}); raise "
                "activation.max_scaling_iterations, activation.alpha or act_beta_scale (warned once per layer; "
                "see stats()['act_clamp_rate'])",
                ClampWarning,
                stacklevel=4,
            )
        if torch.is_grad_enabled() and xa.requires_grad:
            scale = None
            if self.qconfig.ste != "identity":
                blocks, pad = to_blocks(xa.detach(), self.cfg.dim)
                scale = block_grad_scale(
                    self.qconfig.ste, blocks, (T > 0) | clamped, torch.tensor(beta * overload_radius(self.cfg)), pad
                )
            xq = ste(xa, xq, scale)
        return xq.movedim(-1, fd) if fd != -1 else xq

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_rq", None)  # (made again at the next training forward)
        return state

    def _rows(self, xa: torch.Tensor) -> RowQuantizer | None:
        """The prepared row quantizer of inputs shaped like ``xa`` (its ``(rows, k)`` view; float32 / float64),
        kept for the last shape seen."""
        if xa.dtype not in (torch.float32, torch.float64):
            return None
        shape = (xa.numel() // xa.shape[-1] if xa.shape[-1] else 0, xa.shape[-1])
        key = (shape, xa.dtype, xa.device)
        rq = self.__dict__.get("_rq")
        if rq is None or rq[0] != key:
            rq = self.__dict__["_rq"] = (key, act_rows(shape, xa.dtype, xa.device, self.qconfig))
        return rq[1]

    def _running(self) -> float:
        """``float(self.beta)``, kept beside the buffer while the buffer is unchanged (reading a tensor's value
        costs ~6 us, every training step)."""
        b = self.beta
        shadow = self.__dict__.get("_shadow")
        if shadow is not None and shadow[0] is b and shadow[1] == _version(b) and shadow[1] >= 0:
            return shadow[2]
        value = float(b)
        self.__dict__["_shadow"] = (b, _version(b), value)
        return value

    def stats(self) -> dict:
        """``act_blocks`` seen, ``act_overload_rate`` (T > 0 or clamped) and ``act_clamp_rate`` (nan before any)."""
        n = self._seen
        return {
            "act_blocks": n,
            "act_overload_rate": self._overloaded / n if n else float("nan"),
            "act_clamp_rate": self._clamped / n if n else float("nan"),
        }

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        b = state_dict.get(prefix + "beta")
        if b is not None:
            if not isinstance(b, torch.Tensor) or b.numel() != 1 or not b.is_floating_point():
                raise ValueError(f"{prefix}beta must be a float scalar tensor")
            if not bool(torch.isfinite(b).all()) or float(b) < 0:
                raise ValueError(f"{prefix}beta must be finite and >= 0, got {float(b)}")
            state_dict[prefix + "beta"] = b.reshape(())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "beta" in missing_keys:  # a float checkpoint: observed at the next training forward
            missing_keys.remove(prefix + "beta")

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.lattice_type} q={c.q} M={c.M}, feature_dim={self.feature_dim}"
