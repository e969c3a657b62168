"""Up-front input checks, run before minutes of work (issue #9 extends them)."""

from __future__ import annotations

from pathlib import Path

from .models import read_config


def preflight(cfg, model_path: Path) -> None:
    """Raise a one-line EoraError for input that would fail later in the run."""
    read_config(model_path)
