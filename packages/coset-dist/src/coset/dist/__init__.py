"""coset.dist: DDP communication hooks that send HNLQ-compressed gradients.

``register(ddp_model, mode=..., config=...)`` installs :func:`hnlq_hook` with a new :class:`HNLQHookState`.
Modes: "allgather" (bit-packed codes, all-gather), "modular" (summable flat codes, all-reduce in the
compressed domain, exact sum), "decode" (reference; saves no bytes). See docs/dist.md. The single-process
pieces (payload layout, modular code, byte accounting) live in :mod:`coset.dist.codec`.
"""

from .hooks import MODES, HNLQHookState, default_config, hnlq_hook, register

__all__ = ["hnlq_hook", "HNLQHookState", "register", "default_config"]
__version__ = "0.1.0"
