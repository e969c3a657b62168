"""report.json and PNG plots of a run: per-layer error, perplexity vs rank, sizes."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=float))


def plot_layer_errors(layers: list[dict], path: Path) -> None:
    """Bars of the relative activation-weighted error per layer for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [entry["name"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for entry in layers]
    methods = [m for m in ("none", "svd", "eora") if all(m in entry["relative_error"] for entry in layers)]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.35), 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [entry["relative_error"][m] for entry in layers], width, label=m)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("‖(W − W′) X‖² / ‖(W − W_c) X‖²")
    ax.set_title("Per-layer output error relative to the uncompensated compressed layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ppl_vs_rank(sweep: dict[str, dict[int, float]], reference: dict[str, float], path: Path) -> None:
    """Perplexity vs rank per method, with FP16 and uncompensated levels as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, points in sweep.items():
        ranks = sorted(points)
        ax.plot(ranks, [points[r] for r in ranks], marker="o", label=method)
    styles = {"fp16": ("k", "--"), "compressed": ("r", ":")}
    for label, value in reference.items():
        color, ls = styles.get(label, ("gray", "-."))
        ax.axhline(value, color=color, ls=ls, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity vs rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[tuple[str, float | None, int]]) -> str:
    """rows: (label, perplexity, bytes) -> aligned text table."""
    lines = [f"{'model':<28} {'perplexity':>11} {'size (MB)':>10}", "-" * 51]
    for label, ppl, size in rows:
        ppl_s = f"{ppl:11.3f}" if ppl is not None else f"{'-':>11}"
        lines.append(f"{label:<28} {ppl_s} {size / 1e6:10.3f}")
    return "\n".join(lines)
