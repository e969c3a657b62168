"""The main command (``eora-export [flags]``): its options, generated from :class:`RunConfig` and
:class:`DeployConfig`, and the run: compress, compensate, evaluate, write outputs.

The run is :func:`eora_export.engine.run` (looked up at call time: tests replace it); graph
outputs follow from its in-memory model, or for streamed runs from the finished folder.
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
    from ..engine import is_streamed
    from ..engine import run as run_engine
    from ..folder import FolderResult
    from ..models import resolve_model

    fmt = output_format(args.format, args.out)
    deploy = from_args(DeployConfig, args, format=fmt, out=args.out)
    if deploy.kv_cache and fmt == "dir":
        raise UsageError("--kv-cache applies to graph outputs; use --out X.onnx or X.plan")
    cfg = from_args(RunConfig, args, out=artifacts_dir(args.out, fmt), format=fmt, deploy_out=None if fmt == "dir" else args.out)
    if fmt == "trtllm":
        from ..deploy.trtllm import check_trtllm_config

        check_trtllm_config(cfg)  # before minutes of work, not after
    cfg.validate()
    streamed = is_streamed(cfg, resolve_model(cfg.model))
    if streamed and fmt not in STREAMED_FORMATS:
        raise UsageError(f"--format {fmt} is not streamed: stream to a folder (--out DIR), then load DIR/base and DIR/adapter "
                         "with the TensorRT-LLM recipe in the README")
    if streamed and deploy.verify:
        raise UsageError("--verify compares whole models in memory and is not streamed; drop --verify, then run "
                         "`eora-export compare` on the written graphs")
    result = run_engine(cfg, progress=not args.quiet)
    if result.report is None:
        return 0  # a torchrun rank other than the last: the last one reports and writes the outputs
    print(result.report["table"])
    print(f"report, adapter and compressed checkpoint: {cfg.out}/")
    if fmt == "dir":
        return 0
    # Streamed runs keep no model in memory: the graphs are written from the finished folder,
    # one decoder block in memory at a time.
    return write_deployment(deploy, cfg, result if result.model is not None else FolderResult(cfg.out, result.model_path))
