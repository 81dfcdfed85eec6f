"""coset.quant: hierarchical nested-lattice quantization (Kaplan & Ordentlich 2025, arXiv 2505.13164).

Algorithm 1 (:func:`encode`) and Algorithm 2 (:func:`decode`) over the last dimension of any tensor, the
beta/alpha overload ramp, subtractive and tie dither, mod-q label arithmetic, bit-packing, and a registry
through which native kernels (coset-cuda) plug in without being imported here.
"""

from .backend import available_backends, get_backend, register_backend, unregister_backend
from .blocks import from_blocks, to_blocks
from .calibrate import beta_min, calibrate_beta
from .codes import CODES_FORMAT, codes_nbytes, pack_codes, unpack_codes
from .config import MAX_T, OverloadError, QuantizationConfig
from .decode import coset_representative, decode, decode_lattice_units
from .dither import sample_dither
from .encode import encode, encode_layers
from .offset import constellation_offset
from .modq import ModqSumReport, add_modq, from_flat_code, mac_modq, modq_sum_report, to_flat_code
from .packing import pack_labels, packed_nbytes, unpack_labels
from .quantize import quantize
from .quantizer import Quantizer
from .rd import entropy_bits, gaussian_data, hnlq_rd, scalar_rd

__all__ = [
    "QuantizationConfig",
    "OverloadError",
    "MAX_T",
    "encode",
    "decode",
    "quantize",
    "Quantizer",
    "encode_layers",
    "decode_lattice_units",
    "coset_representative",
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
    "CODES_FORMAT",
    "to_blocks",
    "from_blocks",
    "beta_min",
    "calibrate_beta",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "get_backend",
    "hnlq_rd",
    "scalar_rd",
    "gaussian_data",
    "entropy_bits",
    "constellation_offset",
]
__version__ = "0.1.0"
