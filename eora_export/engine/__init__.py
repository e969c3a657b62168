"""The one pipeline: every run walks the model block by block (engine.walk), in memory or
streamed from memory-mapped safetensors; see engine.run."""

from .run import RunResult, is_streamed, run

__all__ = ["RunResult", "is_streamed", "run"]
