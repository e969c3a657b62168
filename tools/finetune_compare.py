#!/usr/bin/env python3
"""Fine-tuning from EoRA vs SVD vs LoRA (B = 0) initialisation, over learning rates.

For each learning rate, trains the factors of an eora-export adapter from each init with
the same steps, seed and batches (eora_export.finetune.job.train_from), and reports the
held-out perplexity of the re-quantized factors at several steps, as a Markdown table
(the README's "Fine-tuning from EoRA" table) and JSON.

Usage (the README's table, ~35 min on one CPU thread)::

    eora-export --model demo --rank 16 --sparsity magnitude --out demo24
    python tools/finetune_compare.py --adapter demo24/adapter --data eora_export/demo_model/calib.txt \\
        --eval-data eora_export/demo_model/heldout.txt --lrs 1e-4,3e-4,1e-3 --steps 200 --eval-at 25,50,100 \\
        --json finetune_compare.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eora_export.finetune.job import FinetuneConfig, prepare, train_from  # noqa: E402
from eora_export.finetune.train import INITS  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def markdown(results: dict, fp16: float, compressed: float, steps: list[int]) -> str:
    """One row per (lr, init): start perplexity, then perplexity after each step count."""
    head = "| lr | init | start | " + " | ".join(f"{s} steps" for s in steps) + " |"
    lines = [f"FP16 {fp16:.2f}, compressed (no factors) {compressed:.2f}; held-out perplexity, factors re-quantized.", "",
             head, "|" + "---|" * (3 + len(steps))]
    for lr, rows in results.items():
        best = {s: min(r["ppl_at"][str(s)] for r in rows.values()) for s in steps}
        for init, r in rows.items():
            cells = [f"**{r['ppl_at'][str(s)]:.2f}**" if r["ppl_at"][str(s)] == best[s] else f"{r['ppl_at'][str(s)]:.2f}" for s in steps]
            lines.append(f"| {lr:g} | {init} | {r['start']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--base", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--eval-data", type=Path)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", type=_floats, default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--eval-at", type=_ints, default=[25, 50, 100], help="also evaluate after these steps")
    p.add_argument("--inits", default=",".join(INITS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the measurements were taken so)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = FinetuneConfig(adapter=args.adapter, data=args.data, model=args.model, base=args.base, eval_data=args.eval_data,
                         eval_samples=args.eval_samples, seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size,
                         seed=args.seed, compare_inits=True)
    t0 = time.perf_counter()
    session = prepare(cfg)
    steps = sorted({s for s in args.eval_at if 0 < s < args.steps} | {args.steps})
    results: dict[float, dict] = {}
    for lr in args.lrs:
        session.cfg = dataclasses.replace(cfg, lr=lr)
        results[lr] = {}
        for init in args.inits.split(","):
            run = train_from(session, init, progress=True, eval_at=tuple(s for s in steps if s < args.steps))
            at = {str(s): v for s, v in run.ppl_at.items()} | {str(args.steps): run.ppl["trained_requantized"]}
            results[lr][init] = {"start": run.ppl["start"], "ppl_at": at, "trained_fp16": run.ppl["trained"],
                                 "loss_first": run.losses[0] if run.losses else None, "loss_last": run.losses[-1] if run.losses else None,
                                 "seconds": run.seconds}
            print(f"lr {lr:g} {init}: start {run.ppl['start']:.2f} -> " + ", ".join(f"{k}: {v:.2f}" for k, v in at.items())
                  + f" ({run.seconds:.0f} s)", flush=True)
    table = markdown(results, session.ppl["fp16"], session.ppl["compressed"], steps)
    print(table)
    if args.json:
        out = {"config": {k: str(v) for k, v in vars(args).items()}, "fp16": session.ppl["fp16"], "compressed": session.ppl["compressed"],
               "lowrank_bits": session.lowrank_bits, "train_windows": int(session.train.shape[0]),
               "heldout_windows": int(session.held.shape[0]), "results": {str(k): v for k, v in results.items()},
               "total_s": time.perf_counter() - t0, "table": table}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
