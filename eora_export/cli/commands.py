"""Subcommands beside the main export: compare, inspect, build-plugin, export."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..config import FORMATS, DeployConfig
from ..errors import MissingDependency, MissingInput, UsageError
from .parser import Parser, add_deploy_options, from_args, output_format


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return Parser(prog=f"eora-export {prog}", description=description)


def compare_main(argv: list[str]) -> int:
    """Polygraphy comparison of existing ONNX files on held-out text."""
    from ..calibration import read_texts, token_windows
    from ..deploy.verify import compare_models, polygraphy_command
    from ..models import DEMO_DIR

    p = _parser("compare", "Compare compensated ONNX models with the FP16 baseline: max/mean |Δlogits|, "
                "top-1 agreement and perplexity, through Polygraphy (ONNX Runtime on the CPU).")
    p.add_argument("--baseline", type=Path, required=True, help="FP16 baseline ONNX (X.fp16.onnx)")
    p.add_argument("models", nargs="+", metavar="NAME=FILE.onnx", help="models to compare, e.g. eora=demo.onnx")
    p.add_argument("--tokenizer", type=Path, default=DEMO_DIR, help="tokenizer folder (default: the demo's)")
    p.add_argument("--text", type=Path, default=DEMO_DIR / "heldout.txt", help="held-out text (default: the demo's)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("compare-out"), help="where the Polygraphy JSON goes")
    p.add_argument("--plugin-lib", help="libeora_plugin.so for --trt and the replay command (default: $EORA_PLUGIN_LIB or the built one)")
    p.add_argument("--trt", action="store_true",
                   help="also run each model as a TensorRT engine through Polygraphy against the saved baseline outputs "
                   "(needs TensorRT, a GPU and the plugin; exits 1 if a check fails)")
    args = p.parse_args(argv)
    models = {}
    for spec in args.models:
        name, sep, path = spec.partition("=")
        name, path = (name, Path(path)) if sep else (Path(spec).stem, Path(spec))
        models[name] = path
    for path in [args.baseline, *models.values()]:
        if not path.is_file():
            raise MissingInput(f"{path} not found; give existing ONNX files (eora-export --out X.onnx writes them)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    windows = token_windows(tok, read_texts(args.text), args.seq_len, args.samples).numpy()
    if windows.shape[0] == 0:
        raise UsageError(f"{args.text} is shorter than one {args.seq_len}-token window; lower --seq-len")
    report = compare_models(args.baseline, models, windows, args.out)
    print(report.table())
    plugin = _compare_plugin(args.plugin_lib)

    def replay(path: Path) -> str:
        return polygraphy_command(path, plugin, inputs_json=args.out / "inputs.json",
                                  baseline_outputs=args.out / "baseline_outputs.json", seq_len=args.seq_len)

    if not args.trt:
        print("replay on a GPU machine with TensorRT:\n  " + replay(next(iter(models.values()))))
        return 0
    return _compare_trt(models, plugin, replay, args.out)


def _compare_plugin(flag: str | None) -> Path | None:
    from ..deploy.plugin import PluginError, find_library

    if flag:
        return Path(flag)
    try:
        return find_library()
    except PluginError:
        return None


def _compare_trt(models: dict[str, Path], plugin: Path | None, replay, out: Path) -> int:
    """Each model through ``polygraphy run --trt`` against the saved baseline outputs."""
    import shlex
    import subprocess

    from ..deploy.engine_build import missing_tensorrt_reason
    from ..deploy.verify import plugin_path

    reason = missing_tensorrt_reason()
    if reason is None and shutil.which("polygraphy") is None:
        reason = "the polygraphy command is not on PATH"
    if reason is not None:
        raise MissingDependency(f"{reason}; the ONNX Runtime comparison is saved in {out}/, replay it on a GPU machine: "
                                + replay(next(iter(models.values()))))
    if plugin is None or not plugin.is_file():
        raise MissingInput(f"plugin library {plugin_path(plugin)} not found; build it with `eora-export build-plugin` "
                           "or pass --plugin-lib")
    failed = []
    for name, path in models.items():
        rc = subprocess.run(shlex.split(replay(path)), check=False).returncode
        print(f"TensorRT {name}: {'matches the baseline within tolerance' if rc == 0 else f'check FAILED (polygraphy exit {rc})'}")
        if rc:
            failed.append(name)
    return 1 if failed else 0


def build_plugin_main(argv: list[str]) -> int:
    """Compile libeora_plugin.so with CMake + nvcc against the TensorRT headers."""
    from ..deploy.plugin import PluginError, build_plugin

    p = _parser("build-plugin", "Build trt_plugins/ (CUDA + TensorRT headers) into libeora_plugin.so.")
    p.add_argument("--build-dir", type=Path, help="CMake build folder (default: build/trt_plugins in the repository)")
    args = p.parse_args(argv)
    try:
        lib = build_plugin(args.build_dir) if args.build_dir else build_plugin()
    except PluginError as e:
        raise MissingDependency(str(e)) from None
    print(lib)
    return 0


def inspect_main(argv: list[str]) -> int:
    from ..describe import describe

    p = _parser("inspect", "Print what is inside an eora-export output: ONNX graph, engine, folder, adapter, Triton repository.")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if not args.path.exists():
        raise MissingInput(f"{args.path} not found")
    print(describe(args.path, as_json=args.json))
    return 0


def export_main(argv: list[str]) -> int:
    """Deployable outputs (ONNX, engine, Triton) from a finished output folder, one block in memory at a time."""
    from ..deploy.graphs import write_deployment
    from ..folder import FolderResult, original_model_path, read_quantization
    from ..models import resolve_model

    p = _parser("export", "Write ONNX graphs, a TensorRT engine or a Triton repository from an eora-export output folder "
                "(in-memory, streamed or fine-tuned). Layers are read one decoder block at a time, so 7B folders fit in memory.")
    p.add_argument("folder", type=Path, help="an eora-export output folder (holds base/ and adapter/)")
    p.add_argument("--out", type=Path, required=True, help="X.onnx, X.plan, or a Triton repository folder with --format triton")
    p.add_argument("--format", choices=[f for f in FORMATS if f in ("onnx", "plan", "triton")],
                   help="default from --out: .onnx -> onnx, .plan -> plan")
    p.add_argument("--model", help="the original FP16 model, for the baseline graph (default: the path the folder records)")
    add_deploy_options(p)
    args = p.parse_args(argv)
    fmt = output_format(args.format, args.out)
    if fmt == "dir":
        raise UsageError(f"--out {args.out} names no deployable output; give X.onnx, X.plan, or --format triton")
    if not args.folder.is_dir():
        raise MissingInput(f"{args.folder} is not a folder; give the --out folder of an eora-export run")
    read_quantization(args.folder / "base")
    model_path = resolve_model(args.model) if args.model else original_model_path(args.folder)
    if model_path is None:
        raise MissingInput(f"the model {args.folder} was made from is not found; pass --model PATH for the FP16 baseline graph")
    deploy = from_args(DeployConfig, args, format=fmt, out=args.out)
    return write_deployment(deploy, None, FolderResult(args.folder, model_path))
