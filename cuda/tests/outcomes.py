"""Comparing one call on two backends: the result, or the documented exception (type and message)."""

import warnings

import torch


def documented(e: BaseException) -> None:
    """A hostile input may only end in a TypeError / ValueError with a message."""
    assert isinstance(e, (TypeError, ValueError)), f"undocumented {type(e).__name__}: {e}"
    assert str(e), "an error without a message"


def outcome(fn):
    """``("ok", fn())``, or ``(exception type, message)`` for a documented exception (warnings silenced)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn()
    except Exception as e:  # noqa: BLE001 - compared between backends
        documented(e)
        return type(e), str(e)


def same(a, b, what: str) -> None:
    """Two outcomes agree: the same exception and message, or results equal bit for bit (dtype, shape, values)."""
    assert a[0] == b[0], f"{what}: {a} vs {b}"
    if a[0] != "ok":
        assert a[1] == b[1], what
        return
    ra = a[1] if isinstance(a[1], tuple) else (a[1],)
    rb = b[1] if isinstance(b[1], tuple) else (b[1],)
    assert len(ra) == len(rb), what
    for u, v in zip(ra, rb, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), what
