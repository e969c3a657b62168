"""TensorRT-LLM output: the quantized base as NVIDIA ModelOpt checkpoints plus the EoRA factors as a LoRA adapter.

``eora-export --out DIR --format trtllm`` writes, all or nothing::

    DIR/checkpoint/         unified Hugging Face checkpoint from ModelOpt's ``export_hf_checkpoint``
                            (``quant_algo: W4A16_AWQ``): what the TensorRT-LLM LLM API / trtllm-serve load
    DIR/trtllm_checkpoint/  the same weights in the TensorRT-LLM checkpoint format (config.json +
                            rank0.safetensors, ModelOpt's ``export_tensorrt_llm_checkpoint``), for trtllm-build
    DIR/lora/               the EoRA factors as a PEFT LoRA adapter (adapter.save_peft_adapter)
    DIR/README.md           the recipe

ModelOpt is the format authority: we quantize a float16 copy of the model with its INT4 block
(weight-only) config, then pin each weight quantizer's per-block amax to ``7 * our fp16 scale``
so its exported scale (amax / 7, computed in float32) *is* our scale, and load W_c as the weight
so its codes (round(W_c / scale)) *are* our codes. Both checkpoints are checked after export: their
packed weights decode back to W_c bit for bit, or the export fails with one line (and fused layers
with differing AWQ scales, which ModelOpt would re-quantize, are refused before it runs).

TensorRT-LLM reads these folders with its own, older transformers: the tokenizer files and the
RoPE settings are written so that 4.45 … 5.x read them alike (hf_compat), and
``trtllm_checkpoint/config.json`` gets ``rotary_base`` / ``rotary_scaling`` from the source config.

TensorRT-LLM's W4A16 (AWQ) linear loader reads a ``pre_quant_scale`` for layers whose input
is not shared (o_proj, down_proj); we give every quantized layer an all-ones pre-quant scale,
which ModelOpt folds into the layer norms of q/k/v and gate/up exactly as it does for AWQ
(a no-op: x·1), so the checkpoint has the canonical AWQ layout with identity smoothing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shlex
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir, default_mode
from ..errors import BadInput, MissingDependency, UsageError
from ..hf_compat import add_legacy_rope_keys, rope_settings, save_tokenizer

log = logging.getLogger("eora_export")

# Group sizes of TensorRT-LLM's INT4 weight-only (fpA_intB) GEMM kernels.
TRTLLM_GROUP_SIZES = (64, 128)
# Hugging Face module name -> TensorRT-LLM LoRA target (tensorrt_llm.lora_manager defaults).
HF_TO_TRTLLM_LORA = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h",
}
# Linears TensorRT-LLM fuses into one GEMM: they must be quantized alike (all or none).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# TensorRT-LLM checkpoint GEMM of a Llama layer -> the Hugging Face Linears it concatenates (rows, in
# this order), as ModelOpt's export_tensorrt_llm_checkpoint writes them.
TRTLLM_GEMMS = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
                "mlp.proj": ("mlp.down_proj",)}


def check_trtllm_config(cfg: Any) -> None:
    """Refuse settings TensorRT-LLM cannot run, before any work is done.

    The CLI can call this right after parsing ``--format trtllm`` so a long compression run
    does not end in this error; :func:`write_trtllm` calls it again.
    """
    if cfg.quant != "none" and cfg.bits == 3:
        raise UsageError("--format trtllm needs --bits 4: TensorRT-LLM has no INT3 weight kernels "
                         "(use --out X.onnx / X.plan for 3-bit, which run in the INT4 container)")
    if cfg.quant != "none" and cfg.group_size not in TRTLLM_GROUP_SIZES:
        raise UsageError(f"--format trtllm needs --group-size 64 or 128 (TensorRT-LLM's INT4 kernels), "
                         f"got {cfg.group_size}")


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """ModelOpt prints progress to stdout and warns about untested transformers versions;
    keep the CLI's output to our own lines (the text goes to the debug log)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield buf
    if buf.getvalue().strip():
        log.debug("modelopt: %s", buf.getvalue().strip())


def _modelopt() -> tuple[Any, Any]:
    try:
        with _quiet():
            import modelopt.torch.export as mte
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise MissingDependency(f"NVIDIA ModelOpt is needed for --format trtllm ({e}); pip install 'nvidia-modelopt[hf]'") from None
    return mtq, mte


