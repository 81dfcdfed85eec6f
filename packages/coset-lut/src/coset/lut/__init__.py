"""coset.lut: inner products and matrix products computed straight from HNLQ labels (paper.md §6).

* :func:`label_index` / :func:`index_labels`: label <-> table index (base-q digits, little-endian).
* :func:`build_two_sided_lut` (``<a_i, a_j>``, exact integers, cached) and :func:`build_one_sided_lut`
  (``<a_i, y>`` for float queries).
* :func:`lut_inner_product` / :func:`lut_inner_product_one_sided`: blockwise, batched over leading dims.
* :class:`EncodedMatrix`, :func:`lut_matmul` (``X̂ Ŷ^T``), :func:`lut_matmul_one_sided` (``X̂ Y^T``),
  :func:`lut_linear` (``x Ŵ^T``); native kernels plug in through the coset.quant backend registry
  (ops ``lut_one_sided`` / ``lut_two_sided``, see :mod:`coset.lut.kernels`).
"""

from .encoded import EncodedMatrix
from .index import index_labels, label_index
from .inner_product import lut_inner_product, lut_inner_product_one_sided
from .matmul import lut_linear, lut_matmul, lut_matmul_one_sided
from .tables import DEFAULT_MAX_ENTRIES, TwoSidedLUT, build_one_sided_lut, build_two_sided_lut, representative_table

__all__ = [
    "label_index",
    "index_labels",
    "representative_table",
    "TwoSidedLUT",
    "build_two_sided_lut",
    "build_one_sided_lut",
    "DEFAULT_MAX_ENTRIES",
    "lut_inner_product",
    "lut_inner_product_one_sided",
    "EncodedMatrix",
    "lut_matmul",
    "lut_matmul_one_sided",
    "lut_linear",
]
__version__ = "0.1.0"
