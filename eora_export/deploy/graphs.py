"""Deployable outputs of a finished run: ONNX (fused, pattern, FP16 baseline), the
Polygraphy comparison, the TensorRT engine and the Triton repository.

Each file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_dir, atomic_file, default_mode
from ..errors import MissingDependency, MissingInput, UsageError
from .verify import plugin_path

if TYPE_CHECKING:
    from ..config import DeployConfig
    from .engine_build import ShapeProfile

log = logging.getLogger("eora_export")


@dataclass(frozen=True)
class OnnxSet:
    """The three graphs written for ``--out X.onnx``."""

    fused: Path  # X.onnx: EoraLinear nodes, for the TensorRT plugin
    pattern: Path  # X.pattern.onnx: the canonical unfused pattern (stock TensorRT / ORT)
    baseline: Path  # X.fp16.onnx: the uncompressed FP16 model


def onnx_paths(out: Path) -> OnnxSet:
    stem = out.with_suffix("")
    return OnnxSet(out, stem.with_name(stem.name + ".pattern.onnx"), stem.with_name(stem.name + ".fp16.onnx"))


def write_onnx(result, out: Path, kv_cache: bool = False) -> OnnxSet:
    """Fused + pattern graphs of the run's final modules, and the FP16 baseline graph
    (each written atomically by the exporter; external data above 1.5 GiB).

    ``result``: an engine.RunResult or a folder.FolderResult (a finished folder, whose
    layers are loaded one block at a time while the graph is written).
    """
    from ..onnx.export import export_baseline_onnx, export_onnx

    paths = onnx_paths(out)
    external = result.external_data
    with result.export_model() as model:
        export_onnx(model, paths.fused, kv_cache=kv_cache, fused=True, external_data=external)
        export_onnx(model, paths.pattern, kv_cache=kv_cache, fused=False, external_data=external)
    export_baseline_onnx(result.baseline_model(), paths.baseline, kv_cache=kv_cache, external_data=external)
    return paths


def verify_onnx(result, cfg, paths: OnnxSet, held, verify_dir: Path):
    """Polygraphy comparison of the baseline against the pattern graph of every method the run
    evaluated (``result.by_method``: none, the compared ones, the final one) on held-out windows.

    Methods other than the run's own are exported to temporary graphs for the comparison.
    """
    from ..onnx.export import export_onnx
    from .verify import compare_models

    windows = held.numpy()
    with atomic_dir(verify_dir) as tmp:
        graphs = {}
        for method in result.by_method:
            if method == cfg.method:
                graphs[method] = paths.fused
                continue
            with result.export_model(method) as model:
                graphs[method] = export_onnx(model, tmp / f"{method}.onnx", fused=True)
        report = compare_models(paths.baseline, graphs, windows, tmp)
        for method in graphs:
            if method != cfg.method:
                (tmp / f"{method}.onnx").unlink()
        # The saved JSON must point at the renamed folder, not the temporary one.
        text = (tmp / "verify.json").read_text().replace(str(tmp), str(verify_dir))
        (tmp / "verify.json").write_text(text)
    return report


def artifacts_dir(out: Path, fmt: str) -> Path:
    """Where report.json, adapter/ and base/ go: ``out`` itself for a plain folder,
    else ``<out without suffix>.eora`` beside the deployable file or repository."""
    if fmt == "dir":
        return out
    base = out.with_suffix("") if out.suffix in (".onnx", ".plan", ".engine") else out
    return base.with_name(base.name + ".eora")


def _plugin_library(deploy: DeployConfig) -> Path | None:
    from .plugin import PluginError, find_library

    if deploy.plugin_lib:
        if not deploy.plugin_lib.is_file():
            raise MissingInput(f"--plugin-lib {deploy.plugin_lib} does not exist; build it with `eora-export build-plugin`")
        return deploy.plugin_lib
    try:
        return find_library()
    except PluginError as e:  # $EORA_PLUGIN_LIB names no file: the user's input, not our bug
        raise MissingInput(str(e)) from None


def _profile(deploy: DeployConfig, result) -> ShapeProfile:
    from .engine_build import ShapeProfile

    max_seq = min(deploy.max_seq, int(getattr(result.model.config, "max_position_embeddings", deploy.max_seq)))
    return ShapeProfile(batch=(1, 1, deploy.max_batch), seq=(1, min(deploy.opt_seq, max_seq), max_seq))


def write_build_script(plan: Path, plugin: Path | None, command: str) -> Path:
    """``X.build.sh`` beside the requested plan: the build to finish on a TensorRT machine.

    ``command`` is the trtexec line without the plugin flag; the plugin library is copied
    beside the script when it is built here, so the folder travels whole.
    """
    if plugin is not None and (plan.parent / plugin.name).resolve() != plugin.resolve():
        with atomic_file(plan.parent / plugin.name) as tmp:
            shutil.copy2(plugin, tmp)
    # Absolute paths before the cd: the script may be run from any folder (bash out/X.build.sh), and
    # trtexec dlopens --dynamicPlugins, which looks a bare name up on the library path only.
    default = plugin_path(None)  # where `eora-export build-plugin` puts it
    lib = f'"$HERE/{plugin.name}"' if plugin else f'"$(realpath -m "${{EORA_PLUGIN_LIB:-{default}}}")"'
    body = f"""#!/usr/bin/env bash
