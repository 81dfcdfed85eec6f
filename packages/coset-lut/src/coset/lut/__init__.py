"""coset.lut: Lookup tables and compressed-domain inner products / matmul for HNLQ codes."""

__all__: list[str] = []
__version__ = "0.1.0"
