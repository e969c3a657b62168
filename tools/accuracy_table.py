"""Regenerate the README's demo accuracy table: one `eora-export` run per setting, both held-out
texts, perplexity and KL(FP16 ‖ model) with paired bootstrap intervals.

    python tools/accuracy_table.py                       # all settings, rank 16, prints markdown
    python tools/accuracy_table.py --rank 32 --settings int3-gptq,24-sparsegpt --json acc.json

Each setting is exactly the CLI command printed beside its rows (run in this process through
``eora_export.cli.main`` with ``--sweep-ranks ''``: the table does not need the rank sweep),
so a row can be reproduced alone. One torch thread: the numbers do not depend on it, and on a
shared 2-core machine one thread is the faster choice.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

# name -> (flags, what it is); ordered from mild to harsh
SETTINGS: dict[str, tuple[list[str], str]] = {
    "int4": ([], "INT4 RTN g128 (default)"),
    "int3": (["--bits", "3"], "INT3 RTN g128"),
    "int3-gptq": (["--quant", "gptq", "--bits", "3"], "INT3 GPTQ g128"),
    "24": (["--quant", "none", "--sparsity", "magnitude"], "2:4 magnitude, FP16 weights"),
    "24-int4": (["--sparsity", "magnitude"], "2:4 magnitude + INT4 RTN"),
    "24-sparsegpt": (["--sparsity", "sparsegpt"], "2:4 SparseGPT + INT4 RTN"),
    # not in the default list: LSI trains for minutes (README, "LSI beside EoRA")
    "int3-lsi": (["--bits", "3", "--method", "lsi+eora"], "INT3 RTN g128, LSI"),
    "int4-lsi": (["--method", "lsi+eora"], "INT4 RTN g128, LSI"),
}
DEFAULT = ("int4", "int3", "int3-gptq", "24", "24-int4", "24-sparsegpt")
SHORT = {"fp16": "FP16", "compressed": "C", "compressed+svd": "SVD", "compressed+eora": "EoRA",
         "compressed+lsi": "LSI", "compressed+lsi+eora": "LSI+EoRA"}


def run_setting(flags: list[str], rank: int, out: Path, extra: list[str]) -> tuple[dict, float, str]:
    """One CLI run; returns its report, wall seconds and the command as a user would type it."""
    from eora_export.cli import main

    argv = ["--model", "demo", "--rank", str(rank), *flags, *extra, "--sweep-ranks", "", "--quiet", "--out", str(out)]
    shown = "eora-export " + " ".join(shlex.quote(a) for a in argv if a != "--quiet").replace(str(out), "DIR")
    t = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code:
        sys.stderr.write(buf.getvalue())
        raise SystemExit(f"{shown} failed with exit code {code}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - t, shown


def _ranking(line: str) -> str:
    return " ".join(tok if tok in ("<", "~") else _short(tok) for tok in line.split(" "))


def methods_of(report: dict) -> tuple[str, ...]:
    """The compensated models of a run, in report order (compressed+svd, compressed+eora, ...)."""
    return tuple(k for k in report["accuracy"]["heldout"]["perplexity"] if k not in ("fp16", "compressed"))


def _short(label: str) -> str:
    return SHORT.get(label, label.removeprefix("compressed+"))


def header(methods: tuple[str, ...]) -> str:
    names = " / ".join(["FP16", "C", *(f"+{_short(m)}" for m in methods)])
    return (f"| compression | text (windows) | perplexity: {names} | EoRA vs C, perplexity [95% CI] | "
            f"KL ×1e-3: {' / '.join(['C', *(f'+{_short(m)}' for m in methods)])} | "
            f"KL recovered: {' / '.join(_short(m) for m in methods)} [95% CI] | ranked by KL | ranked by perplexity |\n"
            "|---|---|---|---|---|---|---|---|")


def rows(name: str, report: dict) -> list[str]:
    """Markdown rows of one setting: one per held-out text."""
    out = []
    methods = methods_of(report)
    for text in report["accuracy"].values():
        ppl, kl = text["perplexity"], text["kl"]
        cells = [f"{ppl[k]:.3f}" for k in ("fp16", "compressed", *methods)]
        kls = [f"{1e3 * kl[k]:.3f}" for k in ("compressed", *methods)]
        rec = []
        for m in methods:
            r, tied = text["kl_recovered"][m], not text["vs_baseline"][m]["kl"]["significant"]
            rec.append(f"{100 * r['share']:.0f}% [{100 * r['low']:.0f}, {100 * r['high']:.0f}]" + (" ~" if tied else ""))
        eora = text["vs_baseline"].get("compressed+eora", {}).get("ppl_change")
        dppl = ""
        if eora:
            dppl = f"{100 * eora['diff']:+.2f}% [{100 * eora['low']:+.2f}, {100 * eora['high']:+.2f}]" + ("" if eora["significant"] else " ~")
        domain = "in" if text["domain"] == "in domain" else "out"
        out.append(f"| {SETTINGS[name][1]} | {domain} ({text['windows']}) | {' / '.join(cells)} | {dppl} | "
                   f"{' / '.join(kls)} | {' / '.join(rec)} | {_ranking(text['ranking']['kl'])} | "
                   f"{_ranking(text['ranking']['perplexity'])} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--extra", default="", help="more eora-export flags for every setting, e.g. '--lowrank-bits 16'")
    ap.add_argument("--json", type=Path, help="also write each setting's report (accuracy, sizes, timings) here")
    ap.add_argument("--from-json", type=Path, help="print the tables of an earlier --json instead of running")
    args = ap.parse_args()
    if args.from_json:
        print_tables(json.loads(args.from_json.read_text()), None)
        return
    torch.set_num_threads(1)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    saved, total = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            report, seconds, shown = run_setting(SETTINGS[name][0], args.rank, Path(tmp) / name, shlex.split(args.extra))
            saved[name] = {"command": shown, "seconds": seconds,
                           **{k: report[k] for k in ("accuracy", "sizes", "timings", "config")}}
            print(f"done {name} in {seconds:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(saved, indent=1))
    print_tables(saved, time.perf_counter() - total)


def print_tables(saved: dict[str, dict], seconds: float | None) -> None:
    """Markdown: one table per set of compared methods, then each setting's command and time."""
    tables: dict[tuple[str, ...], list[str]] = {}
    for name, report in saved.items():
        tables.setdefault(methods_of(report), []).extend(rows(name, report))
    for methods, lines in tables.items():
        print(header(methods))
        print("\n".join(lines))
        print()
    for name, report in saved.items():
        print(f"- {SETTINGS[name][1]}: `{report['command']}` ({report['seconds']:.0f} s)")
    if seconds is not None:
        print(f"\n(`python tools/accuracy_table.py {' '.join(sys.argv[1:])}`: {seconds:.0f} s in all)")


if __name__ == "__main__":
    main()
