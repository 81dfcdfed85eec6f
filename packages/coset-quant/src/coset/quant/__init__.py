"""coset.quant: hierarchical nested-lattice quantization (Kaplan & Ordentlich 2025, arXiv 2505.13164).

Algorithm 1 (:func:`encode`) and Algorithm 2 (:func:`decode`) over the last dimension of any tensor, the
beta/alpha overload ramp, subtractive dither and centring, mod-q label arithmetic, bit-packing and the packed
code format, and a registry through which native kernels (coset-cuda) plug in without being imported here.
The rate-distortion harness lives in :mod:`coset.quant.rd` (not exported here).
"""

from ._core import coset_representative, count_true, decode_lattice_units, encode_layers
from .backend import (
    BACKEND_API,
    KernelConstants,
    available_backends,
    get_backend,
    kernel_constants,
    register_backend,
    unregister_backend,
)
from .blocks import from_blocks, to_blocks
from .calibrate import beta_min, calibrate_beta
from .codes import CODE_TENSORS, CODES_FORMAT, T_CODINGS, codes_nbytes, pack_codes, t_coding_nbytes, unpack_codes
from .config import MAX_T, ClampWarning, DegenerateConfigWarning, OverloadError, QuantizationConfig
from .decode import decode
from .dither import sample_dither
from .encode import encode
from .modq import ModqSumReport, add_modq, from_flat_code, mac_modq, modq_sum_report, to_flat_code
from .offset import constellation_offset
from .packing import pack_labels, packed_nbytes, unpack_labels
from .quantize import quantize
from .quantizer import Quantizer
from .rms import RmsBetas, rms_betas
from .rows import RowQuantizer, quantize_rows

__all__ = [
    "QuantizationConfig",
    "OverloadError",
    "ClampWarning",
    "DegenerateConfigWarning",
    "MAX_T",
    "encode",
    "decode",
    "quantize",
    "quantize_rows",
    "RowQuantizer",
    "RmsBetas",
    "rms_betas",
    "count_true",
    "Quantizer",
    "encode_layers",
    "decode_lattice_units",
    "coset_representative",
    "constellation_offset",
    "sample_dither",
    "add_modq",
    "mac_modq",
    "to_flat_code",
    "from_flat_code",
    "modq_sum_report",
    "ModqSumReport",
    "pack_labels",
    "unpack_labels",
    "packed_nbytes",
    "pack_codes",
    "unpack_codes",
    "codes_nbytes",
    "CODE_TENSORS",
    "T_CODINGS",
    "t_coding_nbytes",
    "CODES_FORMAT",
    "to_blocks",
    "from_blocks",
    "beta_min",
    "calibrate_beta",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "get_backend",
    "kernel_constants",
    "KernelConstants",
    "BACKEND_API",
]
__version__ = "0.1.0"
