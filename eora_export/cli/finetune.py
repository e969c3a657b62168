"""``eora-export finetune``: train the low-rank factors of an export on a frozen compressed base.

Flags and the order of the outputs only; the work is :mod:`eora_export.finetune` (job.py: steps,
train.py: training, folders.py: folders).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..config import FORMATS, DeployConfig
from ..errors import UsageError
from .parser import Parser, add_deploy_options, from_args, output_format

FINETUNE_FORMATS = ("dir", "onnx", "plan", "triton")


def build_parser() -> argparse.ArgumentParser:
    from ..finetune.train import INITS

    p = Parser(
        prog="eora-export finetune",
        description="Fine-tune the low-rank factors of an eora-export adapter on text, the compressed base frozen "
        "(QLoRA-style: AdamW on A and B only), then re-quantize them and write the same outputs as the export.",
    )
    p.add_argument("--model", default="demo", help="the FP16 model the base was compressed from (tokenizer, FP16 reference perplexity)")
    p.add_argument("--adapter", type=Path, required=True, help="adapter/ folder of an eora-export output (or the output folder)")
    p.add_argument("--base", type=Path, help="compressed base folder (default: base/ beside the adapter folder)")
    p.add_argument("--out", type=Path, default=Path("eora-finetune"),
                   help="output: a folder, X.onnx, X.plan, or a Triton repository with --format triton (default: eora-finetune)")
    p.add_argument("--format", choices=FORMATS, help=f"output kind: {', '.join(FINETUNE_FORMATS)}; default from --out: "
                   ".onnx -> onnx, .plan -> plan, else dir")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, required=True, help="training text: plain text (blank-line separated documents) or JSONL with a 'text' field")
    g.add_argument("--eval-data", type=Path, help="held-out text for perplexity (default: the last --heldout-fraction of --data)")
    g.add_argument("--heldout-fraction", type=float, default=0.1, help="share of --data windows held out when no --eval-data (default: 0.1)")
    g.add_argument("--eval-samples", type=int, default=64, help="held-out windows evaluated, at most (default: 64)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps; 0 re-writes the input (default: 100)")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per step (default: 8)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the batch order and of the lora init (default: 0)")
    g.add_argument("--init", choices=INITS, default="eora",
                   help="start from the adapter's factors (eora), plain SVD of ΔW (svd, needs --model), or LoRA's A random / B = 0 (lora)")
    g.add_argument("--compare-inits", action="store_true",
                   help="also train from the other inits with the same steps, lr, seed and batches, and report held-out perplexity of each")
    g.add_argument("--lowrank-bits", type=int, help="storage of the trained factors: 4, 8 or 16 (default: what the input adapter used)")
    g.add_argument("--lowrank-group-size", type=int, default=0, help="factor quantization group (default: the input's, else auto)")
    add_deploy_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _quiet() -> None:
    os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _refuse_own_input(out: Path, adapter: Path, base: Path | None) -> None:
    """Writing over the folder being read would swap it out from under the run."""
    out = out.resolve()
    inputs = {adapter.resolve(), adapter.resolve().parent}
    if base is not None:
        inputs |= {base.resolve(), base.resolve().parent}
    if out in inputs:
        raise UsageError(f"--out {out} is the folder the adapter or base is read from; write the fine-tuned output elsewhere")


def finetune_main(argv: list[str]) -> int:
    if "--quiet" in argv:
        _quiet()  # before anything imports tqdm, which reads TQDM_DISABLE once
    from ..deploy.graphs import artifacts_dir
    from ..finetune.folders import write_finetuned
    from ..finetune.job import FinetuneConfig, build_report, compare_inits, output_meta, prepare, train_from
    from ..validate import check_output_location

    args = build_parser().parse_args(argv)
    fmt = output_format(args.format, args.out)
    if fmt not in FINETUNE_FORMATS:
        raise UsageError(f"finetune writes {', '.join(FINETUNE_FORMATS)}; for TensorRT-LLM use the fine-tuned folder's adapter/ "
                         "and base/ with the README's recipe")
    out = artifacts_dir(args.out, fmt)
    check_output_location(out)
    _refuse_own_input(out, args.adapter, args.base)
    cfg = FinetuneConfig(
        adapter=args.adapter, data=args.data, model=args.model, base=args.base, eval_data=args.eval_data,
        heldout_fraction=args.heldout_fraction, eval_samples=args.eval_samples, seq_len=args.seq_len, steps=args.steps,
        lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, seed=args.seed, init=args.init,
        lowrank_bits=args.lowrank_bits, lowrank_group_size=args.lowrank_group_size, compare_inits=args.compare_inits,
    )
    progress = not args.quiet
    t0 = time.perf_counter()
    session = prepare(cfg)
    run = train_from(session, cfg.init, progress)
    comparison = compare_inits(session, {cfg.init: run}, progress) if cfg.compare_inits else None
    report = build_report(session, run, comparison)
    report["timings"]["total_s"] = time.perf_counter() - t0
    curves = {init: r.losses for init, r in (comparison or {cfg.init: run}).items()}
    write_finetuned(out, session.model, session.tokenizer, run.modules, output_meta(session, run), str(session.model_path), report, curves)
    print(report["table"])
    print(f"fine-tuned adapter, compressed checkpoint and report: {out}/")
    if fmt == "dir":
        return 0
    from ..deploy.graphs import write_deployment
    from ..folder import FolderResult

    deploy = from_args(DeployConfig, args, format=fmt, out=args.out)
    return write_deployment(deploy, None, FolderResult(out, session.model_path))
