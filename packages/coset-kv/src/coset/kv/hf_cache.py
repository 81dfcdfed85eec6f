"""transformers adapters: ``Cache`` classes over the stores, and the ``"coset_kv"`` attention function.

Import this module only with the ``[hf]`` extra (it imports transformers). Usage::

    from coset.kv import KVQuantConfig
    from coset.kv.hf_cache import CosetQuantizedCache, use_coset_attention

    use_coset_attention(model)                      # registers "coset_kv" and switches the model to it
    cache = CosetQuantizedCache(model.config, KVQuantConfig(bits=4))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

With the ``"coset_kv"`` attention, :class:`CosetKVLayer` hands the attention function a :class:`CodedKV`
handle instead of dense tensors, and scores are computed from the key codes. With any other attention
implementation pass ``return_codes=False``: the layer then returns the decoded keys and values (the HF
``QuantizedCache`` behaviour, no LUT). Layers follow the appendable ``Fp8QuantizedLayer`` pattern of
``BaseQuantizedLayer``: a token is quantized once, when it arrives (or leaves the window).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Literal, overload

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .coded_store import CodedKVStore
from .codes import KVCodes, decode_states, encode_states
from .config import KVQuantConfig, ScalarKVConfig
from .head_store import PerHeadKVStore, check_head_configs
from .key_transform import KeyTransform, check_options, key_transform, score_error_factor
from .rope import RotaryTable, apply_rotary, unapply_rotary
from .scalar_store import ScalarKVStore

__all__ = [
    "CodedKV",
    "CosetKVLayer",
    "ScalarKVLayer",
    "CosetQuantizedCache",
    "ScalarQuantizedCache",
    "coset_kv_attention",
    "register_coset_attention",
    "use_coset_attention",
    "calibrate_key_scales",
    "calibrate_key_transforms",
    "fisher_sensitivity",
    "layer_sensitivity",
    "ATTN_NAME",
]

ATTN_NAME = "coset_kv"

#: Layers a cache may have (one store object each): far above any model, far below a token id passed by mistake.
MAX_LAYERS = 1 << 16


class CodedKV:
    """What :meth:`CosetKVLayer.update` returns in place of dense keys and values: a handle on the store."""

    __slots__ = ("store",)

    def __init__(self, store: CodedKVStore | PerHeadKVStore):
        self.store = store

    def __repr__(self) -> str:
        return f"CodedKV(tokens={len(self.store)}, nbytes={self.store.nbytes})"


class _StoreLayer(BaseQuantizedLayer):
    """Shared plumbing of the two layers: the store does the work, the layer speaks the Cache API."""

    store: CodedKVStore | PerHeadKVStore | ScalarKVStore

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return len(self.store)

    def reset(self) -> None:
        self.store.reset()
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove tokens: a negative value removes that many of the newest, a positive one keeps that many
        (the legacy convention of ``DynamicLayer``)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(f"tokens_to_remove must be an int, got {type(tokens_to_remove).__name__}")
        n = -tokens_to_remove if tokens_to_remove < 0 else max(0, len(self.store) - tokens_to_remove)
        self.store.crop(min(n, len(self.store)))
        self.cumulative_length = len(self.store)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes


class CosetKVLayer(_StoreLayer):
    """One layer of the HNLQ KV cache (:class:`coset.kv.CodedKVStore` behind the ``CacheLayerMixin`` API).

    Parameters
    ----------
    config : KVQuantConfig, or a sequence of one KVQuantConfig per KV head (a per-head bit allocation:
        :class:`coset.kv.PerHeadKVStore`; the configs must agree on ``window``, ``sink``, ``prefill``, ``seed``)
    layer_idx : int, offsets the rotation seed (``config.seed + layer_idx``)
    return_codes : return a :class:`CodedKV` handle (for the ``"coset_kv"`` attention) instead of decoded
        dense states
    backend : LUT kernel, ``"auto"`` | ``"torch"`` | ``"native"``
    """

    store: CodedKVStore | PerHeadKVStore

    def __init__(
        self,
        config: KVQuantConfig | Sequence[KVQuantConfig] | None = None,
        layer_idx: int = 0,
        return_codes: bool = True,
        backend: str = "auto",
        key_scale: torch.Tensor | KeyTransform | None = None,
        rope: RotaryTable | None = None,
    ):
        super().__init__()
        config = KVQuantConfig() if config is None else config
        if isinstance(config, KVQuantConfig):
            self.store = CodedKVStore(
                config, seed=config.seed + int(layer_idx), backend=backend, key_scale=key_scale, rope=rope
            )
        else:
            try:
                heads = check_head_configs(config)
            except TypeError:
                raise TypeError(
                    f"config must be a KVQuantConfig or a sequence of one KVQuantConfig per KV head, got {config!r}"
                ) from None
            except ValueError as e:
                raise ValueError(f"config: {e}") from None
            self.store = PerHeadKVStore(
                heads, seed=heads[0].seed + int(layer_idx), backend=backend, key_scale=key_scale, rope=rope
            )
        self.return_codes = bool(return_codes)

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        # codes are per token, so dropping the newest is exact; with a window the split between coded and
        # full-precision tokens would differ from a run that never saw the dropped tokens
        return self.store.config.window == 0

    def _joint_store(self) -> CodedKVStore:
        if not isinstance(self.store, CodedKVStore):
            raise NotImplementedError("a layer with per-head configs has no single code; see PerHeadKVStore")
        return self.store

    def _quantize(self, tensor: torch.Tensor) -> KVCodes:
        store = self._joint_store()
        return encode_states(tensor, store._require_rotation(), store.config)

    def _dequantize(self, q_tensor: KVCodes) -> torch.Tensor:
        store = self._joint_store()
        return decode_states(q_tensor, store._require_rotation(), store.config)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens' codes; return a :class:`CodedKV` handle twice, or the decoded states, or
        (``config.prefill == "float"``, several tokens into an empty cache) the given states themselves."""
        fresh = len(self.store) == 0
        self.store.append(key_states, value_states)  # validates first: a call that raises changes nothing
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length = len(self.store)
        if fresh and key_states.shape[2] > 1 and self.store.config.prefill == "float":
            return key_states, value_states  # the prompt attends with what it has; only its codes are kept
        if self.return_codes:
            h = CodedKV(self.store)
            return h, h
        return self.store.dequantized()