def _quantized_names(modules: dict[str, Any]) -> list[str]:
    return [n for n, m in modules.items() if m.weight_q.bits != 16]


def _check_fused_groups(model: torch.nn.Module, quantized: set[str]) -> None:
    """q/k/v and gate/up become one GEMM in TensorRT-LLM, with one quantization format."""
    for name, sub in model.named_modules():
        for group in FUSED_GROUPS:
            if not all(hasattr(sub, s) for s in group):
                continue
            if len({(f"{name}.{s}" if name else s) in quantized for s in group}) > 1:
                raise UsageError(f"{name}: TensorRT-LLM fuses {'/'.join(group)} into one GEMM, so they must be "
                                 "compressed alike; adjust --only/--skip to keep them together")


def _base_model(result: Any, modules: dict[str, Any]) -> torch.nn.Module:
    """A float16 copy of the original model whose compressed Linears hold W_c exactly."""
    from ..models import load_model

    model, _ = load_model(result.model_path, torch.float16)
    for name, mod in modules.items():
        target = model.get_submodule(name)
        target.weight.data = mod.weight.to(torch.float16).clone()
    return model


def _quantize(mtq: Any, model: torch.nn.Module, modules: dict[str, Any], group_size: int) -> torch.nn.Module:
    """Attach ModelOpt INT4 block quantizers and pin them to our codes and scales."""
    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: group_size, "type": "static"}
    # No forward loop: the weight amax is calibrated from the weights, then overwritten below.
    model = mtq.quantize(model, cfg, forward_loop=None)
    quantized = set(_quantized_names(modules))
    for name, sub in model.named_modules():
        wq = getattr(sub, "weight_quantizer", None)
        if wq is None or not wq.is_enabled or name in quantized:
            continue
        wq.disable()  # layers we left in FP16 (--skip) stay FP16 and go to exclude_modules
    tiny = torch.finfo(torch.float32).tiny
    for name in quantized:
        mod, sub = modules[name], model.get_submodule(name)
        scale = mod.weight_q.scale.float()
        # amax / 7 (ModelOpt's INT4 maxbound) must give back our fp16 scale exactly: s * 7 has
        # at most 14 significant bits, so both the product and the division are exact in float32.
        # An all-zero group (scale 0) gets the smallest positive amax; its codes are 0 either way.
        amax = torch.where(scale > 0, scale * 7.0, torch.full_like(scale, tiny))
        sub.weight_quantizer.amax = amax.reshape(-1, 1)
        # Identity AWQ smoothing: TensorRT-LLM reads pre_quant_scale for unfused layers.
        sub.input_quantizer.pre_quant_scale = torch.ones(mod.in_features, dtype=torch.float16)
    return model


