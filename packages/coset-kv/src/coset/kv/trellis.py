"""Bitshift-trellis code of head vectors (:class:`coset.kv.KVQuantConfig` ``value_code`` and ``key_code``).

Why: the values are decoded, never scored from tables, so their code need not be a lattice code with byte
labels; keys in this code are scored by decoding each cached token's stream once per step (a native kernel),
not through one-sided tables. On the near-Gaussian rotated head vectors the E8 q=2 code (with its overload steps) sits ~0.8 bit per
element from the distortion-rate bound (``benchmarks/results/kv_rate_gap.md``); a trellis code with a
Gaussian codebook sits ~0.2-0.3 bit from it at a few hundred states (QTIP, Tseng et al. 2024, §3: the
"bitshift trellis"; Viterbi encoding, Marcellin & Fischer 1990).

The code of one rotated, rms-normalised vector ``u`` of D elements (D a multiple of 8):

* a circular bit stream of ``N = D / 8 * block_bits`` bits; element t takes ``k_t`` new bits of it (the
  ``block_bits`` of every 8 elements spread as evenly as possible: 26 bits -> k = 3,3,3,4,3,3,3,4);
* the state of element t is the ``L = state_bits`` stream bits ending after its own (most recent bit least
  significant, the stream read circularly: "tail-biting", no start state is stored);
* ``u_hat[t] = codebook[state_t]``: a fixed table of the 2^L quantiles of N(0, 1), permuted by a fixed
  bijection of the L-bit states (:func:`trellis_codebook`).

Bits of the stream are stored MSB first in bytes (bit p in byte p // 8 at ``7 - p % 8``). Encoding is a
Viterbi search for the stream minimising ``|u - u_hat|^2``: one unconstrained pass on the vector rotated by
D / 2 elements reads the L - k_0 bits that wrap around, a second pass constrained to them gives the stream
(QTIP's tail-biting approximation). The float32 costs, the order of their additions and the first-index tie
rule are the specification the native kernel follows bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

__all__ = [
    "TrellisCode",
    "trellis_schedule",
    "trellis_codebook",
    "trellis_encode",
    "trellis_decode",
    "viterbi",
    "schedule_tensor",
    "trellis_states",
    "trellis_gain",
]

#: Block length the bit budget is spread over (the E8 block of the key code: same head dims allowed).
_BLOCK = 8


@dataclass(frozen=True)
class TrellisCode:
    """Bitshift-trellis code of head vectors (see the module docstring).

    Parameters
    ----------
    block_bits : 8..32, stream bits per 8 elements (26 = 3.25 bits per element)
    state_bits : L, 6..14, bits of the trellis state (2^L states and codebook entries; always more than the
        at most 4 new bits per element). Encoding costs ~2^L operations per element.
    scale_bits : 8 (8-bit log code of the per-vector rms, as the key code's) or 16 (float16)
    unbiased : decode ``g * codebook[state]`` with ``g = E[u^2] / E[u u_hat]`` (:func:`trellis_gain`) instead of
        the codebook value. The Viterbi search returns a shrunk reconstruction (``E[u u_hat] = E[u_hat^2] < E[u^2]``,
        as any MSE-optimal code: 0.98 of u at 3.25 bits, 0.81 at 1.25); averaged over tokens by the attention,
        that shrinkage is a bias of the layer's output, which costs more perplexity than the little MSE the
        unbiased reconstruction adds (docs/kv.md).
    """

    block_bits: int = 26
    state_bits: int = 10
    scale_bits: int = 8
    unbiased: bool = True

    def __post_init__(self) -> None:
        for name, lo, hi in (("block_bits", 8, 32), ("state_bits", 6, 14)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
        if isinstance(self.scale_bits, bool) or self.scale_bits not in (8, 16):
            raise ValueError(f"scale_bits must be 8 or 16, got {self.scale_bits!r}")
        if not isinstance(self.unbiased, bool):
            raise TypeError(f"unbiased must be a bool, got {type(self.unbiased).__name__}")

    @property
    def max_step_bits(self) -> int:
        return -(-self.block_bits // _BLOCK)

    def stream_bits(self, head_dim: int) -> int:
        return head_dim // _BLOCK * self.block_bits

    def stream_bytes(self, head_dim: int) -> int:
        return -(-self.stream_bits(head_dim) // 8)

    def bytes_per_vector(self, head_dim: int) -> int:
        """Stored bytes of one coded head vector: the stream and the scale."""
        return self.stream_bytes(head_dim) + self.scale_bits // 8

    def bits_per_element(self, head_dim: int) -> float:
        return 8.0 * self.bytes_per_vector(head_dim) / head_dim

    def code_key(self) -> tuple:
        """What a decoder must share with the encoder (recorded in the codes)."""
        return ("trellis", self.block_bits, self.state_bits, self.scale_bits, self.unbiased)

    def decode_table(self, device=None) -> torch.Tensor:
        """``(2^L,)`` float32 values the decoder reads: the codebook, times :func:`trellis_gain` if unbiased."""
        cb = trellis_codebook(self.state_bits)
        if self.unbiased:
            cb = cb * trellis_gain(self.block_bits, self.state_bits)
        return cb if device is None else cb.to(device)


@cache
def trellis_schedule(block_bits: int, head_dim: int) -> tuple[int, ...]:
    """Bits ``k_t`` of each of the ``head_dim`` elements: ``block_bits`` per 8 spread evenly (Bresenham)."""
    base, extra = divmod(block_bits, _BLOCK)
    block = [base + ((j + 1) * extra // _BLOCK - j * extra // _BLOCK) for j in range(_BLOCK)]
    return tuple(block * (head_dim // _BLOCK))


def _permute(i: torch.Tensor, L: int) -> torch.Tensor:
    """A fixed bijection of L-bit integers (odd multiplies and xor-shifts, each invertible mod 2^L)."""
    mask = (1 << L) - 1
    x = i
    for a in (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35):
        x = (x * a) & mask
        x = x ^ (x >> ((L + 1) // 2))
    return x


@cache
def _codebook(L: int) -> torch.Tensor:
    n = 1 << L
    p = (_permute(torch.arange(n, dtype=torch.int64), L).to(torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)).to(torch.float32)


def trellis_codebook(state_bits: int, device=None) -> torch.Tensor:
    """``(2^L,)`` float32: entry s is the ``(pi(s) + 1/2) / 2^L`` quantile of N(0, 1), ``pi`` a fixed bijection
    (so that the 2^k successors of a state, and its predecessors, hold values spread over the distribution)."""
    cb = _codebook(state_bits)
    return cb if device is None else cb.to(device)


@cache
def _positions(block_bits: int, head_dim: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(state_pos (T, L), bit_step (N,), bit_shift (N,))``: the stream positions of each state's bits (MSB
    first) and, for each stream bit, the element that writes it and its shift in that element's new bits."""
    ks = trellis_schedule(block_bits, head_dim)
    N = sum(ks)
    ends = torch.tensor(ks, dtype=torch.int64).cumsum(0)  # P_t: the state of t ends at bit P_t - 1
    state_pos = (ends.view(-1, 1) - L + torch.arange(L, dtype=torch.int64).view(1, -1)) % N
    step = torch.repeat_interleave(torch.arange(len(ks), dtype=torch.int64), torch.tensor(ks))
    shift = torch.cat([torch.arange(k - 1, -1, -1, dtype=torch.int64) for k in ks])
    return state_pos, step, shift


def viterbi(
    x: torch.Tensor, codebook: torch.Tensor, ks: tuple[int, ...], wrap: torch.Tensor | None = None
) -> torch.Tensor:
    """States ``(n, T)`` int64 of the bitshift trellis minimising ``sum_t (x_t - codebook[s_t])^2``.

    x : (n, T) float32; ks : bits of each step; wrap : (n,) int64 or None, then the path must be circular
    through it: ``s_0 >> k_0 == wrap == s_{T-1} & (2^(L - k_0) - 1)``.
    Costs in float32: ``c_t(s) = min_j c_{t-1}(p_j(s)) + (x_t - cb[s])^2`` (the predecessors ``p_j(s) =
    (s >> k_t) + j 2^(L - k_t)``, the first minimal j), the last state the first minimal one.
    """
    n, T = x.shape
    S = codebook.numel()
    L = S.bit_length() - 1
    cost = (x[:, :1] - codebook.view(1, S)).square()
    if wrap is not None:
        top = torch.arange(S, device=x.device) >> ks[0]
        cost = torch.where(top.view(1, S) == wrap.view(n, 1), cost, torch.full_like(cost, math.inf))
    back = []
    for t in range(1, T):
        K, R = 1 << ks[t], S >> ks[t]
        m, j = cost.view(n, K, R).min(1)  # over the top k_t bits of the predecessor
        back.append(j.to(torch.uint8))
        cost = (m.unsqueeze(-1) + (x[:, t].view(n, 1, 1) - codebook.view(1, R, K)).square()).view(n, S)
    if wrap is not None:
        low = torch.arange(S, device=x.device) & ((S >> ks[0]) - 1)
        cost = torch.where(low.view(1, S) == wrap.view(n, 1), cost, torch.full_like(cost, math.inf))
    s = cost.argmin(1)
    states = torch.empty((n, T), dtype=torch.int64, device=x.device)
    states[:, T - 1] = s
    rows = torch.arange(n, device=x.device)
    for t in range(T - 1, 0, -1):
        k = ks[t]
        r = s >> k
        s = r + (back[t - 1][rows, r].long() << (L - k))
        states[:, t - 1] = s
    return states


@cache
def schedule_tensor(block_bits: int, head_dim: int) -> torch.Tensor:
    """:func:`trellis_schedule` as a ``(head_dim,)`` uint8 tensor (the native kernels' argument)."""
    return torch.tensor(trellis_schedule(block_bits, head_dim), dtype=torch.uint8)


def trellis_encode(
    u: torch.Tensor, code: TrellisCode, backend: str = "auto", chunk: int = 1024, *, checked: bool = False
) -> torch.Tensor:
    """Streams of the vectors ``u (n, D)`` (float32, rms-normalised, rotated): ``(n, stream_bytes)`` uint8.

    ``backend``: ``"torch"`` (this reference), ``"native"`` (a registered kernel, bit for bit the same streams)
    or ``"auto"`` (native when registered). ``checked=True``: the caller has made sure ``u`` is finite (the
    encoder of a cache, every decoding step, whose states were checked)."""
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise TypeError("u must be a floating torch.Tensor")
    if u.ndim != 2:
        raise ValueError(f"u must have shape (n, head_dim), got {tuple(u.shape)}")
    if not isinstance(code, TrellisCode):
        raise TypeError(f"code must be a TrellisCode, got {type(code).__name__}")
    if not checked and u.numel() and not bool(torch.isfinite(u).all()):
        raise ValueError("u contains NaN or Inf")
    n, D = u.shape
    if D < _BLOCK or D % _BLOCK or D * code.block_bits % 64 or D * code.block_bits < 128:
        raise ValueError(
            f"head_dim {D} with block_bits={code.block_bits}: the stream of a vector must fill whole bytes, two "
            "at least (head_dim * block_bits a multiple of 64, >= 128)"
        )
    if backend != "torch":
        from . import native  # (native imports codes, which imports this module)

        if backend == "native" or (u.device.type == "cpu" and native.trellis_available()):
            cb = trellis_codebook(code.state_bits, u.device)
            return native.trellis_encode(u.to(torch.float32), schedule_tensor(code.block_bits, D), cb)
    ks = trellis_schedule(code.block_bits, D)
    L = code.state_bits
    cb = trellis_codebook(L, u.device)
    h = D // 2
    ks_rolled = ks[h:] + ks[:h]
    _, step, shift = _positions(code.block_bits, D, L)
    step, shift = step.to(u.device), shift.to(u.device)
    nbytes = code.stream_bytes(D)
    N = step.numel()
    out = torch.empty((n, nbytes), dtype=torch.uint8, device=u.device)
    weights = (1 << torch.arange(7, -1, -1, device=u.device)).to(torch.int64)
    for i in range(0, n, chunk):
        x = u[i : i + chunk].to(torch.float32)
        first = viterbi(torch.roll(x, -h, dims=1), cb, ks_rolled)
        # the low L - k_0 bits of element D - 1's state (rolled to D - h - 1) are the top bits of element 0's
        wrap = first[:, D - h - 1] & ((1 << (L - ks[0])) - 1)
        states = viterbi(x, cb, ks, wrap)
        bits = (states[:, step] >> shift) & 1  # (n, N)
        pad = nbytes * 8 - N
        if pad:
            bits = torch.nn.functional.pad(bits, (0, pad))
        out[i : i + chunk] = (bits.view(-1, nbytes, 8) * weights).sum(-1).to(torch.uint8)
    return out


def trellis_states(stream: torch.Tensor, code: TrellisCode, head_dim: int) -> torch.Tensor:
    """``(n, stream_bytes)`` uint8 -> the states ``(n, D)`` int64 of each element."""
    state_pos, _, _ = _positions(code.block_bits, head_dim, code.state_bits)
    state_pos = state_pos.to(stream.device)
    bits = (stream.to(torch.int64).unsqueeze(-1) >> torch.arange(7, -1, -1, device=stream.device)) & 1
    bits = bits.flatten(-2)  # (n, 8 nbytes), MSB first
    w = 1 << torch.arange(code.state_bits - 1, -1, -1, device=stream.device)
    return (bits[:, state_pos] * w).sum(-1)


#: ``trellis_gain`` of the common codes (head dim 64, computed by its definition; tests/test_kv_trellis.py
#: recomputes entries); others are computed on first use.
_GAIN_TABLE: dict[tuple[int, int], float] = {
    (10, 10): 1.2353,
    (12, 10): 1.1703,
    (18, 10): 1.0688,
    (20, 10): 1.052,
    (26, 10): 1.0214,
    (28, 10): 1.017,
    (10, 12): 1.2298,
    (18, 12): 1.0617,
    (26, 12): 1.0177,
}


@cache
def trellis_gain(block_bits: int, state_bits: int) -> float:
    """``E[u^2] / E[u u_hat]`` of the code on 2048 seeded N(0, I_64) vectors, rounded to 4 decimals: the factor
    that makes the reconstruction unbiased in the mean (``E[g u_hat | u] ~ u`` along u)."""
    hit = _GAIN_TABLE.get((block_bits, state_bits))
    if hit is not None:
        return hit
    code = TrellisCode(block_bits=block_bits, state_bits=state_bits, unbiased=False)
    u = torch.randn(2048, 64, generator=torch.Generator().manual_seed(4321))
    uh = trellis_decode(trellis_encode(u, code), code, 64)
    return round(float(u.double().square().sum() / (u.double() * uh.double()).sum()), 4)


def trellis_decode(stream: torch.Tensor, code: TrellisCode, head_dim: int) -> torch.Tensor:
    """``(n, stream_bytes)`` uint8 -> ``u_hat (n, D)`` float32 (the decode table's entries of the states)."""
    return code.decode_table(stream.device)[trellis_states(stream, code, head_dim)]
