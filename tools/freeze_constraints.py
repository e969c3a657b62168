"""Record, or compare with, the exact package versions a passing test run resolved.

    python tools/freeze_constraints.py           # write constraints.txt from this environment
    python tools/freeze_constraints.py --diff    # print what differs from constraints.txt (exit 0)

constraints.txt is what CI last passed with; `pip install -c constraints.txt torch==2.13.0 -e ".[test]"`
reproduces that set-up. The ranges users get are pyproject.toml's; this file only pins one point in them.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
# The project itself and the installers are not part of the tested set.
SKIP = {"eora-export", "pip", "setuptools", "wheel"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) not in SKIP:
            found[_norm(name)] = dist.version
    return dict(sorted(found.items()))


def read(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def render(pins: dict[str, str]) -> str:
    head = (f"# Exact versions of a passing `.ci/run` (Python {platform.python_version()}, {sys.platform}).\n"
            "# Regenerate with `python tools/freeze_constraints.py` inside that environment.\n")
    # torch's local build tag (+cpu) is not a constraint pip can match across indexes.
    return head + "".join(f"{n}=={v.split('+', 1)[0]}\n" for n, v in pins.items())


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), (new.get(name) or "").split("+", 1)[0] or None
        if a != b:
            rows.append(f"{name}: {a or '-'} -> {b or '-'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diff", action="store_true", help="compare with constraints.txt instead of writing it")
    ap.add_argument("--out", type=Path, default=CONSTRAINTS, help="where to write (default: constraints.txt)")
    args = ap.parse_args(argv)
    now = installed()
    if args.diff:
        rows = diff(read(CONSTRAINTS), now) if CONSTRAINTS.is_file() else ["constraints.txt missing"]
        key = {n: now[n] for n in ("torch", "transformers", "onnx", "onnxruntime", "peft", "nvidia-modelopt", "numpy") if n in now}
        print("resolved: " + ", ".join(f"{n} {v}" for n, v in key.items()))
        print("differs from constraints.txt: " + ("; ".join(rows) if rows else "nothing"))
        return 0
    args.out.write_text(render(now))
    print(f"wrote {args.out} ({len(now)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
