"""Orthonormal Hadamard transforms of order ``n = K_1 ... K_r 2^j`` in O(n log n).

``H_n = (Had_{K_1} ⊗ ... ⊗ Had_{K_r} ⊗ H_{2^j}) / sqrt(n)`` where ``H_{2^j}`` is the Sylvester matrix
(applied as a radix-16 fast Walsh-Hadamard transform) and each ``Had_K`` is a small Hadamard matrix from a Paley
construction (built from the maths, Paley 1933):

* Paley I, ``K = p + 1`` with p prime, p ≡ 3 (mod 4): ``Q`` the Jacobsthal matrix ``Q_ij = χ(j - i)``
  (χ the quadratic character mod p), ``S = [[0, 1ᵀ], [-1, Q]]`` is skew, ``Had = I + S``.
* Paley II, ``K = 2(p + 1)`` with p prime, p ≡ 1 (mod 4): ``C = [[0, 1ᵀ], [1, Q]]`` is symmetric
  conference, ``Had = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``.

This covers 12 (p=11), 20 (19), 28 (13, II), 36 (17, II), 44, 60, 68, 76, ... and all real transformer
widths seen so far (192 = 12·16, 384 = 12·32, 576 = 36·16, 1536 = 12·128, 11008 = 172·64 is not covered).
Orders 1, 2 and 2^j are the plain Sylvester case. Unsupported n raises ``ValueError``.
"""

from __future__ import annotations

import math
from functools import cache

import torch

__all__ = ["paley_hadamard", "hadamard_factors", "hadamard_transform", "hadamard_matrix", "is_supported"]


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % k for k in range(2, math.isqrt(p) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    """``Q_ij = χ(j - i)`` over GF(p), χ the quadratic character (0 on 0)."""
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, p)], dtype=torch.int64)
    idx = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    return chi[idx]


def _paley_kind(K: int) -> tuple[int, int] | None:
    """``(kind, p)`` of a Paley construction of order K, or None."""
    if K % 4:
        return None
    if _is_prime(K - 1) and (K - 1) % 4 == 3:
        return 1, K - 1
    if K % 2 == 0 and _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        return 2, K // 2 - 1
    return None