# Finish the TensorRT engine build of {plan.name} on a machine with a GPU and TensorRT.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PLUGIN={lib}
if [ ! -f "$PLUGIN" ]; then
  echo "{plan.with_suffix('.build.sh').name}: no plugin library at $PLUGIN; build it with eora-export build-plugin or set EORA_PLUGIN_LIB" >&2
  exit 3
fi
cd "$HERE"
{command} --dynamicPlugins="$PLUGIN"
"""
    script = plan.with_suffix(".build.sh")
    with atomic_file(script) as tmp:
        tmp.write_text(body)
    # atomic_file gives the plain-file mode on rename; a script also needs the execute bits
    # (the umask-filtered 0o777 that mkdir would use).
    script.chmod(default_mode(directory=True))
    return script


def write_plan(deploy: DeployConfig, result, plan: Path) -> int:
    from .engine_build import build_engine, trtexec_command

    paths = write_onnx(result, plan.with_suffix(".onnx"), kv_cache=deploy.kv_cache)
    plugin = _plugin_library(deploy)
    profile = _profile(deploy, result)
    cache = deploy.timing_cache or plan.with_suffix(".timing.cache")
    try:
        build_engine(paths.fused, plan, plugin, profile, cache)
    except MissingDependency as e:
        # The script cds to its folder: name files there by name, a cache elsewhere by its full path.
        cache_arg = Path(cache.name) if cache.parent.resolve() == plan.parent.resolve() else cache.resolve()
        command = trtexec_command(Path(paths.fused.name), Path(plan.name), None, profile, cache_arg)
        script = write_build_script(plan, plugin, command).absolute()
        # stdout: the error below must stay the only line on stderr.
        print(f"wrote {paths.fused} (fused), {paths.pattern}, {paths.baseline} and {script}")
        raise MissingDependency(f"{str(e).split(';')[0]}; no {plan.name} was written. "
                                f"Finish on a GPU machine with TensorRT: bash {script}") from None
    print(f"engine: {plan}")
    return 0


def write_triton(deploy: DeployConfig, result, repo: Path) -> int:
    from . import triton
    from .engine_build import build_engine, missing_tensorrt_reason

    staging = artifacts_dir(repo, "triton")
    onnx_set = write_onnx(result, staging / "model.onnx", kv_cache=False)
    plugin = _plugin_library(deploy)
    model = triton.TritonModel(deploy.triton_name, int(result.model.config.vocab_size), deploy.max_batch)
    reason = missing_tensorrt_reason()
    trt_version = None
    # Only this model's folder is replaced: other models in the repository stay.
    with atomic_dir(repo / model.name) as tmp:
        if reason is None:
            import tensorrt

            trt_version = str(getattr(tensorrt, "__version__", "unknown"))
            cache = deploy.timing_cache or staging / "model.timing.cache"
            plan = build_engine(onnx_set.fused, staging / "model.plan", plugin, _profile(deploy, result), cache)
            triton.write_model_dir(plan, tmp, model, notes=triton.plan_notes(trt_version))
        else:
            # Without TensorRT the repository serves the unfused pattern on ONNX Runtime.
            extra = [p for p in [Path(str(onnx_set.pattern) + ".data")] if p.exists()]
            triton.write_model_dir(onnx_set.pattern, tmp, model, extra)
        command = triton.serve_command(repo, plugin_path(plugin) if reason is None else None)
        (tmp / "README.md").write_text(triton_readme(model, command, plugin_path(plugin), trt_version))
    print(f"Triton repository: {repo}/{model.name} ({'tensorrt_plan' if reason is None else 'onnxruntime_onnx'})")
    print(f"serve it: {command}")
    if reason:
        print(f"note: {reason}; rebuild on a TensorRT machine for the tensorrt_plan platform "
              f"(eora-export ... --format triton there, or the build script of --out X.plan)", file=sys.stderr)
    return 0


def triton_readme(model, command: str, plugin: Path, trt_version: str | None) -> str:
    """README.md of the model folder; ``trt_version``: the TensorRT that built model.plan (None: ONNX model)."""
    serve = f"""Serve it:

    {command}
