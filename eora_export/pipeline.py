"""The steps in order: load → calibrate → compress → compensate → evaluate → write.

The only module that knows the order. Every step is a function of its inputs; this file
wires them and owns the output folder (written atomically).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .adapter import save_compressed_base, save_peft_adapter
from .atomic import atomic_dir
from .calibration import CalibSource, calibration_windows, collect_grams, read_texts, token_windows
from .compensate.apply import CompensationConfig, LayerResult, compensate_layers, layer_rank, swapped
from .compensate.lsi import LsiConfig, lsi_compress
from .compress import CompressConfig, compress_model
from .errors import BadInput, UsageError
from .evaluate import perplexity
from .models import DEMO_DIR, load_model, resolve_model, target_linears
from .report import format_table, plot_layer_errors, plot_ppl_vs_rank, write_json
from .validate import check_output_location, preflight

log = logging.getLogger("eora_export")


METHOD_CHOICES = ("eora", "svd", "none", "lsi", "lsi+eora")


@dataclass
class RunConfig:
    model: str = "demo"
    out: Path = Path("eora-out")
    method: str = "eora"
    rank: int = 16
    lowrank_bits: int = 4
    lowrank_group_size: int = 0
    quant: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sparsity: str = "none"
    calib: list[str] = field(default_factory=list)
    calib_samples: int = 128
    seq_len: int = 256
    eval_file: str | None = None
    eval_samples: int = 64
    sweep_ranks: list[int] | None = None  # None: a default sweep around --rank
    compare: bool = True  # also evaluate SVD and no compensation beside --method
    lsi_epochs: int = 5
    lsi_lr: float = 1e-3
    fast: bool = False
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    batch_size: int = 8
    seed: int = 0
    format: str = "dir"  # the deployable kind, for preflight's disk and path checks
    deploy_out: Path | None = None  # --out when it is not the artifacts folder

    def compress_config(self) -> CompressConfig:
        return CompressConfig(quant=self.quant, bits=self.bits, group_size=self.group_size, sparsity=self.sparsity)

    def compensation(self, method: str, rank: int | None = None) -> CompensationConfig:
        return CompensationConfig(
            method=method, rank=self.rank if rank is None else rank, lowrank_bits=self.lowrank_bits,
            lowrank_group_size=self.lowrank_group_size, fast=self.fast,
        )

    def validate(self) -> None:
        if self.method not in METHOD_CHOICES:
            raise UsageError(f"unknown --method {self.method}; use one of {', '.join(METHOD_CHOICES)}")
        if self.method.startswith("lsi") and self.sparsity != "none":
            raise UsageError("--method lsi trains quantized weights and does not keep a 2:4 mask; use --sparsity none")
        if self.method.startswith("lsi") and self.quant == "none":
            raise UsageError("--method lsi needs a weight quantizer (--quant rtn, gptq or awq) to start from")
        if self.method != "none" and self.rank <= 0:
            raise UsageError(f"--rank must be a positive integer, got {self.rank}")
        if self.lowrank_bits not in (4, 8, 16):
            raise UsageError(f"--lowrank-bits must be 4, 8 or 16, got {self.lowrank_bits}")
        if self.bits not in (3, 4):
            raise UsageError(f"--bits must be 3 or 4, got {self.bits}")
        if self.quant == "none" and self.sparsity == "none":
            raise UsageError("nothing to compress: --quant none needs --sparsity sparsegpt or magnitude")
        if self.calib_samples <= 0 or self.seq_len < 2 or self.eval_samples <= 0:
            raise UsageError("--calib-samples and --eval-samples must be positive and --seq-len at least 2")


def _default_sweep(rank: int, max_rank: int, lowrank_bits: int) -> list[int]:
    ranks = {max(1, rank // 4), max(1, rank // 2), rank, rank * 2, rank * 4}
    # Quantized factors need an even rank (lowrank_group); FP16 factors take any.
    return sorted(r for r in ranks if r <= max_rank and (r % 2 == 0 or lowrank_bits == 16))


def _windows(tokenizer, cfg: RunConfig, is_demo: bool):
    sources = [CalibSource.parse(s) for s in cfg.calib] or [CalibSource(DEMO_DIR / "calib.txt")]
    calib = calibration_windows(tokenizer, sources, cfg.calib_samples, cfg.seq_len)
    eval_path = Path(cfg.eval_file) if cfg.eval_file else DEMO_DIR / "heldout.txt"
    held = token_windows(tokenizer, read_texts(eval_path), cfg.seq_len, cfg.eval_samples)
    if held.shape[0] == 0:
        raise BadInput(f"held-out text {eval_path} is shorter than one {cfg.seq_len}-token window; give more text")
    return calib, held


def _layer_rows(results: dict[str, dict[str, LayerResult]]) -> list[dict]:
    first = next(iter(results.values()))
    rows = []
    for name, base in first.items():
        rel = {m: (res[name].error_after / base.error_before if base.error_before > 0 else 0.0) for m, res in results.items()}
        rows.append({
            "name": name, "out_features": base.module.out_features, "in_features": base.module.in_features,
            "rank": {m: res[name].rank for m, res in results.items()},
            "error_before": base.error_before,
            "error_after": {m: res[name].error_after for m, res in results.items()},
            "relative_error": rel,
        })
    return rows


@dataclass
class RunResult:
    """Everything a run computed: the report plus the objects the writers need."""

    report: dict
    model: torch.nn.Module  # the compressed model (target Linears still plain; see ``modules``)
    tokenizer: object
    modules: dict[str, LayerResult]  # the final method's layers
    sweep: dict[str, dict[int, float]]
    model_path: Path
    compressed: dict  # name -> CompressedLinear, to compensate again with other settings
    grams: object  # GramStore
    biases: dict
    held: torch.Tensor  # held-out windows [n, seq]
    external_data: bool | None = None  # ONNX initializers in a side file: None decides by size

    @contextlib.contextmanager
    def export_model(self) -> Iterator[torch.nn.Module]:
        """The compressed model with the final EoraLinear modules in place (restored after)."""
        with swapped(self.model, {n: r.module for n, r in self.modules.items()}):
            yield self.model

    def baseline_model(self) -> torch.nn.Module:
        """The uncompressed float16 model, for the baseline graph."""
        return load_model(self.model_path, torch.float16)[0]


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Compress, compensate and evaluate; write outputs to ``cfg.out``; return the report."""
    result = compute(cfg, progress)
    write_outputs(cfg, result)
    return result.report


