"""eora-export: training-free low-rank compensation of compressed LLMs, exported for TensorRT."""

__version__ = "0.1.0"
