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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .adapter import save_compressed_base, save_peft_adapter
from .atomic import atomic_dir
from .calibration import CalibSource, calibration_windows, collect_grams, read_texts, token_windows
from .compensate.apply import LayerResult, compensate_layers, layer_rank, swapped
from .compensate.feedback import feedback_compensate_model
from .compensate.lsi import LsiConfig, lsi_compress
from .compensate.ranks import budget_bytes, budget_compensate, parse_budget, validation_windows
from .compress import compress_model
from .config import METHOD_CHOICES, RunConfig  # noqa: F401  (re-exported until engine/ replaces this module)
from .errors import BadInput
from .evaluate import Scores, model_logits, reference_logits, score, score_many, text_report
from .models import DEMO_DIR, load_model, resolve_model, target_linears
from .report import format_accuracy, format_table, plot_layer_errors, plot_ppl_vs_rank, write_json
from .validate import check_output_location, preflight

log = logging.getLogger("eora_export")


def _default_sweep(rank: int, max_rank: int, lowrank_bits: int) -> list[int]:
    ranks = {max(1, rank // 4), max(1, rank // 2), rank, rank * 2, rank * 4}
    # Quantized factors need an even rank (lowrank_group); FP16 factors take any.
    return sorted(r for r in ranks if r <= max_rank and (r % 2 == 0 or lowrank_bits == 16))


DEFAULT_EVAL_SAMPLES = 64  # held-out windows per text for models other than the demo (the demo: all of them)
SWEEP_WINDOWS = 32  # the rank sweep's KL and perplexity: the first windows of the held-out text
REFERENCE_CACHE_BYTES = 512 << 20  # the sweep keeps the FP logits of its windows when they fit in this
DEMO_OOD_FILE = DEMO_DIR / "ood_vim_manual.txt"  # out-of-domain text shipped with the demo (MODEL_CARD.md)


@dataclass
class EvalText:
    """One held-out text of a run: where it came from and its windows [n, seq]."""

    name: str  # "heldout" (in domain) or "ood" (out of domain)
    domain: str
    path: Path
    windows: torch.Tensor


def eval_samples(cfg: RunConfig, is_demo: bool) -> int | None:
    """Held-out windows to evaluate: --eval-samples, else all of them for the demo (it evaluates
    in seconds per model and its ranking needs them: DESIGN §10), else DEFAULT_EVAL_SAMPLES."""
    if cfg.eval_samples is not None:
        return cfg.eval_samples
    return None if is_demo else DEFAULT_EVAL_SAMPLES


def _windows(tokenizer, cfg: RunConfig, is_demo: bool) -> tuple[torch.Tensor, list[EvalText]]:
    """(calibration windows [n, seq], the held-out texts: in domain, then out of domain if any)."""
    sources = [CalibSource.parse(s) for s in cfg.calib] or [CalibSource(DEMO_DIR / "calib.txt")]
    calib = calibration_windows(tokenizer, sources, cfg.calib_samples, cfg.seq_len)
    n = eval_samples(cfg, is_demo)
    texts = [("heldout", "in domain", Path(cfg.eval_file) if cfg.eval_file else DEMO_DIR / "heldout.txt", "--eval-file")]
    ood = (None if cfg.ood_file == "none" else Path(cfg.ood_file)) if cfg.ood_file else (DEMO_OOD_FILE if is_demo else None)
    if ood is not None:
        texts.append(("ood", "out of domain", ood, "--ood-file"))
    evals = []
    for name, domain, path, flag in texts:
        windows = token_windows(tokenizer, read_texts(path), cfg.seq_len, n)
        if windows.shape[0] == 0:
            raise BadInput(f"{domain} text {path} ({flag}) is shorter than one {cfg.seq_len}-token window; give more text")
        evals.append(EvalText(name, domain, path, windows))
    return calib, evals


def _label(method: str) -> str:
    return "compressed" if method == "none" else f"compressed+{method}"


def _swapped_logits(model: torch.nn.Module, layers: dict[str, LayerResult]):
    """A logits function of ``model`` with ``layers``' modules in place for each call (swapping
    per batch costs microseconds and lets one pass over the text score every method)."""
    modules = {n: r.module for n, r in layers.items()}

    def logits(ids: torch.Tensor) -> torch.Tensor:
        with swapped(model, modules):
            return model(ids).logits

    return logits


def _rank_sweep(cfg: RunConfig, methods: list[str], max_rank: int, results: dict[str, dict[str, LayerResult]],
                held_scores: dict[str, Scores], compressed: dict, grams, biases: dict, model: torch.nn.Module,
                reference, held: torch.Tensor) -> tuple[dict[str, dict[int, dict[str, float]]], dict]:
    """KL and perplexity vs rank for SVD and EoRA on the first SWEEP_WINDOWS held-out windows.

    A subset keeps the sweep's cost below the old 64-window perplexity sweep while the main
    evaluation uses every window; KL is paired and low-noise, so the subset shows the trend.
    The --rank point is the main evaluation's own scores on those windows (identical numbers).
    """
    ranks = cfg.sweep_ranks if cfg.sweep_ranks is not None else _default_sweep(cfg.rank, max_rank, cfg.lowrank_bits)
    swept = [m for m in ("svd", "eora") if m in methods] if cfg.method != "none" else []
    n = min(SWEEP_WINDOWS, held.shape[0])
    head = {k: v.head(n) for k, v in held_scores.items()}
    sweep_reference = {"windows": n, **{k: {"perplexity": head[k].perplexity, "kl": head[k].mean_kl}
                                        for k in ("fp16", "compressed") if k in head}}
    if not swept or not ranks:
        return {}, sweep_reference
    windows = held[:n]
    vocab = int(model.config.vocab_size)
    if n * windows.shape[1] * vocab * 4 <= REFERENCE_CACHE_BYTES:
        reference = reference_logits(reference, windows, cfg.batch_size)  # once, not once per rank
    sweep: dict[str, dict[int, dict[str, float]]] = {}
    for method in swept:
        sweep[method] = {}
        for r in ranks:
            if r == cfg.rank:
                s = head[_label(method)]
            else:
                res = compensate_layers(compressed, grams, cfg.compensation(method, r), biases, False)
                s = score(_swapped_logits(model, res), windows, reference, cfg.batch_size, f"sweep {method} r={r}", False)
            sweep[method][r] = {"perplexity": s.perplexity, "kl": s.mean_kl}
    return sweep, sweep_reference


def _check_never_worse(cfg: RunConfig, fp_model, model, results: dict[str, dict[str, LayerResult]], val: torch.Tensor) -> None:
    """Model-level never-worse rule: one warning when --method's KL(fp16 ‖ model) on the
    validation split is above the uncompensated model's (layers already got rank 0 where
    compensation did not lower their own validation error)."""
    reference = model_logits(fp_model)
    kl = {m: score(_swapped_logits(model, results[m]), val, reference, cfg.batch_size, f"validate {m}", False).mean_kl
          for m in ("none", cfg.method)}
    if kl[cfg.method] > kl["none"]:
        log.warning("--method %s is worse than no compensation on the validation split (KL %.5f vs %.5f); "
                    "compare both in the report before shipping it", cfg.method, kl[cfg.method], kl["none"])


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
    held: torch.Tensor  # held-out windows [n, seq] (in domain)
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
    calib, evals = _windows(tokenizer, cfg, path == DEMO_DIR)
    held = evals[0].windows
    timings = {}

    t = time.perf_counter()
    grams = collect_grams(model, linears, calib, cfg.batch_size, progress)
    val = val_grams = None
    if cfg.rank_budget is not None:
        # The validation split: calibration text after the fitting windows, never fitted on.
        val = validation_windows(tokenizer, [CalibSource.parse(s) for s in cfg.calib] or [CalibSource(DEMO_DIR / "calib.txt")],
                                 cfg.calib_samples, cfg.val_samples, cfg.seq_len)
        if val.shape[0] == 0:
            raise BadInput(f"the calibration text has no windows left for validation after --calib-samples "
                           f"{cfg.calib_samples}; give more text or lower --calib-samples")
        val_grams = collect_grams(model, linears, val, cfg.batch_size, progress)
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    # The FP model stays alive until evaluation ends: it is the reference of KL(fp16 ‖ model),
    # computed batch by batch beside each model (in-memory runs are < 1 B parameters, so both fit).
    fp_model = model
    compressed_model = copy.deepcopy(model)
    del model  # fp_model is the one name that keeps it, until evaluation ends
    c_linears = target_linears(compressed_model, cfg.only, cfg.skip)
    compressed = compress_model(compressed_model, c_linears, grams, cfg.compress_config(), calib)
    timings["compress_s"] = time.perf_counter() - t
    biases = {n: m.bias for n, m in c_linears.items()}

    methods = ["none"]
    if cfg.method != "none":
        # eora-fb with --rank-budget takes its ranks from the eora allocation: eora runs first.
        methods += [m for m in ("svd", "eora") if cfg.compare or m == cfg.method
                    or (m == "eora" and cfg.method == "eora-fb" and cfg.rank_budget is not None)]
        if cfg.method == "eora-fb":
            methods.append("eora-fb")
    results: dict[str, dict[str, LayerResult]] = {}
    t = time.perf_counter()
    budget_ranks = None
    for method in methods:
        if method == "eora" and val_grams is not None:
            kind, value = parse_budget(cfg.rank_budget)
            budget = budget_bytes(compressed, cfg.compensation(method), kind, value)
            # Ladders reach 4x the average rank the budget buys (bytes: measured against rank 8).
            average = value if kind == "rank" else 8 * budget / max(budget_bytes(compressed, cfg.compensation(method), "rank", 8), 1)
            results[method], budget_ranks = budget_compensate(compressed, grams, val_grams, cfg.compensation(method), budget,
                                                              biases, max_rank=max(8, int(4 * average)))
        elif method == "eora-fb":
            # Error feedback walks the model: each layer is fitted on the inputs its compressed,
            # already compensated upstream produces (compensate/feedback.py); with --rank-budget
            # at the ranks allocated for EoRA above (eora runs first in `methods`).
            results[method] = feedback_compensate_model(compressed_model, compressed, grams.owner, calib,
                                                        cfg.compensation("eora"), biases, cfg.batch_size, ranks=budget_ranks)
        else:
            results[method] = compensate_layers(compressed, grams, cfg.compensation(method), biases, progress)
    timings["compensate_s"] = time.perf_counter() - t
    if val is not None:
        _check_never_worse(cfg, fp_model, compressed_model, results, val)
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
    t = time.perf_counter()
    reference = model_logits(fp_model)
    fns = {_label(m): _swapped_logits(compressed_model, results[m]) for m in methods}
    scores: dict[str, dict[str, Scores]] = {}
    for text in evals:
        scores[text.name] = score_many(fns, text.windows, reference, "fp16", cfg.batch_size,
                                       f"evaluate {text.name}", progress)
    accuracy = {text.name: {"file": str(text.path), "domain": text.domain, **text_report(scores[text.name], seed=cfg.seed)}
                for text in evals}
    timings["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sweep, sweep_reference = _rank_sweep(cfg, methods, max_rank, results, scores["heldout"], compressed, grams, biases,
                                         compressed_model, reference, held)
    timings["sweep_s"] = time.perf_counter() - t
    del fp_model, reference

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
        "perplexity": accuracy["heldout"]["perplexity"],  # in domain; both texts in "accuracy"
        "kl": accuracy["heldout"]["kl"],
        "accuracy": accuracy,
        "sweep": {m: {str(r): v for r, v in s.items()} for m, s in sweep.items()},
        "sweep_reference": sweep_reference,
        "sizes": sizes,
        "rank_clamped": clamped,
        "layers": _layer_rows(results),
        "timings": timings,
    }
    report["table"] = summary_table(report)
    return RunResult(report, compressed_model, tokenizer, final, sweep, path, compressed, grams, biases, held)


def model_sizes(sizes: dict, labels) -> dict[str, int]:
    """Bytes of the decoder Linears of each model label (fp16, compressed, compressed+METHOD)."""
    out = {"fp16": sizes["fp16_linear_bytes"], "compressed": sizes["compressed_linear_bytes"]}
    by_method = sizes.get("factor_bytes_by_method", {})
    for label in labels:
        if label.startswith("compressed+"):
            out[label] = sizes["compressed_linear_bytes"] + by_method.get(label.removeprefix("compressed+"), sizes["factor_bytes"])
    return out


def summary_table(report: dict) -> str:
    """The table printed at the end of a run: both held-out texts, KL beside perplexity,
    paired intervals, ties marked (report.format_accuracy)."""
    if report.get("accuracy"):
        return format_accuracy(report["accuracy"], model_sizes(report["sizes"], report["perplexity"]))
    sizes = model_sizes(report["sizes"], [f"compressed+{report['config']['method']}"] if report["config"]["method"] != "none" else [])
    return format_table([(k, None, v) for k, v in sizes.items()]) + "\n(not evaluated; size: decoder Linears only)"


def write_outputs(cfg: RunConfig, result: RunResult) -> None:
    """The output folder, all or nothing: base/, adapter/, report.json, plots."""
    report = result.report
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
            ref = {k: v for k, v in report["sweep_reference"].items() if k != "windows"}
            plot_ppl_vs_rank(result.sweep, ref, tmp / "ppl_vs_rank.png", report["sweep_reference"]["windows"])
