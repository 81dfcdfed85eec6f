"""coset.cli: the ``coset`` command (main job, rate-distortion, benchmarks, checkpoint compression, info)."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
__version__ = "0.1.0"
