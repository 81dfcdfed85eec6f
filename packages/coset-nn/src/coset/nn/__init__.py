"""coset.nn: Quantization-aware training layers (QLinear, QConv2d), model conversion and compressed checkpoints."""

__all__: list[str] = []
__version__ = "0.1.0"
