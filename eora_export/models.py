"""Resolve ``--model`` (``demo``, a local Hugging Face folder, or an alias) and load it offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import BadInput, MissingInput, UsageError

DEMO_DIR = Path(__file__).parent / "demo_model"

# Aliases resolve to Hugging Face repo ids, looked up in the local HF cache only.
ALIASES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Decoder Linears we compress and compensate, by their name inside a decoder layer.
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_cache_dirs() -> list[Path]:
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _snapshot_in_cache(cache: Path, repo_id: str) -> Path | None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip() / "config.json").is_file():
        return snaps / ref.read_text().strip()
    candidates = sorted((p for p in snaps.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve_model(spec: str) -> Path:
    """Folder holding ``config.json`` for ``spec``; a one-line MissingInput otherwise."""
    if spec == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise MissingInput(f"the demo model is missing from {DEMO_DIR}; reinstall eora-export or run tools/train_demo.py")
        return DEMO_DIR
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BadInput(f"{path} has no config.json; point --model at a Hugging Face model folder")
        return path
    repo_id = ALIASES.get(spec.lower(), spec if spec.count("/") == 1 else None)
    if repo_id is None:
        raise MissingInput(
            f"model '{spec}' not found: it is no folder and no known alias ({', '.join(ALIASES)}); "
            "pass --model demo, a local folder, or an alias"
        )
    caches = hf_cache_dirs()
    for cache in caches:
        snap = _snapshot_in_cache(cache, repo_id)
        if snap is not None:
            return snap
    looked = ", ".join(str(c) for c in caches)
    raise MissingInput(
        f"model '{spec}' ({repo_id}) is not in the local Hugging Face cache (looked in {looked}); "
        f"on a machine with access run `huggingface-cli download {repo_id}` and copy the cache here, "
        "or pass --model /path/to/folder"
    )


def read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path / 'config.json'} is not readable JSON ({e}); re-download the model") from None
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise BadInput(
            f"unsupported architecture {archs[0]} in {path}; eora-export supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return cfg


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local folder, offline; weights as stored, computed in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_config(path)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise MissingInput(f"no weight files (*.safetensors) in {path}; download the full model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def is_target(name: str) -> bool:
    """Whether a qualified module name is a decoder projection eora-export compresses."""
    return name.rsplit(".", 1)[-1] in TARGET_SUFFIXES and ".layers." in f".{name}"


# The residual stream a decoder projection's output is added to is the input of the norm that
# opens its sublayer (Llama, Mistral, Qwen2: pre-norm blocks): o_proj -> input_layernorm,
# down_proj -> post_attention_layernorm. Error feedback with the residual reads it there.
RESIDUAL_NORMS = {"self_attn.o_proj": "input_layernorm", "mlp.down_proj": "post_attention_layernorm"}


def residual_source(name: str, model: nn.Module) -> str | None:
    """The module of ``model`` whose input is the residual stream ``name``'s output is added to
    (:data:`RESIDUAL_NORMS`), or None for a Linear whose output stays inside its sublayer."""
    for suffix, norm in RESIDUAL_NORMS.items():
        if name == suffix or name.endswith("." + suffix):
            source = name[: len(name) - len(suffix)] + norm
            try:
                model.get_submodule(source)
            except AttributeError:
                return None
            return source
    return None


def selected(name: str, only: list[str] | None, skip: list[str] | None) -> bool:
    """--only / --skip on a qualified name: fnmatch patterns (e.g. ``*.mlp.*``)."""
    from fnmatch import fnmatch

    if only and not any(fnmatch(name, p) for p in only):
        return False
    return not (skip and any(fnmatch(name, p) for p in skip))


def target_linears(model: nn.Module, only: list[str] | None = None, skip: list[str] | None = None) -> dict[str, nn.Linear]:
    """The decoder Linears to compress, by qualified name, in model order.

    only/skip: fnmatch patterns on the qualified name (e.g. ``*.mlp.*``).
    """
    found = {}
    for name, mod in model.named_modules():
        if not is_target(name) or not selected(name, only, skip):
            continue
        if not isinstance(mod, nn.Linear):
            raise BadInput(f"{name} is a {type(mod).__name__}, not a Linear; eora-export handles plain Linear layers only")
        found[name] = mod
    if not found:
        raise UsageError("no Linear layers selected for compression; check --only/--skip patterns")
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the submodule at dotted ``name``; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
