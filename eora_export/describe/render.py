"""Text form of :func:`eora_export.describe.inspect_path`'s dict, one renderer per kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    cells = [[h for _, h in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


LAYER_COLUMNS = [("name", "layer"), ("in_features", "in"), ("out_features", "out"), ("rank", "rank"), ("weight_bits", "bits"),
                 ("group_size", "group"), ("lowrank_bits", "lr_bits"), ("sparse24", "2:4"), ("has_bias", "bias")]


def render(info: dict[str, Any]) -> str:
    """Text form of :func:`inspect_path`'s dict."""
    kind = info["kind"]
    lines = [f"{info.get('path')}: {kind.replace('_', ' ')}"]
    lines += RENDERERS.get(kind, _render_generic)(info)
    return "\n".join(lines)


def _render_generic(info: dict[str, Any]) -> list[str]:
    return [f"  {k}: {v}" for k, v in info.items() if k not in ("kind", "path") and not isinstance(v, (list, dict))]


def _render_onnx(info: dict[str, Any]) -> list[str]:
    external = info["external_data_bytes"]
    where = f", {fmt_bytes(external)} external in {', '.join(info['external_data_files'])}" if external else ""
    out = [f"  size {fmt_bytes(info['bytes'])}; initializers {info['initializers']} ({fmt_bytes(info['initializer_bytes'])}{where}); "
           f"{info['nodes']} nodes; opsets {info['opsets']}",
           "  inputs:  " + ", ".join(f"{v['name']} {v['dtype']} {v['shape']}" for v in info["inputs"]),
           "  outputs: " + ", ".join(f"{v['name']} {v['dtype']} {v['shape']}" for v in info["outputs"])]
    if info["eora_linear_nodes"]:
        p = info["plugin"]
        out.append(f"  fused: {info['eora_linear_nodes']} EoraLinear node(s), plugin {p['name']} version {','.join(p['versions'])} "
                   f"namespace {','.join(p['namespaces'])} (this eora-export writes version {p['spec_version']})")
        out += _table(info["fused_layers"], LAYER_COLUMNS)
    for bad in info["invalid_fused_nodes"]:
        out.append(f"  invalid EoraLinear node {bad['name']}: {bad['reason']}")
    if info.get("pattern_layers"):
        out.append(f"  unfused: {len(info['pattern_layers'])} EoraLinear pattern(s) (eora-export would fuse them)")
        out += _table(info["pattern_layers"], LAYER_COLUMNS)
    elif not info["eora_linear_nodes"]:
        out.append("  no EoraLinear nodes or patterns")
    if info.get("pattern_note"):
        out.append(f"  {info['pattern_note']}")
    for miss in info.get("near_misses", []):
        out.append(f"  not fused: {miss['name']}: {miss['reason']}")
    return out


def _render_plan(info: dict[str, Any]) -> list[str]:
    out = [f"  size {fmt_bytes(info['bytes'])}; header {info['header_hex']} "
           f"({'TensorRT plan magic' if info['magic_ok'] else 'no TensorRT plan magic: probably not an engine'})"]
    out += [f"  beside it: {k} {v}" for k, v in info["beside"].items()]
    if info.get("note"):
        out.append(f"  {info['note']}")
    engine = info.get("engine")
    if engine:
        out.append(f"  {engine['num_layers']} layers ({engine['eora_linear_layers']} EoraLinear), "
                   f"{engine['optimization_profiles']} optimization profile(s), plugin {engine['plugin_library']}")
        out += [f"  {t['mode'].lower():6} {t['name']} {t['dtype']} {t['shape']}" for t in engine["io_tensors"]]
    return out


def _render_adapter(info: dict[str, Any]) -> list[str]:
    out = [f"  {info['peft_type']} r={info['r']} lora_alpha={info['lora_alpha']} (scaling {info['scaling']}); "
           f"{info['layers']} layers, ranks {info['ranks']}; {fmt_bytes(info['bytes'])} {info['dtypes']}",
           f"  target_modules: {info['target_modules']}"]
    if info["rank_pattern"]:
        out.append(f"  rank_pattern: {info['rank_pattern']}")
    if info.get("eora"):
        out.append(f"  eora: {info['eora']}")
    out += [f"  problem: {p}" for p in info["problems"]]
    return out


