"""``ScalarKVStore``: the KIVI-style baseline cache of one layer (:mod:`coset.kv.scalar`).

Values are quantized per token as they arrive. Keys are quantized per channel once a group of
``group_size`` tokens is complete; the incomplete group stays in full precision (and is counted in
:attr:`nbytes` at its own dtype). With ``config.sink = S`` the first S tokens stay in full precision for good
(as in :class:`coset.kv.CodedKVStore`). Nothing is ever re-quantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import ScalarKVConfig
from .scalar import dequantize_channels, dequantize_tokens, quantize_channels, quantize_tokens
from .store import TokenBuffer

__all__ = ["ScalarKVStore"]

#: Largest |x| the float16 scale and zero point of a group hold at every bit width: half the float16 range.
MAX_ABS = float(torch.finfo(torch.float16).max) / 2


class ScalarKVStore:
    """Keys per channel (groups of tokens) in ``config.bits``, values per token in ``config.value_bits``."""

    def __init__(self, config: ScalarKVConfig | None = None):
        config = ScalarKVConfig() if config is None else config
        if not isinstance(config, ScalarKVConfig):
            raise TypeError(f"config must be a ScalarKVConfig, got {type(config).__name__}")
        self.config = config
        self._bufs = {
            n: TokenBuffer()
            for n in ("k_code", "k_scale", "k_zero", "k_res", "v_code", "v_scale", "v_zero", "k_sink", "v_sink")
        }
        self.head_dim: int | None = None
        self.dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return self._bufs["k_sink"].length + self._bufs["k_code"].length + self._bufs["k_res"].length

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append new tokens ``(B, H, L, D)``; raises like :meth:`CodedKVStore.append`."""
        for name, x in (("key_states", keys), ("value_states", values)):
            if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating torch.Tensor")
        if keys.shape != values.shape or keys.ndim != 4:
            raise ValueError(f"key_states {tuple(keys.shape)} and value_states {tuple(values.shape)} must be equal 4-d")
        if keys.dtype != values.dtype:
            raise ValueError(f"key_states ({keys.dtype}) and value_states ({values.dtype}) differ in dtype")
        B, H, L, D = keys.shape
        if B < 1 or D < 8 or D % 8:
            raise ValueError(f"states must be (B >= 1, H, L, D) with D a multiple of 8, got {tuple(keys.shape)}")
        for name, x in (("key_states", keys), ("value_states", values)):
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} must be finite (it contains NaN or Inf)")
            # float16 zero points and scales (max - min) / (2^bits - 1) hold |x| up to half the float16 range
            if x.numel() and float(x.abs().max()) > MAX_ABS:
                raise ValueError(
                    f"{name} has entries past +-{MAX_ABS:g}, the range of the float16 scale and zero point"
                )
        ref = next((b.data for b in self._bufs.values() if b.data is not None), None)
        if ref is not None and (B, H) != tuple(ref.shape[:2]):
            raise ValueError(f"states have batch size and heads {(B, H)}, the cache holds {tuple(ref.shape[:2])}")
        if self.head_dim is None:
            self.head_dim, self.dtype = D, keys.dtype
        elif D != self.head_dim:
            raise ValueError(f"head_dim changed from {self.head_dim} to {D}")
        elif keys.dtype != self.dtype:
            raise ValueError(f"key_states are {keys.dtype}; the cache holds {self.dtype}")
        bits, G = self.config.bits, self.config.group_size
        S = self.config.sink - self._bufs["k_sink"].length
        if S > 0:
            self._bufs["k_sink"].append(keys[:, :, :S].detach())
            self._bufs["v_sink"].append(values[:, :, :S].detach())
            keys, values = keys[:, :, S:], values[:, :, S:]
            if not keys.shape[2]:
                return
        vc, vs, vz = quantize_tokens(values.detach(), self.config.resolved_value_bits)
        self._bufs["v_code"].append(vc)
        self._bufs["v_scale"].append(vs)
        self._bufs["v_zero"].append(vz)
        self._bufs["k_res"].append(keys.detach())
        while self._bufs["k_res"].length >= G:
            grp = self._bufs["k_res"].pop_front(G)
            kc, ks, kz = quantize_channels(grp, bits)
            self._bufs["k_code"].append(kc)
            self._bufs["k_scale"].append(ks)
            self._bufs["k_zero"].append(kz)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values ``(B, H, L, D)`` in the states' dtype.

        Raises
        ------
        ValueError if nothing was appended yet (or since :meth:`reset`).
        """
        bits, D = self.config.bits, self.head_dim
        b = self._bufs
        ref = next((x.data for x in b.values() if x.data is not None and x.data.ndim == 4), None)
        if D is None or ref is None:
            raise ValueError("the cache is empty: append keys and values before reading them")
        if not len(self):
            empty = torch.empty((ref.shape[0], ref.shape[1], 0, D), dtype=self.dtype)
            return empty, empty.clone()
        parts: list[torch.Tensor] = []
        vparts: list[torch.Tensor] = []
        if b["k_sink"].length:
            parts.append(b["k_sink"].tensor)
            vparts.append(b["v_sink"].tensor)
        if b["v_code"].length:
            vparts.append(
                dequantize_tokens(
                    b["v_code"].tensor, b["v_scale"].tensor, b["v_zero"].tensor, self.config.resolved_value_bits, D
                ).to(self.dtype)
            )
        if b["k_code"].length:
            parts.append(
                dequantize_channels(b["k_code"].tensor, b["k_scale"].tensor, b["k_zero"].tensor, bits, D).to(self.dtype)
            )
        if b["k_res"].length:
            parts.append(b["k_res"].tensor)
        return torch.cat(parts, dim=2), torch.cat(vparts, dim=2)

    def crop(self, n: int) -> None:
        """Drop the ``n`` newest tokens; only possible within the full-precision key residual.

        Raises
        ------
        ValueError if ``n`` reaches into a quantized key group (its per-channel scales cover tokens that
        would stay).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        res = self._bufs["k_res"].length
        sink = self._bufs["k_sink"].length if not self._bufs["k_code"].length else 0
        if n > res + sink:
            raise ValueError(
                f"cannot crop {n} tokens: only the {res} newest keys are unquantized; "
                "per-channel key groups cannot be split"
            )
        self._bufs["k_res"].crop(n)
        for name in ("v_code", "v_scale", "v_zero"):
            self._bufs[name].crop(min(n, res))
        self._bufs["k_sink"].crop(n - min(n, res))
        self._bufs["v_sink"].crop(n - min(n, res))

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for b in self._bufs.values():
            b.map_batch(fn)

    def reset(self) -> None:
        for b in self._bufs.values():
            b.clear()
        self.head_dim = self.dtype = None
