"""``TokenBuffer``: a tensor that grows along its token axis (dim 2) with amortised O(1) appends.

``torch.cat`` on every decoding step copies the whole cache each time (O(L^2) bytes over a generation);
the buffer doubles its capacity instead and hands out a view of the used part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["TokenBuffer"]


class TokenBuffer:
    """Growable ``(B, H, L, ...)`` tensor; :attr:`data` is the used part ``[:, :, :length]`` (a view)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self.length = 0

    @property
    def data(self) -> torch.Tensor | None:
        return None if self._buf is None else self._buf.narrow(2, 0, self.length)

    @property
    def tensor(self) -> torch.Tensor:
        """:attr:`data` for a buffer that has been appended to.

        Raises
        ------
        RuntimeError if nothing was appended since creation or the last :meth:`clear`.
        """
        return self._require().narrow(2, 0, self.length)

    def _require(self) -> torch.Tensor:
        if self._buf is None:
            raise RuntimeError("the TokenBuffer is empty: append before reading it")
        return self._buf

    @property
    def storage(self) -> torch.Tensor | None:
        """The whole held tensor ``(B, H, capacity, ...)`` (contiguous; the first :attr:`length` tokens are used),
        for kernels that read the buffer in place without a view (None before the first append)."""
        return self._buf

    @property
    def batch(self) -> int | None:
        """The batch size of the held tensor (None before the first append): no view is made."""
        return None if self._buf is None else self._buf.shape[0]

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the held tensor (None before the first append)."""
        return None if self._buf is None else self._buf.dtype

    @property
    def device(self) -> torch.device | None:
        """The device of the held tensor (None before the first append)."""
        return None if self._buf is None else self._buf.device

    @property
    def nbytes(self) -> int:
        """Bytes of the used part (the spare capacity is an allocation detail, at most the same again)."""
        d = self.data
        return 0 if d is None else d.numel() * d.element_size()

    def append(self, x: torch.Tensor) -> None:
        if self._buf is None:
            cap = max(16, x.shape[2])
            self._buf = x.new_empty((x.shape[0], x.shape[1], cap, *x.shape[3:]))
        elif x.shape[:2] != self._buf.shape[:2] or x.shape[3:] != self._buf.shape[3:] or x.dtype != self._buf.dtype:
            raise ValueError(
                f"cannot append a {tuple(x.shape)} {x.dtype} chunk to a buffer of "
                f"{tuple(self._buf.shape[:2])} x L x {tuple(self._buf.shape[3:])} {self._buf.dtype}"
            )
        k = x.shape[2]
        buf = self.reserve(k)
        if k and x.numel():  # (one narrow + copy)
            buf.narrow(2, self.length, k).copy_(x)
        self.length += k

    def reserve(self, k: int) -> torch.Tensor:
        """Room for ``k`` more tokens past :attr:`length` in a buffer that has been appended to (the capacity grows
        as :meth:`append` grows it; the used part is unchanged): the whole held tensor, for a kernel that writes the
        next tokens in place before :meth:`advance` marks them used."""
        buf = self._require()
        n = self.length + k
        if n > buf.shape[2]:
            cap = max(n, 2 * buf.shape[2])
            new = buf.new_empty((buf.shape[0], buf.shape[1], cap, *buf.shape[3:]))
            new.narrow(2, 0, self.length).copy_(buf.narrow(2, 0, self.length))
            self._buf = buf = new
        return buf

    def advance(self, k: int) -> None:
        """Mark ``k`` tokens written in place past :attr:`length` (after :meth:`reserve`) as used."""
        if self._buf is None or not 0 <= k <= self._buf.shape[2] - self.length:
            raise ValueError(f"advance({k}) past the reserved capacity")
        self.length += k

    def pop_front(self, n: int) -> torch.Tensor:
        """Remove and return the ``n`` oldest tokens (a copy)."""
        buf = self._require()
        out = buf[:, :, :n].clone()
        rest = buf[:, :, n : self.length].clone()
        buf[:, :, : rest.shape[2]] = rest
        self.length -= n
        return out

    def crop(self, n: int) -> None:
        """Drop the ``n`` newest tokens."""
        self.length = max(0, self.length - n)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the buffer by ``fn(data)`` (batch reorder / select / repeat)."""
        if self._buf is not None:
            self._buf = fn(self._buf[:, :, : self.length]).contiguous()
            self.length = self._buf.shape[2]

    def clear(self) -> None:
        self._buf = None
        self.length = 0
