"""``PerHeadKVStore``: one attention layer's cache with its own code for every KV head.

Heads of one layer differ in how much their coding error costs (:func:`coset.kv.hf_cache.fisher_sensitivity`
with ``per_head=True``), so a per-head bit allocation (:func:`coset.kv.allocate_trellis_heads`) needs a store
that codes each KV head with its own :class:`coset.kv.KVQuantConfig`. This one holds one
:class:`coset.kv.CodedKVStore` per KV head (each over its ``(B, 1, L, D)`` slice of the states, rotated with
that head's rotation of the layer: ``CodedKVStore(head=(h, H))``) and presents the store interface: inputs are
split along the head axis, outputs concatenated. With grouped-query attention, query heads
``h G .. h G + G - 1`` attend over KV head ``h``. With the same config for every head it stores, scores and
returns what one :class:`coset.kv.CodedKVStore` of the layer does (per-head means, channel scales, key
transforms and rotations are per head there too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .coded_store import CodedKVStore, check_states
from .config import KVQuantConfig
from .key_transform import KeyTransform
from .rope import RotaryTable

__all__ = ["PerHeadKVStore"]


def _head_key_scales(key_scale, n: int) -> list[torch.Tensor | KeyTransform | None]:
    """``key_scale`` of a layer (``(H, D)`` scales or a :class:`KeyTransform` of ``H`` heads) cut into ``n`` heads."""
    if key_scale is None:
        return [None] * n
    if isinstance(key_scale, KeyTransform):
        if key_scale.vectors.ndim != 3 or key_scale.vectors.shape[0] != n:
            raise ValueError(
                f"key_scale (a KeyTransform) must hold one transform per KV head: vectors ({n}, D, r), got "
                f"{tuple(key_scale.vectors.shape)}"
            )
        return [KeyTransform(key_scale.vectors[h : h + 1], key_scale.gains[h : h + 1]) for h in range(n)]
    if not isinstance(key_scale, torch.Tensor) or not key_scale.dtype.is_floating_point:
        raise TypeError("key_scale must be a floating torch.Tensor or a KeyTransform")
    if key_scale.ndim != 2 or key_scale.shape[0] != n:
        raise ValueError(f"key_scale must have shape (num_kv_heads={n}, head_dim), got {tuple(key_scale.shape)}")
    return [key_scale[h : h + 1] for h in range(n)]


class PerHeadKVStore:
    """Keys and values of one attention layer, KV head ``h`` coded with ``configs[h]`` (see the module docstring).

    Parameters
    ----------
    configs : one KVQuantConfig per KV head; they must agree on ``window``, ``sink``, ``prefill`` and ``seed``
        (what the layer around the store reads; the codes and everything else may differ)
    seed : seed of the layer's rotation signs (head ``h`` gets row ``h`` of ``HeadRotation(H, D, seed)``)
    backend, rope : as for :class:`coset.kv.CodedKVStore`
    key_scale : optional ``(H, D)`` per-channel key scales or a :class:`coset.kv.KeyTransform` with vectors
        ``(H, D, r)``, for the whole layer: head ``h`` gets its row

    Raises
    ------
    TypeError for configs that are not a sequence of KVQuantConfig or a bad key scale type; ValueError for no
    configs, configs that disagree on the shared fields, or a key scale for another number of heads.
    """

    def __init__(
        self,
        configs: Sequence[KVQuantConfig],
        seed: int = 0,
        backend: str = "auto",
        key_scale: torch.Tensor | KeyTransform | None = None,
        rope: RotaryTable | None = None,
    ):
        self.configs = check_head_configs(configs)
        n = len(self.configs)
        scales = _head_key_scales(key_scale, n)
        self.heads = [
            CodedKVStore(c, seed=seed, backend=backend, key_scale=s, rope=rope, head=(h, n))
            for h, (c, s) in enumerate(zip(self.configs, scales, strict=True))
        ]
        self.seed, self.backend, self.rope = seed, backend, rope

    @property
    def config(self) -> KVQuantConfig:
        """Head 0's config: its ``window``, ``sink``, ``prefill`` and ``seed`` are every head's."""
        return self.configs[0]

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def num_coded(self) -> int:
        return self.heads[0].num_coded

    @property
    def num_window(self) -> int:
        return self.heads[0].num_window

    @property
    def num_sink(self) -> int:
        return self.heads[0].num_sink

    def __len__(self) -> int:
        return len(self.heads[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the heads' stores (:attr:`coset.kv.CodedKVStore.nbytes`), summed."""
        return sum(s.nbytes for s in self.heads)

    # ------------------------------------------------------------------ updates
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append new tokens ``(B, H, L, D)``, H = the number of configs: head ``h``'s slice to its store.

        Raises
        ------
        TypeError / ValueError as :meth:`coset.kv.CodedKVStore.append`, and ValueError for states whose head
        count is not the number of configs. A call that raises leaves every head's store as it was.
        """
        self.stage(keys, values)()

    def stage(self, keys: torch.Tensor, values: torch.Tensor) -> Callable[[], None]:
        """Checks and encodes every head (:meth:`coset.kv.CodedKVStore.stage`); returns the commit of all."""
        check_states(keys, values)
        for name, x in (("key_states", keys), ("value_states", values)):
            if x.shape[1] != self.num_heads:
                raise ValueError(
                    f"{name} have {x.shape[1]} KV heads; this store has one config per KV head ({self.num_heads})"
                )
        commits = [s.stage(keys[:, h : h + 1], values[:, h : h + 1]) for h, s in enumerate(self.heads)]

        def commit() -> None:
            for c in commits:
                c()

        return commit

    def crop(self, n: int) -> None:
        """Drop the ``n`` most recent tokens of every head (:meth:`coset.kv.CodedKVStore.crop`)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        for s in self.heads:
            s.crop(n)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the batch axis of every head's buffers (reorder, select, repeat)."""
        for s in self.heads:
            s.map_batch(fn)

    def reset(self) -> None:
        for s in self.heads:
            s.reset()

    # ------------------------------------------------------------------ reads
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values ``(B, H, L, D)`` (every head's, concatenated along the head axis)."""
        parts = [s.dequantized() for s in self.heads]
        return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    def attend(self, query: torch.Tensor, attention_mask=None, scaling: float | None = None) -> torch.Tensor:
        """Attention of ``query (B, Hq, Lq, D)`` over the whole cache: query heads ``h G .. h G + G - 1`` over
        KV head ``h`` (``G = Hq / H``), a head-wise mask ``(B, Hq, Lq, Lk)`` cut the same way.

        Returns
        -------
        (B, Lq, Hq, D) tensor in the query's dtype

        Raises
        ------
        TypeError / ValueError as :meth:`coset.kv.CodedKVStore.attend` (a head count that is not a multiple of
        the KV heads included).
        """
        if not isinstance(query, torch.Tensor) or not query.dtype.is_floating_point or query.ndim != 4:
            raise TypeError("query must be a floating tensor (batch, heads, q_len, head_dim)")
        Hq, H = query.shape[1], self.num_heads
        if Hq % H or Hq < 1:
            raise ValueError(f"query {tuple(query.shape)} does not fit a cache of {H} KV heads")
        G = Hq // H
        per_head_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4
        per_head_mask = per_head_mask and attention_mask.shape[1] == Hq and H > 1
        outs = []
        for h, s in enumerate(self.heads):
            m = attention_mask[:, h * G : (h + 1) * G] if per_head_mask else attention_mask
            outs.append(s.attend(query[:, h * G : (h + 1) * G], m, scaling))
        return torch.cat(outs, dim=2)


def check_head_configs(configs) -> tuple[KVQuantConfig, ...]:
    """``configs`` as a tuple of KVQuantConfig that agree on ``window``, ``sink``, ``prefill`` and ``seed``.

    Raises
    ------
    TypeError for something that is not a sequence of KVQuantConfig; ValueError for an empty one or configs
    that disagree on those fields.
    """
    if isinstance(configs, (str, bytes, KVQuantConfig)) or not isinstance(configs, Sequence):
        raise TypeError(f"configs must be a sequence of KVQuantConfig (one per KV head), got {type(configs).__name__}")
    out = tuple(configs)
    if not all(isinstance(c, KVQuantConfig) for c in out):
        bad = next(type(c).__name__ for c in out if not isinstance(c, KVQuantConfig))
        raise TypeError(f"configs must be a sequence of KVQuantConfig (one per KV head), got a {bad} in it")
    if not out:
        raise ValueError("configs must hold one KVQuantConfig per KV head, got none")
    for field in ("window", "sink", "prefill", "seed"):
        vals = {getattr(c, field) for c in out}
        if len(vals) > 1:
            raise ValueError(f"the per-head configs must share {field}, got {sorted(vals, key=repr)}")
    return out
