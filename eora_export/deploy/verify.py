"""Compare ONNX exports (FP16 baseline vs compensated variants) on the same token windows.

Every model runs under Polygraphy's ``OnnxrtRunner`` with our exact-reference session
(:func:`eora_export.onnx.runtime.make_session`, which also runs fused EoraLinear nodes on
the CPU). The feeds are saved as ``inputs.json`` and each model's outputs as a Polygraphy
``RunResults`` JSON (what ``polygraphy run --save-outputs`` writes), so on a GPU machine

    polygraphy run /abs/fused.onnx --trt --plugins /abs/libeora_plugin.so \\
        --load-inputs inputs.json --load-outputs baseline_outputs.json ...

replays the same windows in TensorRT (see :func:`polygraphy_command`). Elementwise
tolerances say little about a different model's logits, so the report gives max/mean
|Δlogits|, top-1 agreement with the baseline and the perplexity of each model.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RUNNER_PREFIX = "onnxrt-"


@dataclass
class ModelMetrics:
    """Figures of one model over all windows; the Δ fields are None for the baseline."""

    name: str
    path: str
    perplexity: float
    max_abs_dlogits: float | None = None
    mean_abs_dlogits: float | None = None
    top1_agreement: float | None = None
    outputs_json: str = ""


@dataclass
class VerifyReport:
    """baseline, then the other models in the order given; the JSON files written."""

    baseline: ModelMetrics
    models: list[ModelMetrics] = field(default_factory=list)
    inputs_json: str = ""
    windows: int = 0
    seq_len: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [f"{'model':<12} {'ppl':>10} {'max|Δ|':>10} {'mean|Δ|':>10} {'top1':>7}"]
        for m in [self.baseline, *self.models]:
            fmt = (lambda v, f: "-" if v is None else format(v, f))  # noqa: E731
            rows.append(f"{m.name:<12} {m.perplexity:>10.4f} {fmt(m.max_abs_dlogits, '.4g'):>10} "
                        f"{fmt(m.mean_abs_dlogits, '.4g'):>10} {fmt(m.top1_agreement, '.4f'):>7}")
        return "\n".join(rows)


def token_windows(tokens: Sequence[int] | np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows int64 ``[n, seq_len]`` cut from a 1-D token sequence."""
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if seq_len < 2 or len(arr) < seq_len:
        raise ValueError(f"need seq_len >= 2 and at least seq_len tokens, got seq_len={seq_len}, "
                         f"{len(arr)} tokens; give more text or a shorter window")
    n = len(arr) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return arr[: n * seq_len].reshape(n, seq_len)


