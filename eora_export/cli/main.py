"""The ``eora-export`` command: parse flags, run the pipeline, print a summary.

Every failure a user can cause prints one line and exits with the code of its class
(errors.py); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import INTERNAL_ERROR_EXIT_CODE, EoraError, Interrupted, UsageError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, usage exit code
        raise UsageError(f"{message} (see eora-export --help)")


FORMATS = ("dir", "onnx", "plan", "triton", "trtllm")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="eora-export",
        description="Compress an LLM (INT4 / 2:4 / both), compensate the error with EoRA low-rank "
        "factors, and write deployable outputs. Subcommands: export (graphs/engine from a finished folder), "
        "finetune (train the factors on text, base frozen), compare, inspect, build-plugin (eora-export SUBCOMMAND --help).",
    )
    p.add_argument("--version", action="version", version=f"eora-export {__version__}")
    p.add_argument("--model", default="demo",
                   help="'demo', a local Hugging Face folder, or an alias such as llama2-7b (looked up in the local HF cache)")
    p.add_argument("--out", type=Path, default=Path("eora-out"),
                   help="output: a folder, X.onnx, or X.plan (default: eora-out)")
    p.add_argument("--format", choices=FORMATS,
                   help="output kind; default from --out: .onnx -> onnx, .plan -> plan, else dir")
    g = p.add_argument_group("compression")
    g.add_argument("--quant", choices=["rtn", "gptq", "awq", "none"], default="rtn", help="weight quantizer (default: rtn)")
    g.add_argument("--bits", type=int, default=4, help="weight bits: 4 or 3 (default: 4)")
    g.add_argument("--group-size", type=int, default=128, help="quantization group along the input dim (default: 128)")
    g.add_argument("--sparsity", choices=["none", "sparsegpt", "magnitude"], default="none", help="2:4 sparsity (default: none)")
    g.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="compress only Linears matching this fnmatch pattern (repeatable)")
    g.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="leave Linears matching this pattern in FP16 (repeatable)")
    g = p.add_argument_group("compensation")
    g.add_argument("--method", choices=["eora", "svd", "none", "lsi", "lsi+eora", "eora-fb"], default="eora",
                   help="eora, svd, none, or LSI (learnable singular-value increments, trained block by block) "
                   "alone or followed by EoRA; eora-fb: error-feedback EoRA, each layer fitted to the FP outputs "
                   "from the inputs its compressed and compensated upstream produces (default: eora)")
    g.add_argument("--lsi-epochs", type=int, default=5, help="LSI epochs per block (default: 5)")
    g.add_argument("--lsi-lr", type=float, default=1e-3, help="LSI learning rate, in units of the mean singular value (default: 1e-3)")
    g.add_argument("--rank", type=int, default=16,
                   help="rank of the low-rank residual; clamped per layer to min(out, in) (default: 16)")
    g.add_argument("--lowrank-bits", type=int, default=4, help="storage of the factors: 4, 8 or 16 (default: 4)")
    g.add_argument("--lowrank-group-size", type=int, default=0,
                   help="factor quantization group (default: largest of 128..2 dividing rank and width)")
    g.add_argument("--fast", action="store_true", help="Cholesky + randomized SVD instead of eigh + full SVD (big models)")
    g.add_argument("--rank-budget", metavar="RANK|BYTES",
                   help="EoRA factor budget, an average rank (32) or bytes (1.5MB), spread across layers by measured "
                   "validation gain per byte; layers that gain nothing get rank 0 (default: uniform --rank)")
    g.add_argument("--val-samples", type=int, default=32,
                   help="calibration windows after the fitting ones, held out to allocate --rank-budget (default: 32)")
    g = p.add_argument_group("calibration and evaluation")
    g.add_argument("--calib", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="calibration text or JSONL ('text' field); repeat to mix sets with weights (default: built-in English text)")
    g.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default: 128)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    g.add_argument("--eval-file", help="in-domain held-out text for perplexity and KL to FP16 (default: the demo's held-out split)")
    g.add_argument("--ood-file",
                   help="out-of-domain held-out text, reported beside --eval-file; 'none' for none (default: the demo's "
                   "shipped one for --model demo, none for other models)")
    g.add_argument("--eval-samples", type=int,
                   help="held-out sequences per text; more trades time for a tighter interval (default: all for the "
                   "demo, 64 otherwise)")
    g.add_argument("--sweep-ranks", type=_int_list,
                   help="ranks of the KL- and perplexity-vs-rank plot, on the first 32 held-out windows, e.g. 4,8,16,32 "
                   "(default: around --rank); '' for none")
    g.add_argument("--no-compare", action="store_true", help="evaluate only --method, not SVD beside it")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    add_export_flags(p, verify=True)
    g = p.add_argument_group("large models (block-by-block streaming)")
    g.add_argument("--stream", action="store_true",
                   help="process one decoder block at a time from memory-mapped safetensors (automatic above 1B parameters)")
    g.add_argument("--resume", action="store_true", help="streaming: continue an interrupted run from its last finished block")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="streaming: where the math runs (default: auto)")
    g.add_argument("--work-dir", type=Path, help="streaming: per-block work folder (default: <out>.stream-work)")
    g.add_argument("--stream-inputs", choices=["fp", "compressed"], default="fp",
                   help="streaming: calibrate each block on FP inputs, or on the compressed blocks' outputs (sequential)")
    g.add_argument("--stream-act-dtype", choices=["float16", "float32"], default="float16",
                   help="streaming: storage of hidden states between blocks (default: float16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def add_export_flags(p: argparse.ArgumentParser, verify: bool = False) -> None:
    """Flags of the deployable outputs, shared by the main command and ``eora-export export``."""
    g = p.add_argument_group("export (ONNX / TensorRT / Triton)")
    if verify:
        g.add_argument("--verify", action="store_true",
                       help="with ONNX outputs: compare FP16 baseline, compressed, SVD and EoRA graphs through Polygraphy")
    g.add_argument("--kv-cache", action="store_true", help="export graphs with past/present key-value inputs and outputs")
    g.add_argument("--plugin-lib", type=Path, help="libeora_plugin.so (default: $EORA_PLUGIN_LIB or the built one)")
    g.add_argument("--max-batch", type=int, default=8, help="engine profile: largest batch (default: 8)")
    g.add_argument("--max-seq", type=int, default=1024, help="engine profile: longest sequence (default: 1024)")
    g.add_argument("--opt-seq", type=int, default=128, help="engine profile: sequence length to tune for (default: 128)")
    g.add_argument("--timing-cache", type=Path, help="TensorRT timing cache reused between builds (default: beside the plan)")
    g.add_argument("--triton-name", default="eora_llm", help="model name in the Triton repository (default: eora_llm)")


def output_format(args: argparse.Namespace) -> str:
    """The output kind: --format, else from --out's suffix; a graph kind needs a graph file name."""
    fmt = args.format or {".onnx": "onnx", ".plan": "plan", ".engine": "plan"}.get(args.out.suffix, "dir")
    if fmt in ("onnx", "plan") and args.out.suffix not in (".onnx", ".plan", ".engine"):
        raise UsageError(f"--format {fmt} needs --out ending in .{fmt}, got {args.out}")
    return fmt


