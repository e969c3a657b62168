"""The block walk: every run, streamed or not, is this loop over decoder blocks.

Hidden states travel from block to block as named *paths*, each ``[n, seq, h]`` on the CPU:

    calib                 calibration inputs (FP outputs of the block before, or with
                          --stream-inputs compressed, the final method's)
    calib@M               inputs of method M's own path (methods fitted on their own upstream)
    calib@req:R           inputs of re-quantizer R's path (LSI's quantized blocks)
    val, val@LABEL        the validation split: FP, and per model label (--rank-budget)
    eval@LABEL            held-out windows per model label: fp16, compressed, compressed+M
    sweep@M:R             the first held-out windows through method M at rank R

Per block: load it, one forward of the calibration inputs collects the Grams and the FP
outputs, the FP paths go through before compression (AWQ folds scales into the block),
then compress, re-quantize, compensate with every method the run evaluates, push every
other path through the block with its modules swapped in, and write the block file with
the final method's modules. With ``ladders=True`` (the first pass of --rank-budget) a block
only yields each layer's rank ladder on the validation split.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration import GramStore
from ..compensate.apply import CompensationConfig, LayerResult, swapped
from ..compensate.ranks import eora_ladders
from ..compress import compress_model
from ..eora_linear import EoraLinear
from ..methods import BlockInputs, get_method
from ..models import set_module
from .block import BlockHost, block_linears, gram_forward, run_block
from .state import WorkFolder, load_sets_file, write_block_file, write_sets_file


def label(method: str) -> str:
    """The report's name of the model a method gives."""
    return "compressed" if method == "none" else f"compressed+{method}"


@dataclass
class Plan:
    """What a walk computes, resolved once from the RunConfig (engine.runner)."""

    methods: list[str]  # compensated in every block, "none" first, the final method last
    sweep: dict[str, list[int]]  # method -> ranks other than --rank, on the sweep windows
    comp: Callable[[str, int | None], CompensationConfig]  # (method, rank) -> its settings
    device: torch.device
    act_dtype: torch.dtype
    ranks: dict[str, int] | None = None  # per-layer ranks of --rank-budget (second pass)
    ladders: bool = False  # first pass of --rank-budget
    ladder_max: int = 0
    keep_modules: bool = False  # in memory: keep every method's modules (graphs, --verify)
    save_sets: bool = False  # write every module set per block, to propagate the paths later (distributed)
    sparsegpt_backend: str = "auto"
    results: dict[str, dict] = field(default_factory=dict)  # method -> name -> LayerResult, when keep_modules


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Tensor factories default to ``device`` (CUDA) inside; a no-op on the CPU, where the
    device mode would only add Python overhead to every torch call."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


FP_PATHS = ("val", "eval@fp16", "val@fp16")  # and every sweep@fp16...: paths through the FP block


def is_fp_path(key: str) -> bool:
    return key in FP_PATHS or key.startswith("sweep@fp16")


def modules_of(key: str, cfg, sets: dict[str, dict]) -> dict | None:
    """The modules path ``key`` runs the block with (None: the FP block). ``sets``: tag ->
    name -> EoraLinear, tags being method names, "sweep:METHOD:RANK" and "req:REQUANTIZER"."""
    name = key.split("@", 1)[1] if "@" in key else ""
    if key == "calib":
        return None if cfg.stream_inputs == "fp" else sets[cfg.method]
    if key.startswith("calib@"):
        return sets[name]  # a method's own path, or "req:R"
    if key.startswith("sweep@"):
        return sets[f"sweep:{name}"]
    if is_fp_path(key):
        return None
    return sets["none" if name == "compressed" else name.removeprefix("compressed+")]


