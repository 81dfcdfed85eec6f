"""Offline text for calibration and evaluation (no hub access, ever).

Two *different* English sources from the Python standard library, so that calibration and evaluation never
share text:

- :func:`stdlib_docstrings` — ``inspect.getdoc`` of a fixed list of stdlib modules and their public members
  (calibration);
- :func:`pydoc_passages` / :func:`pydoc_text` — the paragraphs of ``pydoc_data.topics`` (the language
  reference shipped with CPython; evaluation).

Both change between Python versions, so :func:`text_fingerprint` records the interpreter version and a
sha256 of the exact text used; benchmarks store it next to their numbers.
:func:`token_windows` cuts a token stream into fixed-length windows for calibration and perplexity.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "CALIBRATION_MODULES",
    "pydoc_passages",
    "pydoc_text",
    "stdlib_docstrings",
    "text_fingerprint",
    "token_windows",
]

# Fixed, ordered list: the calibration set must not depend on what else happens to be imported.
CALIBRATION_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "builtins",
    "calendar",
    "cmath",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
    "zlib",
)

_BLANK = re.compile(r"\n\s*\n")
_SPACE = re.compile(r"\s+")


def pydoc_text() -> str:
    """All of ``pydoc_data.topics`` as one string (topics in file order, joined by blank lines)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in topics)


def pydoc_passages(min_words: int = 12) -> list[str]:
    """Paragraphs of ``pydoc_data.topics`` with at least ``min_words`` words, whitespace collapsed.

    Parameters
    ----------
    min_words : int
        Minimum number of whitespace-separated words for a paragraph to be kept (>= 1).

    Returns
    -------
    list[str]
        Passages in topic order (about 1,550 on CPython 3.11 with the default).
    """
    if not isinstance(min_words, int) or isinstance(min_words, bool) or min_words < 1:
        raise ValueError(f"min_words must be a positive int, got {min_words!r}")
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in topics:
        for para in _BLANK.split(topics[key]):
            text = _SPACE.sub(" ", para).strip()
            if len(text.split(" ")) >= min_words:
                out.append(text)
    return out


def _members(mod: Any) -> list[Any]:
    """The module and its public functions/classes/methods defined in it, in a deterministic order."""
    objs: list[Any] = [mod]
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        objs.append(obj)
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                if not mname.startswith("_") and inspect.isroutine(vars(obj)[mname]):
                    objs.append(vars(obj)[mname])
    return objs


def stdlib_docstrings(modules: Sequence[str] = CALIBRATION_MODULES, min_chars: int = 40) -> list[str]:
    """Docstrings (``inspect.getdoc``) of stdlib modules and their public members, de-duplicated.

    Parameters
    ----------
    modules : sequence of str
        Module names to import (default :data:`CALIBRATION_MODULES`); a module that is missing on this
        platform is skipped.
    min_chars : int
        Docstrings shorter than this are dropped.

    Returns
    -------
    list[str]
        Docstrings in a deterministic order (module list order, then sorted member names).
    """
    if isinstance(modules, str) or not isinstance(modules, Sequence) or len(modules) == 0:
        raise ValueError("modules must be a non-empty sequence of module names")
    seen: set[str] = set()
    out: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in _members(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def text_fingerprint(texts: Sequence[str] | str) -> dict[str, Any]:
    """Python version, number of texts/characters and the sha256 of the texts joined by ``"\\n\\n"``."""
    joined = texts if isinstance(texts, str) else "\n\n".join(texts)
    return {
        "python": sys.version.split()[0],
        "n_texts": 1 if isinstance(texts, str) else len(texts),
        "n_chars": len(joined),
        "sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
    }


def _special_wrap(tokenizer: Callable[..., Any]) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before / after a text (BERT: [CLS] / [SEP]; GPT-2-like: none)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError("cannot locate the text inside the tokenizer's special-token wrapping")


def token_windows(
    tokenizer: Callable[..., Any], texts: Sequence[str] | str, seqlen: int, n: int | None = None
) -> torch.Tensor:
    """Tokenize texts as one stream and cut it into contiguous windows of ``seqlen`` token ids.

    If the tokenizer adds special tokens (BERT's ``[CLS] ... [SEP]``), every window is wrapped with them
    and still has exactly ``seqlen`` ids.

    Parameters
    ----------
    tokenizer : HF tokenizer
        Called as ``tokenizer(text, add_special_tokens=False)["input_ids"]``.
    texts : sequence of str or str
        Joined with ``"\\n\\n"`` before tokenizing.
    seqlen : int
        Window length (including special tokens).
    n : int, optional
        Maximum number of windows (default: as many as the stream holds).

    Returns
    -------
    torch.LongTensor of shape (n_windows, seqlen)
        ``n_windows = min(n, len(stream) // body)``; the tail shorter than a window is dropped.
    """
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"seqlen must be an int >= 2, got {seqlen!r}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("texts is empty")
    ids = list(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    prefix, suffix = _special_wrap(tokenizer)
    body = seqlen - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"seqlen={seqlen} leaves no room next to {len(prefix) + len(suffix)} special tokens")
    count = len(ids) // body
    if n is not None:
        count = min(count, n)
    if count == 0:
        raise ValueError(f"texts hold {len(ids)} tokens, fewer than one window of {body}")
    rows = [prefix + ids[i * body : (i + 1) * body] + suffix for i in range(count)]
    return torch.tensor(rows, dtype=torch.long)