"""
    if trt_version is not None:
        platform = "tensorrt_plan (fused EoraLinear plugin)"
        notes = (f"model.plan was built with TensorRT {trt_version}. A plan (built without TensorRT's "
                 "version-compatible flag) loads only under the TensorRT version that built it, "
                 "so serve it with a Triton image of that same TensorRT version (NVIDIA's support matrix lists each image's "
                 "TensorRT), or rebuild it with eora-export on the serving image.\n")
    else:
        platform = "onnxruntime_onnx (unfused pattern)"
        # The pattern graph is opset 21 (blocked INT4 DequantizeLinear): older ORT builds in Triton reject it.
        notes = ("The ONNX model is opset 21 with INT4 DequantizeLinear (block_size): the Triton image's ONNX Runtime must "
                 "support it (1.20 or newer).\n\n"
                 "For the fused TensorRT engine (tensorrt_plan), run `eora-export ... --format triton` on a GPU machine whose "
                 "TensorRT is the version of the Triton image that will serve it (a plan loads only under the TensorRT that "
                 f"built it), and pass the plugin: `--backend-config=tensorrt,plugins={plugin}`.\n")
    return f"""# Triton model repository: {model.name}

Platform: {platform}. Input `{model.input_name}` INT64 [batch, seq]; output `{model.output_name}` FP16
[batch, seq, {model.vocab_size}]; max batch {model.max_batch_size}, dynamic batching on.

{serve}
{notes}"""


def write_deployment(deploy: DeployConfig, cfg, result) -> int:
    """The deployable output ``deploy.format`` at ``deploy.out``; returns the exit code.

    cfg: the run's RunConfig (None for a finished folder: ``eora-export export`` / ``finetune``).
    """
    fmt, out = deploy.format, deploy.out
    if fmt == "onnx":
        paths = write_onnx(result, out, kv_cache=deploy.kv_cache)
        print(f"ONNX: {paths.fused} (EoraLinear nodes), {paths.pattern} (unfused pattern), {paths.baseline} (FP16 baseline)")
        if deploy.verify:
            run_verify(deploy, cfg, result, paths)
        return 0
    if fmt == "plan":
        return write_plan(deploy, result, out)
    if fmt == "triton":
        return write_triton(deploy, result, out)
    if fmt == "trtllm":
        from .trtllm import write_trtllm

        return write_trtllm(cfg, result, out)
    raise UsageError(f"unknown --format {fmt}")


def run_verify(deploy: DeployConfig, cfg, result, paths: OnnxSet) -> None:
    from .verify import polygraphy_command

    verify_dir = cfg.out / "verify"
    report = verify_onnx(result, cfg, paths, result.held, verify_dir)
    print(report.table())
    print("replay on a GPU machine with TensorRT:\n  " + polygraphy_command(
        paths.fused, _plugin_library(deploy), inputs_json=verify_dir / "inputs.json",
        baseline_outputs=verify_dir / "baseline_outputs.json", seq_len=cfg.seq_len))
