"""What the block walk keeps on disk: finished block files, the hidden states between blocks,
and the manifest that says how far it got (resume).

Layout of the work folder (``--work-dir``, default ``<out>.stream-work``)::

    manifest.json                 version, fingerprint of everything that changes results,
                                  next_block, the current state file, one entry per finished block
    block_00000.safetensors       the block's final EoraLinear codes, factors, biases, other params
    state_00001.safetensors       hidden states entering block 1, one tensor per path

The manifest is written (atomically) after the block file and the state file, so a kill at
any point leaves either the old or the new finished block recorded, never a half one.
Only files matching these names are ever deleted: the folder may be one the user named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import __version__
from ..atomic import atomic_file, write_text
from ..eora_linear import EoraLinear
from ..errors import BadInput, UsageError
from ..quant import QuantizedMatrix, pack_int4, unpack_int4

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
# Settings that change the results; a resumed run must match them exactly (the others, such
# as --out, --resume or --device, only say where and how).
RESULT_KEYS = (
    "method", "rank", "lowrank_bits", "lowrank_group_size", "lowrank_quant", "quant", "bits", "group_size", "sparsity", "only", "skip",
    "batch_size", "seed", "compare", "sweep_ranks", "lsi_epochs", "lsi_lr", "fast", "rank_budget", "val_samples",
    "stream_inputs", "act_dtype",
)


def tensor_hash(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint(path: Path, cfg, settings: dict, windows: dict[str, Tensor]) -> dict:
    """Everything that changes the results: model, result settings, resolved engine settings, token windows."""
    config = Path(path) / "config.json"
    return {
        "model_path": str(Path(path).resolve()),
        "config_sha": hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None,
        "run": {k: getattr(cfg, k) for k in RESULT_KEYS},
        "settings": settings,
        "windows": {k: tensor_hash(v) for k, v in windows.items()},
        "eora_export_version": __version__,
    }


class WorkFolder:
    """The work folder of one walk (see the module docstring). ``tag`` separates passes."""

    def __init__(self, folder: Path, tag: str = "") -> None:
        self.folder = Path(folder)
        self.tag = tag
        self.manifest_path = self.folder / f"{tag}{MANIFEST}"

    def files(self) -> list[Path]:
        pats = (f"{self.tag}block_*.safetensors", f"{self.tag}sets_*.safetensors", f"{self.tag}state_*.safetensors",
                self.manifest_path.name, ".*.tmp*")
        return [p for pat in pats for p in self.folder.glob(pat)]

    def clear(self) -> None:
        for p in self.files():
            p.unlink(missing_ok=True)

    def start(self, fp: dict, num_layers: int, resume: bool, first_block: int = 0) -> dict:
        """The manifest to continue from: the saved one on --resume (same fingerprint), else a new one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume and self.manifest_path.is_file():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                raise BadInput(f"{self.manifest_path} is corrupt; remove {self.folder} and start again without --resume") from None
            if manifest.get("version") != MANIFEST_VERSION or manifest.get("fingerprint") != fp:
                raise UsageError(f"the work folder {self.folder} holds a run with other settings, model or calibration data; "
                                 "rerun with the same flags, or drop --resume to start over")
            return manifest
        self.clear()
        return {"version": MANIFEST_VERSION, "fingerprint": fp, "num_layers": num_layers, "next_block": first_block,
                "first_block": first_block, "state_file": None, "blocks": {}}

    def save_state(self, name: str, streams: dict[str, Tensor]) -> None:
        with atomic_file(self.folder / name) as tmp:
            save_file({k: v.contiguous() for k, v in streams.items()}, str(tmp))

    def load_state(self, name: str) -> dict[str, Tensor]:
        with safe_open(str(self.folder / name), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def record(self, manifest: dict, index: int, entry: dict, streams: dict[str, Tensor] | None) -> None:
        """Block ``index`` is finished: its state (inputs of the next block), then the manifest."""
        old = manifest["state_file"]
        manifest["state_file"] = None
        if streams is not None:
            manifest["state_file"] = f"{self.tag}state_{index + 1:05d}.safetensors"
            self.save_state(manifest["state_file"], streams)
        manifest["blocks"][str(index)] = entry
        manifest["next_block"] = index + 1
        write_text(self.manifest_path, json.dumps(manifest, indent=1))
        if old and old != manifest["state_file"]:
            (self.folder / old).unlink(missing_ok=True)

    def block_file(self, index: int) -> str:
        return f"{self.tag}block_{index:05d}.safetensors"


# --------------------------------------------------------------------------------------
# Block files: compressed codes + factors + the block's other parameters
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
    return {"bits": qm.bits, "group_size": qm.group_size, "shape": list(qm.q.shape),
            "packed": qm.bits <= 4 and qm.q.shape[-1] % 2 == 0}


def _qm_load(f, prefix: str, meta: dict) -> QuantizedMatrix:
    q = f.get_tensor(f"{prefix}.q")
    if meta["packed"]:
        q = unpack_int4(q)
    scale = f.get_tensor(f"{prefix}.scale") if meta["bits"] != 16 else None
    return QuantizedMatrix(q, scale, meta["bits"], meta["group_size"])


def _module_tensors(prefix: str, mod: EoraLinear) -> tuple[dict[str, Tensor], dict]:
    """(tensors under ``prefix``, metadata) of one EoraLinear: codes, scales, bias (float16, as the module holds it)."""
    tensors = _qm_tensors(f"{prefix}.w", mod.weight_q)
    meta = {"weight": _qm_meta(mod.weight_q), "rank": mod.rank, "sparse24": mod.sparse24, "has_bias": mod.bias is not None}
    if mod.rank:
        meta["a"], meta["b"] = _qm_meta(mod.a_q), _qm_meta(mod.b_q)
        tensors.update(_qm_tensors(f"{prefix}.a", mod.a_q))
        tensors.update(_qm_tensors(f"{prefix}.b", mod.b_q))
    if mod.bias is not None:
        tensors[f"{prefix}.bias"] = mod.bias.detach().to("cpu").contiguous()
    return tensors, meta


def write_block_file(path: Path, index: int, host: nn.Module, modules: dict[str, EoraLinear],
                     linears: dict[str, nn.Module]) -> tuple[dict, list]:
    """Write one finished block; return (per-Linear storage metadata, base-checkpoint tensor list).

    The non-target parameters are taken from the block *after* compression: AWQ folds its
    scales into the RMSNorm weights (and non-target rows), and the base checkpoint must
    carry those.
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
        if owner in modules:
            continue  # an EoraLinear swapped in: its tensors are written below
        tensors[f"param.{key}"] = value.detach().to("cpu", torch.float16).contiguous()
        base.append([key, list(value.shape)])
    for name, mod in modules.items():
        t, entry = _module_tensors(name, mod)
        tensors.update(t)
        meta[name] = {**entry, "out_features": mod.out_features, "in_features": mod.in_features}
        if mod.bias is not None:
            base.append([f"{name}.bias", list(mod.bias.shape)])
    # Base order = the layer's state_dict order, biases included where they belong.
    order = {k: i for i, k in enumerate(state)}
    base.sort(key=lambda kv: order.get(kv[0], len(order)))
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "eora-stream", "block": str(index)})
    return meta, base


def _load_module(f, prefix: str, meta: dict) -> EoraLinear:
    """The EoraLinear :func:`_module_tensors` wrote under ``prefix`` (an open safetensors file)."""
    w = _qm_load(f, f"{prefix}.w", meta["weight"])
    a = _qm_load(f, f"{prefix}.a", meta["a"]) if meta["rank"] else None
    b = _qm_load(f, f"{prefix}.b", meta["b"]) if meta["rank"] else None
    bias = f.get_tensor(f"{prefix}.bias") if meta["has_bias"] else None
    return EoraLinear(w, a, b, bias=bias, sparse24=meta["sparse24"])


def load_block_modules(path: Path, layers: dict[str, dict]) -> Iterator[tuple[str, EoraLinear]]:
    """(name, EoraLinear) for each compensated Linear of one block file, one at a time."""
    with safe_open(str(path), framework="pt") as f:
        for name, entry in layers.items():
            yield name, _load_module(f, name, entry)


def write_sets_file(path: Path, index: int, host: nn.Module, sets: dict[str, dict[str, EoraLinear]],
                    linears: dict[str, nn.Module]) -> dict:
    """Every module set of one block (tag -> name -> EoraLinear) and the block's non-target
    parameters after compression, exactly (AWQ folds scales into them): what pushing the
    held-out paths through the block later needs. Returns the sets' metadata."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}
    for tag, mods in sets.items():
        meta[tag] = {}
        for name, mod in mods.items():
            t, m = _module_tensors(f"{tag}|{name}", mod)
            tensors.update(t)
            meta[tag][name] = m
    for key, value in host.state_dict().items():
        if key.rsplit(".", 1)[0] not in linears:
            tensors[f"param|{key}"] = value.detach().to("cpu").contiguous()
    # Sets share tensors (every method keeps the compressor's weight codes): one copy each.
    tensors = {k: v.clone() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "eora-sets", "block": str(index)})
    return meta


def load_sets_file(path: Path, meta: dict) -> tuple[dict[str, dict[str, EoraLinear]], dict[str, Tensor]]:
    """(module sets, non-target parameters) written by :func:`write_sets_file`."""
    sets: dict[str, dict[str, EoraLinear]] = {}
    with safe_open(str(path), framework="pt") as f:
        for tag, layers in meta.items():
            sets[tag] = {name: _load_module(f, f"{tag}|{name}", e) for name, e in layers.items()}
        params = {k.removeprefix("param|"): f.get_tensor(k) for k in f.keys() if k.startswith("param|")}
    return sets, params
