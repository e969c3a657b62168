"""Safetensors files without the safetensors writer: one checked header reader and writers
that stream tensor by tensor (a 7B base is written with one tensor in memory).

The format: 8-byte little-endian header size, a JSON header (name -> dtype, shape,
data_offsets; optional ``__metadata__``) padded to 8 bytes, then the raw data. Every reader of
headers in the package (preflight, the block loader, ``inspect``) goes through
:func:`read_header`, so a corrupt file gets the same one-line error everywhere.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import BadInput

HEADER_LIMIT = 100 << 20  # safetensors caps its JSON header at 100 MB
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
TORCH_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.int8: "I8",
    torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype string (``F16``...), shape, and its bytes."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def read_header(file: Path) -> dict[str, TensorEntry]:
    """name -> :class:`TensorEntry` of a .safetensors file, after checking that the header is
    well formed and every tensor lies inside the file (BadInput otherwise)."""
    def corrupt(why: str) -> BadInput:
        return BadInput(f"{file} is truncated or corrupt ({why}); re-download the model")

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, HEADER_LIMIT):
                raise corrupt(f"header of {n} bytes in a {size}-byte file")
            blob = f.read(n)
    except OSError as e:
        raise BadInput(f"cannot read {file} ({e.strerror or e}); check the file and its permissions") from None
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise corrupt(f"header is not JSON: {_short(e)}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_len = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise corrupt(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise corrupt(f"entry {name!r} lacks dtype, shape or data_offsets")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in [*shape, *offsets]):
            raise corrupt(f"entry {name!r} has a negative or non-integer shape or offset")
        start, end = offsets
        if not start <= end <= data_len:
            raise corrupt(f"tensor {name} lies past the end of the file ({end} > {data_len} data bytes)")
        item = ITEMSIZE.get(dtype)
        if item is not None and math.prod(shape) * item != end - start:
            raise corrupt(f"tensor {name} {dtype}{shape} needs {math.prod(shape) * item} bytes, the file gives it {end - start}")
        out[name] = TensorEntry(dtype, tuple(shape), end - start)
    return out


class SafetensorsWriter:
    """Writes a .safetensors file tensor by tensor, never holding more than one.

    The header needs every name, dtype and shape first, so ``specs`` declares them up
    front; :meth:`write` then takes the tensors in that order. The result is a standard
    file (8-byte little-endian header size, JSON header padded to 8 bytes, raw data).
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._specs = [(n, dt, tuple(int(s) for s in shape)) for n, dt, shape in specs]
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dt, shape in self._specs:
            size = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[name] = {"dtype": TORCH_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.total_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path.name}: unexpected extra tensor {name}")
        want, dt, shape = self._specs[self._next]
        if name != want or tensor.dtype != dt or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: expected {want} {dt} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self.path.name}: {len(self._specs) - self._next} declared tensors were never written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self._file.close()
            return
        self.close()


class ShardedWriter:
    """An HF checkpoint in shards of at most ``max_shard_bytes`` (a single
    ``model.safetensors`` when it fits, as ``save_pretrained`` writes it), plus
    ``model.safetensors.index.json`` when sharded."""

    def __init__(
        self,
        folder: Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str],
    ) -> None:
        shards: list[list] = [[]]
        size = 0
        for spec in specs:
            nbytes = math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._folder = folder
        self._shards = shards
        self._metadata = metadata
        self._current: SafetensorsWriter | None = None
        self._index = -1
        self._left = 0
        self.weight_map = {spec[0]: self.names[i] for i, shard in enumerate(shards) for spec in shard}
        self.total_bytes = sum(math.prod(s[2]) * torch.empty((), dtype=s[1]).element_size() for s in specs)

    def write(self, name: str, tensor: Tensor) -> None:
        if self._left == 0:
            if self._current is not None:
                self._current.close()
            self._index += 1
            if self._index >= len(self._shards):
                raise ValueError(f"unexpected extra tensor {name}")
            self._current = SafetensorsWriter(self._folder / self.names[self._index], self._shards[self._index], self._metadata)
            self._left = len(self._shards[self._index])
        self._current.write(name, tensor)
        self._left -= 1

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        if self._index != len(self._shards) - 1 or self._left:
            raise ValueError("the checkpoint writer was closed before every tensor was written")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self._folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
