"""Block-by-block pipeline for checkpoints too big to hold in memory (GitHub issue #8).

A 7B Llama in float32 is 27 GB; our machines have 24 GiB. This module never materialises
the model. It reads a Hugging Face checkpoint (one ``model.safetensors`` or shards with
``model.safetensors.index.json``) through memory-mapped ``safe_open`` handles and builds
one transformers decoder layer at a time::

    embed calibration tokens ─► hidden [n, seq, hidden]  (act_dtype, float16 by default)
    for each block i:
        load block i (float32)            ~0.8 GB for 7B
        forward: Grams of its Linears     (hooks; float64; FP-input mode also keeps the outputs)
        compress_model(block)             INT4 / 2:4, as the in-memory pipeline
        compensate_layers(...)            EoRA, Cholesky + randomized SVD for big layers
        [sequential mode: forward the compressed+compensated block for the next inputs]
        write block_i.safetensors, state (next inputs) and the manifest, atomically
        free the block
    assemble out/ (base/, adapter/, report.json, plot) reading one block file at a time

Which inputs feed block i+1 (``inputs``):

* ``"fp"`` (default): the outputs of the full-precision block i. Every block then sees
  exactly the activations the in-memory pipeline calibrates on, so ``--stream`` and the
  in-memory path give the same model (tests check codes and factors), and one forward
  per block suffices (the Gram forward also yields the outputs).
* ``"compressed"``: the outputs of the compressed + compensated block i (sequential
  calibration, as GPTQ does): later blocks are fitted to the inputs they will really
  get. One extra block forward per block; results differ from the in-memory pipeline.

Resume: after each block the manifest (JSON, written atomically after the block file
and the state file) records what is finished; ``resume=True`` continues after the last
finished block. Every block reseeds the RNG from (seed, block index), so the randomized
SVD draws the same numbers whether or not the run was interrupted, and the resumed
outputs equal an uninterrupted run's bit for bit.

Peak memory for a 7B model is one float32 block (0.8 GB), its four Grams (the largest
11008² float64 = 0.97 GB), the compressed block, and two activation tensors of
n × seq × hidden; depth does not change it. ``tools/bench_pipeline.py`` measured a peak
RSS of 8.75 GiB on Llama-2-7B shapes (32 × 512 calibration tokens, rank 128), most of
it transient copies of the 11008² Gram inside the EoRA root computation.

Fast path: ``StreamOptions.fast=None`` uses Cholesky + randomized SVD when the hidden
size is ≥ FAST_MIN_HIDDEN (eigh + full SVD of a 7B block takes ~7 min on 2 cores), and
the exact path for small models, which is what the in-memory pipeline does by default.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import inspect
import json
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import __version__
from .adapter import adapter_config, peft_state_dict, quantized_specs, quantized_state_dict
from .atomic import atomic_dir, atomic_file, write_text
from .calibration import GramCollector, GramStore
from .compensate.apply import CompensationConfig, compensate_layers, layer_rank, swapped
from .compress import CompressConfig, compress_model
from .errors import BadInput, MissingDependency, MissingInput, UsageError
from .evaluate import Scores, text_report, window_scores
from .hf_compat import add_legacy_rope_keys, save_tokenizer
from .models import TARGET_SUFFIXES, read_config
from .modules import EoraLinear
from .quant import QuantizedMatrix, pack_int4, unpack_int4
from .report import plot_layer_errors, write_json
from .safetensors_io import SafetensorsWriter, ShardedWriter, read_header
from .validate import check_output_location

log = logging.getLogger("eora_export")

INPUT_MODES = ("fp", "compressed")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Layers at least this wide get the fast EoRA path (Cholesky + randomized SVD) unless the
# caller decides: eigh + full SVD of a 4096-wide layer costs ~28 s on 2 cores (DESIGN §2).
FAST_MIN_HIDDEN = 2048
# Shard size of the written base checkpoint (HF's customary 5 GB shards).
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
_NON_LAYER = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_ST_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_ACT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------------------
# Reading: a memory-mapped checkpoint, one decoder layer at a time
# --------------------------------------------------------------------------------------


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


class StreamingCheckpoint:
    """A Llama/Mistral HF checkpoint read lazily through ``safe_open`` (memory-mapped).

    Nothing is read at construction but config.json and the safetensors headers. Shard
    handles are opened per read and closed again, so pages of finished blocks are not
    kept mapped (they would count in the resident set).
    """

    def __init__(self, path: Path) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        read_config(self.path)  # one-line errors for unsupported architectures
        self.config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        # from_pretrained picks SDPA on CPU and GPU; a bare config would fall back to eager
        # attention, which rounds differently from the in-memory pipeline.
        self.config._attn_implementation = "sdpa"
        self.model_type: str = self.config.model_type
        if self.model_type not in ("llama", "mistral"):
            raise BadInput(f"streaming supports Llama and Mistral checkpoints, not model_type '{self.model_type}'")
        self.weight_map = self._weight_map()
        self.live = _LiveTensors()
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

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

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
        """Tensors by name, converted to ``dtype`` on ``device``; counted in :attr:`live`."""
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
                    t = f.get_tensor(n)
                    # Through float32, so bf16 → fp16 rounds exactly as load-to-fp32-then-cast does.
                    if dtype is not None and t.dtype != dtype:
                        t = t.float().to(dtype) if t.is_floating_point() else t.to(dtype)
                    out[n] = t.to(device)
        if track:
            self.live.add(out.values())
        return {n: out[n] for n in names}

    def layer_classes(self) -> tuple[type, type]:
        """(DecoderLayer class, RotaryEmbedding class) of this architecture in transformers."""
        mod = importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")
        prefix = {"llama": "Llama", "mistral": "Mistral"}[self.model_type]
        return getattr(mod, f"{prefix}DecoderLayer"), getattr(mod, f"{prefix}RotaryEmbedding")

    def load_layer(self, index: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """Decoder layer ``index`` (transformers' class) with its weights, in eval mode.

        Built on the meta device, so no random initialisation is allocated; then each
        parameter is assigned from the shards. Keys of the checkpoint the layer does not
        have (e.g. old ``rotary_emb.inv_freq`` buffers) are ignored.
        """
        if not 0 <= index < self.num_layers:
            raise UsageError(f"block {index} does not exist; the model has {self.num_layers} blocks")
        layer_cls, _ = self.layer_classes()
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

    def rotary(self, device: torch.device | str = "cpu") -> nn.Module:
        """The rotary embedding module (no weights: inverse frequencies from the config)."""
        _, rope_cls = self.layer_classes()
        return rope_cls(self.config).to(device)

    @torch.no_grad()
    def embed(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """``ids: [n, seq]`` int64 -> ``[n, seq, hidden]`` in ``dtype`` (rows of the table)."""
        table = self.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
            raise BadInput(f"token ids reach {int(ids.max())} but the vocabulary has {table.shape[0]} entries; wrong tokenizer?")
        return F.embedding(ids, table).float().to(dtype)


# --------------------------------------------------------------------------------------
# One block, callable on hidden states, under its checkpoint name
# --------------------------------------------------------------------------------------


class BlockHost(nn.Module):
    """One decoder layer placed at ``model.layers.{i}`` so qualified names match the full
    model's (Gram keys, --only/--skip patterns, AWQ's layer lookup, adapter keys).

    ``forward(hidden: [b, seq, hidden]) -> [b, seq, hidden]`` (the layer's dtype): runs the
    layer with causal attention and rotary positions 0..seq-1, as the full model does.
    ``config`` is a plain attribute (AWQ reads head counts from it).
    """

    def __init__(self, layer: nn.Module, index: int, rotary: nn.Module, config) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(index): layer})
        self.index = index
        self.config = config
        # Not a submodule: its buffers must not appear in the block's state_dict.
        self._rotary = [rotary]
        self._positions: dict[tuple[int, torch.device], tuple[Tensor, tuple[Tensor, Tensor]]] = {}

    @property
    def layer(self) -> nn.Module:
        return self.model.layers[str(self.index)]

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.index}."

    def _pos(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        key = (x.shape[1], x.device)
        if key not in self._positions:
            pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            self._positions[key] = (pos, self._rotary[0](x, position_ids=pos))
        return self._positions[key]

    @torch.no_grad()
    def forward(self, hidden: Tensor) -> Tensor:
        from transformers import masking_utils

        ref = next(self.layer.parameters())
        x = hidden.to(device=ref.device, dtype=ref.dtype)
        pos, pe = self._pos(x)
        window = getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None
        mask_fn = masking_utils.create_causal_mask if window is None else masking_utils.create_sliding_window_causal_mask
        # positional: the embeddings argument is input_embeds in 4.x and inputs_embeds in 5.x
        mask = mask_fn(self.config, x, None, position_ids=pos, **_no_cache_kwargs(mask_fn, pos[0]))
        return self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)


def _no_cache_kwargs(mask_fn: Callable, cache_position: Tensor) -> dict:
    """"No KV cache" in the mask builder's own words: transformers ≥ 5.24 calls it ``cache`` (and
    removes ``past_key_values`` in 5.40); 4.53–5.23 call it ``past_key_values``, and 4.x sizes the
    mask from ``cache_position: [seq]`` (the positions 0..seq-1 without a cache)."""
    params = inspect.signature(mask_fn).parameters
    kwargs: dict = {"cache": None} if "cache" in params else {"past_key_values": None}
    if "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return kwargs


def block_linears(host: BlockHost, only: list[str] | None = None, skip: list[str] | None = None) -> dict[str, nn.Linear]:
    """The target Linears of one block by qualified name (same rule as models.target_linears)."""
    found = {}
    for name, mod in host.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGET_SUFFIXES:
            continue
        if not isinstance(mod, nn.Linear):
            raise BadInput(f"{name} is a {type(mod).__name__}, not a Linear; eora-export handles plain Linear layers only")
        if only and not any(fnmatch(name, p) for p in only):
            continue
        if skip and any(fnmatch(name, p) for p in skip):
            continue
        found[name] = mod
    return found


@torch.no_grad()
def run_block(host: nn.Module, hidden: Tensor, batch_size: int, out_dtype: torch.dtype, what: str = "") -> Tensor:
    """``hidden: [n, seq, h]`` (CPU, any dtype) through ``host`` in batches -> ``[n, seq, h]``
    ``out_dtype`` on the CPU. Refuses outputs that overflow ``out_dtype``."""
    out = torch.empty(hidden.shape, dtype=out_dtype)
    for i in range(0, hidden.shape[0], batch_size):
        y = host(hidden[i : i + batch_size])
        out[i : i + batch_size] = y.to(device="cpu", dtype=out_dtype)
    if not torch.isfinite(out).all():
        hint = " rerun with float32 activations (--stream-act-dtype float32)" if out_dtype != torch.float32 else " check the model weights"
        raise BadInput(f"NaN/Inf in the activations after {what or 'a block'};{hint}")
    return out


class _HookTimer:
    """Seconds spent in the GramCollector's hooks: pre-hooks registered before and after
    its own (hooks run in registration order) bracket exactly the Gram accumulation."""

    def __init__(self, modules: Iterable[nn.Module], sync: Callable[[], None]) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        self._modules = list(modules)
        self._sync = sync
        self._handles: list = []

    def start_hooks(self) -> None:
        for m in self._modules:
            self._handles.append(m.register_forward_pre_hook(self._start, prepend=True))

    def stop_hooks(self) -> None:
        for m in self._modules:
            self._handles.append(m.register_forward_pre_hook(self._stop))

    def _start(self, _m: nn.Module, _a: tuple) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, _m: nn.Module, _a: tuple) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def gram_forward(
    host: BlockHost,
    linears: dict[str, nn.Linear],
    hidden: Tensor,
    batch_size: int,
    keep_outputs: bool,
    out_dtype: torch.dtype,
    sync: Callable[[], None] = lambda: None,
) -> tuple[GramStore, Tensor | None, float]:
    """Grams of ``linears`` from ``hidden: [n, seq, h]`` through the block; also the
    block's outputs ``[n, seq, h]`` when ``keep_outputs``. Returns (grams, outputs, seconds
    spent accumulating Grams)."""
    out = torch.empty(hidden.shape, dtype=out_dtype) if keep_outputs else None
    timer = _HookTimer(linears.values(), sync)
    timer.start_hooks()
    try:
        with GramCollector(linears) as col:
            timer.stop_hooks()
            for i in range(0, hidden.shape[0], batch_size):
                y = host(hidden[i : i + batch_size])
                col.end_batch()
                if out is not None:
                    out[i : i + batch_size] = y.to(device="cpu", dtype=out_dtype)
    finally:
        timer.remove()
    if out is not None and not torch.isfinite(out).all():
        raise BadInput(f"NaN/Inf in the activations after block {host.index}; rerun with float32 activations (--stream-act-dtype float32)")
    return col.store, out, timer.seconds


# --------------------------------------------------------------------------------------
# Writing: safetensors one tensor at a time
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Per-block files: compressed codes + factors + the block's other parameters
# --------------------------------------------------------------------------------------


def _qm_tensors(prefix: str, qm: QuantizedMatrix) -> dict[str, Tensor]:
    """Codes packed two per byte when ≤ 4 bits (halves the work folder), fp16 scales."""
    q = qm.q.detach().to("cpu")
    packed = qm.bits <= 4 and q.shape[-1] % 2 == 0
    out = {f"{prefix}.q": pack_int4(q) if packed else q.contiguous()}
    if qm.scale is not None:
        out[f"{prefix}.scale"] = qm.scale.detach().to("cpu").contiguous()
    return out


def _qm_meta(qm: QuantizedMatrix) -> dict:
    q = qm.q
    return {
        "bits": qm.bits,
        "group_size": qm.group_size,
        "shape": list(q.shape),
        "packed": qm.bits <= 4 and q.shape[-1] % 2 == 0,
    }


def _qm_load(f, prefix: str, meta: dict) -> QuantizedMatrix:
    q = f.get_tensor(f"{prefix}.q")
    if meta["packed"]:
        q = unpack_int4(q)
    scale = f.get_tensor(f"{prefix}.scale") if meta["bits"] != 16 else None
    return QuantizedMatrix(q, scale, meta["bits"], meta["group_size"])


def _block_file_tensors(host: BlockHost, results: dict, linears: dict[str, nn.Linear]) -> tuple[dict[str, Tensor], dict, list]:
    """(tensors, per-Linear metadata, base-checkpoint tensor list) of one finished block.

    The non-target parameters are taken from the block *after* compression: AWQ folds its
    scales into the RMSNorm weights (and non-target rows), and the base checkpoint must
    carry those, exactly as the in-memory pipeline's ``model.state_dict()`` does.
    """
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}
    base: list[list] = []
    state = host.state_dict()
    for key, value in state.items():
        owner = key.rsplit(".", 1)[0]
        if owner in linears and key.endswith(".weight"):
            base.append([key, list(value.shape)])
            continue
        if owner in linears and key.endswith(".bias"):
            continue  # kept with the Linear below (EoraLinear holds it as float16)
        tensors[f"param.{key}"] = value.detach().to("cpu", torch.float16).contiguous()
        base.append([key, list(value.shape)])
    for name, res in results.items():
        mod: EoraLinear = res.module
        entry = {
            "weight": _qm_meta(mod.weight_q),
            "rank": res.rank,
            "sparse24": mod.sparse24,
            "error_before": res.error_before,
            "error_after": res.error_after,
            "out_features": mod.out_features,
            "in_features": mod.in_features,
            "has_bias": mod.bias is not None,
        }
        tensors.update(_qm_tensors(f"{name}.w", mod.weight_q))
        if mod.rank:
            entry["a"] = _qm_meta(mod.a_q)
            entry["b"] = _qm_meta(mod.b_q)
            tensors.update(_qm_tensors(f"{name}.a", mod.a_q))
            tensors.update(_qm_tensors(f"{name}.b", mod.b_q))
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().to("cpu", torch.float16).contiguous()
            base.append([f"{name}.bias", list(mod.bias.shape)])
        meta[name] = entry
    # Keep base order = the layer's state_dict order, biases included where they belong.
    order = {k: i for i, k in enumerate(state)}
    base.sort(key=lambda kv: order.get(kv[0], len(order)))
    return tensors, meta, base


def load_block_modules(path: Path, layers: dict[str, dict]) -> Iterator[tuple[str, EoraLinear]]:
    """(name, EoraLinear) for each compensated Linear of one block file, one at a time."""
    with safe_open(str(path), framework="pt") as f:
        for name, entry in layers.items():
            w = _qm_load(f, f"{name}.w", entry["weight"])
            a = _qm_load(f, f"{name}.a", entry["a"]) if entry["rank"] else None
            b = _qm_load(f, f"{name}.b", entry["b"]) if entry["rank"] else None
            bias = f.get_tensor(f"{name}.bias") if entry["has_bias"] else None
            yield name, EoraLinear(w, a, b, bias=bias, sparse24=entry["sparse24"])


# --------------------------------------------------------------------------------------
# The streaming run
# --------------------------------------------------------------------------------------


@dataclass
class StreamOptions:
    """Streaming-only settings; everything else comes from :class:`pipeline.RunConfig`."""

    inputs: str = "fp"  # "fp" | "compressed" (sequential calibration); see the module docstring
    act_dtype: str = "float16"  # storage of the hidden states between blocks (math is float32)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    fast: bool | None = None  # None: cfg.fast, or True when hidden_size ≥ FAST_MIN_HIDDEN
    evaluate: bool = True  # streamed perplexity of fp16 / compressed / compressed+method
    work_dir: Path | None = None  # default: <out>.stream-work beside the output
    resume: bool = False
    keep_work: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    sparsegpt_backend: str = "own"  # Gram-based SparseGPT; ModelOpt would re-run a deep copy per block

    def validate(self) -> None:
        if self.inputs not in INPUT_MODES:
            raise UsageError(f"unknown streaming input mode '{self.inputs}'; use fp or compressed")
        if self.act_dtype not in _ACT_DTYPES:
            raise UsageError(f"unknown activation dtype '{self.act_dtype}'; use {', '.join(_ACT_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"unknown --device '{self.device}'; use auto, cpu or cuda")
        if self.max_shard_bytes <= 0:
            raise UsageError("the base checkpoint shard size must be positive")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingDependency("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    return torch.device(device)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Make tensor factories default to ``device`` (CUDA); a no-op on the CPU, where the
    device mode would only add Python overhead to every torch call."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _tensor_hash(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class _State:
    """What carries from block to block: the next block's inputs, per path."""

    calib: Tensor  # [n, seq, h]
    evals: dict[str, Tensor] = field(default_factory=dict)  # path label -> [m, seq, h]


