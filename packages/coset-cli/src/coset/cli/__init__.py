"""coset.cli: The coset command: main job (FP32 vs HNLQ QAT on MNIST-1D), rate-distortion, benchmarks, checkpoint compression."""

__all__: list[str] = []
__version__ = "0.1.0"
