"""A small ONNX graph builder that streams initializers, and an atomic writer.

Initializers go through :class:`InitializerSink` as they are made: kept inline for small
models, or appended to an external data file at once (the ModelProto then holds only
their location/offset/length), so a multi-GB model never sits in memory as one protobuf.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..atomic import default_mode
from .initializers import array_tensor

EXTERNAL_THRESHOLD_BYTES = int(1.5 * 2**30)
_ALIGN = 64  # external tensors start on 64-byte boundaries (friendly to mmap and SIMD loads)
# Smaller tensors stay inline: shape constants must be readable by shape inference.
EXTERNAL_MIN_BYTES = 1024


class InitializerSink:
    """Collects initializers; with ``data_file`` their bytes are streamed there."""

    def __init__(self, data_file: BinaryIO | None = None, location: str = "") -> None:
        self.tensors: list[TensorProto] = []
        self.names: set[str] = set()
        self._file = data_file
        self._location = location
        self._offset = 0

    def add(self, t: TensorProto) -> str:
        if t.name in self.names:
            raise ValueError(f"initializer {t.name!r} added twice; give each constant a unique name")
        self.names.add(t.name)
        if self._file is not None and t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
            pad = -self._offset % _ALIGN
            if pad:
                self._file.write(b"\0" * pad)
                self._offset += pad
            data = t.raw_data
            self._file.write(data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self._location), ("offset", str(self._offset)),
                               ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            self._offset += len(data)
        self.tensors.append(t)
        return t.name


class GraphBuilder:
    """Nodes plus streamed initializers, with unique node and tensor names."""

    def __init__(self, sink: InitializerSink) -> None:
        self.sink = sink
        self.nodes: list[onnx.NodeProto] = []
        self._count: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def op(self, op_type: str, inputs: list[str], hint: str, n_out: int = 1, **attrs: Any) -> Any:
        """Add a node; returns its output name (or list of names when ``n_out`` > 1)."""
        name = self.fresh(hint)
        outs = [name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer from a numpy array (dtype kept)."""
        return self.sink.add(array_tensor(name, array))

    def add_initializer(self, t: TensorProto) -> str:
        return self.sink.add(t)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class ExternalDataFile:
    """A temp data file beside ``path`` that becomes ``<path>.data`` on :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        self.final = Path(str(path) + ".data")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent)
        self.file = os.fdopen(fd, "wb")

    @property
    def location(self) -> str:
        return self.final.name  # relative to the model file, as the ONNX spec requires

    def commit(self) -> None:
        self.file.close()
        os.chmod(self.tmp, default_mode())
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)