@torch.no_grad()
def process_block(src, index: int, streams: dict[str, Tensor], cfg, plan: Plan, rotary: nn.Module,
                  work: WorkFolder, progress: bool) -> tuple[dict[str, Tensor], dict]:
    """Everything for block ``index``: the next block's paths and the manifest entry.

    A function of its own so that every reference to the block dies on return (the loader's
    live-tensor count checks it).
    """
    sync = _sync(plan.device)
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal t
        sync()
        now = time.perf_counter()
        times[key] = times.get(key, 0.0) + now - t
        t = now

    # Per-block seed: a resumed run draws the same randomized-SVD sketches as a full one.
    torch.manual_seed(cfg.seed * 1_000_003 + index)
    bs, dt = cfg.batch_size, plan.act_dtype
    what = f"block {index}"
    with _on(plan.device):
        host = BlockHost(src.load_layer(index, plan.device), index, rotary, src.config)
    lap("load_s")
    linears = block_linears(host, cfg.only, cfg.skip)
    nxt: dict[str, Tensor] = {}
    entry: dict = {"layers": {}, "timings": times}
    with _on(plan.device):
        if linears:
            grams, fp_out, gram_s = gram_forward(host, linears, streams["calib"], bs, True, dt, sync)
        else:
            grams, fp_out, gram_s = GramStore(), run_block(host, streams["calib"], bs, dt, what), 0.0
        lap("forward_s")
        times["forward_s"] -= gram_s
        times["gram_s"] = gram_s
        entry["shared_grams"] = len(grams.sums)
        # FP paths before compression, which may fold AWQ scales into the block in place.
        val_grams = None
        fp_keys = [k for k in streams if is_fp_path(k)]
        for key in fp_keys:
            if key == "val" and plan.ladders and linears:
                val_grams, nxt[key], _ = gram_forward(host, linears, streams[key], bs, True, dt, sync)
            else:
                nxt[key] = run_block(host, streams[key], bs, dt, what)
        lap("eval_s")
        if not linears:
            # Nothing compressed here: every path goes through the FP block.
            for key, x in streams.items():
                if key not in nxt:
                    nxt[key] = fp_out if key == "calib" else run_block(host, x, bs, dt, what)
            if not plan.ladders:
                entry["file"] = work.block_file(index)
                _, entry["base"] = write_block_file(work.folder / entry["file"], index, host, {}, {})
            lap("write_s")
            return nxt, entry

        biases = {n: m.bias for n, m in linears.items()}
        compressed = compress_model(host, linears, grams, cfg.compress_config(), streams["calib"],
                                    sparsegpt_backend=plan.sparsegpt_backend)
        lap("compress_s")
        if plan.ladders:
            entry["ladders"] = _ladders(compressed, grams, val_grams, plan)
            lap("compensate_s")
            nxt["calib"] = fp_out
            return nxt, entry

        cache: dict = {}  # shared by every method of this block (Gram roots)

        def inputs(own: str, base: dict) -> BlockInputs:
            """``own``: the path whose inputs the method fits on (a method's, or "req:R")."""
            return BlockInputs(host, linears, base, grams, streams["calib"], fp_out, biases, cfg, index,
                               streams.get(f"calib@{own}"), progress, cache)

        requantized: dict[str, dict] = {}
        for m in plan.methods:
            spec = get_method(m)
            if spec.requantize is not None and spec.requantizer not in requantized:
                requantized[spec.requantizer] = spec.requantize(inputs(f"req:{spec.requantizer}", compressed))
        lap("requantize_s")
        results: dict[str, dict] = {}
        for m in sorted(plan.methods, key=lambda m: m == "none"):  # "none" last: it can borrow an error
            spec = get_method(m)
            base = requantized[spec.requantizer] if spec.requantize is not None else compressed
            donor = next((r for d, r in results.items() if get_method(d).plain_error and get_method(d).requantize is None), None)
            if m == "none" and donor is not None:
                # The compressed model's error is every plain method's error_before: no second pass.
                results[m] = {n: LayerResult(EoraLinear(c.weight, bias=biases.get(n), sparse24=c.sparse24), 0,
                                             donor[n].error_before, donor[n].error_before) for n, c in compressed.items()}
                continue
            results[m] = spec.compensate(inputs(m, base), plan.comp(m, None), plan.ranks if spec.allocates else None)
        results = {m: results[m] for m in plan.methods}
        sets = {m: {n: r.module for n, r in res.items()} for m, res in results.items()}
        for m, ranks in plan.sweep.items():
            for r in ranks:
                swept = get_method(m).compensate(inputs(m, compressed), plan.comp(m, r), None)
                sets[f"sweep:{m}:{r}"] = {n: res.module for n, res in swept.items()}
        for name, req in requantized.items():
            sets[f"req:{name}"] = {n: EoraLinear(c.weight, bias=biases.get(n), sparse24=c.sparse24) for n, c in req.items()}
        lap("compensate_s")
        for key, x in streams.items():
            if key in nxt or (key == "calib" and cfg.stream_inputs == "fp"):
                continue
            with swapped(host, modules_of(key, cfg, sets) or {}):
                nxt[key] = run_block(host, x, bs, dt, what)
        if cfg.stream_inputs == "fp":
            nxt["calib"] = fp_out
        lap("eval_s")

    final = sets[cfg.method]
    entry["file"] = work.block_file(index)
    storage, entry["base"] = write_block_file(work.folder / entry["file"], index, host, final, linears)
    if plan.save_sets:
        # Every module set and the compressed block's own parameters, for propagate_block.
        entry["sets_file"] = work.block_file(index).replace("block_", "sets_")
        entry["sets"] = write_sets_file(work.folder / entry["sets_file"], index, host, sets, linears)
    for n, meta in storage.items():
        none = results["none"][n]
        meta["error_before"] = none.error_before
        meta["weight_bytes"] = final[n].weight_q.storage_bytes()
        meta["methods"] = {m: {"rank": res[n].rank, "error_after": res[n].error_after,
                               "factor_bytes": res[n].module.storage_bytes() - res[n].module.weight_q.storage_bytes()}
                           for m, res in results.items()}
        entry["layers"][n] = meta
    if plan.keep_modules:
        for m, res in results.items():
            plan.results.setdefault(m, {}).update(res)
        for n, mod in final.items():
            set_module(host, n, mod)
        src.replace_layer(index, host.layer)
    lap("write_s")
    return nxt, entry


