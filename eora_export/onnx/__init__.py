"""ONNX export of compensated Llama models: canonical pattern, fusion, CPU runtime.

Modules: ``spec`` (the EoraLinear contract), ``pattern`` (emitter + matcher of the
unfused subgraph), ``fuse`` (pattern ⇄ fused node), ``export`` (whole causal LM),
``runtime`` (ORT sessions, CPU custom op), ``builder``/``initializers`` (plumbing).
The public names below are imported lazily so that ``spec`` stays torch-free.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "export_onnx": "export", "export_baseline_onnx": "export",
    "fuse": "fuse", "unfuse": "fuse", "FuseReport": "fuse",
    "make_session": "runtime",
    "LinearWeights": "pattern", "pattern_model": "pattern",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