class ScalarKVLayer(_StoreLayer):
    """One layer of the KIVI-style baseline; returns decoded dense states (any attention implementation)."""

    store: ScalarKVStore

    def __init__(self, config: ScalarKVConfig | None = None):
        super().__init__()
        self.store = ScalarKVStore(config)

    def _quantize(self, tensor):
        raise NotImplementedError("ScalarKVLayer quantizes keys and values differently; see ScalarKVStore")

    def _dequantize(self, q_tensor):
        raise NotImplementedError("ScalarKVLayer quantizes keys and values differently; see ScalarKVStore")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store.append(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length = len(self.store)
        return self.store.dequantized()


def _num_layers(model_config) -> int:
    if isinstance(model_config, bool):
        raise TypeError("model_config must be a transformers config or an int number of layers")
    if isinstance(model_config, int):
        n = model_config
    else:
        cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        num_hidden_layers = getattr(cfg, "num_hidden_layers", None)
        if not isinstance(num_hidden_layers, int):
            raise TypeError("model_config must be a transformers config with num_hidden_layers, or an int")
        n = num_hidden_layers
    if not 1 <= n <= MAX_LAYERS:
        raise ValueError(f"the number of layers must be in [1, {MAX_LAYERS}], got {n}")
    return n


def _num_kv_heads(model_config) -> int | None:
    """``num_key_value_heads`` of a transformers config (``num_attention_heads`` without it), None for an int."""
    if isinstance(model_config, int):
        return None
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    return h if isinstance(h, int) and not isinstance(h, bool) else None


class _BytesMixin:
    layers: list

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (codes, side information, full-precision residuals/windows)."""
        return sum(layer.nbytes for layer in self.layers)


class CosetQuantizedCache(_BytesMixin, Cache):
    """KV cache storing keys and values as HNLQ codes, one :class:`CosetKVLayer` per model layer.

    Parameters
    ----------
    model_config : the model's ``PretrainedConfig`` (``num_hidden_layers``) or the number of layers
    config : KVQuantConfig (default ``KVQuantConfig()``: 4 bits, 4.5 bits per element all-in at D = 64), or a
        sequence of one entry per layer (a per-layer bit allocation): a KVQuantConfig, or a sequence of one
        KVQuantConfig per KV head (a per-head allocation, :func:`coset.kv.allocate_trellis_heads`; that layer
        is a :class:`coset.kv.PerHeadKVStore`)
    return_codes, backend : see :class:`CosetKVLayer`
    key_scales : optional sequence of one key scale (or None) per layer: ``(H, D)`` per-channel scales from
        :func:`calibrate_key_scales` or :class:`coset.kv.KeyTransform` from :func:`calibrate_key_transforms` (see
        :class:`coset.kv.CodedKVStore`)
    rope : optional :class:`coset.kv.RotaryTable` (``RotaryTable.from_model(model)``), shared by the layers:
        centre the keys on their pre-RoPE mean (:mod:`coset.kv.rope`); calibrate the key scales / transforms
        with the same ``rope``
    """

    def __init__(
        self,
        model_config,
        config: KVQuantConfig | Sequence[KVQuantConfig | Sequence[KVQuantConfig]] | None = None,
        *,
        return_codes: bool = True,
        backend: str = "auto",
        key_scales: Sequence[torch.Tensor | KeyTransform | None] | None = None,
        rope: RotaryTable | None = None,
    ):
        n = _num_layers(model_config)
        config = KVQuantConfig() if config is None else config
        bad = TypeError(
            f"config must be a KVQuantConfig or a sequence of {n} entries (one per layer), each a KVQuantConfig or "
            "a sequence of one KVQuantConfig per KV head"
        )
        configs: list[KVQuantConfig | tuple[KVQuantConfig, ...]]
        if isinstance(config, KVQuantConfig):
            configs = [config] * n
        elif isinstance(config, (str, bytes)) or not isinstance(config, Iterable):
            raise bad
        else:
            configs = []
            for entry in config:
                if isinstance(entry, KVQuantConfig):
                    configs.append(entry)
                    continue
                try:
                    configs.append(check_head_configs(entry))
                except TypeError:
                    raise bad from None
                except ValueError as e:
                    raise ValueError(f"config[{len(configs)}]: {e}") from None
        if len(configs) != n:
            raise bad
        kv_heads = _num_kv_heads(model_config)
        for i, c in enumerate(configs):
            if isinstance(c, tuple) and kv_heads is not None and len(c) != kv_heads:
                raise ValueError(f"config[{i}] has {len(c)} per-head configs; the model has {kv_heads} KV heads")
        scales = _per_layer("key_scales", key_scales, n)
        first = configs[0]
        self.kv_config = (
            config if isinstance(config, KVQuantConfig) else first[0] if isinstance(first, tuple) else first
        )
        self.kv_configs = configs
        super().__init__(
            layers=[
                CosetKVLayer(configs[i], i, return_codes, backend, key_scale=scales[i], rope=rope) for i in range(n)
            ]
        )


class ScalarQuantizedCache(_BytesMixin, Cache):
    """The KIVI-style baseline cache (:class:`ScalarKVLayer` per layer); works with any attention."""

    def __init__(self, model_config, config: ScalarKVConfig | None = None):
        config = ScalarKVConfig() if config is None else config
        if not isinstance(config, ScalarKVConfig):
            raise TypeError(f"config must be a ScalarKVConfig, got {type(config).__name__}")
        self.kv_config = config
        super().__init__(layers=[ScalarKVLayer(config) for _ in range(_num_layers(model_config))])


def coset_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention function for ``AttentionInterface``: reads the codes when handed a :class:`CodedKV`, and is
    plain SDPA for dense keys and values (no cache, or another cache class)."""
    if isinstance(key, CodedKV):
        if dropout:
            raise ValueError("coset_kv attention has no dropout (inference only); got dropout > 0")
        return key.store.attend(query, attention_mask, scaling), None
    if isinstance(value, CodedKV):
        raise TypeError("value is a CodedKV handle but key is not")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_coset_attention() -> str:
    """Register ``"coset_kv"`` (attention function + SDPA-style mask) with transformers; idempotent."""
    ALL_ATTENTION_FUNCTIONS[ATTN_NAME] = coset_kv_attention
    ALL_MASK_ATTENTION_FUNCTIONS[ATTN_NAME] = sdpa_mask
    return ATTN_NAME


def use_coset_attention(model) -> None:
    """Register the attention function and switch ``model`` to it (``model.set_attn_implementation``)."""
    register_coset_attention()
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model.set_attn_implementation(ATTN_NAME)


def _check_ids(model, input_ids: torch.Tensor) -> None:
    """TypeError for non-integer ids, ValueError for ids outside the model's vocabulary (checked before the
    forward, which would raise an IndexError from inside the embedding)."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
    if input_ids.shape[0] < 1:
        raise ValueError("input_ids must hold at least one sequence")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if input_ids.numel() and (int(input_ids.min()) < 0 or (vocab is not None and int(input_ids.max()) >= vocab)):
        raise ValueError(
            f"input_ids must be token ids in [0, {vocab}), got [{int(input_ids.min())}, {int(input_ids.max())}]"
        )


@contextmanager
def _attention_function(model, name: str, fn) -> Iterator[None]:
    """``model`` runs with the attention function ``fn`` (SDPA-style mask), registered as ``name``; the model's
    own implementation is restored on exit."""
    ALL_ATTENTION_FUNCTIONS[name] = fn
    ALL_MASK_ATTENTION_FUNCTIONS[name] = sdpa_mask
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _check_recorded(recorded: dict, n: int) -> None:
    if sorted(recorded) != list(range(n)):
        raise RuntimeError(f"recorded {len(recorded)} of {n} attention layers (is this a transformers decoder?)")


def _per_layer(name: str, entries, n: int) -> list:
    """``entries`` (a sequence of one entry per layer, or None) as a list of ``n`` (None: ``n`` Nones)."""
    if entries is None:
        return [None] * n
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise TypeError(f"{name} must be a sequence of one key scale (or None) per layer, got {entries!r}")
    out = list(entries)
    if len(out) != n:
        raise ValueError(f"{name} must have one entry per layer ({n}), got {len(out)}")
    return out


@torch.no_grad()
def _attention_moments(
    model, input_ids: torch.Tensor, rope: RotaryTable | None = None
) -> list[dict[str, torch.Tensor]]:
    """Per layer, ``(num_kv_heads, D, D)`` float64 second moments from one forward of ``model`` on
    ``input_ids``: ``"k"`` of the centred keys (token 0, the attention sink, left out; with ``rope``, centred
    on the rotated pre-RoPE mean ``R_p μ`` as the cache codes them), ``"v"`` of the centred values (token 0 left
    out) and ``"q"`` of the queries (uncentred: a constant query component scores every key; the ``G`` query
    heads of a group pooled)."""
    if rope is not None and not isinstance(rope, RotaryTable):
        raise TypeError(f"rope must be a coset.kv.RotaryTable, got {type(rope).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 3:
        raise ValueError("input_ids must be a (batch, seq_len >= 3) tensor of token ids")
    _check_ids(model, input_ids)
    n = _num_layers(model.config)
    stats: dict[int, dict[str, torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        B, Hq, L, D = query.shape
        H = key.shape[1]
        q = query.detach().to(torch.float64).reshape(B, H, Hq // H * L, D).transpose(0, 1).reshape(H, -1, D)
        k = key.detach().to(torch.float64)[:, :, 1:]  # (B, H, L - 1, D) at positions 1 .. L-1
        if rope is not None:
            cos, sin = (t.to(torch.float64) for t in rope.get(1, key.shape[2]))
            mu = unapply_rotary(k, cos, sin).mean(dim=(0, 2))
            k = k - apply_rotary(mu.unsqueeze(1), cos, sin)
            k = k.transpose(0, 1).reshape(H, -1, D)
        else:
            k = k.transpose(0, 1).reshape(H, -1, D)
            k = k - k.mean(dim=1, keepdim=True)
        v = value.detach().to(torch.float64)[:, :, 1:].transpose(0, 1).reshape(H, -1, D)
        v = v - v.mean(dim=1, keepdim=True)
        stats[int(module.layer_idx)] = {
            "k": k.transpose(1, 2) @ k / k.shape[1],
            "v": v.transpose(1, 2) @ v / v.shape[1],
            "q": q.transpose(1, 2) @ q / q.shape[1],
        }
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with _attention_function(model, "coset_kv_calibrate", record), torch.no_grad():
        model(input_ids, use_cache=False)
    _check_recorded(stats, n)
    return [stats[i] for i in range(n)]


def calibrate_key_scales(
    model, input_ids: torch.Tensor, exponent: float = 0.25, rope: RotaryTable | None = None
) -> list[torch.Tensor]:
    """Per-layer, per-KV-head, per-channel key scales ``s_c = (E[k_c^2] / E[q_c^2])^exponent`` (rms-normalised
    over the channels) from one forward of ``model`` on ``input_ids`` (calibration text, not the evaluation
    text), for ``CosetQuantizedCache(..., key_scales=...)``.

    Why: keys are coded as ``k / s`` with white error ``e`` after the rotation, and scored as ``<s q, k / s>``,
    so the score error is ``<s q, e>`` with variance ``sigma^2 sum_c s_c^2 E[q_c^2]`` while ``sigma^2`` (the
    code's error at a fixed rate) scales with ``sum_c E[k_c^2] / s_c^2``. The product is smallest (Cauchy-
    Schwarz) at ``s_c^4 = E[k_c^2] / E[q_c^2]``: the default exponent 1/4. Keys are centred (as the cache codes
    ``k - mu``); token 0 (the attention sink, often an outlier) is left out of the key statistics. Queries of
    the ``G`` heads of a group are pooled. :func:`calibrate_key_transforms` is the full-matrix optimum. With
    ``rope`` the keys are centred on their rotated pre-RoPE mean, as a cache with the same ``rope`` codes them.

    Returns
    -------
    list of ``num_hidden_layers`` float32 tensors ``(num_kv_heads, head_dim)``
    """
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not 0 <= exponent <= 1:
        raise ValueError(f"exponent must be a number in [0, 1], got {exponent!r}")
    out = []
    for st in _attention_moments(model, input_ids, rope):
        ek, eq = torch.diagonal(st["k"], dim1=-2, dim2=-1), torch.diagonal(st["q"], dim1=-2, dim2=-1)
        tiny = 1e-12 * float(torch.maximum(ek.max(), eq.max()).clamp(min=1e-30))
        s = (ek.clamp(min=tiny) / eq.clamp(min=tiny)).pow(exponent)
        out.append((s / s.pow(2).mean(-1, keepdim=True).sqrt()).to(torch.float32))
    return out


def calibrate_key_transforms(
    model, input_ids: torch.Tensor, ridge: float = 1e-3, rank: int | None = 8, rope: RotaryTable | None = None
) -> list[KeyTransform]:
    """Per-layer, per-KV-head key transforms ``T`` (:func:`coset.kv.key_transform`: the matrix geometric mean
    of the keys' and queries' second moments, which minimises the expected squared score error of the code over
    all linear maps) from one forward of ``model`` on ``input_ids`` (calibration text, not the evaluation text),
    for ``CosetQuantizedCache(..., key_scales=...)``. Same statistics as :func:`calibrate_key_scales`, whose
    diagonal optimum it generalises; ``rank`` eigen-directions of it are kept, ``rank (D + 1)`` float16 per KV
    head and layer (counted in the cache bytes; SmolLM2-135M, rank 8: 94 KB for the model). With ``rope``
    (the cache's :class:`coset.kv.RotaryTable`) the key moments are those of ``k - R_p μ`` the cache codes.

    Returns
    -------
    list of ``num_hidden_layers`` :class:`coset.kv.KeyTransform` with vectors ``(num_kv_heads, head_dim, rank)``
    """
    check_options(ridge, rank)  # before the forward
    return [key_transform(st["k"], st["q"], ridge, rank) for st in _attention_moments(model, input_ids, rope)]


def _kv_gradients(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the gradients ``(B, H, L, D)`` of the summed next-token log-loss of ``input_ids`` with respect
    to the key and value states as they enter attention (post-RoPE). One forward and one backward; the
    parameters' ``requires_grad`` flags and the attention implementation are restored."""
    n = _num_layers(model.config)
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        k, v = key.detach().requires_grad_(), value.detach().requires_grad_()
        leaves[int(module.layer_idx)] = (k, v)
        return sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients of the states only: no graph through the weights
            p.requires_grad_(False)
        with _attention_function(model, "coset_kv_fisher", record), torch.enable_grad():
            logits = model(input_ids, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
            )
            _check_recorded(leaves, n)
            grads = torch.autograd.grad(loss, [t for i in range(n) for t in leaves[i]])
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return [(grads[2 * i].detach(), grads[2 * i + 1].detach()) for i in range(n)]


def _kv_fisher(model, input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer, ``"k"`` and ``"v"``: ``(num_kv_heads, D, D)`` float64 empirical Fisher ``mean_t g_t g_t^T`` of
    the key and value states (:func:`_kv_gradients`; token 0, the exact attention sink, left out)."""
    out = []
    for gk, gv in _kv_gradients(model, input_ids):
        layer = {}
        for side, g in (("k", gk), ("v", gv)):
            H, D = g.shape[1], g.shape[-1]
            g = g.to(torch.float64)[:, :, 1:].transpose(0, 1).reshape(H, -1, D)
            layer[side] = g.transpose(1, 2) @ g / g.shape[1]
        out.append(layer)
    return out


@overload
def fisher_sensitivity(
    model,
    input_ids: torch.Tensor,
    key_scales: Sequence[torch.Tensor | KeyTransform | None] | None = None,
    rope: RotaryTable | None = None,
    per_head: Literal[False] = False,
) -> tuple[list[float], list[float]]: ...


@overload
def fisher_sensitivity(
    model,
    input_ids: torch.Tensor,
    key_scales: Sequence[torch.Tensor | KeyTransform | None] | None = None,
    rope: RotaryTable | None = None,
    *,
    per_head: Literal[True],
) -> tuple[list[list[float]], list[list[float]]]: ...


@overload
def fisher_sensitivity(
    model,
    input_ids: torch.Tensor,
    key_scales: Sequence[torch.Tensor | KeyTransform | None] | None = None,
    rope: RotaryTable | None = None,
    per_head: bool = False,
) -> tuple[list[float], list[float]] | tuple[list[list[float]], list[list[float]]]: ...


def fisher_sensitivity(
    model,
    input_ids: torch.Tensor,
    key_scales: Sequence[torch.Tensor | KeyTransform | None] | None = None,
    rope: RotaryTable | None = None,
    per_head: bool = False,
) -> tuple[list[float], list[float]] | tuple[list[list[float]], list[list[float]]]:
    """Per layer, how much the log-loss grows per unit of relative coding error of its keys and of its values:
    the input of :func:`coset.kv.allocation.allocate_trellis` (``per_head=True``: per layer and KV head, the input
    of :func:`coset.kv.allocation.allocate_trellis_heads`). From one forward (moments) and one forward + backward
    (gradients) of ``model`` on ``input_ids`` (calibration text, not the evaluation text).

    Model (second order, empirical Fisher ``F = mean_t g_t g_t^T`` of the states, :func:`_kv_fisher`): a code
    with relative error ``eps`` (white in its domain, variance ``eps E||x'||^2 / D`` per element) on keys coded
    as ``x' = T (k - R_p mu)`` adds ``eps/2 tr(T S T^T) tr(T^-T F T^-1) / D`` to the summed log-loss (``S``: the
    moments the cache codes, :func:`_attention_moments` with ``rope``; ``T``: the layer's key transform,
    ``diag(1/s)`` for per-channel scales, ``I`` for None); values are coded as ``v - mu_v`` (``T = I``). Summed
    over the KV heads unless ``per_head``; the common factor ``1/2`` is left out.

    Parameters
    ----------
    model : a transformers decoder
    input_ids : (batch, seq_len >= 3) token ids of the calibration text
    key_scales : optional sequence of one key scale or :class:`coset.kv.KeyTransform` (or None) per layer, as
        the cache will use them
    rope : the cache's :class:`coset.kv.RotaryTable`, if any
    per_head : return, per layer, one sensitivity per KV head instead of their sum

    Returns
    -------
    key_sensitivity, value_sensitivity : lists of ``num_hidden_layers`` floats >= 0, or (``per_head``) of
        ``num_hidden_layers`` lists of ``num_key_value_heads`` floats >= 0 (summed over the heads: the per-layer
        figures)
    """
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool, got {type(per_head).__name__}")
    n = _num_layers(model.config)
    scales = _per_layer("key_scales", key_scales, n)
    moments = _attention_moments(model, input_ids, rope)
    fisher = _kv_fisher(model, input_ids)
    ks: list = []
    vs: list = []
    for st, fi, sc in zip(moments, fisher, scales, strict=True):
        D = st["k"].shape[-1]
        t = 1 / sc if isinstance(sc, torch.Tensor) else sc  # keys coded as k / s: T = diag(1 / s)
        k, v = score_error_factor(st["k"], fi["k"], t), score_error_factor(st["v"], fi["v"], None)  # (H,)
        if per_head:
            ks.append([float(x) / D for x in k])
            vs.append([float(x) / D for x in v])
        else:
            ks.append(float(k.sum()) / D)
            vs.append(float(v.sum()) / D)
    return ks, vs


@torch.no_grad()
def layer_sensitivity(
    model,
    input_ids: torch.Tensor,
    config: KVQuantConfig,
    key_scales: Sequence[torch.Tensor | KeyTransform | None] | None = None,
    rope: RotaryTable | None = None,
) -> list[float]:
    """Per layer, the increase of the mean next-token log-loss on ``input_ids`` (calibration text) when only
    that layer's keys and values are coded with ``config`` (every position reading the codes, as the ppl
    benchmark does) and every other layer keeps them exact: the input of
    :func:`coset.kv.allocation.allocate_layers`. One forward per layer plus one reference forward.

    ``model`` must use the ``"coset_kv"`` attention (:func:`use_coset_attention`). Negative increases (noise)
    are returned as measured. ``key_scales`` and ``rope`` go to the caches (:class:`CosetQuantizedCache`).
    """
    if not isinstance(config, KVQuantConfig):
        raise TypeError(f"config must be a KVQuantConfig, got {type(config).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError("input_ids must be a (batch, seq_len >= 2) tensor of token ids")
    _check_ids(model, input_ids)
    n = _num_layers(model.config)
    coded = replace(config, prefill="codes")
    exact = replace(coded, window=2**31 - 1, sink=0)  # every token stays in the full-precision window

    def loss(configs) -> float:
        cache = CosetQuantizedCache(model.config, configs, key_scales=key_scales, rope=rope)
        logits = model(input_ids, past_key_values=cache, use_cache=True).logits[:, :-1].double()
        return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:]))

    ref = loss([exact] * n)
    return [loss([coded if i == l else exact for i in range(n)]) - ref for l in range(n)]
