"""What is inside an output, as a dict with a ``kind`` key: detection and reading.

Recognized: a fused or pattern ONNX graph, a TensorRT plan, a safetensors file, an eora-export
output folder (report.json, adapter/, base/), a PEFT adapter, a Triton repository or model
folder, a TensorRT-LLM folder (checkpoint/, trtllm_checkpoint/, lora/) and the checkpoints in it.

Every input is treated as untrusted: sizes are checked before anything is parsed, nothing is
executed or unpickled, external ONNX data must stay beside its graph, and anything malformed
ends in a one-line :class:`BadInput` instead of a traceback.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import BadInput, MissingInput
from ..safetensors_io import read_header
from .render import fmt_bytes as _fmt_bytes

MAX_ONNX_BYTES = 2 * 2**30  # protobuf cannot hold more; larger graphs keep weights in external data
MAX_EXTERNAL_LOAD_BYTES = 4 * 2**30  # external weights read for pattern matching; skipped above this
MAX_JSON_BYTES = 64 * 2**20
MAX_TEXT_BYTES = 2**20
HEADER_BYTES = 32


def inspect_path(path: Path) -> dict[str, Any]:
    """The description as a dict with a ``kind`` key; dispatches on file type or folder content."""
    if not path.exists():
        raise MissingInput(f"{path} not found")
    try:
        return _dispatch(path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
        # Well-formed JSON/protobuf with the wrong structure (a list where an object belongs, a
        # string where a number does): the file is not what its name says, not a bug of ours.
        raise BadInput(f"{path}: unexpected content ({_one_line(e)})") from None


def _dispatch(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return _inspect_dir(path)
    if not path.is_file():
        raise BadInput(f"{path} is not a regular file or folder")
    name, suffix = path.name, path.suffix.lower()
    if suffix == ".onnx":
        return inspect_onnx(path)
    if suffix in (".plan", ".engine"):
        return inspect_plan(path)
    if suffix == ".safetensors":
        return inspect_safetensors(path)
    if name == "config.pbtxt":
        return inspect_triton_model(path.parent)
    if name == "report.json":
        return inspect_eora_output(path.parent)
    if name == "adapter_config.json":
        return inspect_adapter(path.parent)
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:4] == PLAN_MAGIC:
        return inspect_plan(path)
    raise BadInput(f"{path}: not something eora-export writes (.onnx, .plan, .safetensors, config.pbtxt, report.json, "
                   "adapter_config.json or an output folder)")


def _inspect_dir(path: Path) -> dict[str, Any]:
    if (path / "report.json").is_file():
        return inspect_eora_output(path)
    if (path / "checkpoint").is_dir() and ((path / "lora").is_dir() or (path / "trtllm_checkpoint").is_dir()):
        return inspect_trtllm_output(path)
    if (path / "config.pbtxt").is_file():
        return inspect_triton_model(path)
    if any((child / "config.pbtxt").is_file() for child in _subdirs(path)):
        return inspect_triton_repository(path)
    if (path / "adapter_config.json").is_file():
        return inspect_adapter(path)
    if (path / "hf_quant_config.json").is_file() or ((path / "config.json").is_file() and any(path.glob("rank*.safetensors"))):
        return inspect_checkpoint(path)
    if (path / "quantization.json").is_file():
        return inspect_base(path)
    raise BadInput(f"{path}: not an eora-export output folder (no report.json, config.pbtxt, adapter_config.json, "
                   "checkpoint/ or quantization.json)")


# --------------------------------------------------------------------------- small readers


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_json(path: Path) -> Any:
    """JSON from an untrusted file: bounded size, one-line errors."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise BadInput(f"{path} is {_fmt_bytes(size)}, more than the {_fmt_bytes(MAX_JSON_BYTES)} a JSON file here may be")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadInput(f"{path} is not valid JSON ({_one_line(e)})") from None