def _render_base(info: dict[str, Any]) -> list[str]:
    out = [f"  {info['quant']} {info['bits']}-bit, group {info['group_size']}, sparsity {info['sparsity']}, method {info['method']}; "
           f"{info['layers']} compressed layers"]
    out += [f"  {f['layers']} layers: {f['bits']} bits, group {f['group_size']}, 2:4 {f['sparse24']}" for f in info["formats"]]
    out += [f"  {name}: {fmt_bytes(size)}" for name, size in info["files"].items()]
    return out


def _render_eora_output(info: dict[str, Any]) -> list[str]:
    out = [f"  model {info['model']}, eora-export {info['version']}, config {info['config']}"]
    if info.get("table"):
        out += ["  " + line for line in str(info["table"]).splitlines()]
    for key, fn in (("adapter", _render_adapter), ("base", _render_base)):
        if key in info:
            out.append(f"  {key}/:")
            out += ["  " + line for line in fn(info[key])]
    if info.get("deployables"):
        out.append(f"  deployables: {', '.join(info['deployables'])}")
    return out


def _render_checkpoint(info: dict[str, Any]) -> list[str]:
    return [f"  {info['architecture']}: {info['quant_algo'] or 'unquantized'} group {info['group_size']}, "
            f"{info['int4_layers']} INT4 tensors of {info['tensors']}, {fmt_bytes(info['bytes'])}; excluded {info['exclude_modules']}"]


def _render_trtllm_output(info: dict[str, Any]) -> list[str]:
    out = ["  checkpoint/ (LLM API):"] + ["  " + line for line in _render_checkpoint(info["checkpoint"])]
    if "trtllm_checkpoint" in info:
        out += ["  trtllm_checkpoint/ (trtllm-build):"] + ["  " + line for line in _render_checkpoint(info["trtllm_checkpoint"])]
    if "lora" in info:
        out += ["  lora/:"] + ["  " + line for line in _render_adapter(info["lora"])]
    return out


def _render_triton_model(info: dict[str, Any]) -> list[str]:
    c = info["config"]
    if c.get("schema") is None:
        return ["  config.pbtxt (tritonclient not installed; raw text):"] + ["    " + line for line in c["text"].splitlines()]
    out = [f"  {c['name']}: platform {c['platform'] or c['backend']}, max_batch_size {c['max_batch_size']}, "
           f"dynamic batching {'on' if c['dynamic_batching'] else 'off'}, instances {c['instance_groups']}"]
    out += [f"  input  {v['name']} {v['dtype']} {v['dims']}" for v in c["inputs"]]
    out += [f"  output {v['name']} {v['dtype']} {v['dims']}" for v in c["outputs"]]
    for version, files in info["versions"].items():
        out.append(f"  version {version}: " + ", ".join(f"{n} ({fmt_bytes(s)})" for n, s in files.items()))
    return out


def _render_triton_repository(info: dict[str, Any]) -> list[str]:
    out = []
    for m in info["models"]:
        out.append(f"  model {Path(m['path']).name}/")
        out += ["  " + line for line in _render_triton_model(m)]
    out += [f"  serve: {s}" for s in info["serve"]]
    return out


def _render_safetensors(info: dict[str, Any]) -> list[str]:
    return [f"  {info['tensors']} tensors, {fmt_bytes(info['bytes'])}, dtypes {info['dtypes']}"]


RENDERERS = {
    "onnx": _render_onnx, "tensorrt_plan": _render_plan, "peft_adapter": _render_adapter, "eora_base": _render_base,
    "eora_output": _render_eora_output, "modelopt_hf_checkpoint": _render_checkpoint, "trtllm_checkpoint": _render_checkpoint,
    "trtllm_output": _render_trtllm_output, "triton_model": _render_triton_model, "triton_repository": _render_triton_repository,
    "safetensors": _render_safetensors,
}
