"""Read an eora-export output back (adapter folder + compressed base folder) and write a
fine-tuned one in the same layout.

Every problem with the folders is found here, before any training, and reported as one
line (errors.py): a missing folder or file is MissingInput, one that exists but does not
fit (corrupt, another model's adapter, another compression) is BadInput.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..adapter import read_quantized_layer, save_compressed_base, save_peft_adapter
from ..atomic import atomic_dir
from ..eora_linear import EoraLinear
from ..errors import BadInput, MissingInput
from ..quant import QuantizedMatrix
from ..report import write_json

PREFIX = "base_model.model."
# Settings an adapter shares with the base it was computed for (eora_adapter.json vs quantization.json).
COMPRESSION_KEYS = ("quant", "bits", "group_size", "sparsity")


@dataclass
class AdapterFolder:
    """A PEFT LoRA adapter folder. factors: name -> (B ``[out, r]``, A ``[r, in]``) float16 as stored."""

    path: Path
    config: dict
    meta: dict  # eora_adapter.json; {} for an adapter from elsewhere
    factors: dict[str, tuple[Tensor, Tensor]]


@dataclass
class BaseFolder:
    """The compressed base: HF checkpoint of W_c plus quantization.json / .safetensors.

    weights: name -> W_c codes ``[out, in]``; factor_codes: name -> (B, A) codes where the
    base holds the exported factors' own codes (recent exports do).
    """

    path: Path
    meta: dict
    layers: dict[str, dict]
    weights: dict[str, QuantizedMatrix]
    factor_codes: dict[str, tuple[QuantizedMatrix, QuantizedMatrix]]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is not readable JSON ({e}); re-export it with eora-export") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a JSON object; re-export it with eora-export")
    return data


def _tensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{path} is not a readable safetensors file ({e}); re-export it") from None


def load_adapter(path: Path) -> AdapterFolder:
    """The adapter at ``path`` (an ``adapter/`` folder, or an output folder holding one)."""
    if not path.exists():
        raise MissingInput(f"adapter folder {path} not found; give the adapter/ folder of an eora-export output (--out DIR writes DIR/adapter)")
    if not path.is_dir():
        raise BadInput(f"--adapter {path} is a file; give the adapter/ folder that holds adapter_model.safetensors")
    if not (path / "adapter_model.safetensors").is_file() and (path / "adapter" / "adapter_model.safetensors").is_file():
        path = path / "adapter"  # the output folder itself was given
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise MissingInput(f"{path} has no {name}; give the adapter/ folder of an eora-export output")
    config = _read_json(path / "adapter_config.json")
    meta = _read_json(path / "eora_adapter.json") if (path / "eora_adapter.json").is_file() else {}
    if config.get("use_rslora") or (config.get("r") and config.get("lora_alpha") not in (None, config.get("r"))) \
            or any((config.get("alpha_pattern") or {}).get(n) != r for n, r in (config.get("rank_pattern") or {}).items()):
        raise BadInput(f"{path / 'adapter_config.json'}: LoRA scaling is not 1 (lora_alpha ≠ r); "
                       "eora-export adapters use lora_alpha = r")
    state = _tensors(path / "adapter_model.safetensors")
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        for which in ("lora_A", "lora_B"):
            suffix = f".{which}.weight"
            if key.startswith(PREFIX) and key.endswith(suffix):
                factors.setdefault(key[len(PREFIX): -len(suffix)], {})[which] = t
    if not factors:
        raise BadInput(f"{path / 'adapter_model.safetensors'} holds no {PREFIX}<layer>.lora_A/B.weight tensors; is it a LoRA adapter?")
    out = {}
    for name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise BadInput(f"{path}: layer {name} has only {next(iter(pair))}; the adapter is incomplete, re-export it")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise BadInput(f"{path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not pair as [r, in] / [out, r]")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise BadInput(f"{path}: NaN/Inf in the factors of {name}; re-export the adapter")
        out[name] = (b, a)
    return AdapterFolder(path, config, meta, out)


def load_base(path: Path) -> BaseFolder:
    """quantization.json + quantization.safetensors of the base at ``path`` (the HF model is loaded by the caller)."""
    if not path.is_dir():
        raise MissingInput(f"compressed base folder {path} not found; it is the base/ beside adapter/ in an eora-export output (or pass --base)")
    for name in ("config.json", "quantization.json", "quantization.safetensors"):
        if not (path / name).is_file():
            raise MissingInput(f"{path} has no {name}; --base must be the base/ folder of an eora-export output")
    q = _read_json(path / "quantization.json")
    layers = q.pop("layers", None)
    if not isinstance(layers, dict) or not layers:
        raise BadInput(f"{path / 'quantization.json'} lists no layers; re-export the base")
    tensors = _tensors(path / "quantization.safetensors")
    keys = set(tensors)
    weights, codes = {}, {}
    for name, entry in layers.items():
        try:
            weights[name], factors = read_quantized_layer(tensors.__getitem__, keys, name, entry)
            if factors is not None:
                codes[name] = factors
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise BadInput(f"{path / 'quantization.safetensors'}: layer {name} cannot be read ({e}); re-export the base") from None
        if weights[name].shape != (entry.get("out_features"), entry.get("in_features")):
            raise BadInput(f"{path}: layer {name} is stored as {weights[name].shape}, quantization.json says "
                           f"[{entry.get('out_features')}, {entry.get('in_features')}]; re-export the base")
    return BaseFolder(path, q, layers, weights, codes)


def _factor(codes: QuantizedMatrix | None, stored: Tensor) -> QuantizedMatrix:
    """The base's codes of a factor when they give exactly the adapter's values, else the
    adapter's fp16 values themselves (lossless; re-quantized after training)."""
    if codes is not None and codes.shape == tuple(stored.shape) and torch.equal(codes.dequantize(), stored.to(torch.float16)):
        return codes
    return QuantizedMatrix(stored.to(torch.float16), None, 16, 0)


