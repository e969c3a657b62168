"""The token windows of a run: calibration, validation (--rank-budget) and the held-out texts.

Every run draws them here, streamed or not, so both see identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import CalibSource, calibration_windows, read_texts, token_windows, validation_windows
from ..errors import BadInput
from ..models import DEMO_DIR

DEFAULT_EVAL_SAMPLES = 64  # held-out windows per text for models other than the demo (the demo: all of them)
DEMO_OOD_FILE = DEMO_DIR / "ood_vim_manual.txt"  # out-of-domain text shipped with the demo (MODEL_CARD.md)


@dataclass
class EvalText:
    """One held-out text of a run: where it came from and its windows [n, seq]."""

    name: str  # "heldout" (in domain) or "ood" (out of domain)
    domain: str
    path: Path
    windows: torch.Tensor


def eval_samples(cfg, is_demo: bool) -> int | None:
    """Held-out windows to evaluate: --eval-samples, else all of them for the demo (it evaluates
    in seconds per model and its ranking needs them: docs/design.md §10), else DEFAULT_EVAL_SAMPLES."""
    if cfg.eval_samples is not None:
        return cfg.eval_samples
    return None if is_demo else DEFAULT_EVAL_SAMPLES


def calib_sources(cfg) -> list[CalibSource]:
    return [CalibSource.parse(s) for s in cfg.calib] or [CalibSource(DEMO_DIR / "calib.txt")]


def run_windows(tokenizer, cfg, is_demo: bool) -> tuple[torch.Tensor, list[EvalText]]:
    """(calibration windows [n, seq], the held-out texts: in domain, then out of domain if any)."""
    calib = calibration_windows(tokenizer, calib_sources(cfg), cfg.calib_samples, cfg.seq_len)
    n = eval_samples(cfg, is_demo)
    texts = [("heldout", "in domain", Path(cfg.eval_file) if cfg.eval_file else DEMO_DIR / "heldout.txt", "--eval-file")]
    ood = (None if cfg.ood_file == "none" else Path(cfg.ood_file)) if cfg.ood_file else (DEMO_OOD_FILE if is_demo else None)
    if ood is not None:
        texts.append(("ood", "out of domain", ood, "--ood-file"))
    evals = []
    for name, domain, path, flag in texts:
        windows = token_windows(tokenizer, read_texts(path), cfg.seq_len, n)
        if windows.shape[0] == 0:
            raise BadInput(f"{domain} text {path} ({flag}) is shorter than one {cfg.seq_len}-token window; give more text")
        evals.append(EvalText(name, domain, path, windows))
    return calib, evals


def run_validation_windows(tokenizer, cfg, required: bool) -> torch.Tensor | None:
    """The validation split: calibration windows beside the fitting ones, never fitted on (ranks of
    --rank-budget, and the model-level never-worse check of every compensated run). None when the
    text has none left and ``required`` is False."""
    val = validation_windows(tokenizer, calib_sources(cfg), cfg.calib_samples, cfg.val_samples, cfg.seq_len)
    if val.shape[0] == 0:
        if not required:
            return None
        raise BadInput(f"the calibration text has no windows left for validation after --calib-samples "
                       f"{cfg.calib_samples}; give more text or lower --calib-samples")
    return val
