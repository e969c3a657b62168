"""Write the compensation as a PEFT LoRA adapter and the compressed base as an HF checkpoint.

Layout (DESIGN §6), read by peft, TensorRT-LLM, vLLM and GPTQModel:
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

from .modules import EoraLinear
from .quant import pack_int4


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


def save_peft_adapter(modules: dict[str, EoraLinear], out_dir: Path, base_model: str, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config(modules, base_model, meta), indent=2))
    # Our settings live beside the PEFT config: peft warns about unknown keys inside it.
    (out_dir / "eora_adapter.json").write_text(json.dumps(meta, indent=2))
    save_file(peft_state_dict(modules), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def quantized_state_dict(modules: dict[str, EoraLinear]) -> tuple[dict[str, torch.Tensor], dict]:
    """Packed codes in the graph layout ([K, N], INT4 two per byte along N) and fp16 scales."""
    tensors, layers = {}, {}
    for name, mod in modules.items():
        wq = mod.weight_q
        layers[name] = {
            "in_features": mod.in_features, "out_features": mod.out_features, "bits": wq.bits,
            "group_size": wq.group_size, "sparse24": mod.sparse24, "rank": mod.rank,
            "lowrank_bits": mod.lowrank_bits,
        }
        if wq.bits == 16:
            tensors[f"{name}.weight"] = wq.q.T.contiguous()
            continue
        codes = wq.q.T.contiguous()
        tensors[f"{name}.weight_packed"] = pack_int4(codes) if wq.bits <= 4 else codes
        tensors[f"{name}.weight_scale"] = wq.scale.T.contiguous()
    return tensors, layers


def save_compressed_base(model: nn.Module, tokenizer, modules: dict[str, EoraLinear], out_dir: Path, meta: dict) -> Path:
    """HF checkpoint whose target weights are W_c (fp16), plus the packed quantized form."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    for name, mod in modules.items():
        state[f"{name}.weight"] = mod.weight.to(torch.float16).contiguous()
    model.config.dtype = "float16"
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tensors, layers = quantized_state_dict(modules)
    save_file(tensors, str(out_dir / "quantization.safetensors"), metadata={"format": "eora"})
    (out_dir / "quantization.json").write_text(json.dumps({**meta, "layers": layers}, indent=2))
    return out_dir
