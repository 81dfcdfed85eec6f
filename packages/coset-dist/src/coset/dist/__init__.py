"""coset.dist: DDP communication hooks that send HNLQ-compressed gradients.

``register(ddp_model, mode=..., config=...)`` installs :func:`hnlq_hook` with a new :class:`HNLQHookState`.
Modes: "allgather" (bit-packed labels, all-gather), "modular" (summable flat codes, all-reduce in the
compressed domain, exact sum), "decode" (reference; saves no bytes). See docs/dist.md.
"""

from .codec import (
    SumPacking,
    allgather_bytes,
    choose_sum_packing,
    decode_payload,
    encode_payload,
    modular_decode,
    modular_encode,
    modular_scales,
    pack_sum_fields,
    payload_layout,
    ring_allreduce_bytes,
    unpack_sum_fields,
)
from .hooks import MODES, HNLQHookState, default_config, hnlq_hook, register

__all__ = [
    "HNLQHookState",
    "hnlq_hook",
    "register",
    "default_config",
    "MODES",
    "encode_payload",
    "decode_payload",
    "payload_layout",
    "modular_scales",
    "modular_encode",
    "modular_decode",
    "SumPacking",
    "choose_sum_packing",
    "pack_sum_fields",
    "unpack_sum_fields",
    "ring_allreduce_bytes",
    "allgather_bytes",
]
__version__ = "0.1.0"
