"""The run report, built in one place from the walk's manifest and the head's scores.

Per-layer rows, sizes and the summary table all read the manifest entries the walk wrote
(engine.walk.process_block), so a streamed run and an in-memory run report the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..report import format_accuracy, format_table


def layer_rows(blocks: list[dict]) -> list[dict]:
    """One row per compressed Linear: shape, rank and activation-weighted error per method."""
    rows = []
    for b in blocks:
        for name, e in b["layers"].items():
            before = e["error_before"]
            methods = e["methods"]
            rows.append({
                "name": name, "out_features": e["out_features"], "in_features": e["in_features"],
                "rank": {m: v["rank"] for m, v in methods.items()},
                "error_before": before,
                "error_after": {m: v["error_after"] for m, v in methods.items()},
                "relative_error": {m: (v["error_after"] / before if before > 0 else 0.0) for m, v in methods.items()},
            })
    return rows


def sizes(blocks: list[dict], method: str) -> dict:
    """Bytes of the decoder Linears: FP16, compressed, and the factors of ``method`` and of every
    method evaluated (a bias counts with the factors: module bytes minus weight bytes)."""
    fp16 = comp = 0
    by_method: dict[str, int] = {}
    for b in blocks:
        for e in b["layers"].values():
            fp16 += e["out_features"] * e["in_features"] * 2
            comp += e["weight_bytes"]
            for m, v in e["methods"].items():
                by_method[m] = by_method.get(m, 0) + v["factor_bytes"]
    return {"fp16_linear_bytes": fp16, "compressed_linear_bytes": comp, "factor_bytes": by_method.get(method, 0),
            "factor_bytes_by_method": by_method}


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
    method = report["config"]["method"]
    labels = [f"compressed+{method}"] if method != "none" else []
    return format_table([(k, None, v) for k, v in model_sizes(report["sizes"], labels).items()]) + \
        "\n(not evaluated; size: decoder Linears only)"


def build_report(cfg, path: Path, blocks: list[dict], *, calib_shape: tuple[int, int], eval_rows: int,
                 accuracy: dict, sweep: dict, sweep_reference: dict, clamped: dict, timings: dict, engine: dict,
                 validation: dict) -> dict:
    """The report.json of a run (and the table it prints)."""
    calib_n, seq = calib_shape
    report = {
        "eora_export_version": __version__,
        "model": cfg.model,
        "model_path": str(path),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "calibration": {"windows": calib_n, "seq_len": seq, "tokens": calib_n * seq,
                        "shared_grams": sum(b.get("shared_grams", 0) for b in blocks),
                        "linears": sum(len(b["layers"]) for b in blocks)},
        "eval": {"windows": eval_rows, "tokens": eval_rows * seq} if accuracy else {},
        "perplexity": accuracy["heldout"]["perplexity"] if accuracy else {},  # in domain; both texts in "accuracy"
        "kl": accuracy["heldout"]["kl"] if accuracy else {},
        "accuracy": accuracy,
        "sweep": {m: {str(r): v for r, v in s.items()} for m, s in sweep.items()},
        "sweep_reference": sweep_reference,
        "sizes": sizes(blocks, cfg.method),
        "rank_clamped": clamped,
        # KL(fp16 ‖ model) on the validation split (calibration text never fitted on): the
        # never-worse check of the final method against the uncompensated model.
        "validation": validation,
        "layers": layer_rows(blocks),
        "timings": timings,
        "engine": engine,
    }
    report["table"] = summary_table(report)
    return report
