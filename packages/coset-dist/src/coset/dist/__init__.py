"""coset.dist: DDP communication hooks that compress gradients with HNLQ."""

__all__: list[str] = []
__version__ = "0.1.0"
