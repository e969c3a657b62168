"""Where a run's decoder blocks come from: a checkpoint read lazily, or a model in memory.

Both sources offer one interface (:class:`BlockSource`): the config, the number of blocks,
decoder layer ``i`` as a module of its own, the rotary embedding, the embedding of token ids,
and named tensors (final norm, LM head). The engine walks blocks through it and never sees
which one it has; ``--stream`` picks :class:`StreamingCheckpoint` (memory-mapped safetensors,
one block resident at a time, what makes a 7B model fit 24 GiB), otherwise
:class:`LoadedModel` (anything transformers loads, e.g. ``.bin`` weights).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import BadInput, MissingInput, UsageError
from .models import read_config
from .safetensors_io import read_header


class BlockSource:
    """What the engine reads of a model (see the module docstring). Subclasses give the tensors
    (``tensor_names``, ``shape``, ``read``) and the layers (``load_layer``); the rest follows
    from the config and ``read`` and is defined here once."""

    path: Path
    config: object
    model_type: str
    live: _LiveTensors

    def _set_config(self, config, supported: str) -> None:
        """``supported``: the error's subject, e.g. "streaming supports Llama and Mistral checkpoints"."""
        self.config = config
        self.model_type = config.model_type
        if self.model_type not in ("llama", "mistral"):
            raise BadInput(f"{supported}, not model_type '{self.model_type}'")
        self.live = _LiveTensors()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def tensor_names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> list[int]:
        raise NotImplementedError

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             track: bool = True) -> dict[str, Tensor]:
        """Tensors by name, converted to ``dtype`` on ``device``; counted in :attr:`live` when ``track``."""
        raise NotImplementedError

    def load_layer(self, index: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        raise NotImplementedError

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise UsageError(f"block {index} does not exist; the model has {self.num_layers} blocks")

    def rotary(self, device: torch.device | str = "cpu") -> nn.Module:
        """The rotary embedding module (no weights: inverse frequencies from the config)."""
        return _layer_classes(self.model_type)[1](self.config).to(device)

    @torch.no_grad()
    def embed(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """``ids: [n, seq]`` int64 -> ``[n, seq, hidden]`` in ``dtype`` (rows of the table)."""
        table = self.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
            raise BadInput(f"token ids reach {int(ids.max())} but the vocabulary has {table.shape[0]} entries; wrong tokenizer?")
        return F.embedding(ids, table).float().to(dtype)

    def final_norm(self, device: torch.device | str = "cpu") -> nn.Module:
        """The final RMSNorm (float32) with the checkpoint's weight."""
        norm_cls = _layer_classes(self.model_type)[2]
        norm = norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps).to(device)
        norm.weight.data = self.read(["model.norm.weight"], torch.float32, device)["model.norm.weight"]
        return norm


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    # Through float32, so bf16 → fp16 rounds exactly as load-to-fp32-then-cast does.
    if dtype is None or t.dtype == dtype:
        return t
    return t.float().to(dtype) if t.is_floating_point() else t.to(dtype)


def _layer_classes(model_type: str) -> tuple[type, type, type]:
    """(DecoderLayer, RotaryEmbedding, RMSNorm) classes of a Llama/Mistral model in transformers."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = {"llama": "Llama", "mistral": "Mistral"}[model_type]
    return getattr(mod, f"{prefix}DecoderLayer"), getattr(mod, f"{prefix}RotaryEmbedding"), getattr(mod, f"{prefix}RMSNorm")


class _LiveTensors:
    """Counts the tensors the loader handed out that are still alive (weak references).

    Lets tests assert that no more than one block's weights exist at any time: a tensor
    leaked from block i (a stray reference) would still be counted while block i+1 loads.
    """

    def __init__(self) -> None:
        self._refs: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0

    def add(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            self._refs.add(t)
        self.peak = max(self.peak, len(self._refs))

    def __len__(self) -> int:
        return len(self._refs)


class StreamingCheckpoint(BlockSource):
    """A Llama/Mistral HF checkpoint read lazily through ``safe_open`` (memory-mapped).

    Nothing is read at construction but config.json and the safetensors headers. Shard
    handles are opened per read and closed again, so pages of finished blocks are not
    kept mapped (they would count in the resident set).
    """

    def __init__(self, path: Path) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        read_config(self.path)  # one-line errors for unsupported architectures
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        # from_pretrained picks SDPA on CPU and GPU; a bare config would fall back to eager
        # attention, which rounds differently from a model transformers loads (LoadedModel).
        config._attn_implementation = "sdpa"
        self._set_config(config, "streaming supports Llama and Mistral checkpoints")
        self.weight_map = self._weight_map()
        self._headers: dict[str, dict] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise BadInput(f"{index} is not a valid safetensors index ({e}); re-download the model") from None
            missing = sorted({f for f in wmap.values() if not (self.path / f).is_file()})
            if missing:
                raise MissingInput(f"shard {missing[0]} listed in {index.name} is missing from {self.path}; re-download the model")
            return dict(wmap)
        single = self.path / "model.safetensors"
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single.name)
        if any(self.path.glob("*.bin")):
            raise BadInput(
                f"{self.path} holds PyTorch .bin weights; streaming needs safetensors (convert with save_pretrained(safe_serialization=True))"
            )
        raise MissingInput(f"no model.safetensors or model.safetensors.index.json in {self.path}; download the full model")

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def header(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype string, shape) of one stored tensor, without reading it."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise BadInput(f"tensor {name} is missing from the checkpoint in {self.path}; re-download the model")
        if shard not in self._headers:
            self._headers[shard] = read_header(self.path / shard)
        entry = self._headers[shard][name]
        return entry.dtype, list(entry.shape)

    def read(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        track: bool = True,
    ) -> dict[str, Tensor]:
        names = list(names)
        by_shard: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise BadInput(f"tensor {n} is missing from the checkpoint in {self.path}; re-download the model")
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, Tensor] = {}
        for shard, members in by_shard.items():
            with safe_open(str(self.path / shard), framework="pt") as f:
                for n in members:
                    out[n] = _cast(f.get_tensor(n), dtype).to(device)
        if track:
            self.live.add(out.values())
        return {n: out[n] for n in names}

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> list[int]:
        return self.header(name)[1]

    def load_layer(self, index: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """Decoder layer ``index`` (transformers' class) with its weights, in eval mode.

        Built on the meta device, so no random initialisation is allocated; then each
        parameter is assigned from the shards. Keys of the checkpoint the layer does not
        have (e.g. old ``rotary_emb.inv_freq`` buffers) are ignored.
        """
        self._check_index(index)
        layer_cls = _layer_classes(self.model_type)[0]
        with torch.device("meta"):
            layer = layer_cls(self.config, index)
        prefix = self.layer_prefix(index)
        wanted = [k for k, _ in layer.named_parameters()]
        missing = [k for k in wanted if prefix + k not in self.weight_map]
        if missing:
            raise BadInput(f"checkpoint in {self.path} lacks {prefix}{missing[0]}; re-download the model")
        tensors = self.read([prefix + k for k in wanted], dtype, device, track=False)
        params = {k: nn.Parameter(tensors.pop(prefix + k), requires_grad=False) for k in wanted}
        layer.load_state_dict(params, strict=True, assign=True)
        del params
        self.live.add(layer.parameters())  # the Parameters are what the block holds on to
        return layer.eval()



class LoadedModel(BlockSource):
    """A transformers model already in memory as a :class:`BlockSource` (``model``: a
    Llama/Mistral causal LM, float32). ``load_layer`` hands out a deep copy of a decoder
    layer, so compressing it (AWQ folds scales into it) leaves the model's own layer intact
    until the engine puts the finished block back with :meth:`replace_layer`; at the end of a
    run ``model`` is the compressed model with the final modules in place."""

    def __init__(self, model: nn.Module, path: Path) -> None:
        self.model = model
        self.path = Path(path)
        self._set_config(model.config, "eora-export supports Llama and Mistral models")
        state = model.state_dict(keep_vars=False)
        self._shapes = {k: list(v.shape) for k, v in state.items()}
        # Decoder layers are handed out as modules (load_layer); only the rest is read by name, and
        # holding no reference to the FP layers lets them go once the compressed ones replace them.
        self._state = {k: v for k, v in state.items() if not k.startswith("model.layers.")}

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> list[int]:
        if name == "lm_head.weight" and name not in self._shapes and self.tied:
            name = "model.embed_tokens.weight"
        if name not in self._shapes:
            raise BadInput(f"tensor {name} is missing from the model in {self.path}; re-download the model")
        return self._shapes[name]

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             track: bool = True) -> dict[str, Tensor]:
        out = {}
        for n in names:
            t = self._state.get(n)
            if t is None and n == "lm_head.weight" and self.tied:
                t = self._state["model.embed_tokens.weight"]
            if t is None:
                raise BadInput(f"tensor {n} is missing from the model in {self.path}; re-download the model")
            out[n] = _cast(t.detach(), dtype).to(device)
        return out

    def load_layer(self, index: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        self._check_index(index)
        layer = copy.deepcopy(self.model.model.layers[index]).to(device=device, dtype=dtype).eval()
        for p in layer.parameters():
            p.requires_grad_(False)
        self.live.add(layer.parameters())
        return layer

    def replace_layer(self, index: int, layer: nn.Module) -> None:
        """Put a finished (compressed) block back into the model (the in-memory result)."""
        self.model.model.layers[index] = layer



def count_parameters(path: Path) -> int:
    """Parameter count of a safetensors checkpoint from its headers alone (no tensor is
    read): the CLI streams models above a size threshold."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    return sum(math.prod(e.shape) for f in files for e in read_header(path / f).values())
