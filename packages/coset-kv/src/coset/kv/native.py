"""Native kernels ``kv_scores`` / ``kv_values`` (``cuda/csrc/kv_cpu.cpp``; CUDA twin ``kv_cuda.cu``).

They are found through the coset.quant backend registry: a registered backend (coset-cuda's ``"native"``,
discovered through the ``coset.backends`` entry point) that has the ops ``kv_scores`` and ``kv_values`` and
``supports`` them for the tensors at hand. coset.kv never imports coset.cuda; without such a backend
:mod:`coset.kv.lut` uses its PyTorch paths. Arguments are validated here (shapes of the cache) and again by
the backend (shapes of the flat buffers).
"""

from __future__ import annotations

from typing import Any

import torch

from coset.quant.backend import available_backends, select_backend

from .codes import log_scale_table, scale_values

__all__ = [
    "append_available",
    "attend_available",
    "available",
    "kv_scores",
    "kv_values",
    "trellis_append",
    "trellis_attend_step",
    "trellis_available",
    "trellis_encode",
    "trellis_normalise_encode",
    "trellis_scores",
    "trellis_values",
]


_found: dict[tuple[str, str, int], Any] = {}


def _backend(op: str, like: torch.Tensor | None = None) -> Any | None:
    """The best registered backend that runs ``op`` on ``like`` (a CPU tensor by default), or None.

    Looked up once per (op, device type) and registry size: the registry's selection costs about a
    millisecond, paid 60 times per decoding step of a 30-layer model otherwise."""
    key = (op, "cpu" if like is None else like.device.type, len(available_backends()))
    if key not in _found:
        probe = torch.empty(0, dtype=torch.uint8) if like is None else like
        try:
            _found[key] = select_backend("auto", op, probe, None, None)
        except (TypeError, ValueError):
            _found[key] = None
    return _found[key]


def available() -> bool:
    """Whether a registered backend provides both kv kernels for CPU tensors."""
    return _backend("kv_scores") is not None and _backend("kv_values") is not None


def trellis_available() -> bool:
    """Whether a registered backend provides the trellis code's kernels (encode, values, scores) for CPU
    tensors."""
    return all(_backend(op) is not None for op in ("kv_trellis_encode", "kv_trellis_values", "kv_trellis_scores"))


def attend_available() -> bool:
    """Whether a registered backend provides the fused decode step over trellis codes for CPU tensors."""
    return _backend("kv_trellis_attend_step") is not None


def append_available() -> bool:
    """Whether a registered backend provides the encoder of a cache's new tokens (centring, scaling, rotation,
    8-bit scale and Viterbi in one call; keys and values into the cache's buffers in another) for CPU tensors."""
    return _backend("kv_trellis_normalise_encode") is not None and _backend("kv_trellis_append") is not None


def backends() -> list[str]:
    """Names of the registered backends (for messages)."""
    return available_backends()


def _need(op: str, like: torch.Tensor) -> Any:
    b = _backend(op, like)
    if b is None:
        raise ValueError(
            f"no registered kernel backend provides {op} for {like.device.type} tensors "
            f"(registered: {available_backends()}; install coset-cuda, see docs/kv.md)"
        )
    return b


