"""Read a finished output folder back: every EoraLinear, and models that graphs can be built from.

An output folder (``eora-export --out DIR``, streamed or not, or ``finetune``) holds
``base/`` (the compressed checkpoint: W_c in float16 plus ``quantization.safetensors`` with
the exact codes and scales of W_c, A and B) and ``adapter/``. From these this module
rebuilds each :class:`EoraLinear` bit for bit, and offers :class:`LazyLlama`, a stand-in
for ``LlamaForCausalLM`` whose decoder layers are loaded one at a time when the ONNX
exporter walks them, so a 7B graph is written with one block in memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .adapter import read_quantized_layer
from .checkpoint import StreamingCheckpoint
from .eora_linear import EoraLinear
from .errors import BadInput, MissingInput
from .models import set_module


def read_quantization(base: Path) -> dict:
    """quantization.json of a compressed base folder, checked."""
    path = base / "quantization.json"
    if not path.is_file() or not (base / "quantization.safetensors").is_file():
        raise MissingInput(f"{base} has no quantization.json / quantization.safetensors; give an eora-export output folder "
                           "(its base/ subfolder holds them)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e}); re-run eora-export to rewrite the folder") from None
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise BadInput(f"{path} lists no layers; re-run eora-export to rewrite the folder")
    return meta


def load_modules(base: Path, names: Sequence[str] | None = None) -> Iterator[tuple[str, EoraLinear]]:
    """(name, EoraLinear) for the compensated Linears of ``base``, one at a time, exactly as written."""
    layers = read_quantization(base)["layers"]
    wanted = list(layers) if names is None else list(names)
    ckpt = None
    with safe_open(str(base / "quantization.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in wanted:
            e = layers[name]
            w, factors = read_quantized_layer(f.get_tensor, keys, name, e)
            if e.get("rank") and factors is None:
                raise BadInput(f"{base}/quantization.safetensors has no factor codes for {name} (written by an older "
                               "eora-export); re-run the export to rewrite the folder")
            b, a = factors or (None, None)
            bias = None
            if e.get("has_bias"):
                ckpt = ckpt or StreamingCheckpoint(base)
                bias = ckpt.read([f"{name}.bias"], torch.float16, track=False)[f"{name}.bias"]
            yield name, EoraLinear(w, a, b, bias=bias, sparse24=bool(e.get("sparse24")))


class _Lazy(nn.Module):
    """A weight-only module whose tensor is read from the checkpoint when asked for."""

    def __init__(self, ckpt: StreamingCheckpoint, key: str) -> None:
        super().__init__()
        self._ckpt, self._key = ckpt, key

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._ckpt.read([self._key], torch.float16, track=False)[self._key]


class _LazyLayers(Sequence):
    """Decoder layers built on access (float16), compensated Linears swapped in."""

    def __init__(self, ckpt: StreamingCheckpoint, base: Path | None, targets: dict[int, list[str]]) -> None:
        self._ckpt, self._base, self._targets = ckpt, base, targets

    def __len__(self) -> int:
        return self._ckpt.num_layers

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("lazy layers are read one at a time")
        if not 0 <= i < len(self):
            raise IndexError(i)
        layer = self._ckpt.load_layer(i, dtype=torch.float16)
        prefix = f"model.layers.{i}."
        if self._base is not None and self._targets.get(i):
            for name, mod in load_modules(self._base, self._targets[i]):
                set_module(layer, name[len(prefix):], mod)
        return layer


class _Inner:
    def __init__(self, ckpt: StreamingCheckpoint, layers: _LazyLayers) -> None:
        self.layers = layers
        self.embed_tokens = _Lazy(ckpt, "model.embed_tokens.weight")
        self.norm = _Lazy(ckpt, "model.norm.weight")
        self.rotary_emb = ckpt.rotary()


class LazyLlama:
    """What :func:`eora_export.onnx.export.export_onnx` reads of a LlamaForCausalLM, loaded on demand.

    ``compensated=True`` (a folder's base/): the target Linears are the EoraLinear modules of
    quantization.safetensors; ``False``: plain float16 Linears of the checkpoint (the FP16 baseline).
    """

    def __init__(self, checkpoint: Path, compensated: bool) -> None:
        self.path = Path(checkpoint)
        ckpt = StreamingCheckpoint(self.path)
        self.config = ckpt.config
        targets: dict[int, list[str]] = {}
        if compensated:
            for name in read_quantization(self.path)["layers"]:
                parts = name.split(".")
                if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
                    raise BadInput(f"{self.path}/quantization.json: layer {name} is not inside model.layers.N; "
                                   "only decoder-block Linears can be exported from a folder")
                targets.setdefault(int(parts[2]), []).append(name)
        self.model = _Inner(ckpt, _LazyLayers(ckpt, self.path if compensated else None, targets))
        self.lm_head = self.model.embed_tokens if ckpt.tied else _Lazy(ckpt, "lm_head.weight")


@dataclass
class FolderResult:
    """A finished output folder, in the shape :mod:`eora_export.deploy` writes graphs from."""

    folder: Path
    model_path: Path  # the original (FP16) checkpoint, for the baseline graph
    external_data: bool | None = True  # a folder export never holds the whole model in one protobuf

    @property
    def base(self) -> Path:
        return self.folder / "base"

    @functools.cached_property
    def model(self) -> LazyLlama:
        return LazyLlama(self.base, compensated=True)

    @contextlib.contextmanager
    def export_model(self) -> Iterator[LazyLlama]:
        yield self.model

    def baseline_model(self) -> LazyLlama:
        return LazyLlama(self.model_path, compensated=False)


def original_model_path(folder: Path) -> Path | None:
    """The checkpoint a folder was made from, as its adapter config or report records it."""
    for rel, key in (("adapter/adapter_config.json", "base_model_name_or_path"), ("report.json", "model_path")):
        path = folder / rel
        if path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
                value = json.loads(path.read_text()).get(key)
                if value and Path(value).is_dir():
                    return Path(value)
    return None
