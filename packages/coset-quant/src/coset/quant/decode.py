"""``decode``: Algorithm 2 and the undoing of scaling and dither over any leading dims.

The algorithm itself is :func:`coset.quant._core.decode_flat`; this module resolves the arguments, checks the
labels and dispatches to a registered kernel or the reference.
"""

from __future__ import annotations

import torch

from coset.lattice import Lattice

from ._core import check_label_ranges, check_labels, check_out_dtype, decode_flat, resolve
from .backend import select_backend
from .config import QuantizationConfig
from .dither import sample_dither
from .offset import effective_dither

__all__ = ["decode"]


def decode(
    b: torch.Tensor,
    config: QuantizationConfig | None = None,
    T: torch.Tensor | None = None,
    *,
    lattice: Lattice | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode labels (Algorithm 2) and undo the scaling (and dither).

    Parameters
    ----------
    b : (..., M, d) integer labels in [0, q)
    config : as for :func:`coset.quant.encode`
    T : (...) integer scale steps from the encoder; ``None`` means all zero
    lattice : keyword-only, as for :func:`coset.quant.encode`
    dtype : floating output dtype

    Returns
    -------
    (..., d) tensor of ``dtype``

    Raises
    ------
    TypeError for a non-integer ``b``/``T`` or a non-floating ``dtype`` (on every backend); ValueError for
    shapes that do not match the config, labels outside [0, q), T outside [0, max_scaling_iterations], or a
    ``lattice`` that disagrees with ``config.lattice_type``.
    """
    lattice, config = resolve(config, lattice)
    check_labels(b, T, lattice, config, ranges=False)
    check_out_dtype(dtype)
    # uint8 labels and T may go unchecked to a backend that range-checks them in its own pass; any other dtype
    # could wrap around in the cast to uint8, so its values are checked first
    as_bytes = b.dtype == torch.uint8 and (T is None or T.dtype == torch.uint8)
    if not as_bytes:
        check_label_ranges(b, T, config)
    lead = b.shape[:-2]
    bf = b.reshape(-1, config.M, lattice.dim)
    if bf.dtype != torch.uint8:
        bf = bf.to(torch.uint8)
    be = select_backend(backend, "decode", bf, lattice, config)
    if as_bytes and not (be is not None and getattr(be, "validates_labels", False)):
        check_label_ranges(b, T, config)
    N = bf.shape[0]
    Tf = None if T is None else T.reshape(N).to(torch.uint8)
    z = sample_dither(N, lattice, config.dither_seed, b.device) if config.with_dither else None
    z = effective_dither(N, lattice, config, z, b.device)
    if be is not None:
        if Tf is None:
            Tf = torch.zeros(N, dtype=torch.uint8, device=b.device)
        out = be.decode(bf, Tf, lattice, config, z, dtype)
    else:
        out = decode_flat(bf, Tf, lattice, config, z, dtype)
    return out.reshape(*lead, lattice.dim)