def compute(cfg: RunConfig, progress: bool = True) -> RunResult:
    """All the work of a run, without writing anything."""
    cfg.validate()
    check_output_location(Path(cfg.out))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    path = resolve_model(cfg.model)
    preflight(cfg, path)
    model, tokenizer = load_model(path)
    linears = target_linears(model, cfg.only, cfg.skip)
    max_rank = min(min(m.weight.shape) for m in linears.values())
    clamped = {n: layer_rank(cfg.rank, *m.weight.shape) for n, m in linears.items() if layer_rank(cfg.rank, *m.weight.shape) < cfg.rank}
    if clamped and cfg.method != "none":
        log.warning("rank %d clamped to the layer size for %d layers (smallest: %d)", cfg.rank, len(clamped), min(clamped.values()))
    calib, held = _windows(tokenizer, cfg, path == DEMO_DIR)
    timings = {}

    t = time.perf_counter()
    grams = collect_grams(model, linears, calib, cfg.batch_size, progress)
    timings["calibrate_s"] = time.perf_counter() - t
    ppl = {"fp16": perplexity(model, held, cfg.batch_size, "perplexity fp16")}

    t = time.perf_counter()
    compressed_model = copy.deepcopy(model)
    del model  # the compressed copy is all we need from here on
    c_linears = target_linears(compressed_model, cfg.only, cfg.skip)
    compressed = compress_model(compressed_model, c_linears, grams, cfg.compress_config(), calib)
    timings["compress_s"] = time.perf_counter() - t
    biases = {n: m.bias for n, m in c_linears.items()}

    methods = ["none"]
    if cfg.method != "none":
        methods += [m for m in ("svd", "eora") if cfg.compare or m == cfg.method]
    results: dict[str, dict[str, LayerResult]] = {}
    t = time.perf_counter()
    for method in methods:
        results[method] = compensate_layers(compressed, grams, cfg.compensation(method), biases, progress)
    timings["compensate_s"] = time.perf_counter() - t
    if cfg.method.startswith("lsi"):
        # LSI retrains the quantized weights (starting from the compressor's scales);
        # lsi+eora then compensates what error remains.
        t = time.perf_counter()
        lsi_cfg = LsiConfig(bits=cfg.bits, group_size=cfg.group_size, epochs=cfg.lsi_epochs, lr=cfg.lsi_lr, progress=progress)
        lsi_compressed = lsi_compress(compressed_model, c_linears, lsi_cfg, calib, base=compressed)
        timings["lsi_s"] = time.perf_counter() - t
        results["lsi"] = compensate_layers(lsi_compressed, grams, cfg.compensation("none"), biases, progress)
        results["lsi+eora"] = compensate_layers(lsi_compressed, grams, cfg.compensation("eora"), biases, progress)
        methods += ["lsi", "lsi+eora"]
    for method in methods:
        label = "compressed" if method == "none" else f"compressed+{method}"
        with swapped(compressed_model, {n: r.module for n, r in results[method].items()}):
            ppl[label] = perplexity(compressed_model, held, cfg.batch_size, f"perplexity {label}")

    sweep: dict[str, dict[int, float]] = {}
    ranks = cfg.sweep_ranks if cfg.sweep_ranks is not None else _default_sweep(cfg.rank, max_rank, cfg.lowrank_bits)
    if cfg.method != "none":
        for method in [m for m in ("svd", "eora") if m in methods]:
            sweep[method] = {}
            for r in ranks:
                res = results[method] if r == cfg.rank else compensate_layers(compressed, grams, cfg.compensation(method, r), biases, False)
                with swapped(compressed_model, {n: x.module for n, x in res.items()}):
                    sweep[method][r] = perplexity(compressed_model, held, cfg.batch_size, f"sweep {method} r={r}")

    final = results[cfg.method]
    fp16_bytes = sum(m.weight.numel() * 2 for m in c_linears.values())
    sizes = {
        "fp16_linear_bytes": fp16_bytes,
        "compressed_linear_bytes": sum(r.module.weight_q.storage_bytes() for r in final.values()),
        "factor_bytes": sum(r.module.storage_bytes() - r.module.weight_q.storage_bytes() for r in final.values()),
        # Per compared method: LSI alone has no factors, the others their own rank's.
        "factor_bytes_by_method": {m: sum(r.module.storage_bytes() - r.module.weight_q.storage_bytes() for r in res.values())
                                   for m, res in results.items()},
    }
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "eora_export_version": __version__,
        "model": cfg.model,
        "model_path": str(path),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "calibration": {"windows": int(calib.shape[0]), "seq_len": cfg.seq_len, "tokens": int(calib.numel()),
                        "shared_grams": len(grams.sums), "linears": len(linears)},
        "eval": {"windows": int(held.shape[0]), "tokens": int(held.numel())},
        "perplexity": ppl,
        "sweep": {m: {str(r): v for r, v in s.items()} for m, s in sweep.items()},
        "sizes": sizes,
        "rank_clamped": clamped,
        "layers": _layer_rows(results),
        "timings": timings,
    }
    report["table"] = summary_table(report)
    return RunResult(report, compressed_model, tokenizer, final, sweep, path, compressed, grams, biases, held)


