"""``eora-export inspect FILE``: what is inside an output, without running it.

:mod:`.detect` recognizes and reads the input (untrusted: sizes checked first, nothing
executed or unpickled, malformed input ends in one-line :class:`~eora_export.errors.BadInput`);
:mod:`.render` turns its dict into text.
"""

from __future__ import annotations

import json
from pathlib import Path

from .detect import inspect_path
from .render import render

__all__ = ["describe", "inspect_path", "render"]


def describe(path: str | Path, as_json: bool = False) -> str:
    """A human-readable (or JSON) description of ``path``; raises BadInput for what it cannot read."""
    info = inspect_path(Path(path))
    if as_json:
        return json.dumps(info, indent=2, default=str)
    return render(info)
