"""coset.cuda: native HNLQ kernels (C++ on all CPU cores, CUDA when built with nvcc and a GPU is present).

The kernels plug into :mod:`coset.quant` through the entry-point group ``coset.backends`` (name
``native``): ``coset.quant.encode/decode/quantize(..., backend="auto")`` use them automatically and give
bit-for-bit the same labels, scale steps, clamp flags and reconstructions as ``backend="torch"``.
The LUT scoring ops of coset.lut (``lut_one_sided``, ``lut_two_sided``) are served by the same backend on CUDA
tensors (on the CPU coset.lut's PyTorch path is faster). The raw ``(N, d)`` kernel wrappers live in the private
``coset.cuda._ops``; use :mod:`coset.quant` (or :mod:`coset.cuda.ops`) instead.

The torch operators ``torch.ops.coset.quantize`` / ``encode`` / ``decode`` (module :mod:`coset.cuda.ops`)
wrap the kernels for autograd (straight-through gradient for ``quantize``) and ``torch.compile``.
"""

from . import ops  # registers torch.ops.coset.*
from ._ops import WITH_CUDA, cuda_available, get_num_threads, set_num_threads
from .backend import NativeBackend, backend

__all__ = [
    "WITH_CUDA",
    "cuda_available",
    "NativeBackend",
    "backend",
    "get_num_threads",
    "set_num_threads",
    "ops",
]
__version__ = "0.1.0"