def summary_table(report: dict) -> str:
    s = report["sizes"]
    ppl = report["perplexity"]
    rows = [("fp16", ppl["fp16"], s["fp16_linear_bytes"]), ("compressed", ppl["compressed"], s["compressed_linear_bytes"])]
    by_method = s.get("factor_bytes_by_method", {})
    for label, value in ppl.items():
        if label.startswith("compressed+"):
            factors = by_method.get(label.removeprefix("compressed+"), s["factor_bytes"])
            rows.append((label, value, s["compressed_linear_bytes"] + factors))
    return format_table(rows) + "\n(size: decoder Linears only; factors at --lowrank-bits)"


def write_outputs(cfg: RunConfig, result: RunResult) -> None:
    """The output folder, all or nothing: base/, adapter/, report.json, plots."""
    report, ppl = result.report, result.report["perplexity"]
    meta = {
        "method": cfg.method, "rank": cfg.rank, "lowrank_bits": cfg.lowrank_bits, "quant": cfg.quant, "bits": cfg.bits,
        "group_size": cfg.group_size, "sparsity": cfg.sparsity, "eora_export_version": __version__,
    }
    modules = {n: r.module for n, r in result.modules.items()}
    with atomic_dir(cfg.out) as tmp:
        save_compressed_base(result.model, result.tokenizer, modules, tmp / "base", meta)
        if any(m.rank for m in modules.values()):
            save_peft_adapter(modules, tmp / "adapter", str(result.model_path), meta)
        write_json(report, tmp / "report.json")
        plot_layer_errors(report["layers"], tmp / "per_layer_error.png")
        if any(result.sweep.values()):
            ref = {"fp16": ppl["fp16"], "compressed": ppl["compressed"]}
            plot_ppl_vs_rank(result.sweep, ref, tmp / "ppl_vs_rank.png")
