"""A run, start to end: windows → (rank allocation pass) → block walk → scores → report → folder.

The one pipeline of every method and every scale. ``--stream`` (automatic above
STREAM_MIN_PARAMS) changes two things only: blocks come from memory-mapped safetensors
instead of a model transformers loaded, and the hidden states between blocks are saved so
``--resume`` can continue. Every default that depends on scale depends on the model's size,
never on the mode, so the same flags give the same outputs either way (tests check it).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import LoadedModel, StreamingCheckpoint, count_parameters
from ..compensate.apply import LayerResult, layer_rank, swapped
from ..compensate.ranks import RANK_STEP, Rung, allocate, budget_bytes, ladder_top, parse_budget
from ..errors import MissingDependency, MissingInput, UsageError
from ..evaluate import text_report
from ..methods import get_method
from ..models import DEMO_DIR, is_target, load_model, resolve_model, selected
from ..validate import check_output_location, preflight
from . import distributed
from .assemble import DEFAULT_MAX_SHARD_BYTES, write_output_folder
from .evaluation import head_scores, split_scores
from .report import build_report
from .state import WorkFolder, fingerprint
from .texts import EvalText, run_validation_windows, run_windows
from .walk import Plan, label, walk

log = logging.getLogger("eora_export")

STREAM_MIN_PARAMS = 1e9  # above this many parameters a run streams without being asked
# Layers this wide take the fast EoRA path (Cholesky + randomized SVD) without --fast: eigh +
# full SVD of a 4096-wide layer costs ~28 s on 2 cores (docs/design.md §2).
FAST_MIN_HIDDEN = 2048
SWEEP_WINDOWS = 32  # the rank sweep's KL and perplexity: the first windows of the held-out text
# Hidden states between blocks stay float32 while all paths together fit this; float16 above
# (a 7B model with 128 × 2048 calibration tokens: 4 GiB per path in float32).
ACT_FP32_LIMIT_BYTES = 1 << 30


@dataclass
class RunResult:
    """What a run leaves besides its folder: the report, and for runs in memory the
    compressed model with the final modules in place plus every evaluated method's modules."""

    report: dict
    out: Path
    model_path: Path
    tokenizer: object
    held: Tensor  # in-domain held-out windows [n, seq]
    model: nn.Module | None = None  # None for streamed runs (read the folder: folder.FolderResult)
    by_method: dict[str, dict[str, LayerResult]] = field(default_factory=dict)  # in memory: method -> name -> result
    external_data: bool | None = None  # ONNX initializers in a side file: None decides by size

    @property
    def method(self) -> str:
        return self.report["config"]["method"]

    @property
    def modules(self) -> dict[str, LayerResult]:
        """The final method's layers by name (in memory)."""
        return self.by_method.get(self.method, {})

    @contextlib.contextmanager
    def export_model(self, method: str | None = None) -> Iterator[nn.Module]:
        """The compressed model with ``method``'s modules in place (default: the final method's)."""
        if self.model is None:
            raise UsageError("a streamed run keeps no model in memory; export from its folder")
        other = method is not None and method != self.method
        with swapped(self.model, {n: r.module for n, r in self.by_method[method].items()} if other else {}):
            yield self.model

    def baseline_model(self) -> nn.Module:
        """The uncompressed float16 model, for the baseline graph."""
        return load_model(self.model_path, torch.float16)[0]


