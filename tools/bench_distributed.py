"""One process vs several: the same streamed run on a Llama-2-7B-shaped checkpoint (issue #17).

Builds (or reuses) tools/bench_pipeline.py's synthetic checkpoint (exact Llama-2-7B shapes,
``--layers`` blocks, random weights, no tokenizer: the figures are time, memory and traffic),
then runs ``eora_export.engine.run`` twice on identical token ids:

* ``1 x T``: one process with T torch threads;
* ``N x 1``: ``torchrun --nproc-per-node N`` (gloo), one thread each — the same cores.

and reports side by side: wall time, peak RSS per rank, bytes each rank sent to the next, and
whether the two output folders are identical. Default: 2 blocks, 2 threads vs 2 processes,
32 × 512 calibration tokens, rank 128, INT4 RTN g128, EoRA alone (``--no-compare``).

    python tools/bench_distributed.py                       # writes <work>/bench_distributed.json
    python tools/bench_distributed.py --layers 4 --procs 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def _cfg(args: argparse.Namespace, ckpt: Path, out: Path):
    from eora_export.config import RunConfig

    return RunConfig(model=str(ckpt), out=out, method="eora", rank=args.rank, quant="rtn", bits=4, group_size=128,
                     calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=0,
                     compare=False, sweep_ranks=[], stream=True, act_dtype="float16", device="cpu",
                     work_dir=out.with_name(out.name + ".work"))


def worker(args: argparse.Namespace) -> int:
    """One rank (or the single process): the run, then its own figures as JSON."""
    from eora_export.engine import run

    torch.set_num_threads(args.threads)
    ckpt, out = Path(args.ckpt), Path(args.out)
    ids = torch.randint(3, 32000, (args.calib_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    result = run(_cfg(args, ckpt, out), progress=False, calib_windows=ids, evaluate=False)
    wall = time.perf_counter() - t
    rank = int(os.environ.get("RANK", "0"))
    figures = {"rank": rank, "wall_s": wall, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if result.report is not None:
        figures["engine"] = {k: v for k, v in result.report["engine"].items() if k != "block_timings"}
        figures["block_timings"] = result.report["engine"]["block_timings"]
    (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(figures, indent=1))
    return 0


def _launch(args: argparse.Namespace, ckpt: Path, out: Path, procs: int, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    me = [str(Path(__file__).resolve()), "--worker", "--ckpt", str(ckpt), "--out", str(out), "--threads", str(threads),
          "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
          "--batch-size", str(args.batch_size)]
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *me]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t
    rows = [json.loads((out.parent / f"{out.name}.rank{r}.json").read_text()) for r in range(procs)]
    for r in rows:
        r["launch_wall_s"] = wall
    return rows


def _compare_outputs(a: Path, b: Path) -> dict[str, float]:
    """Share of differing codes, for the compressed weights and for the factors. Runs with different
    thread counts round BLAS reductions differently, which moves some factor codes; equal thread
    counts give identical files (tests/test_distributed.py)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "base/quantization.safetensors"), load_file(b / "base/quantization.safetensors")
    out = {}
    for kind, pick in (("weights", lambda k: ".weight_" in k), ("factors", lambda k: ".lora_" in k)):
        keys = [k for k in ta if pick(k)]
        total = sum(ta[k].numel() for k in keys)
        out[kind] = sum(int((ta[k] != tb[k]).sum()) for k in keys) / max(total, 1)
    # What the codes compute: each layer's activation-weighted error after EoRA.
    ra, rb = (json.loads((x / "report.json").read_text())["layers"] for x in (a, b))
    out["layer_error_rel"] = max(abs(x["error_after"]["eora"] - y["error_after"]["eora"]) / max(x["error_after"]["eora"], 1e-30)
                                 for x, y in zip(ra, rb, strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--procs", type=int, default=2, help="processes of the distributed run, one thread each (default 2)")
    p.add_argument("--work", default="/tmp/eora-bench", help="folder for the checkpoint and outputs")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="where to write the figures (default <work>/bench_distributed.json)")
    # internal: one rank of a launch
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    from bench_pipeline import LLAMA2_7B, _checkpoint_ok, build_checkpoint

    work = Path(args.work)
    ckpt = work / f"llama2-7b-shaped-{args.layers}L"
    if not _checkpoint_ok(ckpt, args.layers):
        proc = mp.get_context("spawn").Process(target=build_checkpoint, args=(ckpt, dict(LLAMA2_7B), args.layers, 0))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"bench: building the synthetic checkpoint failed (exit {proc.exitcode})")
    one = _launch(args, ckpt, work / "one", 1, args.procs)
    many = _launch(args, ckpt, work / "many", args.procs, 1)
    result = {
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
        "settings": {k: getattr(args, k) for k in ("layers", "procs", "calib_samples", "seq_len", "rank", "batch_size")},
        f"1x{args.procs}": one,
        f"{args.procs}x1": many,
        "differing_codes": _compare_outputs(work / "one", work / "many"),
    }
    ranks = many[-1]["engine"]["processes"]["ranks"]
    sent = {r["rank"]: r["bytes_sent"] for r in ranks}
    rss = " / ".join(f"{r['peak_rss_gib']:.2f}" for r in many)
    hidden_bytes = args.calib_samples * args.seq_len * LLAMA2_7B["hidden_size"] * 2
    lines = [
        f"{'run':<10} {'wall s':>8} {'peak RSS GiB per rank':>24}",
        f"{'1 x ' + str(args.procs):<10} {one[0]['launch_wall_s']:>8.0f} {one[0]['peak_rss_gib']:>24.2f}",
        f"{str(args.procs) + ' x 1':<10} {many[0]['launch_wall_s']:>8.0f} {rss:>24}",
        f"speed-up {one[0]['launch_wall_s'] / many[0]['launch_wall_s']:.2f}x; bytes sent to the next rank: "
        + ", ".join(f"rank {r}: {b / 2**20:.0f} MiB" for r, b in sent.items())
        + f" (one [n, seq, hidden] float16 tensor: {hidden_bytes / 2**20:.0f} MiB)",
        "codes differing between the runs: weights {:.4%}, factors {:.2%} (thread counts differ); per-layer error "
        "after EoRA agrees to {:.1e} relative".format(result["differing_codes"]["weights"], result["differing_codes"]["factors"],
                                                     result["differing_codes"]["layer_error_rel"]),
    ]
    result["table"] = "\n".join(lines)
    print(result["table"])
    Path(args.json or work / "bench_distributed.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
