"""The one pipeline: every run walks the model block by block (engine.walk), in memory or
streamed from memory-mapped safetensors; see engine.runner."""

from .runner import RunResult, is_streamed, run

__all__ = ["RunResult", "is_streamed", "run"]
