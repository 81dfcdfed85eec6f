"""coset.ptq: post-training quantization of pretrained models with nested-lattice codes."""

__all__: list[str] = []
__version__ = "0.1.0"