def decode_unified_checkpoint(ckpt: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """float16 ``[out, in]`` weights of the INT4 layers of a ModelOpt unified checkpoint.

    ModelOpt's W4A16 layout: ``<name>.weight`` uint8 ``[out/2, in]`` holding output rows 2j (low
    nibble) and 2j+1 (high nibble) as signed 4-bit codes, ``<name>.weight_scale`` ``[out, in/g]``;
    value = fp16(code * scale) computed in float32, as eora-export's W_c.
    """
    from safetensors import safe_open

    qcfg = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    group = int(qcfg["group_size"])
    out: dict[str, torch.Tensor] = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            for key in keys:
                if not key.endswith(".weight_scale"):
                    continue
                name = key[: -len(".weight_scale")]
                if (names is not None and name not in names) or f"{name}.weight" not in keys:
                    continue
                packed, scale = f.get_tensor(f"{name}.weight"), f.get_tensor(key)
                out[name] = dequantize_packed_rows(packed, scale, group)
    return out


def dequantize_packed_rows(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float16 ``[out, in]`` from ModelOpt's packed INT4 ``[out/2, in]`` and scales ``[out, in/group]``."""
    p = packed.view(torch.uint8).to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    codes = torch.stack([lo, hi], dim=1).reshape(-1, p.shape[1])
    codes = torch.where(codes > 7, codes - 16, codes)
    return (codes.float() * scale.float().repeat_interleave(group, dim=1)).to(torch.float16)


def decode_trtllm_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """float16 ``[out, in]`` of the INT4 GEMMs of a TensorRT-LLM checkpoint, by its own names
    (``transformer.layers.0.attention.qkv``): the packing of :func:`decode_unified_checkpoint`,
    with the scales named ``weights_scaling_factor``."""
    from safetensors import safe_open

    group = int(json.loads((ckpt / "config.json").read_text())["quantization"]["group_size"])
    out: dict[str, torch.Tensor] = {}
    for path in sorted(ckpt.glob("rank*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith(".weights_scaling_factor"):
                    name = key[: -len(".weights_scaling_factor")]
                    out[name] = dequantize_packed_rows(f.get_tensor(f"{name}.weight"), f.get_tensor(key), group)
    return out


def trtllm_gemm_weights(modules: dict[str, Any]) -> dict[str, torch.Tensor]:
    """W_c of the quantized Linears under TensorRT-LLM's GEMM names, fused rows concatenated."""
    out: dict[str, torch.Tensor] = {}
    for name in _quantized_names(modules):
        prefix, sep, rest = name.partition(".layers.")
        index, _, local = rest.partition(".")
        for gemm, parts in TRTLLM_GEMMS.items():
            if sep and local == parts[0]:
                rows = [modules[f"{prefix}.layers.{index}.{p}"].weight.to(torch.float16) for p in parts]
                out[f"transformer.layers.{index}.{gemm}"] = torch.cat(rows)
    return out


def _check_codes(what: str, decoded: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """One line naming the first layer whose exported codes and scales do not give back W_c exactly."""
    for name, w in want.items():
        got = decoded.get(name)
        if got is None or not torch.equal(got, w):
            why = "is missing" if got is None else "does not decode to eora-export's W_c"
            raise BadInput(f"ModelOpt's {what} changed the INT4 codes ({name} {why}); this ModelOpt version "
                           "re-quantizes the weights (report it); use --out X.onnx / X.plan meanwhile")


def _check_fused_smoothing(model: torch.nn.Module) -> None:
    """Linears TensorRT-LLM fuses must share one AWQ pre-quant scale, or the export changes codes.

    ModelOpt's export (``preprocess_linear_fusion``, modelopt/torch/export/quant_utils.py) replaces
    differing pre-quant scales of q/k/v or gate/up by their mean and re-quantizes each weight
    (``_update_pre_quant_scale``: weight * old / new, then a fresh amax), so W_c would not survive.
    """
    for name, sub in model.named_modules():
        for group in FUSED_GROUPS:
            quantizers = [getattr(getattr(sub, s, None), "input_quantizer", None) for s in group]
            scales = [getattr(q, "pre_quant_scale", None) for q in quantizers]
            if any(s is None for s in scales):
                continue
            if not all(torch.equal(s, scales[0]) for s in scales[1:]):
                raise BadInput(f"{name}: the AWQ pre-quant scales of {'/'.join(group)} differ, so ModelOpt's export would "
                               "average them and re-quantize the weights (changing the INT4 codes); use --out X.onnx / X.plan")


def _export_unified(mtq: Any, mte: Any, result: Any, modules: dict[str, Any], group_size: int, dest: Path) -> None:
    model = _base_model(result, modules)
    names = _quantized_names(modules)
    with _quiet():
        if names:
            model = _quantize(mtq, model, modules, group_size)
            _check_fused_smoothing(model)
        try:
            mte.export_hf_checkpoint(model, dtype=torch.float16, export_dir=dest)
        except AssertionError as e:  # ModelOpt's shape checks (e.g. an odd output dimension)
            raise BadInput(f"ModelOpt cannot export this model for TensorRT-LLM: {e}") from None
    # TensorRT-LLM reads this folder with its own, older transformers (see hf_compat).
    add_legacy_rope_keys(dest / "config.json", model.config)
    if result.tokenizer is not None:
        save_tokenizer(result.tokenizer, dest)
    if names:
        want = {n: modules[n].weight.to(torch.float16) for n in names}
        _check_codes("export_hf_checkpoint", decode_unified_checkpoint(dest, names), want)


def _export_trtllm(mtq: Any, mte: Any, result: Any, modules: dict[str, Any], group_size: int, dest: Path) -> str | None:
    """TensorRT-LLM checkpoint for trtllm-build; returns why not when ModelOpt cannot convert the architecture."""
    from modelopt.torch.export.model_utils import get_model_type

    model = _base_model(result, modules)
    decoder = get_model_type(model)
    if decoder is None:
        return f"ModelOpt has no TensorRT-LLM decoder type for {type(model).__name__}"
    quantized = bool(_quantized_names(modules))
    with _quiet():
        if quantized:
            model = _quantize(mtq, model, modules, group_size)
            _check_fused_smoothing(model)
        try:
            mte.export_tensorrt_llm_checkpoint(model, decoder, dtype=torch.float16, export_dir=dest, inference_tensor_parallel=1)
        except Exception as e:  # legacy path only; the unified checkpoint stands on its own
            return f"ModelOpt's export_tensorrt_llm_checkpoint failed ({type(e).__name__}: {e})"
    write_rope(dest / "config.json", model.config)
    if quantized:
        _check_codes("export_tensorrt_llm_checkpoint", decode_trtllm_checkpoint(dest), trtllm_gemm_weights(modules))
    return None


def write_rope(config_json: Path, source_config: Any) -> None:
    """``rotary_base`` / ``rotary_scaling`` of a TensorRT-LLM checkpoint from the source model's config.

    ModelOpt takes them from ``model.config.__dict__`` (``rope_theta``, ``rope_scaling``:
    modelopt/torch/export/hf_config_map.py), where transformers 5 has only ``rope_parameters``, and
    TensorRT-LLM then defaults to θ = 10000 without scaling. ``rotary_scaling`` takes the Hugging
    Face ``rope_scaling`` form, as TensorRT-LLM's own ``LLaMAConfig.from_hugging_face`` passes it on;
    plain RoPE gets none (TensorRT-LLM's ``RotaryScalingType.from_string`` knows no "default").
    """
    theta, scaling = rope_settings(source_config)
    data = json.loads(config_json.read_text())
    data["rotary_base"] = theta
    data["rotary_scaling"] = scaling
    config_json.write_text(json.dumps(data, indent=4) + "\n")


@dataclass(frozen=True)
class _Factors:
    """The two things save_peft_adapter reads from a layer: rank and float16 factors."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int


def lora_factors(modules: dict[str, Any]) -> dict[str, Any]:
    """The layers' factors, zero-padded to one common rank when ranks differ.

    TensorRT-LLM scales each LoRA module by lora_alpha / (its own rank) and ignores peft's
    rank_pattern/alpha_pattern, so a layer whose rank was clamped below ``r`` would be scaled
    by r / r_i. Zero rows of A and zero columns of B change nothing numerically and make every
    module's scale exactly 1 in peft, TensorRT-LLM and vLLM alike.
    """
    ranked = {n: m for n, m in modules.items() if m.rank}
    if not ranked:
        return {}
    top = max(m.rank for m in ranked.values())
    if all(m.rank == top for m in ranked.values()):
        return ranked
    out: dict[str, Any] = {}
    for name, m in ranked.items():
        a = torch.zeros(top, m.in_features, dtype=torch.float16)
        b = torch.zeros(m.out_features, top, dtype=torch.float16)
        a[: m.rank] = m.a.to(torch.float16)
        b[:, : m.rank] = m.b.to(torch.float16)
        out[name] = _Factors(a, b, top)
    return out


def _readme(out: Path, modules: dict[str, Any], cfg: Any, group_size: int, rank: int, legacy_reason: str | None,
            max_seq_len: int) -> str:
    targets = {n.rsplit(".", 1)[-1] for n, m in modules.items() if m.rank}
    trt_targets = " ".join(v for k, v in HF_TO_TRTLLM_LORA.items() if k in targets)
    return trtllm_readme(out.resolve(), quant=cfg.quant, bits=cfg.bits, group_size=group_size, sparsity=cfg.sparsity,
                         lowrank_bits=cfg.lowrank_bits, rank=rank, trt_targets=trt_targets, legacy_reason=legacy_reason,
                         max_seq_len=max_seq_len)


def engine_lengths(max_position_embeddings: int) -> tuple[int, int]:
    """(--max_input_len, --max_seq_len) of trtllm-build: the whole context the model was trained for,
    half of it (at most 1024 tokens) for the prompt."""
    return min(1024, max(1, max_position_embeddings // 2)), max_position_embeddings


def trtllm_readme(out: Path, *, quant: str, bits: int, group_size: int, sparsity: str, lowrank_bits: int, rank: int,
                  trt_targets: str, max_seq_len: int, legacy_reason: str | None = None) -> str:
    """The README.md of a --format trtllm folder: layout, LLM API recipe, trtllm-build recipe.

    Commands use ``$OUT`` (set to this folder where it was written) because the folder is usually
    copied to the GPU machine that runs TensorRT-LLM. ``max_seq_len``: the model's
    max_position_embeddings (positions past it were never trained).
    """
    base = f"W4A16_AWQ: INT4 weights, group {group_size}, fp16 activations" if quant != "none" else "FP16 (unquantized)"
    lines = [
        "# TensorRT-LLM: quantized base + EoRA adapter", "",
        f"- `checkpoint/`: unified Hugging Face checkpoint written by NVIDIA ModelOpt's `export_hf_checkpoint`, {base}.",
    ]
    if quant != "none":
        lines.append(f"  Its packed INT4 weights and fp16 scales decode exactly to eora-export's W_c ({bits}-bit {quant}); "
                     "`hf_quant_config.json` names the format, and its AWQ pre-quant scales are all ones (no smoothing).")
    if not legacy_reason:
        lines.append("- `trtllm_checkpoint/`: the same weights in the TensorRT-LLM checkpoint format "
                     "(`export_tensorrt_llm_checkpoint`), for trtllm-build.")
    if rank:
        lines.append(f"- `lora/`: the EoRA factors as a PEFT LoRA adapter, rank {rank}, lora_alpha = r (scaling 1), fp16 "
                     f"(dequantized from {lowrank_bits}-bit storage). Layers whose rank was clamped are zero-padded to rank "
                     f"{rank}: TensorRT-LLM scales each module by lora_alpha / its own rank, and zero padding changes nothing.")
    else:
        lines.append("- no `lora/`: this run has no compensation (--method none).")
    if sparsity != "none":
        lines += ["", "2:4 sparsity: the pruned zeros are kept inside the weights. TensorRT-LLM has no sparse INT4 GEMM, so "
                      "INT4 layers run dense (same accuracy, no sparsity speed-up); an FP16 2:4 base (--quant none) can use "
                      "TensorRT's sparse tactics with `trtllm-build --weight_sparsity`."]
    lines += ["", "Set `OUT` to this folder on the machine with TensorRT-LLM:", "", "```bash", f"export OUT={shlex.quote(str(out))}", "```"]
    lora_cfg = f',\n          lora_config=LoraConfig(lora_dir=[f"{{OUT}}/lora"], max_lora_rank={rank}, max_loras=1, max_cpu_loras=1)' \
        if rank else ""
    request = ", lora_request=[eora]" if rank else ""
    imports = ("from tensorrt_llm.executor import LoRARequest\ntry:\n    from tensorrt_llm.lora_helper import LoraConfig\n"
               "except ImportError:  # older releases\n    from tensorrt_llm.lora_manager import LoraConfig\n") if rank else ""
    lines += ["", "## LLM API (PyTorch backend)", "", "```python", "import os", "",
              "from tensorrt_llm import LLM, SamplingParams", *imports.splitlines(), "",
              'OUT = os.environ["OUT"]',
              f'llm = LLM(model=f"{{OUT}}/checkpoint"{lora_cfg})',
              *(['eora = LoRARequest("eora", 1, f"{OUT}/lora")'] if rank else []),
              f'for output in llm.generate(["The capital of France is"], SamplingParams(max_tokens=32){request}):',
              "    print(output.outputs[0].text)", "```"]
    if rank:
        lines += ["", "Every request that should be compensated carries the `eora` LoRA request; with `trtllm-serve` "
                      '(same `lora_config` in `--extra_llm_api_options`), send `"lora_request": {"lora_name": "eora", '
                      '"lora_int_id": 1, "lora_path": "<OUT>/lora"}` in the request body.']
    lines += ["", "## TensorRT engine (trtllm-build" + (" with the LoRA plugin)" if rank else ")"), ""]
    if legacy_reason:
        lines.append(f"No `trtllm_checkpoint/` was written: {legacy_reason}. Use the LLM API above.")
    else:
        max_input, max_seq = engine_lengths(max_seq_len)
        build = ["trtllm-build --checkpoint_dir $OUT/trtllm_checkpoint --output_dir $OUT/engine \\",
                 f"    --gemm_plugin auto --max_batch_size 8 --max_input_len {max_input} --max_seq_len {max_seq}"]
        run = ["python3 TensorRT-LLM/examples/run.py --engine_dir $OUT/engine --tokenizer_dir $OUT/checkpoint \\",
               '    --max_output_len 32 --input_text "The capital of France is"']
        if rank:
            build[-1] += " \\"
            build += [f"    --lora_plugin auto --lora_dir $OUT/lora --max_lora_rank {rank} \\",
                      f"    --lora_target_modules {trt_targets}"]
            run[-1] += " \\"
            run.append("    --lora_dir $OUT/lora --lora_task_uids 0")
        lines += ["```bash", *build, *run, "```"]
        if rank and quant != "none":
            lines += ["", "LoRA on an INT4 (W4A16 AWQ) base through trtllm-build is unconfirmed upstream for current "
                          "TensorRT-LLM releases (NVIDIA's RTX-AI-Toolkit guide shows it with TensorRT-LLM 0.11; we found no "
                          "TensorRT-LLM example or test of it); the LLM API above is the path to use first."]
    return "\n".join(lines) + "\n"


def write_trtllm(cfg: Any, result: Any, out: Path) -> int:
    """Write ``out/checkpoint``, ``out/trtllm_checkpoint``, ``out/lora`` and ``out/README.md`` atomically."""
    from ..adapter import save_peft_adapter

    check_trtllm_config(cfg)
    modules = {n: r.module for n, r in result.modules.items()}
    quantized = set(_quantized_names(modules))
    if any(modules[n].weight_q.bits != 4 for n in quantized):
        raise UsageError("--format trtllm needs 4-bit weights (TensorRT-LLM has no INT3 kernels)")
    # The layers' own group size, not the flag: it is what the codes were made with.
    groups = {modules[n].weight_q.group_size for n in quantized}
    if len(groups) > 1 or not groups <= set(TRTLLM_GROUP_SIZES):
        raise UsageError(f"--format trtllm needs one group size of 64 or 128 (TensorRT-LLM's INT4 kernels), got {sorted(groups)}")
    group_size = groups.pop() if groups else 0
    _check_fused_groups(result.model, quantized)
    mtq, mte = _modelopt()
    factors = lora_factors(modules)
    rank = max((f.rank for f in factors.values()), default=0)
    meta = {"method": cfg.method, "rank": cfg.rank, "lowrank_bits": cfg.lowrank_bits, "quant": cfg.quant,
            "bits": cfg.bits, "group_size": cfg.group_size, "sparsity": cfg.sparsity}
    with atomic_dir(out) as tmp:
        _export_unified(mtq, mte, result, modules, group_size, tmp / "checkpoint")
        legacy = _export_trtllm(mtq, mte, result, modules, group_size, tmp / "trtllm_checkpoint")
        if legacy is not None:
            log.warning("no trtllm_checkpoint/ (trtllm-build input): %s; checkpoint/ serves the LLM API", legacy)
        if factors:
            save_peft_adapter(factors, tmp / "lora", str(out / "checkpoint"), meta)
        max_pos = int(result.model.config.max_position_embeddings)
        (tmp / "README.md").write_text(_readme(out, modules, cfg, group_size, rank, legacy, max_pos))
        _fix_modes(tmp)
    print(f"TensorRT-LLM: {out}/checkpoint (ModelOpt {'W4A16_AWQ' if quantized else 'FP16'})"
          + (f", {out}/lora (PEFT LoRA, rank {rank})" if factors else "") + f"; recipe in {out}/README.md")
    return 0


def _fix_modes(root: Path) -> None:
    """Some writers create files through mkstemp (mode 0600); give them the usual umask mode."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            os.chmod(Path(dirpath) / f, default_mode())