def _read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    size = path.stat().st_size
    if size > limit:
        raise BadInput(f"{path} is {_fmt_bytes(size)}, more than the {_fmt_bytes(limit)} expected")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text ({e})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape", "bytes"}}`` from the file's checked header (:func:`read_header`), without reading tensors."""
    return {name: {"dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes} for name, t in read_header(path).items()}


def inspect_safetensors(path: Path) -> dict[str, Any]:
    tensors = safetensors_header(path)
    dtypes = Counter(t["dtype"] for t in tensors.values())
    return {"kind": "safetensors", "path": str(path), "bytes": path.stat().st_size, "tensors": len(tensors),
            "dtypes": dict(dtypes), "tensor_list": tensors}


# --------------------------------------------------------------------------- ONNX


def inspect_onnx(path: Path) -> dict[str, Any]:
    """Graph I/O, EoraLinear layers (fused nodes), unfused patterns and initializer bytes."""
    import onnx
    from onnx import TensorProto

    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise BadInput(f"{path} is {_fmt_bytes(size)}; an ONNX protobuf is at most 2 GiB, so this is not a valid ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, onnx errors, ...: all mean the same to the user
        raise BadInput(f"{path} is not a readable ONNX model ({_one_line(e)})") from None
    graph = model.graph
    if model.ir_version <= 0 or (not graph.node and not graph.output):
        raise BadInput(f"{path} parses as protobuf but holds no ONNX graph")

    def value_info(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type) if t.elem_type else "?", "shape": dims}

    inline, external, external_files = 0, 0, set()
    for t in graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            external += int(entries.get("length", 0) or 0)
            external_files.add(entries.get("location", "?"))
        else:
            inline += t.ByteSize()
    info: dict[str, Any] = {
        "kind": "onnx", "path": str(path), "bytes": size, "ir_version": model.ir_version,
        "producer": model.producer_name, "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [value_info(v) for v in graph.input if v.name not in {t.name for t in graph.initializer}],
        "outputs": [value_info(v) for v in graph.output], "nodes": len(graph.node),
        "initializers": len(graph.initializer), "initializer_bytes": inline + external,
        "external_data_bytes": external, "external_data_files": sorted(external_files),
        "op_types": dict(Counter(n.op_type for n in graph.node).most_common(12)),
    }
    info.update(_fused_layers(graph))
    info.update(_pattern_layers(model, path, external))
    return info


def _fused_layers(graph: Any) -> dict[str, Any]:
    from ..onnx import spec
    from ..onnx.fuse import node_attrs

    layers, invalid = [], []
    for node in graph.node:
        if node.op_type != spec.op_type() or node.domain != spec.domain():
            continue
        try:
            attrs = node_attrs(node)
        except ValueError as e:
            invalid.append({"name": node.name, "reason": str(e)})
            continue
        layers.append({"name": node.name or node.output[0], **attrs})
    versions = sorted({str(la.get("plugin_version")) for la in layers})
    namespaces = sorted({str(la.get("plugin_namespace")) for la in layers})
    return {"eora_linear_nodes": len(layers), "fused_layers": layers, "invalid_fused_nodes": invalid,
            "plugin": {"name": spec.load_spec()["plugin_name"], "versions": versions, "namespaces": namespaces,
                       "spec_version": spec.load_spec()["plugin_version"]} if layers else None}


def _pattern_layers(model: Any, path: Path, external: int) -> dict[str, Any]:
    """Unfused EoraLinear patterns, found by the same matcher ``fuse`` uses (on a copy)."""
    from ..onnx.fuse import fuse

    if external:
        if external > MAX_EXTERNAL_LOAD_BYTES:
            return {"pattern_layers": [], "pattern_note": f"pattern matching skipped: {_fmt_bytes(external)} of external weights"}
        try:
            _load_external(model, path.parent)
        except BadInput as e:
            return {"pattern_layers": [], "pattern_note": f"pattern matching skipped: {e}"}
    try:
        _, report = fuse(model)
    except Exception as e:  # an odd but readable graph: describe the rest of it
        return {"pattern_layers": [], "pattern_note": f"pattern matching skipped: {_one_line(e)}"}
    return {"pattern_layers": [{"name": f["name"], **f["attrs"]} for f in report.fused],
            "near_misses": [{"name": n, "reason": r} for n, r in report.unmatched]}


def _load_external(model: Any, base: Path) -> None:
    """Read external initializer data, refusing locations that leave the graph's folder."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    root = base.resolve()
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        target = (root / loc).resolve()
        if not loc or Path(loc).is_absolute() or target.parent != root or not target.is_file():
            raise BadInput(f"external data {loc!r} of {t.name!r} is not a file beside the graph")
        offset, length = int(entries.get("offset", 0) or 0), int(entries.get("length", 0) or 0)
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            raise BadInput(f"external data of {t.name!r} points outside {loc}")
        try:
            load_external_data_for_tensor(t, str(root))
        except Exception as e:
            raise BadInput(f"cannot read external data of {t.name!r} ({_one_line(e)})") from None
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]


# --------------------------------------------------------------------------- TensorRT plan

PLAN_MAGIC = b"ftrt"  # first four bytes of TensorRT's serialized engines


def inspect_plan(path: Path) -> dict[str, Any]:
    """Header and neighbours of a plan; with TensorRT and a GPU, its I/O tensors and layers."""
    from ..deploy.engine_build import missing_tensorrt_reason

    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{path} is empty; a plan is never written empty by eora-export, so it came from elsewhere")
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    stem = path.with_suffix("")
    beside = {kind: str(p) for kind, p in (("fused_onnx", path.with_suffix(".onnx")), ("build_script", path.with_suffix(".build.sh")),
                                           ("timing_cache", path.with_suffix(".timing.cache")),
                                           ("artifacts", stem.with_name(stem.name + ".eora"))) if p.exists()}
    info: dict[str, Any] = {
        "kind": "tensorrt_plan", "path": str(path), "bytes": size, "header_bytes": len(head),
        "header_hex": head[:16].hex(" "), "magic_ok": head[:4] == PLAN_MAGIC, "beside": beside,
    }
    reason = missing_tensorrt_reason()
    if reason:
        info["engine"] = None
        info["note"] = f"listing layers and bindings needs deserializing, which needs TensorRT and a GPU: {reason}"
        return info
    info["engine"] = _deserialize(path)
    return info


def _deserialize(path: Path) -> dict[str, Any]:
    import tensorrt as trt

    from ..deploy.plugin import LIB_NAME, PluginError, find_library

    logger = trt.Logger(trt.Logger.ERROR)
    lib = path.parent / LIB_NAME
    try:
        lib = lib if lib.is_file() else find_library()
    except PluginError:
        lib = None
    runtime = trt.Runtime(logger)
    if lib is not None:
        runtime.get_plugin_registry().load_library(str(lib))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BadInput(f"TensorRT could not deserialize {path} (another TensorRT version, another GPU, "
                       f"or the EoraLinear plugin missing{'' if lib else ': build it with eora-export build-plugin'})")
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensors.append({"name": name, "mode": str(engine.get_tensor_mode(name)).rsplit(".", 1)[-1],
                        "dtype": str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1], "shape": list(engine.get_tensor_shape(name))})
    layers: list[str] = []
    try:
        inspector = engine.create_engine_inspector()
        data = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        layers = [la if isinstance(la, str) else str(la.get("Name", "?")) for la in data.get("Layers", [])]
    except Exception:  # layer names need the engine built with profiling verbosity; bindings are enough
        pass
    return {"io_tensors": tensors, "num_layers": engine.num_layers, "layers": layers,
            "eora_linear_layers": sum("EoraLinear" in la for la in layers), "plugin_library": str(lib) if lib else None,
            "optimization_profiles": engine.num_optimization_profiles}


# --------------------------------------------------------------------------- folders


def inspect_adapter(path: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter: config, per-layer ranks from the tensor shapes, layout checks."""
    cfg = _read_json(path / "adapter_config.json")
    if not isinstance(cfg, dict):
        raise BadInput(f"{path / 'adapter_config.json'} is not a JSON object")
    weights = path / "adapter_model.safetensors"
    tensors = safetensors_header(weights) if weights.is_file() else {}
    layers: dict[str, dict[str, Any]] = {}
    problems = []
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                name = key[: -len(marker)].removeprefix("base_model.model.")
                layers.setdefault(name, {})[part] = t["shape"]
    rows = []
    for name, parts in layers.items():
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"{name}: lora_A {a} / lora_B {b} is not [r, in] / [out, r]")
            continue
        rows.append({"name": name, "rank": a[0], "in_features": a[1], "out_features": b[0]})
    ranks = Counter(r["rank"] for r in rows)
    r = cfg.get("r")
    if ranks and r is not None and max(ranks) > int(r) and not cfg.get("rank_pattern"):
        problems.append(f"tensor ranks up to {max(ranks)} exceed r={r} with no rank_pattern")
    return {
        "kind": "peft_adapter", "path": str(path), "peft_type": cfg.get("peft_type"), "r": r, "lora_alpha": cfg.get("lora_alpha"),
        "scaling": (float(cfg["lora_alpha"]) / float(r)) if r and cfg.get("lora_alpha") is not None else None,
        "target_modules": cfg.get("target_modules"), "rank_pattern": cfg.get("rank_pattern") or {},
        "base_model": cfg.get("base_model_name_or_path"), "eora": _eora_meta(path),
        "layers": len(rows), "ranks": dict(sorted(ranks.items())),
        "dtypes": dict(Counter(t["dtype"] for t in tensors.values())),
        "bytes": weights.stat().st_size if weights.is_file() else 0, "problems": problems, "layer_list": rows,
    }


def _eora_meta(adapter_dir: Path) -> dict | None:
    """Our settings file beside the PEFT config (absent for adapters from elsewhere)."""
    meta = adapter_dir / "eora_adapter.json"
    if not meta.is_file() or meta.stat().st_size > 1 << 20:
        return None
    try:
        data = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def inspect_base(path: Path) -> dict[str, Any]:
    """eora-export's compressed base checkpoint (quantization.json + quantization.safetensors)."""
    q = _read_json(path / "quantization.json")
    if not isinstance(q, dict):
        raise BadInput(f"{path / 'quantization.json'} is not a JSON object")
    layers = q.get("layers") or {}
    if not isinstance(layers, dict):
        raise BadInput(f"{path / 'quantization.json'}: 'layers' is not an object")
    formats = Counter((la.get("bits"), la.get("group_size"), bool(la.get("sparse24"))) for la in layers.values() if isinstance(la, dict))
    files = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}
    return {"kind": "eora_base", "path": str(path), "method": q.get("method"), "quant": q.get("quant"), "bits": q.get("bits"),
            "group_size": q.get("group_size"), "sparsity": q.get("sparsity"), "layers": len(layers),
            "formats": [{"bits": b, "group_size": g, "sparse24": s, "layers": n} for (b, g, s), n in sorted(formats.items(), key=str)],
            "files": files, "version": q.get("eora_export_version")}


