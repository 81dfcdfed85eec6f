"""coset.kv: a key/value cache in nested-lattice (HNLQ) codes, attention scores straight from the key codes.

* :class:`KVQuantConfig` (E8, q = 2, M = bits; per-token/per-head scale, T per block, optional full-precision
  window) and :class:`ScalarKVConfig` (the KIVI-style scalar baseline);
* :class:`TrellisCode`: the optional value and key code (a bitshift trellis with a Gaussian codebook,
  Viterbi-encoded; ``KVQuantConfig(value_code=..., key_code=...)``), ~0.25 bit per element from the
  distortion-rate bound;
* :class:`HeadRotation` / :func:`fwht`: per-KV-head Hadamard rotation with random signs;
* :func:`encode_states` / :func:`decode_states`: head vectors <-> bytes (:class:`KVCodes`);
* :func:`query_tables`, :func:`scores_lut`, :func:`scores_reference`, :func:`values_from_codes`: attention
  scores from the key codes through one-sided lookup tables, values accumulated from the value codes;
* :class:`CodedKVStore` / :class:`ScalarKVStore`: per-layer caches, independent of transformers;
  :class:`PerHeadKVStore`: a layer with its own code per KV head (one CodedKVStore per head);
* :func:`key_transform`: the linear map of the keys (and, inverted, of the queries) that minimises the score
  error of the code, from the keys' and queries' second moments;
* :func:`allocate_layers`: per-layer codes at an exact mean rate from measured layer sensitivities;
  :func:`allocate_trellis` / :func:`allocate_trellis_heads`: per-layer / per-KV-head trellis key and value bits
  at an exact mean rate from modelled sensitivities.

The transformers ``Cache`` classes and the ``"coset_kv"`` attention function live in
:mod:`coset.kv.hf_cache` (extra ``[hf]``); importing :mod:`coset.kv` does not import transformers.
"""

from .allocation import allocate_layers, allocate_trellis, allocate_trellis_heads
from .coded_store import CodedKVStore
from .codes import KVCodes, code_tables, decode_states, encode_states
from .config import BLOCK, KVQuantConfig, ScalarKVConfig, calibrated_beta
from .head_store import PerHeadKVStore
from .key_transform import KeyTransform, key_transform, score_error_factor
from .lut import query_tables, scores_lut, scores_lut_torch, scores_reference, values_from_codes
from .rope import RotaryTable
from .rotation import HeadRotation, fwht
from .scalar_store import ScalarKVStore
from .trellis import TrellisCode

__all__ = [
    "KVQuantConfig",
    "ScalarKVConfig",
    "BLOCK",
    "calibrated_beta",
    "HeadRotation",
    "fwht",
    "KVCodes",
    "encode_states",
    "decode_states",
    "code_tables",
    "query_tables",
    "scores_lut",
    "scores_lut_torch",
    "scores_reference",
    "values_from_codes",
    "CodedKVStore",
    "ScalarKVStore",
    "PerHeadKVStore",
    "allocate_layers",
    "allocate_trellis",
    "allocate_trellis_heads",
    "KeyTransform",
    "key_transform",
    "score_error_factor",
    "RotaryTable",
    "TrellisCode",
]
__version__ = "0.1.0"
