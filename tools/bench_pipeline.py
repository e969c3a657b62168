"""Benchmark the streaming pipeline on a Llama-2-7B-shaped checkpoint (GitHub issue #8).

Builds a synthetic checkpoint with Llama-2-7B's exact shapes (hidden 4096, intermediate
11008, 32 heads, vocab 32000) but only ``--layers`` decoder blocks, random N(0, 0.02)
weights in float16, sharded safetensors + index (one shard per block, as the real
checkpoint's ~10 GB shards would be streamed). Calibrates on random token ids (no
tokenizer needed: the figures are about time and memory, not accuracy), runs
:func:`eora_export.engine.run` (streamed), and reports per block:

* wall time and its split: load, calibration forward, Gram accumulation, compression
  (INT4 RTN + clip search), and inside EoRA: Gram root (Cholesky / eigh), SVD, whitening
  + unwhitening, factor quantization, error metrics; plus writing;
* peak RSS (psutil sampling every 50 ms, and ``getrusage`` for the whole process);
* the extrapolation to 32 blocks (a full 7B model).

Issue #8 targets: peak RSS ≤ 12 GiB for a 7B-shaped model; EoRA for one 7B block
(7 Linears, rank 128) ≤ 60 s on a 2-core machine, calibration forward excluded.

    python tools/bench_pipeline.py                     # 2 blocks, 32 × 512 tokens, rank 128
    python tools/bench_pipeline.py --layers 1 --export         # + the ONNX graphs from the folder
    python tools/bench_pipeline.py --layers 1 --calib-samples 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
FULL_DEPTH = 32
GIB = 1024**3


# --------------------------------------------------------------------------------------
# The synthetic checkpoint
# --------------------------------------------------------------------------------------


def _layer_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return [
        ("self_attn.q_proj.weight", (h, h)),
        ("self_attn.k_proj.weight", (kv, h)),
        ("self_attn.v_proj.weight", (kv, h)),
        ("self_attn.o_proj.weight", (h, h)),
        ("mlp.gate_proj.weight", (f, h)),
        ("mlp.up_proj.weight", (f, h)),
        ("mlp.down_proj.weight", (h, f)),
        ("input_layernorm.weight", (h,)),
        ("post_attention_layernorm.weight", (h,)),
    ]


def build_checkpoint(folder: Path, shape: dict, layers: int, seed: int = 0) -> None:
    """Sharded float16 checkpoint, written one tensor at a time (a few hundred MB of RAM).

    shape: the config fields (``LLAMA2_7B``), passed explicitly so a spawned builder
    process uses the caller's values."""
    from eora_export.safetensors_io import SafetensorsWriter

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**shape, "num_hidden_layers": layers}
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (v, h))]]
    shards += [[(f"model.layers.{i}.{k}", s) for k, s in _layer_shapes(cfg)] for i in range(layers)]
    shards.append([("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        specs = [(k, torch.float16, s) for k, s in shard]
        with SafetensorsWriter(folder / fname, specs, {"format": "pt"}) as w:
            for k, s in shard:
                # Realistic scale: N(0, 0.02) like Llama's initialisation; RMSNorm gains of 1.
                t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02
                w.write(k, t.to(torch.float16))
                weight_map[k] = fname
                total += math.prod(s) * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def _checkpoint_ok(folder: Path, layers: int) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
        index = json.loads((folder / "model.safetensors.index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    same = {k: cfg.get(k) for k in LLAMA2_7B} == LLAMA2_7B and cfg.get("num_hidden_layers") == layers
    return same and all((folder / f).is_file() for f in set(index["weight_map"].values()))


# --------------------------------------------------------------------------------------
# Instrumentation: where the time goes inside compensation
# --------------------------------------------------------------------------------------


class Timers:
    """Wraps functions by attribute (module, name) and sums their wall time per key."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}  # wall
        self.cpu: dict[str, float] = {}  # process CPU seconds (all threads)
        self._patches: list[tuple[object, str, object]] = []
        self._active: set[str] = set()

    def wrap(self, owner: object, name: str, key: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            if key in timers._active:  # e.g. svd_lowrank calls linalg.svd: count the outer call only
                return original(*args, **kwargs)
            timers._active.add(key)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            try:
                return original(*args, **kwargs)
            finally:
                timers._active.discard(key)
                timers.seconds[key] = timers.seconds.get(key, 0.0) + time.perf_counter() - t0
                timers.cpu[key] = timers.cpu.get(key, 0.0) + _cpu_seconds() - c0

        setattr(owner, name, timed)
        self._patches.append((owner, name, original))

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        out, self.seconds = self.seconds, {}
        cpu, self.cpu = self.cpu, {}
        return out, cpu

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


@contextlib.contextmanager
def instrumented(error_metrics: bool = True) -> Iterator[Timers]:
    """Time compensate_layers' parts without changing them (patched for this run only).

    error_metrics=False: a what-if that replaces the diagnostic tr(E G Eᵀ) (reported per
    layer, not used by the factors) with NaN, to measure the EoRA core alone. On the fast
    path (--fast, big models) it is computed from the whitened M = ΔW R the factors need
    anyway (r · in² per Linear); on the exact path it costs two dense out × in² products.
    """
    from eora_export.compensate import apply, layerwise
    from eora_export.compensate import eora as eora_math
    from eora_export.engine import walk as engine_walk

    t = Timers()
    # Whole phases, for their CPU seconds (streaming's own timings are wall time).
    t.wrap(engine_walk, "gram_forward", "phase_calib_forward")
    t.wrap(engine_walk, "compress_model", "phase_compress")
    t.wrap(layerwise, "compensate_layers", "phase_eora")
    if not error_metrics:
        for name in ("weighted_error", "whitened_error"):
            original = getattr(apply, name)
            setattr(apply, name, lambda *a, **k: float("nan"))
            t._patches.append((apply, name, original))
    t.wrap(apply, "gram_root", "root")  # Cholesky (or eigh fallback) of each shared Gram
    t.wrap(torch.linalg, "cholesky_ex", "cholesky")
    t.wrap(torch.linalg, "eigh", "eigh")
    t.wrap(apply, "whiten", "whiten")  # fast path: M = ΔW R in float32
    t.wrap(apply, "eora_factors_from_whitened", "factors")  # SVD of M + unwhitening (exact path: M's product is in "other")
    t.wrap(eora_math, "randomized_svd", "svd")
    t.wrap(torch.linalg, "svd", "svd")
    t.wrap(apply, "factor_module", "factor_quant")  # rounding the factors (with --lowrank-quant gptq: GPTQ of A and B)
    t.wrap(apply, "weighted_error", "error_metrics")  # tr(E G Eᵀ), before and after
    t.wrap(apply, "whitened_error", "error_metrics")
    try:
        yield t
    finally:
        t.restore()


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class RssSampler:
    """Peak resident set size, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0
        self.window_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self.window_peak = max(self.window_peak, rss)
            self._stop.wait(self._interval)

    def take_window(self) -> int:
        out, self.window_peak = self.window_peak, self._proc.memory_info().rss
        return out

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

COLUMNS = [
    ("wall", "total_s"),
    ("load", "load_s"),
    ("calib fwd", "forward_s"),
    ("gram", "gram_s"),
    ("compress", "compress_s"),
    ("EoRA", "compensate_s"),
    ("root", "root"),
    ("svd", "svd"),
    ("whiten", "whiten"),
    ("f.quant", "factor_quant"),
    ("err", "error_metrics"),
    ("write", "write_s"),
]


def _split(stream_t: dict, inner: dict) -> dict[str, float]:
    row = {k: stream_t.get(k, 0.0) for k in ("total_s", "load_s", "forward_s", "gram_s", "compress_s", "compensate_s", "forward_out_s", "write_s")}
    row["root"] = inner.get("root", 0.0)
    row["cholesky"] = inner.get("cholesky", 0.0)
    row["eigh"] = inner.get("eigh", 0.0)
    row["svd"] = inner.get("svd", 0.0)
    # ΔW R (its own timer on the fast path, inside "factors" on the exact one) and the R⁻¹ solve.
    row["whiten"] = inner.get("whiten", 0.0) + inner.get("factors", 0.0) - inner.get("svd", 0.0)
    row["factor_quant"] = inner.get("factor_quant", 0.0)
    row["error_metrics"] = inner.get("error_metrics", 0.0)
    row["compensate_other"] = (row["compensate_s"] - row["root"] - inner.get("whiten", 0.0) - inner.get("factors", 0.0)
                               - row["factor_quant"] - row["error_metrics"])
    return row


def run(args: argparse.Namespace) -> dict:
    from eora_export.config import RunConfig
    from eora_export.engine import run as run_engine

    work = Path(args.work)
    ckpt = work / f"llama2-7b-shaped-{args.layers}L"
    load_start = os.getloadavg()
    t = time.perf_counter()
    if not _checkpoint_ok(ckpt, args.layers):
        shutil.rmtree(ckpt, ignore_errors=True)
        # In a child process, so the benchmark's peak RSS is the pipeline's alone.
        proc = mp.get_context("spawn").Process(target=build_checkpoint, args=(ckpt, dict(LLAMA2_7B), args.layers, args.seed))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"bench: building the synthetic checkpoint failed (exit {proc.exitcode})")
    build_s = time.perf_counter() - t

    ids = torch.randint(3, LLAMA2_7B["vocab_size"], (args.calib_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    cfg = RunConfig(
        model=str(ckpt),
        out=work / "out",
        method="eora",
        rank=args.rank,
        lowrank_bits=args.lowrank_bits,
        lowrank_quant=args.lowrank_quant,
        quant="rtn",
        bits=4,
        group_size=128,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        compare=False,  # one method's cost: --method eora alone
        sweep_ranks=[],
        stream=True,
        stream_inputs=args.inputs,
        act_dtype="float16",
        device=args.device,
        fast=not args.exact,
        work_dir=work / "stream-work",
    )
    if args.exact:
        # The engine takes the fast path for layers this wide unless told otherwise; --exact is
        # the benchmark's own override of that rule.
        from eora_export.engine import runner

        runner.FAST_MIN_HIDDEN = 1 << 30
    rows: list[dict] = []
    with instrumented(error_metrics=not args.no_error_metrics) as timers, RssSampler() as rss:
        cpu = [_cpu_seconds()]

        def on_block(index: int, entry: dict) -> None:
            wall, cpu_by_key = timers.take()
            row = _split(entry["timings"], wall)
            row["cpu_phase_s"] = {k.removeprefix("phase_"): v for k, v in cpu_by_key.items() if k.startswith("phase_")}
            row["block"] = index
            row["peak_rss_gib"] = rss.take_window() / GIB
            # Process CPU seconds (all threads): on a shared machine the wall time depends
            # on the neighbours; CPU/threads is the wall time an idle machine would take
            # (roughly: spin-waiting OpenMP threads inflate it a little under contention).
            now = _cpu_seconds()
            row["cpu_s"], cpu[0] = now - cpu[0], now
            rows.append(row)

        report = run_engine(cfg, calib_windows=ids, evaluate=False, progress=not args.quiet, on_block_done=on_block).report
        assemble_rss = rss.take_window()
        export = None
        if args.export:
            # The graphs of --out X.onnx / X.plan, written from the finished folder one block at a time.
            from eora_export.deploy.graphs import write_onnx
            from eora_export.folder import FolderResult

            t = time.perf_counter()
            paths = write_onnx(FolderResult(cfg.out, ckpt), work / "export" / "model.onnx")
            sizes = {k: (Path(str(v) + ".data").stat().st_size if Path(str(v) + ".data").exists() else 0) + v.stat().st_size
                     for k, v in (("fused", paths.fused), ("pattern", paths.pattern), ("fp16", paths.baseline))}
            export = {"seconds": time.perf_counter() - t, "peak_rss_gib": rss.take_window() / GIB, "bytes": sizes}
            shutil.rmtree(work / "export", ignore_errors=True)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    n = len(rows)
    nums = [k for k, v in rows[0].items() if isinstance(v, float)]
    mean = {k: sum(r[k] for r in rows) / n for k in nums}
    steady = rows[1:] or rows  # block 0 pays first-call costs (allocator warm-up, lazy imports)
    steady_mean = {k: sum(r[k] for r in steady) / len(steady) for k in nums}
    steady_mean["cpu_phase_s"] = {k: sum(r["cpu_phase_s"].get(k, 0.0) for r in steady) / len(steady) for k in rows[0]["cpu_phase_s"]}
    threads = torch.get_num_threads()
    idle = {k: v / threads for k, v in steady_mean["cpu_phase_s"].items()}
    idle["block"] = steady_mean["cpu_s"] / threads
    per_block_bytes = sum(math.prod(s) for _, s in _layer_shapes(LLAMA2_7B)) * 2
    head_bytes = 2 * LLAMA2_7B["vocab_size"] * LLAMA2_7B["hidden_size"] * 2
    assemble_s = report["timings"]["assemble_s"]
    scale = (head_bytes + FULL_DEPTH * per_block_bytes) / (head_bytes + args.layers * per_block_bytes)
    fixed = report["timings"]["embed_s"]
    full_s = fixed + FULL_DEPTH * steady_mean["total_s"] + assemble_s * scale
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        },
        "shape": {**{k: LLAMA2_7B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")}, "layers": args.layers},
        "settings": {
            "calib_samples": args.calib_samples,
            "seq_len": args.seq_len,
            "tokens": args.calib_samples * args.seq_len,
            "rank": args.rank,
            "lowrank_bits": args.lowrank_bits,
            "lowrank_quant": args.lowrank_quant,
            "quant": "rtn int4 g128 clip-search",
            "fast": not args.exact,
            "inputs": args.inputs,
            "device": report["engine"]["device"],
            "batch_size": args.batch_size,
            "error_metrics": not args.no_error_metrics,
        },
        "checkpoint_build_s": build_s,
        "blocks": rows,
        "mean_block": mean,
        "steady_block": steady_mean,
        "assemble_s": assemble_s,
        "peak_rss_gib": {"sampled": rss.peak / GIB, "getrusage": maxrss / GIB, "assembly": assemble_rss / GIB},
        "export": export and {**export, "extrapolated_32_blocks_s": export["seconds"] * scale},
        "extrapolation_32_blocks": {
            "total_h": full_s / 3600,
            "per_block_s": steady_mean["total_s"],
            "assemble_s": assemble_s * scale,
            "peak_rss_gib": maxrss / GIB,
            "note": "blocks are independent in time and memory; peak RSS does not grow with depth",
        },
        "idle_machine_estimate_s": {
            **idle,
            "total_32_blocks_h": (fixed + FULL_DEPTH * idle["block"] + assemble_s * scale) / 3600,
            "note": "process CPU seconds / torch threads: the wall time on an idle machine of this size",
        },
        "targets": {
            "peak_rss_le_12_gib": maxrss / GIB <= 12,
            "eora_per_block_le_60_s": steady_mean["compensate_s"] <= 60,
            "eora_per_block_le_60_s_idle_estimate": idle.get("eora", float("inf")) <= 60,
        },
    }
    return result


def _export_line(e: dict) -> str:
    sizes = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in e["bytes"].items())
    return (f"ONNX export      : {e['seconds']:.1f} s for fused + pattern + FP16 graphs (peak RSS {e['peak_rss_gib']:.2f} GiB; {sizes}); "
            f"32 blocks ≈ {e['extrapolated_32_blocks_s'] / 60:.0f} min")


def format_report(r: dict) -> str:
    head = f"{'block':>5} " + " ".join(f"{c:>9}" for c, _ in COLUMNS) + f" {'peak RSS':>9} {'CPU s':>8}"
    lines = [
        f"Llama-2-7B-shaped, {r['shape']['layers']} block(s); {r['settings']['tokens']} calibration tokens "
        f"({r['settings']['calib_samples']} × {r['settings']['seq_len']}); rank {r['settings']['rank']}; "
        f"fast={r['settings']['fast']}; inputs={r['settings']['inputs']}; device={r['settings']['device']}"
        + ("" if r["settings"]["error_metrics"] else "; WHAT-IF: per-layer error metrics skipped"),
        f"machine: {r['machine']['cpus']} CPUs, torch threads {r['machine']['torch_threads']}, "
        f"load average at start {r['machine']['load_avg_start'][0]:.1f}, at end {r['machine']['load_avg_end'][0]:.1f}",
        "",
        "seconds per block (EoRA = compensate_layers; root/svd/whiten/f.quant/err are its parts)",
        head,
        "-" * len(head),
    ]
    for row in r["blocks"]:
        lines.append(f"{row['block']:>5} " + " ".join(f"{row[k]:9.1f}" for _, k in COLUMNS) + f" {row['peak_rss_gib']:8.2f}G {row['cpu_s']:8.0f}")
    m = r["steady_block"]
    lines.append(f"{'mean*':>5} " + " ".join(f"{m[k]:9.1f}" for _, k in COLUMNS) + f" {m['peak_rss_gib']:8.2f}G {m['cpu_s']:8.0f}")
    x = r["extrapolation_32_blocks"]
    p = r["peak_rss_gib"]
    lines += [
        "(* mean over blocks after the first when there are several)",
        "",
        f"assembly of out/ : {r['assemble_s']:.1f} s (peak RSS {p['assembly']:.2f} GiB)",
        *([_export_line(r["export"])] if r.get("export") else []),
        f"peak RSS         : {p['getrusage']:.2f} GiB (getrusage), {p['sampled']:.2f} GiB (sampled)  "
        f"target ≤ 12 GiB: {'met' if r['targets']['peak_rss_le_12_gib'] else 'MISSED'}",
        f"EoRA per block   : {m['compensate_s']:.1f} s  target ≤ 60 s: {'met' if r['targets']['eora_per_block_le_60_s'] else 'MISSED'}",
        f"idle-machine estimate (CPU s / {r['machine']['torch_threads']} threads): block {r['idle_machine_estimate_s']['block']:.0f} s, "
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["idle_machine_estimate_s"].items() if k not in ("block", "total_32_blocks_h", "note"))
        + f"; 32 blocks {r['idle_machine_estimate_s']['total_32_blocks_h']:.2f} h",
        f"32 blocks (7B)   : {x['total_h']:.2f} h ({x['per_block_s']:.0f} s/block + assembly {x['assemble_s']:.0f} s), "
        f"peak RSS ≈ {x['peak_rss_gib']:.2f} GiB (depth-independent)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder blocks in the synthetic checkpoint (default 2)")
    p.add_argument("--work", default="/tmp/eora-bench", help="folder for the checkpoint, work files and outputs")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--lowrank-bits", type=int, default=4)
    p.add_argument("--lowrank-quant", choices=["gptq", "rtn"], default="gptq", help="factor rounding (the CLI's default: gptq)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--inputs", choices=["fp", "compressed"], default="fp")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--exact", action="store_true", help="eigh + full SVD instead of Cholesky + randomized SVD")
    p.add_argument("--no-error-metrics", action="store_true", help="what-if: skip the per-layer tr(E G Eᵀ) diagnostics to time the EoRA core alone")
    p.add_argument("--export", action="store_true", help="also write the ONNX graphs (fused, pattern, FP16) from the output folder and time them")
    p.add_argument("--json", help="where to write the JSON figures (default <work>/bench.json)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.layers < 1 or args.calib_samples < 1 or args.seq_len < 2:
        p.error("--layers, --calib-samples must be ≥ 1 and --seq-len ≥ 2")
    need = (2 * 32000 * 4096 + args.layers * sum(math.prod(s) for _, s in _layer_shapes(LLAMA2_7B))) * 2 * 2.2
    Path(args.work).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < need:
        p.error(f"{args.work} has {free / GIB:.1f} GiB free; this run needs about {need / GIB:.1f} GiB")
    result = run(args)
    text = format_report(result)
    print(text)
    out = Path(args.json) if args.json else Path(args.work) / "bench.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {out}")
    if not args.keep:
        shutil.rmtree(Path(args.work) / f"llama2-7b-shaped-{args.layers}L", ignore_errors=True)
        shutil.rmtree(Path(args.work) / "out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
