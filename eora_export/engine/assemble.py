"""The output folder, assembled from the walk's block files: ``base/`` (the compressed
checkpoint in float16, sharded like ``save_pretrained``, with ``quantization.safetensors``
holding the exact codes), ``adapter/`` (PEFT LoRA), ``report.json`` and the plots.

Tensors are written one at a time (safetensors_io), so a 7B base never sits in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from .. import __version__
from ..adapter import peft_state_dict, quantized_specs, quantized_state_dict, write_adapter_json
from ..atomic import atomic_dir
from ..hf_compat import add_legacy_rope_keys, save_tokenizer
from ..report import plot_layer_errors, plot_ppl_vs_rank, write_json
from ..safetensors_io import SafetensorsWriter, ShardedWriter
from .state import load_block_modules

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # shard size of the written base checkpoint (HF's customary 5 GB)


def write_output_folder(src, blocks: list[dict], work: Path, cfg, out: Path, tokenizer, max_shard_bytes: int, report: dict,
                        sweep_plot: tuple | None = None) -> None:
    """``out/`` (base/, adapter/, report.json, plots), all or nothing, reading one block file at a time.

    blocks: the manifest's entries in block order; sweep_plot: (sweep, reference, windows) for
    ppl_vs_rank.png, or None.
    """
    meta = {
        "method": cfg.method,
        "rank": cfg.rank,
        "lowrank_bits": cfg.lowrank_bits,
        "lowrank_quant": cfg.lowrank_quant,
        "quant": cfg.quant,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sparsity": cfg.sparsity,
        "eora_export_version": __version__,
    }
    layers = {n: e for b in blocks for n, e in b["layers"].items()}

    f16 = torch.float16
    base_specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", f16, tuple(src.shape("model.embed_tokens.weight")))
    ]
    for b in blocks:
        base_specs += [(k, f16, tuple(s)) for k, s in b["base"]]
    base_specs.append(("model.norm.weight", f16, tuple(src.shape("model.norm.weight"))))
    if not src.tied:
        base_specs.append(("lm_head.weight", f16, tuple(src.shape("lm_head.weight"))))

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
        config = type(src.config).from_pretrained(src.path, local_files_only=True)
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
            base_w.write(name, src.read([name], f16)[name])

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
        if not src.tied:
            copy_from_source("lm_head.weight")
        base_w.close()
        quant_w.close()
        (base_dir / "quantization.json").write_text(json.dumps({**meta, "layers": layer_info}, indent=2))
        if adapter_w is not None:
            adapter_w.close()
            ranks = {n: _Ranked(e["rank"]) for n, e in layers.items()}
            write_adapter_json(tmp / "adapter", ranks, str(src.path), meta)
        write_json(report, tmp / "report.json")
        if report["layers"]:
            plot_layer_errors(report["layers"], tmp / "per_layer_error.png")
        if sweep_plot is not None:
            plot_ppl_vs_rank(*sweep_plot[:2], tmp / "ppl_vs_rank.png", sweep_plot[2])


@dataclass(frozen=True)
class _Ranked:
    """Stand-in for an EoraLinear where only ``.rank`` is read (adapter_config)."""

    rank: int
