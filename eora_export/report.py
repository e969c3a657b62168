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


def plot_ppl_vs_rank(sweep: dict[str, dict[int, dict[str, float]]], reference: dict[str, dict[str, float]], path: Path,
                     windows: int | None = None) -> None:
    """KL(fp16 ‖ model) and perplexity vs rank per method, with FP16 and uncompensated levels as lines.

    sweep: method -> rank -> {"kl", "perplexity"}; reference: label -> {"kl", "perplexity"}, on the
    same ``windows`` held-out windows as the sweep.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"fp16": ("k", "--"), "compressed": ("r", ":")}
    for ax, key, ylabel in ((axes[0], "kl", "mean per-token KL(fp16 ‖ model)"), (axes[1], "perplexity", "held-out perplexity")):
        for method, points in sweep.items():
            ranks = sorted(points)
            ax.plot(ranks, [points[r][key] for r in ranks], marker="o", label=method)
        for label, values in reference.items():
            if values.get(key) is None or (key == "kl" and label == "fp16"):
                continue
            color, ls = styles.get(label, ("gray", "-."))
            ax.axhline(values[key], color=color, ls=ls, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_ylabel(ylabel)
        ax.legend()
    suffix = f" ({windows} held-out windows)" if windows else ""
    axes[0].set_title("KL to FP16 vs rank" + suffix)
    axes[1].set_title("Perplexity vs rank" + suffix)
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


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def format_accuracy(accuracy: dict[str, dict], sizes: dict[str, int]) -> str:
    """The end-of-run summary: per held-out text, each model's perplexity, its change against
    the compressed model with a paired interval, mean per-token KL(fp16 ‖ model), the share of
    the compressed model's KL recovered with its interval, and size; then the rankings, where
    "~" marks neighbours whose difference is inside the noise (not ranked).

    accuracy: report["accuracy"] (text name -> evaluate.text_report plus "file", "domain");
    sizes: model label -> bytes of its decoder Linears.
    """
    blocks = []
    level = 95
    for text in accuracy.values():
        level = round(100 * text["bootstrap"]["level"])
        # the file's name only: the full path is in report.json, and the demo's is deep in site-packages
        head = f"{text['domain']}: {Path(text['file']).name} ({text['windows']} windows, {text['predicted_tokens']} predicted tokens)"
        cols = (f"{'model':<26} {'perplexity':>10}  {'ppl vs compressed [' + str(level) + '% CI]':<32} "
                f"{'KL ×1e-3':>9}  {'KL recovered [' + str(level) + '% CI]':<21} {'size (MB)':>9}")
        lines = [head, cols, "-" * len(cols)]
        for label, ppl in text["perplexity"].items():
            vs = text["vs_baseline"].get(label)
            change = ""
            if vs:
                c = vs["ppl_change"]
                change = f"{_pct(c['diff'])} [{_pct(c['low'])}, {_pct(c['high'])}]" + ("" if c["significant"] else " ~")
            kl = text["kl"].get(label)
            kl_s = f"{1e3 * kl:9.3f}" if kl is not None else f"{'-':>9}"
            rec = text["kl_recovered"].get(label)
            rec_s = ""
            if rec:
                tied = vs is not None and "kl" in vs and not vs["kl"]["significant"]
                rec_s = f"{100 * rec['share']:.0f}% [{100 * rec['low']:.0f}, {100 * rec['high']:.0f}]" + (" ~" if tied else "")
            size = sizes.get(label)
            size_s = f"{size / 1e6:9.3f}" if size is not None else f"{'-':>9}"
            lines.append(f"{label:<26} {ppl:10.3f}  {change:<32} {kl_s}  {rec_s:<21} {size_s}")
        for metric, line in text.get("ranking", {}).items():
            lines.append(f"ranked by {metric + ':':<12} {line}")
        blocks.append("\n".join(lines))
    blocks.append(f"(KL: mean per-token KL(fp16 ‖ model) on the same tokens; [..]: paired {level}% bootstrap interval "
                  "over windows; '<' ranked, '~' inside the noise; size: decoder Linears only, factors at --lowrank-bits)")
    return "\n\n".join(blocks)