def _run(args: argparse.Namespace) -> int:
    from .deploy.graphs import artifacts_dir, write_deployment
    from .pipeline import RunConfig, compute, write_outputs

    fmt = output_format(args)
    if args.kv_cache and fmt == "dir":
        raise UsageError("--kv-cache applies to graph outputs; use --out X.onnx or X.plan")
    cfg = RunConfig(
        model=args.model, out=artifacts_dir(args.out, fmt), method=args.method, rank=args.rank,
        lowrank_bits=args.lowrank_bits, lowrank_group_size=args.lowrank_group_size, quant=args.quant, bits=args.bits,
        group_size=args.group_size, sparsity=args.sparsity, calib=args.calib, calib_samples=args.calib_samples,
        seq_len=args.seq_len, eval_file=args.eval_file, eval_samples=args.eval_samples, ood_file=args.ood_file,
        sweep_ranks=args.sweep_ranks,
        compare=not args.no_compare, lsi_epochs=args.lsi_epochs, lsi_lr=args.lsi_lr, fast=args.fast,
        rank_budget=args.rank_budget, val_samples=args.val_samples, only=args.only, skip=args.skip,
        batch_size=args.batch_size, seed=args.seed, format=fmt, deploy_out=None if fmt == "dir" else args.out,
    )
    if fmt == "trtllm":
        from .deploy.trtllm import check_trtllm_config

        check_trtllm_config(cfg)  # before minutes of work, not after
    if _streams(args):
        return _run_streaming(args, fmt, cfg)
    result = compute(cfg, progress=not args.quiet)
    write_outputs(cfg, result)
    print(result.report["table"])
    print(f"report, adapter and compressed checkpoint: {cfg.out}/")
    if fmt != "dir":
        return write_deployment(args, fmt, cfg, result)
    return 0