def is_streamed(cfg, path: Path) -> bool:
    """--stream, --resume, or a model above STREAM_MIN_PARAMS (counted from safetensors headers)."""
    if cfg.stream or cfg.resume:
        return True
    try:
        return count_parameters(path) > STREAM_MIN_PARAMS
    except Exception:  # a broken checkpoint: preflight names the problem in its own words
        return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingDependency("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    return torch.device(device)


def _targets(src, only: list[str], skip: list[str]) -> dict[str, list[int]]:
    """Target Linear name -> [out, in], by the checkpoint's tensor names (models.target_linears' rule)."""
    out = {}
    for key in src.tensor_names():
        name = key.removesuffix(".weight")
        if key.startswith("model.layers.") and key.endswith(".weight") and is_target(name) and selected(name, only, skip):
            out[name] = src.shape(key)
    return out


def _methods(cfg) -> list[str]:
    """Compensated in every block: none (the compressed model), the compared ones, the final one."""
    methods = ["none"]
    if cfg.method != "none":
        spec = get_method(cfg.method)
        for m in (*(spec.compare if cfg.compare else ()), *spec.parts, cfg.method):
            if m not in methods:
                methods.append(m)
    return methods


def _sweep(cfg, methods: list[str], max_rank: int, params: float) -> dict[str, list[int]]:
    """Method -> ranks of the KL/perplexity-vs-rank plot other than --rank. Default: around
    --rank for models up to STREAM_MIN_PARAMS; none above (each rank factorizes every layer again)."""
    if cfg.method == "none":
        return {}
    if cfg.sweep_ranks is not None:
        ranks = cfg.sweep_ranks
    elif params <= STREAM_MIN_PARAMS:
        ranks = {max(1, cfg.rank // 4), max(1, cfg.rank // 2), cfg.rank, cfg.rank * 2, cfg.rank * 4}
        # Quantized factors need an even rank (lowrank_group); FP16 factors take any.
        ranks = sorted(r for r in ranks if r <= max_rank and (r % 2 == 0 or cfg.lowrank_bits == 16))
    else:
        ranks = []
    swept = [m for m in methods if get_method(m).sweeps]
    return {m: list(ranks) for m in swept} if ranks else {}


def _act_dtype(cfg, rows: int, seq: int, hidden: int) -> torch.dtype:
    if cfg.act_dtype != "auto":
        return {"float16": torch.float16, "float32": torch.float32}[cfg.act_dtype]
    return torch.float32 if rows * seq * hidden * 4 <= ACT_FP32_LIMIT_BYTES else torch.float16


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MissingInput(f"no usable tokenizer in {path} ({type(e).__name__}); eora-export needs one to tokenize --calib") from None


def run(cfg, progress: bool = True, *, calib_windows: Tensor | None = None, eval_windows: Tensor | None = None,
        evaluate: bool = True, keep_work: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        on_block_done: Callable[[int, dict], None] | None = None) -> RunResult:
    """Compress, compensate and evaluate ``cfg.model``; write ``cfg.out``; return the result.

    calib_windows / eval_windows: int64 ``[n, seq]`` token ids instead of tokenizing the texts
    (a tokenizer-free path for benchmarks). evaluate=False: no held-out scores. on_block_done
    (index, manifest entry): called after a block is durably recorded; an exception there
    stops the run as a crash would (tests use it).
    """
    cfg.validate()
    spec = get_method(cfg.method)
    spec.check(cfg)
    if cfg.rank_budget is not None and cfg.stream_inputs != "fp":
        raise UsageError("--rank-budget allocates ranks on FP inputs; drop --stream-inputs compressed")
    out = Path(cfg.out)
    check_output_location(out)
    t_start = time.perf_counter()
    path = resolve_model(cfg.model)
    ranks = distributed.from_env()  # a torchrun launch: this process's share of the blocks
    streamed = ranks is not None or is_streamed(cfg, path)
    # A streamed model's values are checked block by block as they load (compress checks for
    # NaN/Inf): scanning 27 GB up front would double the reading.
    preflight(cfg, path, scan_values=not streamed, texts=calib_windows is None)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = None
    if streamed:
        src = StreamingCheckpoint(path)
    else:
        model, tokenizer = load_model(path)
        src = LoadedModel(model, path)
    texts: list[EvalText] = []
    if calib_windows is None or (evaluate and eval_windows is None):
        tokenizer = tokenizer or _tokenizer(path)
        calib, texts = run_windows(tokenizer, cfg, path == DEMO_DIR)
        calib_windows = calib if calib_windows is None else calib_windows
    elif tokenizer is None:
        with contextlib.suppress(Exception):  # a checkpoint without tokenizer files still gets its base/
            tokenizer = _tokenizer(path)
    if eval_windows is not None:
        texts = [EvalText("heldout", "in domain", Path("(eval_windows given)"), eval_windows)]
    if not evaluate:
        texts = []
    calib_windows = calib_windows.to(torch.int64)
    eval_ids = torch.cat([t.windows for t in texts]) if texts else None
    held = texts[0].windows if texts else torch.empty(0, calib_windows.shape[1], dtype=torch.int64)
    # The validation split also checks every compensated model against the compressed model
    # without compensation (never shipped worse without a warning); it needs the calibration text.
    val_ids = None
    if cfg.method != "none" and cfg.val_samples > 0 and (cfg.rank_budget is not None or texts):
        val_ids = run_validation_windows(tokenizer, cfg, required=cfg.rank_budget is not None)

    targets = _targets(src, cfg.only, cfg.skip)
    if not targets:
        raise UsageError("no Linear layers selected for compression; check --only/--skip patterns")
    max_rank = min(min(s) for s in targets.values())
    clamped = {n: layer_rank(cfg.rank, *s) for n, s in targets.items() if layer_rank(cfg.rank, *s) < cfg.rank}
    if clamped and cfg.method != "none":
        log.warning("rank %d clamped to the layer size for %d layers (smallest: %d)", cfg.rank, len(clamped), min(clamped.values()))
    params = count_parameters(path) if streamed else sum(p.numel() for p in src.model.parameters())
    fast = cfg.fast or int(src.config.hidden_size) >= FAST_MIN_HIDDEN
    methods = _methods(cfg)
    sweep = _sweep(cfg, methods, max_rank, params) if texts else {}
    n_sweep = min(SWEEP_WINDOWS, texts[0].windows.shape[0]) if texts else 0
    labels = ["fp16"] + [label(m) for m in methods]
    own = [m for m in methods if get_method(m).own_stream]
    requantizers = sorted({get_method(m).requantizer for m in methods if get_method(m).requantize is not None})
    seq = calib_windows.shape[1]
    rows = calib_windows.shape[0] * (1 + len(own) + len(requantizers))
    rows += (eval_ids.shape[0] * len(labels) if eval_ids is not None else 0) + n_sweep * sum(map(len, sweep.values()))
    rows += val_ids.shape[0] * 3 if val_ids is not None else 0
    act_dtype = _act_dtype(cfg, rows, seq, int(src.config.hidden_size))

    def comp(method: str, rank: int | None):
        return replace(cfg.compensation(method, rank), fast=fast)

    # The --rank point of the sweep is the main evaluation's own scores on those windows.
    walked_sweep = {m: [r for r in rs if r != cfg.rank] for m, rs in sweep.items()}
    plan = Plan(methods, walked_sweep, comp, device, act_dtype, keep_modules=not streamed)
    settings = {"fast": fast, "act_dtype": str(act_dtype), "evaluate": bool(texts), "methods": methods,
                "sweep": sweep, "sparsegpt_backend": plan.sparsegpt_backend, "ranks": ranks.world if ranks else 1}
    fp = fingerprint(path, cfg, settings, {"calib": calib_windows, "eval": eval_ids, "val": val_ids})
    if streamed:
        folder = Path(cfg.work_dir) if cfg.work_dir is not None else out.with_name(out.name + ".stream-work")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        embed: dict[str, Tensor] = {}
        embed_s = [0.0]

        def embedded(name: str, ids: Tensor) -> Tensor:
            if name not in embed:  # once per run: token rows of the embedding table
                t0 = time.perf_counter()
                embed[name] = src.embed(ids, act_dtype)
                embed_s[0] += time.perf_counter() - t0
            return embed[name]

        if cfg.rank_budget is not None:
            plan.ranks = _allocate(src, cfg, plan, comp, targets, calib_windows, val_ids, embedded, folder, fp, streamed,
                                   progress, ranks)

        def first_streams() -> dict[str, Tensor]:
            s = {"calib": embedded("calib", calib_windows)}
            s.update({f"calib@{m}": s["calib"] for m in own})
            s.update({f"calib@req:{r}": s["calib"] for r in requantizers})
            if eval_ids is not None:
                s.update({f"eval@{lab}": embedded("eval", eval_ids) for lab in labels})
                head = embedded("eval", eval_ids)[:n_sweep]
                s.update({f"sweep@{m}:{r}": head for m, ranks in walked_sweep.items() for r in ranks})
            if val_ids is not None:
                s["val"] = embedded("val", val_ids)
                s.update({f"val@{label(m)}": s["val"] for m in ("none", cfg.method)})
            return s

        if ranks is None:
            work = WorkFolder(folder)
            manifest = work.start(fp, src.num_layers, cfg.resume and streamed)
            if cfg.resume and streamed and manifest["next_block"] == 0:
                log.warning("--resume: no finished block in %s; starting from the first block", folder)
            resumed_from = manifest["next_block"] or None
            streams = walk(src, cfg, plan, first_streams, work, manifest, streamed, progress, on_block_done)
            blocks = [manifest["blocks"][str(i)] for i in range(src.num_layers)]
            shares = None
        else:
            streams, manifest = distributed.walk_ranks(ranks, src, cfg, plan, first_streams, folder, fp, progress,
                                                       on_block_done, desc=f"rank {ranks.rank} blocks")
            shares = distributed.all_gather(manifest["comm"])  # every rank's walk is over
            if not ranks.last:
                distributed.barrier()  # the last rank scores, reports and assembles the output
                return RunResult(None, out, path, tokenizer, held)
            blocks = distributed.merged_blocks(folder, src.num_layers, ranks.world)
            resumed_from = min((s["resumed_from_block"] for s in shares if s["resumed_from_block"] is not None), default=None)
        embed.clear()
        t = time.perf_counter()
        accuracy, sweep_scores, sweep_reference = _score(src, cfg, streams, texts, eval_ids, labels, sweep, n_sweep, device)
        validation = _never_worse(src, cfg, streams, val_ids, device) if val_ids is not None else {}
        eval_s = time.perf_counter() - t
        del streams
        block_times = [b["timings"] for b in blocks]
        keys = ("load_s", "forward_s", "gram_s", "compress_s", "requantize_s", "compensate_s", "eval_s", "write_s")
        timings = {"embed_s": embed_s[0], **{k: sum(bt.get(k, 0.0) for bt in block_times) for k in keys},
                   "final_eval_s": eval_s, "total_s": time.perf_counter() - t_start}
        engine = {"streamed": streamed, "inputs": cfg.stream_inputs, "act_dtype": str(act_dtype).removeprefix("torch."),
                  "device": str(device), "fast": fast, "methods": methods, "sparsegpt_backend": plan.sparsegpt_backend,
                  "blocks": len(blocks), "resumed_from_block": resumed_from, "block_timings": block_times,
                  "peak_live_loaded_tensors": src.live.peak, "rank_budget_ranks": plan.ranks,
                  "processes": shares and {"schedule": "parallel" if distributed.parallel_schedule(plan, cfg) else "sequential",
                                           "ranks": shares}}
        report = build_report(cfg, path, blocks, calib_shape=tuple(calib_windows.shape), eval_rows=len(texts[0].windows) if texts else 0,
                              accuracy=accuracy, sweep=sweep_scores, sweep_reference=sweep_reference, clamped=clamped,
                              timings=timings, engine=engine, validation=validation)
        plot = None
        if any(sweep_scores.values()):
            plot = (sweep_scores, {k: v for k, v in sweep_reference.items() if k != "windows"}, sweep_reference["windows"])
        t = time.perf_counter()
        write_output_folder(src, blocks, folder, cfg, out, tokenizer, max_shard_bytes, report, plot)
        # The returned report also holds the assembly's time (report.json was written during it).
        report["timings"]["assemble_s"] = time.perf_counter() - t
        report["timings"]["total_s"] = time.perf_counter() - t_start
    finally:
        if not streamed:
            shutil.rmtree(folder, ignore_errors=True)
    if streamed and not keep_work:
        WorkFolder(folder).clear()
        WorkFolder(folder, "alloc-").clear()
        if ranks is not None:
            distributed.clear(folder, ranks.world)
        with contextlib.suppress(OSError):
            folder.rmdir()
    if ranks is not None:
        distributed.barrier()  # the other ranks wait for the output folder
        distributed.leave(ranks)
    return RunResult(report, out, path, tokenizer, held, None if streamed else src.model, plan.results)


def _score(src, cfg, streams, texts, eval_ids, labels, sweep, n_sweep, device) -> tuple[dict, dict, dict]:
    """(accuracy per text, sweep: method -> rank -> scores, the sweep's reference points)."""
    if eval_ids is None:
        return {}, {}, {}
    scores = head_scores(src, {lab: streams[f"eval@{lab}"] for lab in labels}, eval_ids, cfg.batch_size, device)
    parts = split_scores(scores, [t.windows.shape[0] for t in texts])
    accuracy = {t.name: {"file": str(t.path), "domain": t.domain, **text_report(p, seed=cfg.seed)} for t, p in zip(texts, parts, strict=True)}
    head = {k: v.head(n_sweep) for k, v in parts[0].items()}
    reference = {"windows": n_sweep, **{k: {"perplexity": head[k].perplexity, "kl": head[k].mean_kl}
                                        for k in ("fp16", "compressed") if k in head}}
    if not sweep:
        return accuracy, {}, reference
    hidden = {"fp16": streams["eval@fp16"][:n_sweep],
              **{f"{m}:{r}": streams[f"sweep@{m}:{r}"] for m, rs in sweep.items() for r in rs if r != cfg.rank}}
    swept = head_scores(src, hidden, eval_ids[:n_sweep], cfg.batch_size, device)
    out: dict[str, dict[int, dict]] = {}
    for m, ranks in sweep.items():
        points = {r: head[label(m)] if r == cfg.rank else swept[f"{m}:{r}"] for r in ranks}
        out[m] = {r: {"perplexity": s.perplexity, "kl": s.mean_kl} for r, s in sorted(points.items())}
    return accuracy, out, reference


# What the never-worse warning suggests: on the demo at rank 4, where plain EoRA and SVD make the
# model worse, error feedback with alternation is the method that still pays (README, Results).
STRONGEST_METHOD = "eora-fb-alt"


def _never_worse(src, cfg, streams, val_ids, device) -> dict:
    """Model-level never-worse rule: one warning when --method's KL(fp16 ‖ model) on the
    validation split is above the uncompensated model's (with --rank-budget, layers already got
    rank 0 where compensation did not lower their own validation error). Returns the report's
    "validation" section."""
    none, final = label("none"), label(cfg.method)
    scores = head_scores(src, {"fp16": streams["val"], none: streams[f"val@{none}"], final: streams[f"val@{final}"]},
                         val_ids, cfg.batch_size, device)
    kl = {k: scores[k].mean_kl for k in (none, final)}
    worse = kl[final] > kl[none]
    if worse:
        remedy = "a higher --rank" + ("" if cfg.method == STRONGEST_METHOD else f" or --method {STRONGEST_METHOD}")
        log.warning("--method %s is worse than no compensation on the validation split (KL %.5f vs %.5f); "
                    "compare both in the report before shipping it, or try %s", cfg.method, kl[final], kl[none], remedy)
    return {"windows": int(val_ids.shape[0]), "kl": kl, "worse_than_uncompensated": worse}


def _allocate(src, cfg, plan: Plan, comp, targets: dict, calib_ids, val_ids, embedded, folder: Path, fp: dict,
              streamed: bool, progress: bool, ranks=None) -> dict[str, int]:
    """First pass of --rank-budget: every layer's rank ladder on the validation split, then the
    ranks that fit the budget by validation gain per byte (compensate/ranks.py)."""
    kind, value = parse_budget(cfg.rank_budget)
    shapes = {n: tuple(s) for n, s in targets.items()}
    budget = budget_bytes(shapes, comp("eora", None), kind, value)
    # The average rank a byte budget buys: measured against the bytes of rank RANK_STEP.
    average = value if kind == "rank" else RANK_STEP * budget / max(budget_bytes(shapes, comp("eora", None), "rank", RANK_STEP), 1)
    ladder_plan = replace(plan, methods=[], sweep={}, ladders=True, ladder_max=ladder_top(average), keep_modules=False)

    def first() -> dict[str, Tensor]:
        return {"calib": embedded("calib", calib_ids), "val": embedded("val", val_ids)}

    if ranks is None:
        work = WorkFolder(folder, "alloc-")
        manifest = work.start(fp, src.num_layers, cfg.resume and streamed)
        walk(src, cfg, ladder_plan, first, work, manifest, streamed, progress, desc="allocate ranks")
        parts = [manifest["blocks"]]
    else:
        _, manifest = distributed.walk_ranks(ranks, src, cfg, ladder_plan, first, folder, fp, progress, tag="alloc-",
                                             desc=f"rank {ranks.rank} allocate ranks")
        parts = distributed.all_gather(manifest["blocks"])  # every rank allocates from all ladders alike
    ladders = {n: [Rung(*r) for r in rungs] for blocks in parts for entry in blocks.values()
               for n, rungs in entry.get("ladders", {}).items()}
    return allocate(ladders, budget)