def feeds_for(session: Any, windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One feed dict per window (batch 1); an empty KV cache where the model takes one."""
    feeds = []
    for w in windows:
        feed = {"input_ids": w[None, :].astype(np.int64)}
        for inp in session.get_inputs():
            if inp.name.startswith("past_key_values."):
                _, kv_heads, _, head_dim = inp.shape
                feed[inp.name] = np.zeros((1, kv_heads, 0, head_dim), np.float16)
        feeds.append(feed)
    return feeds


def run_model(path: str | Path, windows: np.ndarray, name: str, *, save_outputs: str | Path | None = None,
              save_inputs: str | Path | None = None) -> Any:
    """Run one ONNX model over ``windows`` with Polygraphy; returns its ``RunResults``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from ..onnx.runtime import make_session

    session = make_session(path)
    feeds = feeds_for(session, windows)
    runner = OnnxrtRunner(session, name=RUNNER_PREFIX + name)
    # Polygraphy prints every feed and output at INFO; our report is the summary.
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        results = Comparator.run([runner], data_loader=feeds,
                                 save_inputs_path=None if save_inputs is None else str(save_inputs))
        if save_outputs is not None:
            results.save(str(save_outputs))
    return results


def _logits(results: Any) -> list[np.ndarray]:
    (_, iterations), = results.items()
    return [np.asarray(it["logits"])[0].astype(np.float32) for it in iterations]


def nll(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(token[t+1] | ≤ t) over a window (float64), and the count."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = logp[np.arange(len(tokens) - 1), tokens[1:]]
    return float(-picked.sum()), len(tokens) - 1


def _perplexity(all_logits: list[np.ndarray], windows: np.ndarray) -> float:
    total, count = 0.0, 0
    for lg, w in zip(all_logits, windows, strict=True):
        s, n = nll(lg, w)
        total, count = total + s, count + n
    return math.exp(total / count)


def compare_models(baseline: str | Path, models: Mapping[str, str | Path], windows: np.ndarray,
                   out_dir: str | Path) -> VerifyReport:
    """Run the baseline and each model (``{"none": p, "svd": p, "eora": p}``) on ``windows``.

    Writes ``inputs.json``, ``baseline_outputs.json``, ``<name>_outputs.json`` and
    ``verify.json`` into ``out_dir``; returns the report.
    """
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2:
        raise ValueError(f"windows must be int64 [n, seq_len], got shape {windows.shape}; use token_windows()")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs_json = out / "inputs.json"
    base_json = out / "baseline_outputs.json"
    base_logits = _logits(run_model(baseline, windows, "baseline", save_outputs=base_json, save_inputs=inputs_json))
    report = VerifyReport(ModelMetrics("baseline", str(baseline), _perplexity(base_logits, windows),
                                       outputs_json=str(base_json)),
                          inputs_json=str(inputs_json), windows=len(windows), seq_len=windows.shape[1])
    for name, path in models.items():
        js = out / f"{name}_outputs.json"
        lg = _logits(run_model(path, windows, name, save_outputs=js))
        diff = np.concatenate([np.abs(a - b).reshape(-1) for a, b in zip(lg, base_logits, strict=True)])
        agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(lg, base_logits, strict=True)])
        report.models.append(ModelMetrics(name, str(path), _perplexity(lg, windows), float(diff.max()),
                                          float(diff.mean()), float(agree.mean()), str(js)))
    (out / "verify.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def compare_pair(baseline: str | Path, model: str | Path, windows: np.ndarray, out_dir: str | Path,
                 name: str = "compensated") -> VerifyReport:
    """:func:`compare_models` for one model."""
    return compare_models(baseline, {name: model}, windows, out_dir)


def plugin_path(plugin_lib: str | Path | None) -> Path:
    """Absolute path of the plugin library for a printed command: the given one, else where
    ``eora-export build-plugin`` puts it.

    Polygraphy's ``--plugins`` (``ctypes.CDLL``), trtexec's ``--dynamicPlugins`` and Triton's
    ``plugins=`` (``dlopen``) look a bare file name up on the library search path, never beside
    the graph or in the current folder.
    """
    from .plugin import DEFAULT_BUILD_DIR, LIB_NAME

    return Path(os.path.abspath(Path(plugin_lib).expanduser())) if plugin_lib else DEFAULT_BUILD_DIR / LIB_NAME


def polygraphy_command(onnx_path: str | Path, plugin_lib: str | Path | None = None, *,
                       inputs_json: str | Path = "inputs.json",
                       baseline_outputs: str | Path = "baseline_outputs.json",
                       seq_len: int | None = None, atol: float = 1.0, rtol: float = 0.0) -> str:
    """The ``polygraphy run`` line that replays the saved windows in TensorRT on a GPU.

    Every path is absolute (the plugin's per :func:`plugin_path`), so the line runs from any folder.
    A compensated model differs from the baseline by design: atol is loose and the check
    uses the mean error; judge it by the perplexity and top-1 figures of the report.
    """
    cmd = ["polygraphy", "run", os.path.abspath(onnx_path), "--trt", "--strongly-typed", "--plugins", str(plugin_path(plugin_lib)),
           "--load-inputs", os.path.abspath(inputs_json), "--load-outputs", os.path.abspath(baseline_outputs),
           "--check-error-stat", "mean", "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]
    if seq_len is not None:
        shape = f"input_ids:[1,{seq_len}]"
        cmd += ["--trt-min-shapes", shape, "--trt-opt-shapes", shape, "--trt-max-shapes", shape]
    return shlex.join(cmd)


def print_polygraphy_command(onnx_path: str | Path, plugin_lib: str | Path | None = None,
                             **kwargs: Any) -> str:
    """Print (and return) :func:`polygraphy_command`."""
    cmd = polygraphy_command(onnx_path, plugin_lib, **kwargs)
    print(cmd)
    return cmd