def start_modules(base: BaseFolder, adapter: AdapterFolder, biases: dict[str, Tensor | None]) -> dict[str, EoraLinear]:
    """EoraLinear per layer of the base: W_c from the base, factors from the adapter (rank 0
    where the adapter has none). Raises BadInput when the two do not belong together."""
    missing = sorted(set(adapter.factors) - set(base.layers))
    if missing:
        raise BadInput(f"the adapter has {len(missing)} layer(s) the base does not (first: {missing[0]}); "
                       f"{adapter.path} does not belong to {base.path} (pass the matching --base)")
    for key in COMPRESSION_KEYS:
        if key in adapter.meta and key in base.meta and adapter.meta[key] != base.meta[key]:
            raise BadInput(f"the adapter was computed for {key}={adapter.meta[key]} but the base has {key}={base.meta[key]}; "
                           f"{adapter.path} does not belong to {base.path} (pass the matching --base)")
    modules = {}
    for name, entry in base.layers.items():
        w = base.weights[name]
        if name not in adapter.factors:
            modules[name] = EoraLinear(w, bias=biases.get(name), sparse24=bool(entry.get("sparse24")))
            continue
        b, a = adapter.factors[name]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise BadInput(f"adapter factors of {name} ({tuple(b.shape)} @ {tuple(a.shape)}) do not fit the base's "
                           f"[{w.shape[0]}, {w.shape[1]}] weight; {adapter.path} does not belong to {base.path}")
        b_codes, a_codes = base.factor_codes.get(name, (None, None))
        modules[name] = EoraLinear(w, _factor(a_codes, a), _factor(b_codes, b), bias=biases.get(name), sparse24=bool(entry.get("sparse24")))
    return modules


def check_reference(base: BaseFolder, reference: dict[str, Tensor], model_spec: str) -> None:
    """The FP16 model (``--model``) must have the base's layers with the same shapes."""
    for name, entry in base.layers.items():
        w = reference.get(name)
        if w is None or tuple(w.shape) != (entry["out_features"], entry["in_features"]):
            got = "no such layer" if w is None else f"shape {tuple(w.shape)}"
            raise BadInput(f"--model {model_spec} does not match the base {base.path}: {name} has {got}; "
                           "pass the FP16 model the base was compressed from")


def plot_loss(curves: dict[str, list[float]], path: Path) -> None:
    """Training loss per step, one line per initialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, losses in curves.items():
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=f"{label} init", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (next-token NLL)")
    ax.set_title("Fine-tuning the low-rank factors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_finetuned(
    out: Path,
    model: nn.Module,
    tokenizer,
    modules: dict[str, EoraLinear],
    meta: dict,
    base_model: str,
    report: dict,
    curves: dict[str, list[float]],
) -> None:
    """``out/`` all or nothing: base/ (W_c unchanged, factor codes updated), adapter/, report.json, loss_curve.png.

    model: the compressed base with its plain Linears (W_c), as loaded.
    """
    with atomic_dir(out) as tmp:
        save_compressed_base(model, tokenizer, modules, tmp / "base", meta)
        if any(m.rank for m in modules.values()):
            save_peft_adapter(modules, tmp / "adapter", base_model, meta)
        write_json(report, tmp / "report.json")
        if any(curves.values()):
            plot_loss(curves, tmp / "loss_curve.png")
