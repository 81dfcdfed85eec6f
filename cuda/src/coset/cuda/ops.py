"""torch operators ``coset::quantize``, ``coset::encode`` and ``coset::decode`` (``torch.library.custom_op``).

They take the fields of a :class:`~coset.quant.QuantizationConfig` as plain arguments, so autograd,
``torch.compile`` (with ``fullgraph=True``) and ``torch.export`` see an opaque op with a fake (meta)
implementation instead of a graph break. Inside, they call ``coset.quant`` with ``backend="auto"``, i.e. the
native kernels when they support the input, else the PyTorch reference; the results are identical.

Gradients: ``coset::quantize`` uses the straight-through estimator, ``d xhat / d x = I`` (quantization
has zero gradient almost everywhere; STE is the usual choice for quantization-aware training). ``T`` and
``clamped`` are not differentiable. ``encode``/``decode`` return integer labels and have no gradient.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from coset.lattice import get_lattice
from coset.quant import QuantizationConfig
from coset.quant import decode as _q_decode
from coset.quant import encode as _q_encode
from coset.quant import quantize as _q_quantize

__all__ = ["quantize", "encode", "decode", "config_args"]

# Each op spells the config fields out (torch.library.custom_op infers the schema from the annotations);
# _check_schemas() compares those schemas with dataclasses.fields(QuantizationConfig) at import.

#: The config fields, in order: the ops' arguments after the tensors (checked against each op's schema at
#: import by :func:`_check_schemas`, so a new config field cannot be silently dropped).
_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizationConfig))


@lru_cache(maxsize=256)
def _config(*fields) -> QuantizationConfig:
    return QuantizationConfig(**dict(zip(_FIELDS, fields, strict=False)))


def config_args(config: QuantizationConfig) -> tuple:
    """The config as the tuple of plain arguments the ``coset::*`` ops take (after the tensor)."""
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    return tuple(getattr(config, f) for f in _FIELDS)


@torch.library.custom_op("coset::quantize", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    lattice_type: str,
    q: int,
    M: int,
    beta: float,
    alpha: float,
    max_scaling_iterations: int,
    with_tie_dither: bool,
    with_dither: bool,
    disable_scaling: bool,
    disable_overload_protection: bool,
    overload_policy: str,
    dither_seed: int,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _config(
        lattice_type,
        q,
        M,
        beta,
        alpha,
        max_scaling_iterations,
        with_tie_dither,
        with_dither,
        disable_scaling,
        disable_overload_protection,
        overload_policy,
        dither_seed,
        center,
    )
    xh, T, cl = _q_quantize(x, config=cfg, backend="auto", return_info=True)
    return xh, T, cl


@_quantize_op.register_fake
def _(x, *args):
    lead = x.shape[:-1]
    return torch.empty_like(x), x.new_empty(lead, dtype=torch.uint8), x.new_empty(lead, dtype=torch.bool)


def _q_setup(ctx, inputs, output):
    pass


def _q_backward(ctx, g_xhat, g_T, g_clamped):
    # straight-through estimator: the gradient passes the quantizer unchanged
    return (g_xhat,) + (None,) * len(_FIELDS)


_quantize_op.register_autograd(_q_backward, setup_context=_q_setup)


@torch.library.custom_op("coset::encode", mutates_args=())
def _encode_op(
    x: torch.Tensor,
    lattice_type: str,
    q: int,
    M: int,
    beta: float,
    alpha: float,
    max_scaling_iterations: int,
    with_tie_dither: bool,
    with_dither: bool,
    disable_scaling: bool,
    disable_overload_protection: bool,
    overload_policy: str,
    dither_seed: int,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _config(
        lattice_type,
        q,
        M,
        beta,
        alpha,
        max_scaling_iterations,
        with_tie_dither,
        with_dither,
        disable_scaling,
        disable_overload_protection,
        overload_policy,
        dither_seed,
        center,
    )
    b, T, cl = _q_encode(x, config=cfg, backend="auto", return_clamped=True)
    return b, T, cl


@_encode_op.register_fake
def _(x, lattice_type, q, M, *args):
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, M, get_lattice(lattice_type).dim), dtype=torch.uint8),
        x.new_empty(lead, dtype=torch.uint8),
        x.new_empty(lead, dtype=torch.bool),
    )


@torch.library.custom_op("coset::decode", mutates_args=())
def _decode_op(
    b: torch.Tensor,
    T: torch.Tensor,
    dtype: torch.dtype,
    lattice_type: str,
    q: int,
    M: int,
    beta: float,
    alpha: float,
    max_scaling_iterations: int,
    with_tie_dither: bool,
    with_dither: bool,
    disable_scaling: bool,
    disable_overload_protection: bool,
    overload_policy: str,
    dither_seed: int,
    center: bool,
) -> torch.Tensor:
    cfg = _config(
        lattice_type,
        q,
        M,
        beta,
        alpha,
        max_scaling_iterations,
        with_tie_dither,
        with_dither,
        disable_scaling,
        disable_overload_protection,
        overload_policy,
        dither_seed,
        center,
    )
    return _q_decode(b, config=cfg, T=T, dtype=dtype, backend="auto")


@_decode_op.register_fake
def _(b, T, dtype, *args):
    return b.new_empty(b.shape[:-2] + b.shape[-1:], dtype=dtype)


def _schema_config_args(op) -> list[tuple[str, str]]:
    """``(name, type)`` of the arguments of ``op`` that follow its tensor/dtype arguments."""
    args = op.default._schema.arguments
    return [(a.name, str(a.type)) for a in args if a.name not in ("x", "b", "T", "dtype")]


def _check_schemas() -> None:
    want = []
    for f in dataclasses.fields(QuantizationConfig):
        t = f.type if isinstance(f.type, str) else f.type.__name__
        want.append((f.name, {"str": "str", "int": "int", "float": "float", "bool": "bool"}[t]))
    for name in ("quantize", "encode", "decode"):
        got = _schema_config_args(getattr(torch.ops.coset, name))
        if got != want:
            raise RuntimeError(f"torch.ops.coset.{name} takes {got}, but QuantizationConfig has fields {want}")


_check_schemas()


def quantize(x: torch.Tensor, config: QuantizationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.coset.quantize``: HNLQ reconstruction with a straight-through gradient.

    Parameters
    ----------
    x : (..., d) float tensor; config : QuantizationConfig

    Returns
    -------
    xhat : (..., d) in x.dtype; T : (...) uint8; clamped : (...) bool
    """
    return torch.ops.coset.quantize(x, *config_args(config))


def encode(x: torch.Tensor, config: QuantizationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.coset.encode``: ``(b (..., M, d) uint8, T (...) uint8, clamped (...) bool)``."""
    return torch.ops.coset.encode(x, *config_args(config))


def decode(
    b: torch.Tensor, T: torch.Tensor, config: QuantizationConfig, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.ops.coset.decode``: ``(..., M, d)`` labels and ``(...)`` T -> ``(..., d)`` of ``dtype``."""
    return torch.ops.coset.decode(b, T, dtype or torch.float32, *config_args(config))