def inspect_eora_output(path: Path) -> dict[str, Any]:
    """An eora-export output folder (or the X.eora beside a deployable): report, adapter, base."""
    report = _read_json(path / "report.json")
    if not isinstance(report, dict):
        raise BadInput(f"{path / 'report.json'} is not a JSON object")
    info: dict[str, Any] = {
        "kind": "eora_output", "path": str(path), "version": report.get("eora_export_version"), "model": report.get("model"),
        "config": {k: (report.get("config") or {}).get(k) for k in ("method", "rank", "quant", "bits", "group_size", "sparsity", "lowrank_bits")},
        "table": report.get("table"), "perplexity": report.get("perplexity"), "sizes": report.get("sizes"),
        "layers": len(report.get("layers") or []), "total_s": (report.get("timings") or {}).get("total_s"),
    }
    if (path / "adapter" / "adapter_config.json").is_file():
        info["adapter"] = inspect_adapter(path / "adapter")
    if (path / "base" / "quantization.json").is_file():
        info["base"] = inspect_base(path / "base")
    if path.name.endswith(".eora"):
        stem = path.with_name(path.name[: -len(".eora")])
        info["deployables"] = [str(p) for p in (stem.with_suffix(".onnx"), stem.with_suffix(".plan"), stem) if p.exists()]
    return info


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """A ModelOpt unified HF checkpoint (hf_quant_config.json) or a TensorRT-LLM checkpoint (rank*.safetensors)."""
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if (path / "hf_quant_config.json").is_file():
        q = (_read_json(path / "hf_quant_config.json") or {}).get("quantization", {})
        kind = "modelopt_hf_checkpoint"
    else:
        q = config.get("quantization") or {}
        kind = "trtllm_checkpoint"
    tensors: dict[str, Any] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(safetensors_header(f))
    int4 = sum(1 for k, t in tensors.items() if t["dtype"] in ("U8", "I8") and (k.endswith(".weight") or k.endswith(".qweight")))
    return {"kind": kind, "path": str(path), "architecture": config.get("architecture") or (config.get("architectures") or [None])[0],
            "quant_algo": q.get("quant_algo"), "group_size": q.get("group_size"), "exclude_modules": q.get("exclude_modules"),
            "int4_layers": int4, "tensors": len(tensors), "bytes": sum(t["bytes"] for t in tensors.values()),
            "producer": (config.get("producer") or {}).get("version") if isinstance(config.get("producer"), dict) else None}


