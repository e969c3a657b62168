"""The main command (``eora-export [flags]``): its options, generated from :class:`RunConfig` and
:class:`DeployConfig`, and the run: compress, compensate, evaluate, write outputs.

The run calls :func:`pipeline.compute` in memory, or :func:`streaming.run_streaming` block by
block for large models; both are looked up at call time (tests replace them).
"""

from __future__ import annotations

import argparse

from .. import __version__
from ..config import DeployConfig, RunConfig
from ..errors import UsageError
from .parser import Parser, add_deploy_options, add_options, from_args, output_format

STREAMED_FORMATS = ("dir", "onnx", "plan", "triton")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="eora-export",
        description="Compress an LLM (INT4 / 2:4 / both), compensate the error with EoRA low-rank "
        "factors, and write deployable outputs. Subcommands: export (graphs/engine from a finished folder), "
        "finetune (train the factors on text, base frozen), compare, inspect, build-plugin (eora-export SUBCOMMAND --help).",
    )
    p.add_argument("--version", action="version", version=f"eora-export {__version__}")
    add_options(p, RunConfig)
    add_deploy_options(p, verify=True, format=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    """The main command on parsed options; returns the exit code."""
    from ..deploy.graphs import artifacts_dir, write_deployment
    from ..pipeline import compute, write_outputs

    fmt = output_format(args.format, args.out)
    deploy = from_args(DeployConfig, args, format=fmt, out=args.out)
    if deploy.kv_cache and fmt == "dir":
        raise UsageError("--kv-cache applies to graph outputs; use --out X.onnx or X.plan")
    cfg = from_args(RunConfig, args, out=artifacts_dir(args.out, fmt), format=fmt, deploy_out=None if fmt == "dir" else args.out)
    if fmt == "trtllm":
        from ..deploy.trtllm import check_trtllm_config

        check_trtllm_config(cfg)  # before minutes of work, not after
    if _streams(cfg):
        return _run_streaming(cfg, deploy, progress=not args.quiet)
    result = compute(cfg, progress=not args.quiet)
    write_outputs(cfg, result)
    print(result.report["table"])
    print(f"report, adapter and compressed checkpoint: {cfg.out}/")
    if fmt != "dir":
        return write_deployment(deploy, cfg, result)
    return 0


def _streams(cfg: RunConfig) -> bool:
    from ..models import resolve_model
    from ..streaming import count_parameters

    if cfg.stream or cfg.resume:
        return True
    try:
        return count_parameters(resolve_model(cfg.model)) > 1e9
    except Exception:  # a broken checkpoint: preflight names the problem in its own words
        return False


def _run_streaming(cfg: RunConfig, deploy: DeployConfig, progress: bool) -> int:
    from ..deploy.graphs import write_deployment
    from ..folder import FolderResult
    from ..models import resolve_model
    from ..streaming import StreamOptions, run_streaming

    fmt = deploy.format
    if fmt not in STREAMED_FORMATS:
        raise UsageError(f"--format {fmt} is not streamed: stream to a folder (--out DIR), then load DIR/base and DIR/adapter "
                         "with the TensorRT-LLM recipe in the README")
    if deploy.verify:
        raise UsageError("--verify compares whole models in memory and is not streamed; drop --verify, then run "
                         "`eora-export compare` on the written graphs")
    # streaming.py stores hidden states as float16 unless told float32; "auto" is the block engine's choice.
    act_dtype = "float16" if cfg.act_dtype == "auto" else cfg.act_dtype
    opts = StreamOptions(inputs=cfg.stream_inputs, act_dtype=act_dtype, device=cfg.device, work_dir=cfg.work_dir, resume=cfg.resume)
    model_path = resolve_model(cfg.model)
    report = run_streaming(model_path, cfg, opts=opts, progress=progress)
    print(report["table"])
    print(f"report, adapter and compressed checkpoint: {cfg.out}/")
    if fmt == "dir":
        return 0
    # The graphs are written from the finished folder, one decoder block in memory at a time.
    return write_deployment(deploy, cfg, FolderResult(cfg.out, model_path))
