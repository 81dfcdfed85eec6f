"""``HNLQLinear``: a linear layer that holds only the compressed code of its weight.

The module's state is exactly what :func:`coset.ptq.save_quantized` writes for it:

* ``weight`` — the bit-packed labels (uint8, 1-D). The name is deliberate: a checkpoint loaded into a plain
  ``nn.Linear`` (e.g. by ``transformers`` without ``import coset.ptq.hf``) hits a shape mismatch on
  ``<layer>.weight`` and raises, instead of silently loading random float weights.
* ``weight_<name>`` — the other tensors of :func:`coset.quant.pack_codes` (compact T).
* ``scale`` — float32, () per layer or (out_features,) per row.
* ``rot_in_seed`` / ``rot_out_seed`` — int64 scalars, the seeds of the randomized Hadamard rotations.
* ``out_scale`` — float16 (out_features,), optional: one gain per output channel in the original basis (set by
  :func:`coset.ptq.finetune_` with ``gains="row"``; 16 bits per row, counted in the all-in bits).
* ``bias`` — the float bias (a Parameter), when the layer has one.

No float copy of the weight is kept. Forward (``W = Uᵀ W̃ V``, PTQ_PLAN.md):

    x̃ = V x  (fast Walsh–Hadamard),   ỹ = W̃ x̃,   y = Uᵀ ỹ + bias

where ``W̃ x̃`` is computed either by decoding ``W̃`` once per call (native kernel via
:func:`coset.quant.decode`) followed by ``F.linear``, or from the codes without a decoded weight: by the
registered ``coded_gemv`` kernel (coset-cuda's int8-codebook GEMV, for codes with q^d <= 65536 such as the 2-bit
E8 q=4) or else by the one-sided LUT path of :mod:`coset.lut`. :data:`DEFAULT_GEMV_MAX_ROWS` /
:data:`DEFAULT_LUT_MAX_ROWS` pick the path from the number of input rows; they were set by measurement
(``docs/ptq.md``). ``cache_weight=True`` keeps the decoded ``W̃`` in memory after the first call:
m·n float32 more memory for no per-call decode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coset.quant import QuantizationConfig, decode, pack_codes, unpack_codes
from coset.quant.backend import select_backend

from .codes import LinearCodes, Rotation, rotation_signs
from .hadamard import hadamard_transform

__all__ = ["HNLQLinear", "HNLQSpec", "DEFAULT_GEMV_MAX_ROWS", "DEFAULT_LUT_MAX_ROWS", "LABELS_KEY"]

#: Rows of input (batch × tokens) up to which forward uses the one-sided LUT path instead of decoding the
#: weight. Measured on a 576×1536 layer on the 2-core CPU (docs/ptq.md): decode + matmul wins already at one row
#: for the E8 q=4 codes (the LUT tables have q^d = 65536 entries per block), so the LUT path is off by default.
DEFAULT_LUT_MAX_ROWS = 0

#: Rows up to which forward computes ``W̃ x̃`` from the codes with the registered ``coded_gemv`` kernel when it
#: serves the layer's code (E8 q=4 M=1 / M=2: the 2-bit and the hierarchical 4-bit codes; not q=8/16, whose
#: 2^24-2^32 representatives have no codebook). Measured on 576x1536 and 1536x576 layers, 1 thread (docs/ptq.md).
DEFAULT_GEMV_MAX_ROWS = 64

#: The pack_codes tensor holding the labels; stored under the buffer name ``weight``.
LABELS_KEY = "labels"

_SPEC_FIELDS = (
    "in_features",
    "out_features",
    "code",
    "packed_meta",
    "packed",
    "scale_shape",
    "rot_in_seed",
    "rot_out_seed",
    "bias",
)


#: the QuantizationConfig fields written by format_version 1 (all of them are needed to decode the same way)
_CODE_FIELDS = (
    "lattice_type",
    "q",
    "M",
    "beta",
    "alpha",
    "max_scaling_iterations",
    "with_tie_dither",
    "with_dither",
    "disable_scaling",
    "disable_overload_protection",
    "overload_policy",
    "dither_seed",
    "center",
)


def _buffer_name(key: str) -> str:
    return "weight" if key == LABELS_KEY else f"weight_{key}"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _seed_to_i64(seed: int) -> int:
    # Seeds live in [0, 2^64); int64 buffers hold them as two's complement.
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _seed_from_i64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


@dataclass(frozen=True)
class HNLQSpec:
    """JSON-able identity of one compressed linear: everything needed to build the empty module.

    Attributes
    ----------
    in_features, out_features : n, m
    code : QuantizationConfig of the labels (beta = 1; the scale is separate)
    packed_meta : the ``meta`` dict returned by :func:`coset.quant.pack_codes`
    packed : {pack_codes tensor name: (shape tuple, dtype name)}
    scale_shape : () (per layer) or (m,) (per row)
    rot_in_seed, rot_out_seed : rotation seeds in [0, 2^64), or None (no rotation on that side)
    bias : whether the layer has a bias
    out_scale : whether the layer holds a float16 per-output-channel gain (applied after the inverse rotation)
    """

    in_features: int
    out_features: int
    code: QuantizationConfig
    packed_meta: dict = field(hash=False)
    packed: dict = field(hash=False)
    scale_shape: tuple = ()
    rot_in_seed: int | None = None
    rot_out_seed: int | None = None
    bias: bool = False
    out_scale: bool = False

    def __post_init__(self) -> None:
        for name in ("in_features", "out_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.code, QuantizationConfig):
            raise TypeError(f"code must be a QuantizationConfig, got {type(self.code).__name__}")
        if self.in_features % self.code.dim:
            raise ValueError(
                f"in_features={self.in_features} is not a multiple of the lattice dimension {self.code.dim}"
            )
        if tuple(self.scale_shape) not in ((), (self.out_features,)):
            raise ValueError(f"scale_shape must be () or ({self.out_features},), got {self.scale_shape!r}")
        self._check_packed_meta()
        if not isinstance(self.packed, dict) or LABELS_KEY not in self.packed:
            raise ValueError(f"packed must be a dict of pack_codes tensors including {LABELS_KEY!r}")
        for k, v in self.packed.items():
            if not isinstance(k, str) or not k.replace("_", "").isalnum():
                raise ValueError(f"packed tensor name must be an identifier, got {k!r}")
            shape, dt = v
            if not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"packed[{k!r}] shape must be non-negative ints, got {shape!r}")
            _dtype(dt)
        for name in ("rot_in_seed", "rot_out_seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64):
                raise ValueError(f"{name} must be None or an int in [0, 2^64), got {v!r}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__}")
        if not isinstance(self.out_scale, bool):
            raise TypeError(f"out_scale must be a bool, got {type(self.out_scale).__name__}")

    def _check_packed_meta(self) -> None:
        """``packed_meta`` must describe this layer's codes: (m, n/d) blocks of ``code`` (q, M, d, lattice).
        The tensors themselves are validated by :func:`coset.quant.unpack_codes` when the layer decodes."""
        pm = self.packed_meta
        if not isinstance(pm, dict):
            raise ValueError(f"packed_meta must be a dict (pack_codes metadata), got {type(pm).__name__}")
        c = self.code
        want = {"shape": [self.out_features, self.in_features // c.dim], "q": c.q, "M": c.M, "d": c.dim}
        for k, v in want.items():
            got = list(pm[k]) if k == "shape" and isinstance(pm.get(k), (list, tuple)) else pm.get(k)
            if got != v or isinstance(got, bool):
                raise ValueError(f"packed_meta[{k!r}] is {pm.get(k)!r}, the layer needs {v!r}")
        lat = pm.get("lattice")
        if not isinstance(lat, str) or lat.strip().upper() != c.lattice_type.strip().upper():
            raise ValueError(f"packed_meta['lattice'] is {lat!r}, the layer's code is {c.lattice_type!r}")

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def buffer_shapes(self) -> dict[str, tuple[tuple, torch.dtype]]:
        """{state-dict name (relative to the module): (shape, dtype)} of every compressed tensor."""
        out = {_buffer_name(k): (tuple(s), _dtype(dt)) for k, (s, dt) in self.packed.items()}
        out["scale"] = (tuple(self.scale_shape), torch.float32)
        if self.rot_in_seed is not None:
            out["rot_in_seed"] = ((), torch.int64)
        if self.rot_out_seed is not None:
            out["rot_out_seed"] = ((), torch.int64)
        if self.out_scale:
            out["out_scale"] = ((self.out_features,), torch.float16)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (inverse: :meth:`from_json`)."""
        d = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "code": asdict(self.code),
            "packed_meta": self.packed_meta,
            "packed": {k: [list(s), dt] for k, (s, dt) in self.packed.items()},
            "scale_shape": list(self.scale_shape),
            "rot_in_seed": self.rot_in_seed,
            "rot_out_seed": self.rot_out_seed,
            "bias": self.bias,
        }
        if self.out_scale:  # written only when present: specs without it read as before
            d["out_scale"] = True
        return d

    @classmethod
    def from_json(cls, d: Any) -> HNLQSpec:
        """Validate and rebuild; ``ValueError`` names the missing or bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"layer spec must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _SPEC_FIELDS if k not in d]
        if missing:
            raise ValueError(f"layer spec is missing {missing}")
        if isinstance(d["code"], dict):
            # every field that to_json writes: a missing one would silently take its default and decode wrongly
            missing = [k for k in _CODE_FIELDS if k not in d["code"]]
            if missing:
                raise ValueError(f"layer spec 'code' is missing {missing}")
        try:
            code = QuantizationConfig(**d["code"])
            packed = {k: (tuple(int(s) for s in v[0]), str(v[1])) for k, v in d["packed"].items()}
            return cls(
                in_features=d["in_features"],
                out_features=d["out_features"],
                code=code,
                packed_meta=d["packed_meta"],
                packed=packed,
                scale_shape=tuple(d["scale_shape"]),
                rot_in_seed=d["rot_in_seed"],
                rot_out_seed=d["rot_out_seed"],
                bias=d["bias"],
                out_scale=d.get("out_scale", False),
            )
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"bad layer spec: {e}") from None


class HNLQLinear(nn.Module):
    """Linear layer whose weight is stored only as an HNLQ code in a randomized-Hadamard basis.

    Build it with :meth:`from_codes`; ``HNLQLinear(spec)`` makes an empty (zero) module of the right shapes,
    to be filled by ``load_state_dict`` (used by the loaders).

    Parameters
    ----------
    spec : HNLQSpec
    cache_weight : keep the decoded rotated weight after the first forward (m·n float32 more memory, no
        decode per call). Off by default.
    lut_max_rows : compute from the codes (registered ``coded_gemv`` kernel, else the one-sided LUT path) when the
        input has at most this many rows (None: the measured :data:`DEFAULT_GEMV_MAX_ROWS` where the kernel
        serves the code, else :data:`DEFAULT_LUT_MAX_ROWS`)
    device : device of the empty buffers
    """

    # Buffers registered in __init__, declared for type checkers (nn.Module.__getattr__ returns Tensor | Module).
    # The packed tensors other than the labels ("weight_<key>") are reached by name via getattr.
    weight: torch.Tensor
    scale: torch.Tensor
    rot_in_seed: torch.Tensor  # only registered when spec.rot_in_seed is not None
    rot_out_seed: torch.Tensor  # only registered when spec.rot_out_seed is not None

    def __init__(self, spec: HNLQSpec, *, cache_weight: bool = False, lut_max_rows: int | None = None, device=None):
        super().__init__()
        if not isinstance(spec, HNLQSpec):
            raise TypeError(f"spec must be an HNLQSpec, got {type(spec).__name__}")
        if not isinstance(cache_weight, bool):
            raise TypeError(f"cache_weight must be a bool, got {type(cache_weight).__name__}")
        if lut_max_rows is not None and (
            isinstance(lut_max_rows, bool) or not isinstance(lut_max_rows, int) or lut_max_rows < 0
        ):
            raise ValueError(f"lut_max_rows must be a non-negative int, got {lut_max_rows!r}")
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.code = spec.code
        self.cache_weight = cache_weight
        self.lut_max_rows = lut_max_rows
        for name, (shape, dt) in spec.buffer_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        if spec.rot_in_seed is not None:
            self.rot_in_seed.fill_(_seed_to_i64(spec.rot_in_seed))
        if spec.rot_out_seed is not None:
            self.rot_out_seed.fill_(_seed_to_i64(spec.rot_out_seed))
        if spec.out_scale:
            self.get_buffer("out_scale").fill_(1.0)
        if spec.bias:
            self.bias = nn.Parameter(torch.zeros(spec.out_features, device=device))
        else:
            self.register_parameter("bias", None)
        self.rot_in = Rotation(spec.in_features, spec.rot_in_seed) if spec.rot_in_seed is not None else None
        self.rot_out = Rotation(spec.out_features, spec.rot_out_seed) if spec.rot_out_seed is not None else None
        self._w_cache: torch.Tensor | None = None
        self._T: torch.Tensor | None = None
        self._consts: dict = {}  # derived constants: sign vectors, representative table

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: LinearCodes,
        bias: torch.Tensor | None = None,
        *,
        cache_weight: bool = False,
        lut_max_rows: int | None = None,
    ) -> HNLQLinear:
        """Compress a :class:`~coset.ptq.codes.LinearCodes` into a module.

        Parameters
        ----------
        codes : LinearCodes of an (m, n) weight
        bias : (m,) float tensor or None

        Raises
        ------
        TypeError / ValueError for a wrong type or shape of ``codes`` or ``bias``.
        """
        if not isinstance(codes, LinearCodes):
            raise TypeError(f"codes must be a LinearCodes, got {type(codes).__name__}")
        m = codes.out_features
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point or tuple(bias.shape) != (m,):
                raise ValueError(
                    f"bias must be a float tensor of shape ({m},), got {getattr(bias, 'shape', type(bias))}"
                )
        tensors, meta = pack_codes(codes.labels, codes.T, codes.code)
        if LABELS_KEY not in tensors:
            raise RuntimeError(f"pack_codes returned no {LABELS_KEY!r} tensor (keys {sorted(tensors)})")
        spec = HNLQSpec(
            in_features=codes.in_features,
            out_features=m,
            code=codes.code,
            packed_meta=meta,
            packed={k: (tuple(t.shape), _dtype_name(t.dtype)) for k, t in tensors.items()},
            scale_shape=tuple(codes.scale.shape),
            rot_in_seed=None if codes.rot_in is None else codes.rot_in.seed,
            rot_out_seed=None if codes.rot_out is None else codes.rot_out.seed,
            bias=bias is not None,
        )
        dev = codes.labels.device
        mod = cls(spec, cache_weight=cache_weight, lut_max_rows=lut_max_rows, device=dev)
        with torch.no_grad():
            for k, t in tensors.items():
                getattr(mod, _buffer_name(k)).copy_(t)
            mod.scale.copy_(codes.scale.to(torch.float32))
            if bias is not None:
                mod.bias.copy_(bias.detach().to(torch.float32))
        return mod

    # ------------------------------------------------------------------ state
    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The pack_codes tensors, by their pack_codes names."""
        return {k: getattr(self, _buffer_name(k)) for k in self.spec.packed}

    def compressed_nbytes(self) -> int:
        """Bytes of all compressed state (buffers and bias) held by the module."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def check_seeds(self) -> None:
        """Raise ``ValueError`` if the loaded seed buffers disagree with the spec (a corrupt checkpoint)."""
        for side in ("in", "out"):
            want = getattr(self.spec, f"rot_{side}_seed")
            if want is not None:
                got = _seed_from_i64(int(getattr(self, f"rot_{side}_seed")))
                if got != want:
                    raise ValueError(f"rot_{side}_seed buffer is {got}, the layer spec says {want}")

    def enable_out_scale(self) -> None:
        """Add the per-output-channel gain buffer (all ones: the layer's output is unchanged); no-op if present."""
        if self.spec.out_scale:
            return
        self.spec = replace(self.spec, out_scale=True)
        self.register_buffer("out_scale", torch.ones(self.out_features, dtype=torch.float16, device=self.scale.device))

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() etc.: cached tensors live on the old device/dtype.
        self._w_cache = None
        self._T = None
        self._consts = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._w_cache = None
        self._T = None
        self._consts.pop(("coded", str(self.weight.device)), None)  # it holds the old T
        for side in ("in", "out"):
            want, key = getattr(self.spec, f"rot_{side}_seed"), f"{prefix}rot_{side}_seed"
            if want is not None and key in state_dict and _seed_from_i64(int(state_dict[key])) != want:
                # The Rotation objects follow the spec: a state with other seeds belongs to another layer.
                error_msgs.append(f"{key}: {_seed_from_i64(int(state_dict[key]))} != the layer's seed {want}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ decoding
    @torch.compiler.disable
    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked ``(labels (m, n/d, M, d) uint8, T (m, n/d))``."""
        return unpack_codes(self.packed_tensors(), self.spec.packed_meta, self.code)

    def _direct_index(self) -> bool:
        """True when the packed label bytes are themselves the representative-table indices.

        Labels are packed little-endian with k = log2 q bits (q a power of two), so the d labels of one
        (block, layer) form the integer ``sum_j b_j q^j`` = the table index of coset.lut, and when ``d k`` is
        8 or 16 bits each index is one uint8 / uint16 of the packed buffer (E8 q=2/4, D4 q=4/16, Z2 q=16).
        """
        c = self.code
        k = c.bits_per_label
        return c.q == 1 << k and c.dim * k in (8, 16) and not c.with_dither

    def _block_scales(self, dtype) -> torch.Tensor:
        """(m, n/d) per-block scale ``beta 2^(alpha T)`` (from the compact T; all ones for T_coding "zero")."""
        m, K = self.out_features, self.in_features // self.code.dim
        table = torch.tensor(self.code.scales, dtype=torch.float64, device=self.scale.device)
        if self.spec.packed_meta.get("T_coding") == "zero":
            return table[0].to(dtype).expand(m, K)
        return table[self._T_u8().long()].to(dtype)

    def _direct_labels(self) -> torch.Tensor:
        """(m, n/d, M) view of the packed label bytes as table indices: uint8, or int16 holding the uint16 bits
        (only when :meth:`_direct_index`)."""
        c = self.code
        raw = self.weight if c.dim * c.bits_per_label == 8 else self.weight.view(torch.int16)
        return raw.view(self.out_features, self.in_features // c.dim, c.M)

    def _decode_direct(self) -> torch.Tensor:
        """Table decode straight from the packed bytes: (m, n/d, d) float32 (equals coset.quant.decode)."""
        from coset.lut.center import code_offset
        from coset.lut.tables import representative_table

        c = self.code
        m, K, M, d = self.out_features, self.in_features // c.dim, c.M, c.dim
        key = ("table", str(self.weight.device))
        a = self._consts.get(key)
        if a is None:
            a = representative_table(c.lattice, c.q, c.with_tie_dither).to(
                device=self.weight.device, dtype=torch.float32
            )
            self._consts[key] = a
        raw = self.weight
        idx = (self._direct_labels().to(torch.int64) & 0xFFFF).view(m * K, M)
        # sum_m q^m a(b_m): exact in float32 (integers/halves < 2^24); one gather per layer
        pts = a.index_select(0, idx[:, 0])
        for i in range(1, M):
            pts.add_(a.index_select(0, idx[:, i]), alpha=float(c.q**i))
        pts = pts.view(m, K, d)
        off = code_offset(c, raw.device)
        if off is not None:
            pts = (pts.double() - off).float()
        return pts * self._block_scales(torch.float32).unsqueeze(-1)

    @torch.compiler.disable
    def rotated_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoded ``Ŵ̃ = scale · decode(labels, T)`` in the rotated basis, (m, n) of ``dtype``.

        Codes whose packed bytes are table indices (see :meth:`_direct_index`) are decoded by one table
        lookup per (block, layer) straight from the buffer; others are unpacked and decoded by
        :func:`coset.quant.decode` (native kernel when registered).
        """
        if self._w_cache is not None and self._w_cache.dtype == dtype:
            return self._w_cache
        if self._direct_index():
            w = self._decode_direct()
        else:
            b, T = self.codes()
            w = decode(b, config=self.code, T=T, dtype=torch.float32)  # (m, n/d, d)
        s = self.scale
        w = (w * (s if s.ndim == 0 else s[:, None, None])).reshape(self.out_features, self.in_features).to(dtype)
        if self.cache_weight:
            self._w_cache = w
        return w

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŵ = Uᵀ Ŵ̃ V`` in the original basis, (m, n) (computed in float64)."""
        w = self.rotated_weight(torch.float64) if not self.cache_weight else self.rotated_weight().double()
        if self.rot_in is not None:
            w = self.rot_in.inverse(w)
        if self.rot_out is not None:
            w = self.rot_out.inverse(w.t()).t()
        if self.spec.out_scale:
            w = w * self.get_buffer("out_scale").to(w.dtype)[:, None]
        return w.to(dtype).contiguous()

    @torch.compiler.disable
    def _sign(self, side: str, dtype, device) -> torch.Tensor:
        key = (side, dtype, str(device))
        s = self._consts.get(key)
        if s is None:
            rot = self.rot_in if side == "in" else self.rot_out
            if rot is None:
                raise RuntimeError(f"layer has no {side!r} rotation")
            s = rotation_signs(rot.n, rot.seed, device).to(dtype)
            self._consts[key] = s
        return s

    def _gemv_backend(self, xt: torch.Tensor):
        """The registered ``coded_gemv`` kernel for this layer's code, or None (also when ``xt`` needs a gradient:
        the kernel has none, and tuning through the layer, e.g. ``finetune_``, needs ``d/dx``)."""
        if torch.is_grad_enabled() and xt.requires_grad:
            return None
        key = ("gemv", str(xt.device))
        if key not in self._consts:
            be = None
            if self._direct_index() and self.code.M * self.code.dim * self.code.bits_per_label in (8, 16, 32, 64):
                be = select_backend("auto", "coded_gemv", xt, self.code.lattice, self.code)
            self._consts[key] = be
        return self._consts[key]

    def _max_code_rows(self, xt: torch.Tensor) -> int:
        if self.lut_max_rows is not None:
            return self.lut_max_rows
        return DEFAULT_GEMV_MAX_ROWS if self._gemv_backend(xt) is not None else DEFAULT_LUT_MAX_ROWS

    def _T_u8(self) -> torch.Tensor:
        """(m, n/d) uint8 T steps (cached: 1 byte per d weights, derived from the packed T; zeros for T_coding
        "zero")."""
        if self._T is None:
            if self.spec.packed_meta.get("T_coding") == "zero":
                m, K = self.out_features, self.in_features // self.code.dim
                self._T = torch.zeros(m, K, dtype=torch.uint8, device=self.weight.device)
            else:
                self._T = self.codes()[1].to(device=self.scale.device, dtype=torch.uint8)
        return self._T

    @torch.compiler.disable
    def _lut_product(self, xt: torch.Tensor) -> torch.Tensor:
        from coset.lut import EncodedMatrix, lut_linear

        be = self._gemv_backend(xt)
        if be is not None:  # straight from the packed bytes: they are the kernel's uint8 / uint16 label indices
            key = ("coded", str(self.weight.device))
            W = self._consts.get(key)
            if W is None:  # validated once; holds views of the packed bytes and the cached T, no copy
                W = self._consts[key] = be.coded_weight(
                    self._direct_labels(), self._T_u8(), self.code, self.in_features
                )
            x2 = xt.reshape(-1, self.in_features)
            y = be.coded_gemv(x2, W)
            s = self.scale
            return (y * s).to(xt.dtype).reshape(*xt.shape[:-1], self.out_features)
        b, T = self.codes()
        E = EncodedMatrix(labels=b, T=T, config=self.code, k=self.in_features)
        y = lut_linear(xt.to(torch.float32), E)
        s = self.scale
        return (y * s).to(xt.dtype)

    def forward(self, x: torch.Tensor, *, path: str = "auto") -> torch.Tensor:
        """``y = x Ŵᵀ + bias``.

        Parameters
        ----------
        x : (..., in_features) float tensor
        path : "auto" (LUT for at most ``lut_max_rows`` rows, else decode), "decode" or "lut"

        Returns
        -------
        (..., out_features) tensor of x's dtype
        """
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(
                f"x must be a floating torch.Tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if path not in ("auto", "decode", "lut"):
            raise ValueError(f"path must be 'auto', 'decode' or 'lut', got {path!r}")
        if self.rot_in is not None:
            x = hadamard_transform(x * self._sign("in", x.dtype, x.device))
        rows = math.prod(x.shape[:-1])
        if path == "lut" or (
            path == "auto"
            and self._w_cache is None
            and rows <= self._max_code_rows(x)
            # the code paths refuse non-finite inputs; like nn.Linear, "auto" propagates them instead
            and bool(torch.isfinite(x).all())
        ):
            y = self._lut_product(x)
        else:
            y = F.linear(x, self.rotated_weight(x.dtype))
        if self.rot_out is not None:
            y = hadamard_transform(y, transpose=True) * self._sign("out", y.dtype, y.device)
        if self.spec.out_scale:
            y = y * self.get_buffer("out_scale").to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        c = self.code
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"code={c.lattice_type} q={c.q} M={c.M}, scale={'row' if self.spec.scale_shape else 'layer'}, "
            f"rotated={self.rot_in is not None}/{self.rot_out is not None}"
        )