def _streams(args: argparse.Namespace) -> bool:
    from .models import resolve_model
    from .streaming import count_parameters

    if args.stream or args.resume:
        return True
    try:
        return count_parameters(resolve_model(args.model)) > 1e9
    except Exception:  # a broken checkpoint: preflight names the problem in its own words
        return False


STREAMED_FORMATS = ("dir", "onnx", "plan", "triton")


def _run_streaming(args: argparse.Namespace, fmt: str, cfg) -> int:
    from .deploy.graphs import write_deployment
    from .models import resolve_model
    from .outputs import FolderResult
    from .streaming import StreamOptions, run_streaming

    if fmt not in STREAMED_FORMATS:
        raise UsageError(f"--format {fmt} is not streamed: stream to a folder (--out DIR), then load DIR/base and DIR/adapter "
                         "with the TensorRT-LLM recipe in the README")
    if getattr(args, "verify", False):
        raise UsageError("--verify compares whole models in memory and is not streamed; drop --verify, then run "
                         "`eora-export compare` on the written graphs")
    opts = StreamOptions(inputs=args.stream_inputs, act_dtype=args.stream_act_dtype, device=args.device,
                         work_dir=args.work_dir, resume=args.resume)
    model_path = resolve_model(args.model)
    report = run_streaming(model_path, cfg, opts=opts, progress=not args.quiet)
    print(report["table"])
    print(f"report, adapter and compressed checkpoint: {cfg.out}/")
    if fmt == "dir":
        return 0
    # The graphs are written from the finished folder, one decoder block in memory at a time.
    return write_deployment(args, fmt, cfg, FolderResult(cfg.out, model_path))


def _subcommand(argv: list[str]) -> int | None:
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    import importlib

    module_name, func = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(module_name, __package__), func)(argv[1:])


SUBCOMMANDS = {
    "compare": (".commands", "compare_main"),
    "inspect": (".commands", "inspect_main"),
    "build-plugin": (".commands", "build_plugin_main"),
    "finetune": (".finetune_cli", "finetune_main"),
    "export": (".commands", "export_main"),
}


_signalled = False  # Ctrl-C or SIGTERM arrived during this run


def _on_signal(signum, frame) -> None:
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="eora-export: %(message)s")
    global _signalled
    _signalled = False
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv, debug)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str], debug: bool) -> int:
    try:
        code = _subcommand(argv)
        if code is not None:
            return code
        args = build_parser().parse_args(argv)
        if args.quiet:
            import os

            os.environ["TQDM_DISABLE"] = "1"
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return _run(args)
    except EoraError as e:
        if debug:
            raise
        print(f"eora-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `eora-export inspect X | head`: the reader left; nothing to report.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return _interrupted(debug)
    except MemoryError:
        print("eora-export: error: out of memory; use --fast, fewer --calib-samples, or a bigger machine", file=sys.stderr)
        return INTERNAL_ERROR_EXIT_CODE
    except OSError as e:
        if _signalled:
            return _interrupted(debug)
        if debug:
            raise
        print(f"eora-export: error: {e.strerror or e} ({e.filename or 'I/O'}); check the path, permissions and free disk space", file=sys.stderr)
        return 4
    except Exception as e:
        if _signalled:
            # The interrupt landed inside code that turns it into another error (a C extension's
            # module init reports "ImportError: initialization failed"): it is still an interrupt.
            return _interrupted(debug)
        if debug:
            raise
        print(f"eora-export: internal error: {type(e).__name__}: {e} (rerun with --debug and report it)", file=sys.stderr)
        return INTERNAL_ERROR_EXIT_CODE


def _interrupted(debug: bool) -> int:
    if debug:
        raise
    print("eora-export: interrupted; no partial output was written", file=sys.stderr)
    return Interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
