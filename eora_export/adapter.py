"""Write the compensation as a PEFT LoRA adapter and the compressed base as an HF checkpoint.

Layout (docs/design.md §6), read by peft, TensorRT-LLM, vLLM and GPTQModel:
  adapter/adapter_config.json        r, lora_alpha = r (scaling 1), target_modules
  adapter/adapter_model.safetensors  base_model.model.<path>.lora_A.weight [r, in]
                                     base_model.model.<path>.lora_B.weight [out, r]
  base/                              config.json, tokenizer, model.safetensors (W_c as fp16,
                                     exactly the quantized grid), quantization.safetensors
                                     (packed INT4 codes + fp16 scales) and quantization.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .eora_linear import EoraLinear
from .hf_compat import add_legacy_rope_keys, save_tokenizer
from .quant import QuantizedMatrix, pack_int4, unpack_int4


def peft_state_dict(modules: dict[str, EoraLinear]) -> dict[str, torch.Tensor]:
    state = {}
    for name, mod in modules.items():
        if not mod.rank:
            continue
        state[f"base_model.model.{name}.lora_A.weight"] = mod.a.to(torch.float16).contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = mod.b.to(torch.float16).contiguous()
    return state


def adapter_config(modules: dict[str, EoraLinear], base_model: str, meta: dict) -> dict:
    ranked = {n: m.rank for n, m in modules.items() if m.rank}
    if not ranked:
        raise ValueError("no compensated layer has a positive rank; nothing to write as an adapter")
    top = max(ranked.values())
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in ranked})
    # Short names serve TensorRT-LLM; full names only when a subset of layers is compensated.
    covered = {n for n in modules if n.rsplit(".", 1)[-1] in suffixes}
    targets = suffixes if covered == set(ranked) else sorted(ranked)
    pattern = {n: r for n, r in ranked.items() if r != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_adapter_json(out_dir: Path, modules: dict, base_model: str, meta: dict) -> None:
    """adapter_config.json (PEFT's) and eora_adapter.json (our settings) of an adapter folder;
    ``modules``: name -> anything with ``.rank``."""
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config(modules, base_model, meta), indent=2))
    # Our settings live beside the PEFT config: peft warns about unknown keys inside it.
    (out_dir / "eora_adapter.json").write_text(json.dumps(meta, indent=2))


def save_peft_adapter(modules: dict[str, EoraLinear], out_dir: Path, base_model: str, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_adapter_json(out_dir, modules, base_model, meta)
    save_file(peft_state_dict(modules), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def graph_layout(prefix: str, qm: QuantizedMatrix) -> dict[str, torch.Tensor]:
    """One matrix in the graph layout: ``[rows, cols]`` stored transposed as ``[K, N] = [cols, rows]``.

    bits 16: ``<prefix>`` float16 ``[K, N]``; else ``<prefix>_packed`` (uint8 ``[K, N/2]``, two
    codes per byte along N, when ≤ 4 bits and N is even; int8 ``[K, N]`` codes otherwise) and
    ``<prefix>_scale`` float16 ``[K/group, N]``. The dtype says which: uint8 is packed.
    """
    codes = qm.q.T.contiguous()
    if qm.bits == 16:
        return {prefix: codes.to(torch.float16)}
    packed = qm.bits <= 4 and codes.shape[1] % 2 == 0
    return {f"{prefix}_packed": pack_int4(codes) if packed else codes, f"{prefix}_scale": qm.scale.T.contiguous()}


def graph_layout_specs(prefix: str, bits: int, group_size: int, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) of what :func:`graph_layout` writes, without the tensors (for streamed writers)."""
    if bits == 16:
        return [(prefix, torch.float16, (cols, rows))]
    packed = bits <= 4 and rows % 2 == 0
    codes = (f"{prefix}_packed", torch.uint8, (cols, rows // 2)) if packed else (f"{prefix}_packed", torch.int8, (cols, rows))
    return [codes, (f"{prefix}_scale", torch.float16, (cols // group_size, rows))]


def read_graph_layout(get, prefix: str, bits: int, group_size: int) -> QuantizedMatrix:
    """Inverse of :func:`graph_layout`; ``get(key)`` returns a stored tensor."""
    if bits == 16:
        return QuantizedMatrix(get(prefix).T.contiguous(), None, 16, 0)
    codes = get(f"{prefix}_packed")
    if codes.dtype == torch.uint8:
        codes = unpack_int4(codes)
    return QuantizedMatrix(codes.T.contiguous(), get(f"{prefix}_scale").T.contiguous(), bits, group_size)


def read_quantized_layer(
    get, keys: set[str], name: str, entry: dict
) -> tuple[QuantizedMatrix, tuple[QuantizedMatrix, QuantizedMatrix] | None]:
    """One layer of quantization.safetensors: W_c ``[out, in]`` and its factors (B ``[out, r]``,
    A ``[r, in]``), or None for the factors when the layer has rank 0 or the file predates
    factor codes. ``entry``: the layer's quantization.json record; ``keys``: the file's keys."""
    w = read_graph_layout(get, f"{name}.weight", entry["bits"], entry["group_size"])
    if not entry.get("rank") or not keys & {f"{name}.lora_a", f"{name}.lora_a_packed"}:
        return w, None
    ga, gb = entry["lowrank_group_size"]
    a = read_graph_layout(get, f"{name}.lora_a", entry["lowrank_bits"], ga)
    b = read_graph_layout(get, f"{name}.lora_b", entry["lowrank_bits"], gb)
    return w, (b, a)


def layer_entry(mod: EoraLinear) -> dict:
    """What quantization.json records of one compensated Linear."""
    wq = mod.weight_q
    entry = {
        "in_features": mod.in_features, "out_features": mod.out_features, "bits": wq.bits,
        "group_size": wq.group_size, "sparse24": mod.sparse24, "rank": mod.rank,
        "lowrank_bits": mod.lowrank_bits, "has_bias": mod.bias is not None,
    }
    if mod.rank:
        entry["lowrank_group_size"] = [mod.a_q.group_size, mod.b_q.group_size]
    return entry


def quantized_state_dict(modules: dict[str, EoraLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    """Packed codes in the graph layout ([K, N], INT4 two per byte along N) and fp16 scales.

    Per Linear: ``<name>.weight_*`` (W_c) and, when compensated, ``<name>.lora_a_*`` /
    ``<name>.lora_b_*`` (A as ``[in, r]``, B as ``[r, out]``: the graph's MatMul operands) with
    their own codes and scales, so every EoraLinear can be rebuilt exactly from the folder
    (the adapter holds only the dequantized fp16 values).
    """
    tensors, layers = {}, {}
    for name, mod in modules.items():
        layers[name] = layer_entry(mod)
        tensors.update(graph_layout(f"{name}.weight", mod.weight_q))
        if mod.rank:
            tensors.update(graph_layout(f"{name}.lora_a", mod.a_q))
            tensors.update(graph_layout(f"{name}.lora_b", mod.b_q))
    return tensors, layers


def quantized_specs(name: str, entry: dict) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) that :func:`quantized_state_dict` writes for one layer entry."""
    out_f, in_f, r = entry["out_features"], entry["in_features"], entry["rank"]
    specs = graph_layout_specs(f"{name}.weight", entry["bits"], entry["group_size"], out_f, in_f)
    if r:
        ga, gb = entry["lowrank_group_size"]
        specs += graph_layout_specs(f"{name}.lora_a", entry["lowrank_bits"], ga, r, in_f)
        specs += graph_layout_specs(f"{name}.lora_b", entry["lowrank_bits"], gb, out_f, r)
    return specs


def save_compressed_base(model: nn.Module, tokenizer, modules: dict[str, EoraLinear], out_dir: Path, meta: dict) -> Path:
    """HF checkpoint whose target weights are W_c (fp16), plus the packed quantized form."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    for name, mod in modules.items():
        state[f"{name}.weight"] = mod.weight.to(torch.float16).contiguous()
    model.config.dtype = "float16"
    model.config.save_pretrained(out_dir)
    # Files that older transformers (vLLM, TensorRT-LLM) read the same as the installed one.
    add_legacy_rope_keys(out_dir / "config.json", model.config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tensors, layers = quantized_state_dict(modules)
    save_file(tensors, str(out_dir / "quantization.safetensors"), metadata={"format": "eora"})
    (out_dir / "quantization.json").write_text(json.dumps({**meta, "layers": layers}, indent=2))
    return out_dir
