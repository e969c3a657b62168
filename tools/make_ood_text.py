"""Build the demo's out-of-domain held-out text from the Vim user manual.

The demo (tools/train_demo.py) trained on Python documentation, standard-library docstrings,
licence texts and README/NEWS prose under /usr/share/doc; the Vim user manual
(/usr/share/vim/vim90/doc/usr_*.txt, Debian package vim-runtime) is none of these: a tutorial
about editing text with keystrokes, in the second person. It is distributed under the Open
Publication License v1.0, which allows redistributing modified copies that are labelled as
modified, say who modified them and when, and name the original; the first document of the
output says exactly that (eora_export/demo_model/MODEL_CARD.md records the provenance).

    python tools/make_ood_text.py --out eora_export/demo_model/ood_vim_manual.txt
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

SOURCE = Path("/usr/share/vim/vim90/doc")
CHAPTERS = ("usr_02", "usr_03")
NOTICE = (
    "The Vim user manual is Copyright (c) 1988-2003 by Bram Moolenaar; parts come from the book \"Vi IMproved - Vim\" "
    "by Steve Oualline (New Riders Publishing). This material may be distributed only subject to the terms and "
    "conditions set forth in the Open Publication License, v1.0 or later (http://www.opencontent.org/openpub/).\n"
    "This is a modified version: chapters {chapters} of the Vim 9.0 user manual as shipped in Debian's vim-runtime "
    "package (/usr/share/vim/vim90/doc; upstream https://github.com/vim/vim/tree/master/runtime/doc), with the help "
    "markup, navigation lines and modelines removed and paragraphs unwrapped, by the eora-export project on "
    "2026-11-30, as out-of-domain evaluation text for the eora-export demo model."
)
_SKIP = re.compile(r"^(=+|-{5,}|\s*(Next|Previous) chapter:.*|\s*Table of contents:.*|Copyright: see .*|\s*vim:.*:)\s*$")


def _clean(line: str) -> str:
    line = re.sub(r"\*[^*\s|]+\*", "", line)  # *tag* anchors
    line = re.sub(r"\|([^|\s]+)\|", r"\1", line)  # |link| -> link
    line = re.sub(r"\s>$", "", line)  # example-block openers
    return line.rstrip()


def chapter_text(path: Path) -> str:
    """One chapter as one document: paragraphs unwrapped to one line each; example lines kept."""
    raw = unicodedata.normalize("NFC", path.read_text(encoding="utf-8", errors="replace")).expandtabs(8)
    paragraphs: list[str] = []
    current: list[str] = []
    for line in raw.splitlines()[1:]:  # the first line is the file's help header
        if _SKIP.match(line) or line.strip() == "<":
            line = ""
        line = _clean(line)
        if line.startswith(" ") and line.strip():  # an indented example: its own line
            if current:
                paragraphs.append(" ".join(current))
                current = []
            paragraphs.append(line.strip())
        elif line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(p for p in paragraphs if p.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    docs = [NOTICE.format(chapters=", ".join(c.removeprefix("usr_") for c in CHAPTERS))]
    docs += [chapter_text(args.source / f"{c}.txt") for c in CHAPTERS]
    args.out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{args.out}: {args.out.stat().st_size} bytes, {len(docs)} documents")


if __name__ == "__main__":
    main()
