"""Shared fixtures: tiny random HF models built locally from a config (no download, ever).

Dimensions are multiples of 8 (E8 blocks) and include a non-power-of-two (96 = 12·8) so the Hadamard
construction for such orders is exercised.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers", reason="coset-ptq[hf] extra (transformers) is not installed")

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """LlamaForCausalLM: hidden 64, 4 heads (2 KV), MLP 96, vocab 128, tied embeddings, eval mode."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """BertModel: hidden 64, 4 heads, MLP 96, vocab 128, eval mode (no dropout)."""
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


class TinyTokenizer:
    """Deterministic byte tokenizer with BERT-style [CLS]=1 / [SEP]=2 wrapping when ``special=True``."""

    def __init__(self, special: bool = False):
        self.special = special
        self.pad_token_id = 0

    def num_special_tokens_to_add(self) -> int:
        return 2 if self.special else 0

    def build_inputs_with_special_tokens(self, ids):
        return [1, *ids, 2] if self.special else list(ids)

    def _encode(self, text: str) -> list[int]:
        return [3 + (b % (VOCAB - 3)) for b in text.encode("utf-8")]

    def __call__(
        self, text, add_special_tokens=True, padding=False, truncation=False, max_length=None, return_tensors=None
    ):
        if isinstance(text, str):
            ids = self._encode(text)
            if add_special_tokens:
                ids = self.build_inputs_with_special_tokens(ids)
            return {"input_ids": ids}
        rows = [self._encode(t) for t in text]
        if truncation and max_length is not None:
            rows = [r[: max_length - self.num_special_tokens_to_add()] for r in rows]
        if add_special_tokens:
            rows = [self.build_inputs_with_special_tokens(r) for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def calib_ids():
    """4 batches of (2, 32) random token ids."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (2, 32), generator=g) for _ in range(4)]


@pytest.fixture
def tiny_tokenizer():
    return TinyTokenizer(special=True)


@pytest.fixture
def makers():
    """{"llama": tiny_llama, "bert": tiny_bert} (test modules cannot import conftest under importlib mode)."""
    return {"llama": tiny_llama, "bert": tiny_bert}


def pytest_configure(config):
    # the package's own pytest section does not list the workspace's markers
    config.addinivalue_line("markers", "slow: long-running tests (still run in CI)")