def _flat(codes, steps: torch.Tensor, t_bits: int):
    B, H, L, K, M = codes.idx.shape
    tb = -(-K * t_bits // 8)
    if codes.t.shape != (B, H, L, tb) or codes.scale.shape != (B, H, L):
        raise ValueError("codes: inconsistent shapes of idx, t, scale")
    if steps.numel() != 2**t_bits:
        raise ValueError(f"steps must have 2**t_bits = {2**t_bits} entries, got {steps.numel()}")
    return (
        codes.idx.reshape(B * H, L, K, M),
        codes.t.reshape(B * H, L, tb),
        scale_values(codes.scale).reshape(B * H, L),
        steps.to(torch.float32),
    )


def kv_scores(codes, steps: torch.Tensor, t_bits: int, tab: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Native LUT scores of key codes.

    codes : KVCodes, idx (B, H, L, K, M) uint8, t (B, H, L, ceil(K t_bits / 8)) uint8, scale (B, H, L)
    steps : (2^t_bits,) float32, ``beta 2^(alpha t)``
    tab (B, H, K, 256, n), cy (B, H, K, n) float32: the query tables (:func:`coset.kv.lut.query_tables`)

    Returns (B, H, n, L) float32, ``out[.., i, t] = sum_k w[t,k] (sum_m 2^m tab[k, idx[t,k,m], i] - cy[k, i])``
    with ``w[t,k] = scale[t] steps[T[t,k]]``.

    Raises
    ------
    ValueError for inconsistent shapes, or no registered backend with the kernel for these tensors.
    """
    impl = _need("kv_scores", codes.idx)
    B, H, L, K, M = codes.idx.shape
    n = tab.shape[-1]
    if tab.shape != (B, H, K, 256, n) or cy.shape != (B, H, K, n):
        raise ValueError("kv_scores: tab and cy do not match the codes")
    idx, t, rho, st = _flat(codes, steps, t_bits)
    out = impl.kv_scores(idx, t, rho, st, t_bits, tab.reshape(B * H, K, 256, n), cy.reshape(B * H, K, n))
    return out.view(B, H, n, L)


def kv_values(
    codes, steps: torch.Tensor, t_bits: int, p: torch.Tensor, a: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Native value accumulation from value codes.

    codes, steps, t_bits : as for :func:`kv_scores`; p (B, H, n, L) float32 weights; a (256, 8), c (8,) the
    code's representatives and centring offset (:func:`coset.kv.code_tables`)

    Returns (B, H, n, K*8) float32, ``out[.., i, 8k:8k+8] = sum_t p[i,t] w[t,k] (sum_m 2^m a[idx[t,k,m]] - c)``.
    """
    impl = _need("kv_values", codes.idx)
    B, H, L, K, M = codes.idx.shape
    n = p.shape[2]
    if p.shape != (B, H, n, L) or a.shape != (256, 8) or c.shape != (8,):
        raise ValueError("kv_values: p, a or c do not match the codes")
    idx, t, rho, st = _flat(codes, steps, t_bits)
    out = impl.kv_values(idx, t, rho, st, t_bits, p.reshape(B * H, n, L), a, c)
    return out.view(B, H, n, K * 8)


def trellis_encode(u: torch.Tensor, ks: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Native :func:`coset.kv.trellis.trellis_encode`: ``u (n, D)`` float32, ``ks (D,)`` uint8 bits per element,
    ``cb (2^L,)`` float32 -> streams ``(n, sum(ks) / 8)`` uint8, bit for bit the reference's."""
    return _need("kv_trellis_encode", u).kv_trellis_encode(u, ks, cb)


def trellis_values(codes, p: torch.Tensor, ks: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Native value accumulation from trellis value codes: ``codes.idx (B, H, L, nbytes)`` streams, ``p (B, H, n,
    L)`` -> ``(B, H, n, D)`` float32, ``out[.., i, :] = sum_t p[i, t] rho_t u_hat_t`` (rotated domain)."""
    impl = _need("kv_trellis_values", codes.idx)
    B, H, L, nb = codes.idx.shape
    n = p.shape[2]
    if p.shape != (B, H, n, L) or codes.scale.shape != (B, H, L):
        raise ValueError("trellis_values: p or the scales do not match the codes")
    rho = scale_values(codes.scale).reshape(B * H, L)
    out = impl.kv_trellis_values(codes.idx.reshape(B * H, L, nb), rho, p.reshape(B * H, n, L), ks, cb)
    return out.view(B, H, n, ks.numel())


def trellis_scores(codes, q: torch.Tensor, ks: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Native scores from trellis key codes: ``codes.idx (B, H, L, nbytes)`` streams, rotated queries ``q (B, H, n,
    D)`` -> ``(B, H, n, L)`` float32, ``out[.., i, t] = rho_t <q_i, u_hat_t>`` (each stream decoded once for the n
    queries)."""
    impl = _need("kv_trellis_scores", codes.idx)
    B, H, L, nb = codes.idx.shape
    n, D = q.shape[2], ks.numel()
    if q.shape != (B, H, n, D) or codes.scale.shape != (B, H, L):
        raise ValueError("trellis_scores: q or the scales do not match the codes")
    rho = scale_values(codes.scale).reshape(B * H, L)
    out = impl.kv_trellis_scores(codes.idx.reshape(B * H, L, nb), rho, q.reshape(B * H, n, D), ks, cb)
    return out.view(B, H, n, L)


def trellis_attend_step(
    keys, values, L: int, k_tables, v_tables, query, qmap, omap, scaling: float, sink=None, window=None,
    bias_mode=0, tab=None, pos0=0,
) -> torch.Tensor:  # fmt: skip
    """A whole decoding step of one layer in one native call: per KV head the query maps, the scores of the coded
    tokens (with the key mean's, per ``bias_mode``: 0 none, 1 one bias per query row, 2 dots with rows ``pos0 + t``
    of ``tab``) and of the dense tokens, one softmax over them, the values accumulated from the codes, the output
    map and the dense tokens' values (``coset.cuda.kv.trellis_attend_step``). ``keys``, ``values``: ``(stream (B, H, C,
    nbytes), scale codes (B, H, C))`` whole contiguous buffers of which the first ``L`` tokens are used;
    ``query (B, H, n, D)``; ``qmap (H, D, D + w)`` with ``query @ qmap[h] = [q' | qm]`` (q' the rotated query, qm
    the bias query: w = 0, 1 or the table's columns for ``bias_mode`` 0, 1, 2); ``omap (H, D (+ 1), D)`` with ``out
    = [acc | psum] @ omap[h]``; ``sink``, ``window``: ``(keys, values, length)`` of the full-precision tokens
    (``(B, H, C', D)`` float32 buffers), or None. Returns ``(B, H, n, D)`` float32; ValueError when a score is not
    finite."""
    (k_stream, k_scale), (v_stream, v_scale) = keys, values
    impl = _need("kv_trellis_attend_step", k_stream)
    return impl.kv_trellis_attend_step(
        k_stream, k_scale, v_stream, v_scale, L, *k_tables, *v_tables, log_scale_table(),
        query, qmap, omap, scaling, sink, window, bias_mode, tab, pos0,
    )  # fmt: skip


def trellis_normalise_encode(
    x: torch.Tensor,
    A: torch.Tensor,
    ks: torch.Tensor,
    cb: torch.Tensor,
    limit: float,
    mean_mode: int = 0,
    mu: torch.Tensor | None = None,
    cs: torch.Tensor | None = None,
    pos0: int = 0,
    chan: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Native encoder of new head vectors ``x (B, H, n, D)`` under a trellis code with 8-bit scales: per vector
    ``z = A[h] ((x - m) / chan[h])`` (m: none, ``mu[h]``, or ``mu[h]`` rotated to position ``pos0 + t`` with the
    ``[cos | sin]`` rows ``cs``: ``mean_mode`` 0 / 1 / 2), its 8-bit log scale and the Viterbi stream of
    ``z / rho``. Returns ``(streams (B, H, n, nbytes), scale codes (B, H, n), first bad row)``; the row is the
    first flat one whose rms is past ``limit`` (-1: none; the outputs are then not to be used). The result equals
    :func:`coset.kv.codes.normalise_checked` + the reference encoder up to rounding (the matrix product and the rms
    are summed in another order), so a vector near a rounding boundary of its scale or path may code otherwise."""
    impl = _need("kv_trellis_normalise_encode", x)
    return impl.kv_trellis_normalise_encode(x, A, ks, cb, log_scale_table(), limit, mean_mode, mu, cs, pos0, chan)


def trellis_append(
    keys: torch.Tensor, values: torch.Tensor, k_side: tuple, v_side: tuple, limit: float, out: tuple, t0: int,
    cs: torch.Tensor | None = None, pos0: int = 0,
) -> int:  # fmt: skip
    """Native encoder of a decoding step's keys and values ``(B, H, n, D)`` in one call, written in place at tokens
    ``t0 ..`` of the buffers ``out = (k_stream (B, H, C, nbk), k_scale (B, H, C), v_stream, v_scale)``:
    :func:`trellis_normalise_encode` of each side (``k_side = (A_k, ks, cb, mean_mode, mu_k, chan)``, ``v_side =
    (A_v, ks, cb, mean_mode, mu_v)``; ``cs`` the whole ``[cos | sin]`` table for the keys' mean mode 2). Returns
    the first bad flat row (rms past ``limit`` or not finite; the buffers past ``t0`` then partly written), or -1."""
    impl = _need("kv_trellis_append", keys)
    return impl.kv_trellis_append(keys, values, k_side, v_side, log_scale_table(), limit, *out, t0, cs, pos0)