def _save_state(path: Path, state: _State) -> None:
    tensors = {"calib": state.calib.contiguous(), **{f"eval.{k}": v.contiguous() for k, v in state.evals.items()}}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))


def _load_state(path: Path) -> _State:
    with safe_open(str(path), framework="pt") as f:
        evals = {k[len("eval.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("eval.")}
        return _State(f.get_tensor("calib"), evals)


def _work_files(work: Path) -> list[Path]:
    pats = ("block_*.safetensors", "state_*.safetensors", "final_state.safetensors", MANIFEST, ".*.tmp*")
    return [p for pat in pats for p in work.glob(pat)]


def _clear_work(work: Path) -> None:
    # Only our own files: the folder may be one the user named and holds other things.
    for p in _work_files(work):
        p.unlink(missing_ok=True)


def _windows_for(path: Path, cfg, need_eval: bool) -> tuple[Tensor, list | None, object]:
    """(calibration windows, held-out texts (pipeline.EvalText: in domain, then out of domain)
    or None, tokenizer) as the in-memory pipeline draws them, so both paths see identical tokens."""
    from transformers import AutoTokenizer

    from .models import DEMO_DIR
    from .pipeline import _windows

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MissingInput(f"no usable tokenizer in {path} ({type(e).__name__}); streaming needs one to tokenize --calib") from None
    calib, texts = _windows(tokenizer, cfg, path == DEMO_DIR)
    return calib, (texts if need_eval else None), tokenizer


@torch.no_grad()
def _head_nll(ckpt: StreamingCheckpoint, hidden: dict[str, Tensor], ids: Tensor, batch_size: int, device: torch.device) -> dict[str, Scores]:
    """Per-window NLL and KL(fp16 ‖ path) sums per path from final hidden states ``[m, seq, h]``
    (final norm, then lm_head in float32, as evaluate.score computes on the full model; the
    "fp16" path's logits are the reference, batch by batch, so no logits are stored)."""
    head_name = "model.embed_tokens.weight" if ckpt.tied else "lm_head.weight"
    t = ckpt.read(["model.norm.weight", head_name], torch.float32, device)
    mod = importlib.import_module(f"transformers.models.{ckpt.model_type}.modeling_{ckpt.model_type}")
    norm_cls = getattr(mod, {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm"}[ckpt.model_type])
    norm = norm_cls(ckpt.config.hidden_size, eps=ckpt.config.rms_norm_eps).to(device)
    norm.weight.data = t["model.norm.weight"]
    head = t[head_name]

    def logits(label: str, i: int) -> Tensor:
        return F.linear(norm(hidden[label][i : i + batch_size].to(device=device, dtype=torch.float32)), head).float()

    nll: dict[str, list[Tensor]] = {label: [] for label in hidden}
    kl: dict[str, list[Tensor]] = {label: [] for label in hidden}
    for i in range(0, ids.shape[0], batch_size):
        b_ids = ids[i : i + batch_size].to(device)
        ref = logits("fp16", i) if "fp16" in hidden else None
        for label in hidden:
            n, k = window_scores(ref if label == "fp16" else logits(label, i), b_ids, ref)
            nll[label].append(n.cpu())
            if k is not None:
                kl[label].append(k.cpu())
    return {label: Scores(torch.cat(nll[label]), torch.cat(kl[label]) if kl[label] else None, ids.shape[1] - 1)
            for label in hidden}


def _fingerprint(path: Path, cfg, opts: StreamOptions, fast: bool, calib: Tensor, held: Tensor | None) -> dict:
    """Everything that changes the results; a resumed run must match it exactly."""
    keys = (
        "method",
        "rank",
        "lowrank_bits",
        "lowrank_group_size",
        "quant",
        "bits",
        "group_size",
        "sparsity",
        "only",
        "skip",
        "batch_size",
        "seed",
    )
    return {
        "model_path": str(Path(path).resolve()),
        "config_sha": hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()[:16],
        "run": {k: getattr(cfg, k) for k in keys},
        "inputs": opts.inputs,
        "act_dtype": opts.act_dtype,
        "fast": fast,
        "evaluate": opts.evaluate,
        "sparsegpt_backend": opts.sparsegpt_backend,
        "calib": _tensor_hash(calib),
        "eval": _tensor_hash(held),
        "eora_export_version": __version__,
    }


def _targets_of_model(ckpt: StreamingCheckpoint, only: list[str], skip: list[str]) -> list[str]:
    names = []
    for key in ckpt.weight_map:
        if not key.startswith("model.layers.") or not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")]
        if name.rsplit(".", 1)[-1] not in TARGET_SUFFIXES:
            continue
        if only and not any(fnmatch(name, p) for p in only):
            continue
        if skip and any(fnmatch(name, p) for p in skip):
            continue
        names.append(name)
    return names


def _compress_config(cfg) -> CompressConfig:
    return cfg.compress_config()


@torch.no_grad()
def _process_block(
    ckpt: StreamingCheckpoint,
    index: int,
    state: _State,
    cfg,
    opts: StreamOptions,
    fast: bool,
    device: torch.device,
    act_dtype: torch.dtype,
    rotary: nn.Module,
    work: Path,
) -> tuple[_State, dict]:
    """Everything for block ``index``; returns the next state and the manifest entry.

    A function of its own so that every reference to the block dies on return (the
    loader's live-tensor count checks it).
    """
    sync = _sync(device)
    times: dict[str, float] = {}

    def lap(key: str, t0: float) -> float:
        sync()
        now = time.perf_counter()
        times[key] = times.get(key, 0.0) + now - t0
        return now

    # Per-block seed: a resumed run draws the same randomized-SVD sketches as a full one.
    torch.manual_seed(cfg.seed * 1_000_003 + index)
    t = time.perf_counter()
    with _on(device):
        host = BlockHost(ckpt.load_layer(index, device), index, rotary, ckpt.config)
    t = lap("load_s", t)
    linears = block_linears(host, cfg.only, cfg.skip)
    # Without targets the block is unchanged, so its FP outputs are the next inputs in both modes.
    keep_fp_out = opts.inputs == "fp" or not linears
    next_evals: dict[str, Tensor] = {}
    # `with torch.device` makes the factories inside calibration/EoRA/quant allocate on
    # the chosen device, so the Grams, their roots and SVDs run there without changes.
    with _on(device):
        if linears:
            grams, fp_out, gram_s = gram_forward(host, linears, state.calib, cfg.batch_size, keep_fp_out, act_dtype, sync)
        else:
            grams, fp_out, gram_s = (
                GramStore(),
                run_block(host, state.calib, cfg.batch_size, act_dtype, f"block {index}"),
                0.0,
            )
        shared_grams = len(grams.sums)
        t = lap("forward_s", t)
        times["forward_s"] -= gram_s
        times["gram_s"] = gram_s
        if "fp16" in state.evals:  # the FP path runs before compress, which may fold AWQ scales in place
            next_evals["fp16"] = run_block(host, state.evals["fp16"], cfg.batch_size, act_dtype, f"block {index}")
            t = lap("eval_s", t)

        results: dict = {}
        plain: dict[str, EoraLinear] = {}
        if linears:
            biases = {n: m.bias for n, m in linears.items()}
            compressed = compress_model(host, linears, grams, _compress_config(cfg), state.calib, sparsegpt_backend=opts.sparsegpt_backend)
            t = lap("compress_s", t)
            comp = CompensationConfig(
                method=cfg.method,
                rank=cfg.rank,
                lowrank_bits=cfg.lowrank_bits,
                lowrank_group_size=cfg.lowrank_group_size,
                fast=fast,
            )
            results = compensate_layers(compressed, grams, comp, biases, progress=False)
            t = lap("compensate_s", t)
            if "compressed" in state.evals:
                plain = {n: EoraLinear(c.weight, bias=biases.get(n), sparse24=c.sparse24) for n, c in compressed.items()}
            del compressed, grams, biases
        modules = {n: r.module for n, r in results.items()}
        with swapped(host, modules):
            if not keep_fp_out:
                next_calib = run_block(host, state.calib, cfg.batch_size, act_dtype, f"block {index}")
                t = lap("forward_out_s", t)
            for label in state.evals:
                if label.startswith("compressed+"):
                    next_evals[label] = run_block(host, state.evals[label], cfg.batch_size, act_dtype, f"block {index}")
        if plain:
            with swapped(host, plain):
                next_evals["compressed"] = run_block(host, state.evals["compressed"], cfg.batch_size, act_dtype, f"block {index}")
        elif "compressed" in state.evals:
            next_evals["compressed"] = run_block(host, state.evals["compressed"], cfg.batch_size, act_dtype, f"block {index}")
        if state.evals:
            t = lap("eval_s", t)
    if keep_fp_out:
        next_calib = fp_out

    tensors, meta, base = _block_file_tensors(host, results, linears)
    fname = f"block_{index:05d}.safetensors"
    with atomic_file(work / fname) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "eora-stream", "block": str(index)})
    del tensors, host, linears, results, modules, plain
    lap("write_s", t)
    entry = {"file": fname, "layers": meta, "base": base, "shared_grams": shared_grams, "timings": times}
    return _State(next_calib, next_evals), entry


def _assemble(ckpt: StreamingCheckpoint, manifest: dict, work: Path, cfg, out: Path, tokenizer, max_shard_bytes: int, report: dict) -> None:
    """The output folder in the in-memory pipeline's layout, one block file at a time."""
    meta = {
        "method": cfg.method,
        "rank": cfg.rank,
        "lowrank_bits": cfg.lowrank_bits,
        "quant": cfg.quant,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sparsity": cfg.sparsity,
        "eora_export_version": __version__,
    }
    blocks = [manifest["blocks"][str(i)] for i in range(ckpt.num_layers)]
    layers = {n: e for b in blocks for n, e in b["layers"].items()}

    f16 = torch.float16
    base_specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", f16, tuple(ckpt.header("model.embed_tokens.weight")[1]))
    ]
    for b in blocks:
        base_specs += [(k, f16, tuple(s)) for k, s in b["base"]]
    base_specs.append(("model.norm.weight", f16, tuple(ckpt.header("model.norm.weight")[1])))
    if not ckpt.tied:
        base_specs.append(("lm_head.weight", f16, tuple(ckpt.header("lm_head.weight")[1])))

    quant_specs, adapter_specs = [], []
    for name, e in layers.items():
        w = e["weight"]
        out_f, in_f, r = e["out_features"], e["in_features"], e["rank"]
        entry = {"out_features": out_f, "in_features": in_f, "bits": w["bits"], "group_size": w["group_size"], "rank": r}
        if r:
            entry.update(lowrank_bits=e["a"]["bits"], lowrank_group_size=[e["a"]["group_size"], e["b"]["group_size"]])
        quant_specs += quantized_specs(name, entry)
        if r:
            adapter_specs.append((f"base_model.model.{name}.lora_A.weight", f16, (r, in_f)))
            adapter_specs.append((f"base_model.model.{name}.lora_B.weight", f16, (out_f, r)))

    with atomic_dir(out) as tmp:
        base_dir = tmp / "base"
        base_dir.mkdir()
        config = type(ckpt.config).from_pretrained(ckpt.path, local_files_only=True)
        config.dtype = "float16"  # as adapter.save_compressed_base writes it
        config.save_pretrained(base_dir)
        # the same files for older transformers (vLLM, TensorRT-LLM) as the in-memory base/
        add_legacy_rope_keys(base_dir / "config.json", config)
        if tokenizer is not None:
            save_tokenizer(tokenizer, base_dir)
        write_adapter = cfg.method != "none" and adapter_specs
        if write_adapter:
            (tmp / "adapter").mkdir()
        base_w = ShardedWriter(base_dir, base_specs, max_shard_bytes, {"format": "pt"})
        quant_w = SafetensorsWriter(base_dir / "quantization.safetensors", quant_specs, {"format": "eora"})
        adapter_w = SafetensorsWriter(tmp / "adapter" / "adapter_model.safetensors", adapter_specs, {"format": "pt"}) if write_adapter else None

        def copy_from_source(name: str) -> None:
            base_w.write(name, ckpt.read([name], f16)[name])

        copy_from_source("model.embed_tokens.weight")
        layer_info: dict[str, dict] = {}
        for b in tqdm(blocks, desc="write outputs", unit="block", leave=False):
            path = work / b["file"]
            w_c: dict[str, Tensor] = {}
            for name, mod in load_block_modules(path, b["layers"]):
                w_c[f"{name}.weight"] = mod.weight.to(f16)
                if mod.bias is not None:
                    w_c[f"{name}.bias"] = mod.bias.to(f16)
                tensors, info = quantized_state_dict({name: mod})
                layer_info.update(info)
                for k, v in tensors.items():
                    quant_w.write(k, v)
                if adapter_w is not None and mod.rank:
                    for k, v in peft_state_dict({name: mod}).items():
                        adapter_w.write(k, v)
            with safe_open(str(path), framework="pt") as f:
                for key, _shape in b["base"]:
                    base_w.write(key, w_c.pop(key) if key in w_c else f.get_tensor(f"param.{key}"))
        copy_from_source("model.norm.weight")
        if not ckpt.tied:
            copy_from_source("lm_head.weight")
        base_w.close()
        quant_w.close()
        (base_dir / "quantization.json").write_text(json.dumps({**meta, "layers": layer_info}, indent=2))
        if adapter_w is not None:
            adapter_w.close()
            ranks = {n: _Ranked(e["rank"]) for n, e in layers.items()}
            (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config(ranks, str(ckpt.path), meta), indent=2))
        write_json(report, tmp / "report.json")
        if report["layers"]:
            plot_layer_errors(report["layers"], tmp / "per_layer_error.png")


@dataclass(frozen=True)
class _Ranked:
    """Stand-in for an EoraLinear where only ``.rank`` is read (adapter_config)."""

    rank: int


def _layer_rows(manifest: dict, num_layers: int, method: str) -> list[dict]:
    rows = []
    for i in range(num_layers):
        for name, e in manifest["blocks"][str(i)]["layers"].items():
            before = e["error_before"]
            after = {"none": before}
            if method != "none":
                after[method] = e["error_after"]
            rows.append(
                {
                    "name": name,
                    "out_features": e["out_features"],
                    "in_features": e["in_features"],
                    "rank": {"none": 0, **({method: e["rank"]} if method != "none" else {})},
                    "error_before": before,
                    "error_after": after,
                    "relative_error": {m: (v / before if before > 0 else 0.0) for m, v in after.items()},
                }
            )
    return rows


def _sizes(manifest: dict, num_layers: int) -> dict[str, int]:
    fp16 = comp = factors = 0
    for i in range(num_layers):
        for e in manifest["blocks"][str(i)]["layers"].values():
            out_f, in_f = e["out_features"], e["in_features"]
            fp16 += out_f * in_f * 2
            comp += _storage_bytes(e["weight"])
            if e["rank"]:
                factors += _storage_bytes(e["a"]) + _storage_bytes(e["b"])
            if e["has_bias"]:
                factors += out_f * 2  # as pipeline counts it: module bytes minus weight bytes
    return {"fp16_linear_bytes": fp16, "compressed_linear_bytes": comp, "factor_bytes": factors}


def _storage_bytes(qm: dict) -> int:
    rows, cols = qm["shape"]
    if qm["bits"] == 16:
        return rows * cols * 2
    code_bits = 4 if qm["bits"] <= 4 else 8
    return rows * cols * code_bits // 8 + rows * (cols // qm["group_size"]) * 2


def run_streaming(
    path: Path,
    cfg,
    out_dir: Path | None = None,
    opts: StreamOptions | None = None,
    *,
    calib_windows: Tensor | None = None,
    eval_windows: Tensor | None = None,
    progress: bool = True,
    on_block_done: Callable[[int, dict], None] | None = None,
) -> dict:
    """Compress and compensate the checkpoint at ``path`` block by block; write ``out_dir``
    (default ``cfg.out``) in the in-memory pipeline's layout; return the report.

    cfg: a :class:`pipeline.RunConfig` (method, rank, quant, calibration settings...).
    calib_windows / eval_windows: int64 ``[n, seq]`` token ids instead of tokenizing
    ``cfg.calib`` / ``cfg.eval_file`` (a tokenizer-free path for benchmarks).
    on_block_done(index, manifest_entry): called after block ``index`` is durably
    recorded; an exception there stops the run as a crash would (tests use it).

    Report extras: ``report["streaming"]`` with per-block timings, the peak number of
    live loaded tensors, and the effective options.
    """
    opts = opts or StreamOptions()
    opts.validate()
    cfg.validate()
    if cfg.method == "eora-fb":
        raise UsageError("--method eora-fb is not streamed yet (it needs the FP and the compressed hidden states side by "
                         "side); use --method eora with --stream-inputs compressed, or a model small enough for memory")
    if getattr(cfg, "rank_budget", None) is not None:
        raise UsageError("--rank-budget is not streamed yet (it allocates ranks over the whole model at once); "
                         "use a uniform --rank for streamed models")
    out = Path(out_dir if out_dir is not None else cfg.out)
    check_output_location(out)
    t_start = time.perf_counter()
    path = Path(path)
    ckpt = StreamingCheckpoint(path)
    device = resolve_device(opts.device)
    act_dtype = _ACT_DTYPES[opts.act_dtype]
    fast = opts.fast if opts.fast is not None else (cfg.fast or ckpt.config.hidden_size >= FAST_MIN_HIDDEN)
    targets = _targets_of_model(ckpt, cfg.only, cfg.skip)
    if not targets:
        raise BadInput("no Linear layers selected for compression; check --only/--skip patterns")

    tokenizer = None
    need_eval = opts.evaluate
    # (name, domain, file, windows) per held-out text; all texts stream as one batch of windows
    # (paths carry their hidden states block to block) and are split again at the head.
    texts: list[tuple[str, str, str, int]] = []
    if calib_windows is None or (need_eval and eval_windows is None):
        calib_tok, eval_texts, tokenizer = _windows_for(path, cfg, need_eval)
        calib_windows = calib_tok if calib_windows is None else calib_windows
        if need_eval and eval_windows is None:
            texts = [(e.name, e.domain, str(e.path), int(e.windows.shape[0])) for e in eval_texts]
            eval_windows = torch.cat([e.windows for e in eval_texts])
    if need_eval and eval_windows is not None and not texts:
        texts = [("heldout", "in domain", "(eval_windows given)", int(eval_windows.shape[0]))]
    if not need_eval:
        eval_windows = None
    calib_windows = calib_windows.to(torch.int64)

    work = Path(opts.work_dir) if opts.work_dir is not None else out.with_name(out.name + ".stream-work")
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(path, cfg, opts, fast, calib_windows, eval_windows)
    manifest_path = work / MANIFEST
    manifest: dict | None = None
    if opts.resume and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise BadInput(f"{manifest_path} is corrupt; remove {work} and start again without --resume") from None
        if manifest.get("version") != MANIFEST_VERSION or manifest.get("fingerprint") != fingerprint:
            raise UsageError(
                f"the work folder {work} holds a run with other settings, model or calibration data; "
                "rerun with the same flags, or drop --resume to start over"
            )
    elif opts.resume:
        log.warning("--resume: no finished block in %s; starting from the first block", work)
    if manifest is None:
        _clear_work(work)
        manifest = {
            "version": MANIFEST_VERSION,
            "fingerprint": fingerprint,
            "num_layers": ckpt.num_layers,
            "next_block": 0,
            "state_file": None,
            "blocks": {},
        }
    start = manifest["next_block"]
    resumed_from = start if start else None

    clamped = {}
    for name in targets:
        _, shape = ckpt.header(name + ".weight")
        if layer_rank(cfg.rank, *shape) < cfg.rank:
            clamped[name] = layer_rank(cfg.rank, *shape)
    if clamped and cfg.method != "none":
        log.warning(
            "rank %d clamped to the layer size for %d layers (smallest: %d)",
            cfg.rank,
            len(clamped),
            min(clamped.values()),
        )

    t = time.perf_counter()
    if start == 0:
        state = _State(ckpt.embed(calib_windows, act_dtype))
        if eval_windows is not None:
            emb = ckpt.embed(eval_windows, act_dtype)
            labels = ["fp16", "compressed"] + ([f"compressed+{cfg.method}"] if cfg.method != "none" else [])
            state.evals = {label: emb for label in labels}  # shared until each path's first block writes its own
    elif start < ckpt.num_layers:
        state = _load_state(work / manifest["state_file"])
    else:
        state = None
    embed_s = time.perf_counter() - t
    with _on(device):
        rotary = ckpt.rotary(device)

    bar = tqdm(total=ckpt.num_layers, initial=start, desc="blocks", unit="block", disable=not progress)
    try:
        for index in range(start, ckpt.num_layers):
            t_block = time.perf_counter()
            state, entry = _process_block(ckpt, index, state, cfg, opts, fast, device, act_dtype, rotary, work)
            gc.collect()  # nn.Module graphs can hold reference cycles; free the block now
            entry["timings"]["total_s"] = time.perf_counter() - t_block
            t = time.perf_counter()
            old_state = manifest["state_file"]
            if index + 1 < ckpt.num_layers:
                manifest["state_file"] = f"state_{index + 1:05d}.safetensors"
                _save_state(work / manifest["state_file"], state)
            else:
                manifest["state_file"] = None
                if state.evals:
                    manifest["final_nll_state"] = "final_state.safetensors"
                    _save_state(work / manifest["final_nll_state"], state)
            entry["timings"]["write_s"] += time.perf_counter() - t
            entry["timings"]["total_s"] += time.perf_counter() - t
            manifest["blocks"][str(index)] = entry
            manifest["next_block"] = index + 1
            write_text(manifest_path, json.dumps(manifest, indent=1))
            if old_state and old_state != manifest["state_file"]:
                (work / old_state).unlink(missing_ok=True)
            bar.update(1)
            bar.set_postfix(block_s=f"{entry['timings']['total_s']:.1f}")
            if on_block_done is not None:
                on_block_done(index, entry)
    finally:
        bar.close()
    if state is None and manifest.get("final_nll_state"):
        state = _load_state(work / manifest["final_nll_state"])

    accuracy: dict[str, dict] = {}
    eval_s = 0.0
    if eval_windows is not None and state is not None and state.evals:
        t = time.perf_counter()
        scores = _head_nll(ckpt, state.evals, eval_windows, cfg.batch_size, device)
        start_w = 0
        for name, domain, file, n in texts:
            part = {k: Scores(v.nll[start_w : start_w + n], None if v.kl is None else v.kl[start_w : start_w + n],
                              v.tokens_per_window) for k, v in scores.items()}
            accuracy[name] = {"file": file, "domain": domain, **text_report(part, seed=cfg.seed)}
            start_w += n
        eval_s = time.perf_counter() - t
    del state
    ppl = accuracy["heldout"]["perplexity"] if accuracy else {}
    held_windows = texts[0][3] if texts else 0

    block_times = [manifest["blocks"][str(i)]["timings"] for i in range(ckpt.num_layers)]
    total = {
        k: sum(bt.get(k, 0.0) for bt in block_times)
        for k in ("load_s", "forward_s", "gram_s", "compress_s", "compensate_s", "forward_out_s", "eval_s", "write_s")
    }
    sizes = _sizes(manifest, ckpt.num_layers)
    report = {
        "eora_export_version": __version__,
        "model": cfg.model,
        "model_path": str(path),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "calibration": {
            "windows": int(calib_windows.shape[0]),
            "seq_len": int(calib_windows.shape[1]),
            "tokens": int(calib_windows.numel()),
            "linears": len(targets),
            "shared_grams": sum(manifest["blocks"][str(i)]["shared_grams"] for i in range(ckpt.num_layers)),
        },
        "eval": ({"windows": held_windows, "tokens": held_windows * int(eval_windows.shape[1])} if eval_windows is not None else {}),
        "perplexity": ppl,
        "kl": accuracy["heldout"]["kl"] if accuracy else {},
        "accuracy": accuracy,
        "sweep": {},
        "sizes": sizes,
        "rank_clamped": clamped,
        "layers": _layer_rows(manifest, ckpt.num_layers, cfg.method),
        "timings": {"embed_s": embed_s, **total, "final_eval_s": eval_s},
        "streaming": {
            "inputs": opts.inputs,
            "act_dtype": opts.act_dtype,
            "device": str(device),
            "fast": fast,
            "sparsegpt_backend": opts.sparsegpt_backend,
            "blocks": len(block_times),
            "resumed_from_block": resumed_from,
            "block_timings": block_times,
            "peak_live_loaded_tensors": ckpt.live.peak,
        },
    }
    from .pipeline import summary_table  # the in-memory run's table, so both print the same

    report["table"] = summary_table(report)

    t = time.perf_counter()
    if tokenizer is None:
        with contextlib.suppress(Exception):  # a checkpoint without tokenizer files still gets its base/
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    report["timings"]["assemble_s"] = 0.0
    report["timings"]["total_s"] = 0.0
    _assemble(ckpt, manifest, work, cfg, out, tokenizer, opts.max_shard_bytes, report)
    report["timings"]["assemble_s"] = time.perf_counter() - t
    report["timings"]["total_s"] = time.perf_counter() - t_start
    write_text(out / "report.json", json.dumps(report, indent=2, default=float))  # again, with the assembly time
    if not opts.keep_work:
        _clear_work(work)
        with contextlib.suppress(OSError):
            work.rmdir()
    return report


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