def _ladders(compressed: dict, grams, val_grams, plan: Plan) -> dict[str, list[list]]:
    """Each layer's rank ladder: [rank, factor bytes, validation error] per rung."""
    ladders, _ = eora_ladders(compressed, grams, val_grams, plan.comp("eora", None), plan.ladder_max)
    return {n: [[r.rank, r.bytes, r.val_error] for r in rungs] for n, rungs in ladders.items()}


@torch.no_grad()
def propagate_block(src, index: int, streams: dict[str, Tensor], cfg, plan: Plan, rotary: nn.Module, work: WorkFolder,
                    entry: dict) -> dict[str, Tensor]:
    """Push ``streams`` through a block :func:`process_block` already finished (``entry``, with
    ``plan.save_sets``): FP paths through the checkpoint's block, the others through the
    compressed block with their module sets, exactly as process_block would have."""
    bs, dt, what = cfg.batch_size, plan.act_dtype, f"block {index}"
    with _on(plan.device):
        host = BlockHost(src.load_layer(index, plan.device), index, rotary, src.config)
        nxt = {k: run_block(host, x, bs, dt, what) for k, x in streams.items() if is_fp_path(k)}
        if entry.get("sets_file") is None:  # nothing compressed in this block
            nxt.update({k: run_block(host, x, bs, dt, what) for k, x in streams.items() if k not in nxt})
            return nxt
        sets, params = load_sets_file(work.folder / entry["sets_file"], entry["sets"])
        host.load_state_dict(params, strict=False)  # the compressed block's own parameters (AWQ-folded)
        for key, x in streams.items():
            if key not in nxt:
                with swapped(host, modules_of(key, cfg, sets) or {}):
                    nxt[key] = run_block(host, x, bs, dt, what)
    return nxt


def walk(src, cfg, plan: Plan, first_streams: Callable[[], dict[str, Tensor]], work: WorkFolder, manifest: dict,
         keep_state: bool, progress: bool, on_block_done: Callable[[int, dict], None] | None = None,
         desc: str = "blocks", blocks: range | None = None) -> dict[str, Tensor]:
    """Walk the blocks of ``blocks`` (default: all) not finished in ``manifest``; return the paths
    after the last one.

    keep_state: save the paths after each block (--stream: resumable); otherwise they live in
    memory only and the manifest still records the finished blocks for assembly.
    """
    blocks = blocks if blocks is not None else range(src.num_layers)
    start = manifest["next_block"]
    streams = first_streams() if start == blocks.start else work.load_state(manifest["state_file"])
    with _on(plan.device):
        rotary = src.rotary(plan.device)
    bar = tqdm(total=len(blocks), initial=start - blocks.start, desc=desc, unit="block", disable=not progress)
    try:
        for index in range(start, blocks.stop):
            t0 = time.perf_counter()
            streams, entry = process_block(src, index, streams, cfg, plan, rotary, work, progress)
            gc.collect()  # nn.Module graphs can hold reference cycles; free the block now
            entry["timings"]["total_s"] = time.perf_counter() - t0
            work.record(manifest, index, entry, streams if keep_state else None)
            bar.update(1)
            bar.set_postfix(block_s=f"{entry['timings']['total_s']:.1f}")
            if on_block_done is not None:
                on_block_done(index, entry)
    finally:
        bar.close()
    return streams