def inspect_trtllm_output(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": "trtllm_output", "path": str(path), "checkpoint": inspect_checkpoint(path / "checkpoint")}
    if (path / "trtllm_checkpoint").is_dir():
        info["trtllm_checkpoint"] = inspect_checkpoint(path / "trtllm_checkpoint")
    if (path / "lora" / "adapter_config.json").is_file():
        info["lora"] = inspect_adapter(path / "lora")
    info["readme"] = (path / "README.md").is_file()
    return info


def _parse_pbtxt(path: Path) -> dict[str, Any]:
    """config.pbtxt through Triton's own ModelConfig schema when tritonclient is installed."""
    text = _read_text(path)
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return {"schema": None, "text": text}
    try:
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise BadInput(f"{path} is not a valid Triton ModelConfig ({e})") from None
    dt = model_config_pb2.DataType.Name

    def io(v: Any) -> dict[str, Any]:
        return {"name": v.name, "dtype": dt(v.data_type), "dims": list(v.dims)}

    return {"schema": "tritonclient.grpc.model_config_pb2.ModelConfig", "name": cfg.name, "platform": cfg.platform,
            "backend": cfg.backend, "max_batch_size": cfg.max_batch_size, "inputs": [io(v) for v in cfg.input],
            "outputs": [io(v) for v in cfg.output], "dynamic_batching": cfg.HasField("dynamic_batching"),
            "instance_groups": [{"count": g.count, "kind": model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)} for g in cfg.instance_group]}


def inspect_triton_model(path: Path) -> dict[str, Any]:
    config = _parse_pbtxt(path / "config.pbtxt")
    versions = {}
    for v in _subdirs(path):
        if v.name.isdigit():
            versions[v.name] = {f.name: f.stat().st_size for f in sorted(v.iterdir()) if f.is_file()}
    return {"kind": "triton_model", "path": str(path), "config": config, "versions": versions}


def inspect_triton_repository(path: Path) -> dict[str, Any]:
    models = [inspect_triton_model(child) for child in _subdirs(path) if (child / "config.pbtxt").is_file()]
    readme = path / "README.md"
    serve = [line.strip() for line in _read_text(readme).splitlines() if "tritonserver" in line] if readme.is_file() else []
    return {"kind": "triton_repository", "path": str(path), "models": models, "serve": serve}
