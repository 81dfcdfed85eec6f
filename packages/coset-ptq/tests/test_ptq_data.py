"""coset.ptq.data: offline texts, fingerprints, token windows."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from coset.ptq.data import (
    CALIBRATION_MODULES,
    pydoc_passages,
    pydoc_text,
    stdlib_docstrings,
    text_fingerprint,
    token_windows,
)


def test_pydoc_passages_respect_min_words_and_nest():
    p12 = pydoc_passages()
    p30 = pydoc_passages(min_words=30)
    assert len(p12) > 1000  # 1,554 on CPython 3.11
    assert all(len(t.split(" ")) >= 12 and t == t.strip() and "\n" not in t for t in p12)
    assert all(len(t.split(" ")) >= 30 for t in p30)
    assert set(p30) <= set(p12) and len(p30) < len(p12)
    # every passage is text of the topics
    flat = " ".join(pydoc_text().split())
    assert all(t in flat for t in p12[:50])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "12"])
def test_pydoc_passages_rejects_bad_min_words(bad):
    with pytest.raises(ValueError, match="min_words"):
        pydoc_passages(min_words=bad)


def test_stdlib_docstrings_deterministic_unique_and_disjoint_from_eval():
    a = stdlib_docstrings(CALIBRATION_MODULES[:10])
    b = stdlib_docstrings(CALIBRATION_MODULES[:10])
    assert a == b and len(a) > 20
    assert len(set(a)) == len(a)
    assert min(len(t) for t in a) >= 40
    assert not set(a) & set(pydoc_passages())  # calibration never equals evaluation text
    # a missing module is skipped, not an error
    assert stdlib_docstrings(["json", "no_such_module_xyz"]) == stdlib_docstrings(["json"])


@pytest.mark.parametrize("bad", [[], "json", None])
def test_stdlib_docstrings_rejects_bad_modules(bad):
    with pytest.raises(ValueError, match="modules"):
        stdlib_docstrings(bad)


def test_text_fingerprint_is_sha256_of_the_joined_text():
    fp = text_fingerprint(["ab", "cd"])
    assert fp["sha256"] == hashlib.sha256(b"ab\n\ncd").hexdigest()
    assert fp["python"] == sys.version.split()[0] and fp["n_texts"] == 2 and fp["n_chars"] == 6
    assert text_fingerprint(["ab", "ce"])["sha256"] != fp["sha256"]


def test_token_windows_are_contiguous_stream_slices(tiny_tokenizer):
    texts = ["hello world, this is text"] * 20
    stream = tiny_tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    w = token_windows(tiny_tokenizer, texts, seqlen=34, n=5)  # [CLS] + 32 + [SEP]
    assert w.shape == (5, 34) and w.dtype == torch.long
    assert (w[:, 0] == 1).all() and (w[:, -1] == 2).all()
    assert w[:, 1:-1].reshape(-1).tolist() == stream[: 5 * 32]
    plain = type(tiny_tokenizer)(special=False)
    w2 = token_windows(plain, texts, seqlen=32)
    assert w2.shape == (len(stream) // 32, 32)
    assert w2.reshape(-1).tolist() == stream[: w2.numel()]


def test_token_windows_bad_input(tiny_tokenizer):
    with pytest.raises(ValueError, match="texts"):
        token_windows(tiny_tokenizer, [], 16)
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(tiny_tokenizer, ["abc"], 1)
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(tiny_tokenizer, ["abc"], 2)  # only room for [CLS] [SEP]
    with pytest.raises(ValueError, match="n must"):
        token_windows(tiny_tokenizer, ["abc"], 16, n=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tiny_tokenizer, ["abc"], 16)