@cache
def _paley_int(K: int) -> torch.Tensor:
    kind_p = _paley_kind(K)
    if kind_p is None:
        raise ValueError(f"no Paley construction of a Hadamard matrix of order {K}")
    kind, p = kind_p
    Q = _jacobsthal(p)
    if kind == 1:
        S = torch.zeros((K, K), dtype=torch.int64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return S + torch.eye(K, dtype=torch.int64)
    C = torch.zeros((p + 1, p + 1), dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(C, A) + torch.kron(torch.eye(p + 1, dtype=torch.int64), B)


def paley_hadamard(K: int) -> torch.Tensor:
    """Unnormalized ±1 Hadamard matrix of order K (Paley I or II), ``H Hᵀ = K I``; int64 (K, K)."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 4:
        raise ValueError(f"K must be an int >= 4, got {K!r}")
    return _paley_int(K).clone()


def _split_pow2(n: int) -> tuple[int, int]:
    v = (n & -n).bit_length() - 1
    return n >> v, v


def _proper_divisors(odd: int) -> list[int]:
    """Divisors of ``odd`` strictly between 1 and ``odd``, ascending (trial division up to sqrt: O(sqrt n))."""
    small, large = [], []
    for k in range(3, math.isqrt(odd) + 1, 2):
        if odd % k == 0:
            small.append(k)
            if k != odd // k:
                large.append(odd // k)
    return small + large[::-1]


@cache
def _factors(odd: int, v: int) -> tuple[int, ...] | None:
    """Paley orders whose odd parts multiply to ``odd`` using at most ``v`` factors of two in total,
    fewest factors first (then the smallest total power of two, leaving the most to the FWHT)."""
    if odd == 1:
        return ()
    if v < 2:  # every factor K > 2 is a multiple of 4: an odd part > 1 needs at least 2^2
        return None
    best = None
    for a in range(2, v + 1):  # a Hadamard order > 2 is a multiple of 4
        K = odd << a
        if _paley_kind(K) is not None:
            return (K,)
    for o1 in _proper_divisors(odd):
        for a in range(2, v + 1):
            K = o1 << a
            if _paley_kind(K) is None:
                continue
            rest = _factors(odd // o1, v - a)
            if rest is not None:
                cand = (K,) + rest
                if best is None or len(cand) < len(best):
                    best = cand
                break
    return best


def hadamard_factors(n: int) -> tuple[tuple[int, ...], int]:
    """Decompose n as ``prod(Ks) * 2^j`` with Paley orders ``Ks``; returns ``(Ks, 2^j)``.

    Raises
    ------
    ValueError if no such decomposition exists (e.g. odd n > 1, 24 = 3·8 is fine as 12·2, but 6 is not).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    odd, v = _split_pow2(n)
    ks = _factors(odd, v)
    if ks is None:
        raise ValueError(
            f"no Hadamard transform of order n={n} = {odd}·2^{v}: need n = K_1...K_r·2^j with each K_i a "
            "Paley order (p+1, p ≡ 3 mod 4 prime, or 2(p+1), p ≡ 1 mod 4 prime), e.g. 12, 20, 28, 36, 44"
        )
    P = n
    for K in ks:
        P //= K
    return ks, P


def is_supported(n: int) -> bool:
    """Whether :func:`hadamard_transform` supports order n."""
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


_CACHE: dict = {}


#: radix of the fast transform: H_{2^j} = H_R ⊗ ... ⊗ H_R ⊗ H_{2^r}, each factor one small batched matmul,
#: so a transform is ceil(j / 4) passes over memory instead of j butterfly passes (O(R n log_R n) flops)
_RADIX = 16


def _sylvester(P: int) -> torch.Tensor:
    S = torch.ones((1, 1), dtype=torch.int64)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while S.shape[0] < P:
        S = torch.kron(S, h2)
    return S


def _factor(K: int, dtype, device, transpose: bool) -> torch.Tensor:
    """The ±1 matrix of one Kronecker factor (Paley order K, or a power of two for Sylvester)."""
    key = (K, dtype, str(device), transpose)
    t = _CACHE.get(key)
    if t is None:
        h = _sylvester(K) if K & (K - 1) == 0 else _paley_int(K)
        t = (h.t() if transpose else h).to(dtype=dtype, device=device).contiguous()
        _CACHE[key] = t
    return t


def _kron_factors(ks: tuple[int, ...], P: int) -> list[int]:
    out = list(ks)
    while P > 1:
        r = min(P, _RADIX)
        out.append(r)
        P //= r
    return out


def hadamard_transform(x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``x ↦ H_n x`` (or ``H_nᵀ x``) along the last dim, ``H_n`` the orthonormal Hadamard of order n.

    ``H_n = (Had_{K_1} ⊗ ... ⊗ H_{2^j}) / sqrt(n)`` is applied factor by factor: for a factor of size r
    with b = product of the later factors, ``x.view(-1, r, b) ↦ F @ x``; the 2^j part is split into
    Sylvester factors of size ≤ 16 (a radix-16 fast Walsh-Hadamard transform).

    Parameters
    ----------
    x : (..., n) floating tensor
    transpose : apply ``H_nᵀ`` (= ``H_n⁻¹``) instead

    Returns
    -------
    (..., n) tensor of x's dtype
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating torch.Tensor")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    n = x.shape[-1]
    ks, P = hadamard_factors(n)
    y = x.reshape(-1, n)
    N = y.shape[0]
    b = n
    for r in _kron_factors(ks, P):
        b //= r
        F = _factor(r, y.dtype, y.device, transpose)
        y = torch.matmul(F, y.reshape(-1, r, b))
    return (y.reshape(N, n) * (1.0 / math.sqrt(n))).reshape(x.shape)


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Dense orthonormal ``H_n`` built by Kronecker products (for tests; O(n²) memory)."""
    ks, P = hadamard_factors(n)
    H = torch.ones((1, 1), dtype=torch.float64)
    for K in ks:
        H = torch.kron(H, _paley_int(K).to(torch.float64))
    return (torch.kron(H, _sylvester(P).to(torch.float64)) / math.sqrt(n)).to(dtype)
