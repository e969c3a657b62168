"""Deployable outputs of a finished run: ONNX (fused, pattern, FP16 baseline), the
Polygraphy comparison, the TensorRT engine and the Triton repository.

Each file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_dir
from .compensate.apply import compensate_layers, swapped
from .models import load_model

log = logging.getLogger("eora_export")


@dataclass(frozen=True)
class OnnxSet:
    """The three graphs written for ``--out X.onnx``."""

    fused: Path  # X.onnx: EoraLinear nodes, for the TensorRT plugin
    pattern: Path  # X.pattern.onnx: the canonical unfused pattern (stock TensorRT / ORT)
    baseline: Path  # X.fp16.onnx: the uncompressed FP16 model


def onnx_paths(out: Path) -> OnnxSet:
    stem = out.with_suffix("")
    return OnnxSet(out, stem.with_name(stem.name + ".pattern.onnx"), stem.with_name(stem.name + ".fp16.onnx"))


def write_onnx(result, out: Path, kv_cache: bool = False) -> OnnxSet:
    """Fused + pattern graphs of the run's final modules, and the FP16 baseline graph
    (each written atomically by the exporter; external data above 1.5 GiB)."""
    from .onnx.export import export_baseline_onnx, export_onnx

    paths = onnx_paths(out)
    modules = {n: r.module for n, r in result.modules.items()}
    with swapped(result.model, modules):
        export_onnx(result.model, paths.fused, kv_cache=kv_cache, fused=True)
        export_onnx(result.model, paths.pattern, kv_cache=kv_cache, fused=False)
    baseline, _ = load_model(result.model_path, torch.float16)
    export_baseline_onnx(baseline, paths.baseline, kv_cache=kv_cache)
    return paths


def verify_onnx(result, cfg, paths: OnnxSet, held, verify_dir: Path, methods: tuple[str, ...] = ("none", "svd", "eora")):
    """Polygraphy comparison of the baseline against each method's pattern graph on held-out windows.

    Methods other than the run's own are exported to temporary graphs for the comparison.
    """
    from .onnx.export import export_onnx
    from .verify import compare_models

    windows = held.numpy()
    with atomic_dir(verify_dir) as tmp:
        graphs = {}
        for method in methods:
            if method == cfg.method:
                graphs[method] = paths.fused
                continue
            if method == "none" or cfg.method != "none":
                layers = compensate_layers(result.compressed, result.grams, cfg.compensation(method), result.biases, False)
                with swapped(result.model, {n: r.module for n, r in layers.items()}):
                    graphs[method] = export_onnx(result.model, tmp / f"{method}.onnx", fused=True)
        report = compare_models(paths.baseline, graphs, windows, tmp)
        for method in graphs:
            if method != cfg.method:
                (tmp / f"{method}.onnx").unlink()
        # The saved JSON must point at the renamed folder, not the temporary one.
        text = (tmp / "verify.json").read_text().replace(str(tmp), str(verify_dir))
        (tmp / "verify.json").write_text(text)
    return report
