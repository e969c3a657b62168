"""Calibration: text -> token batches, and per-Linear input Gram matrices from forward hooks.

G = (1/N) Σ_t x_t x_tᵀ over every calibration token, summed in float64 and divided once
at the end, so every token weighs the same whatever the batch sizes (a running average
that re-weights batches is a known bug elsewhere). Linears that read the same tensor
(q/k/v, gate/up) share one accumulator, found by tensor identity during the forward.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import BadInput


@dataclass
class CalibSource:
    """One calibration text file and its share of the samples (mixed calibration sets)."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> CalibSource:
        """``FILE`` or ``FILE:WEIGHT``."""
        path, _, weight = spec.rpartition(":") if _has_weight(spec) else (spec, "", "")
        return cls(Path(path), float(weight) if weight else 1.0)


def _has_weight(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return False
    try:
        float(tail)
    except ValueError:
        return False
    return True


def read_texts(path: Path) -> list[str]:
    """Documents of a plain-text file (blank-line separated) or a JSONL file (``text`` field)."""
    if not path.is_file():
        raise BadInput(f"calibration file not found: {path}; pass an existing text or JSONL file to --calib")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise BadInput(f"calibration file {path} looks binary; give plain UTF-8 text or JSONL")
    text = raw.decode("utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{n}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from None
            except RecursionError:
                raise BadInput(f"{path}:{n}: JSON nested too deeply; each line must be an object with a 'text' field") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise BadInput(f"{path}:{n}: JSONL lines need a string 'text' field")
            # JSON escapes can spell lone surrogates, which tokenizers refuse: replace them as bad bytes are.
            docs.append(rec["text"].encode("utf-8", "replace").decode("utf-8"))
    else:
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise BadInput(f"calibration file {path} is empty; give it some text")
    return docs


def token_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None = None) -> Tensor:
    """int64 ``[n, seq_len]``: documents joined with EOS and cut into full windows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in texts:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


# Calibration windows are spread evenly over the whole text, not taken from its head: a file that
# concatenates sources (docs, then licences, then changelogs…) would otherwise calibrate on its first
# source only. Measured on the demo, whose calib.txt is ordered that way (README, Results).
SPREAD_TEXT = 16  # tokenise at most this many windows' worth of text per fitting window
CHARS_PER_TOKEN = 4  # estimate used only to size that budget in characters before tokenising


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, ascending (all of them when ``k ≥ n``)."""
    if k >= n:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


def spread_text(docs: list[str], max_chars: int, regions: int) -> list[str]:
    """The documents of a text longer than ``max_chars``, cut down to ``regions`` evenly spaced spans of
    ``max_chars / regions`` characters each (pieces of documents, in order), so tokenising stays
    bounded on huge files while every part of the file is still represented. Shorter texts unchanged."""
    total = sum(len(d) for d in docs)
    if total <= max_chars:
        return docs
    span, stride = max(1, max_chars // regions), total / regions
    starts = [int(r * stride) for r in range(regions)]
    out, pos = [], 0
    for doc in docs:
        end = pos + len(doc)
        pieces = []
        r = bisect.bisect_left(starts, end) - 1  # the last span starting inside this document or before it
        while r >= 0 and starts[r] + span > pos:  # spans are shorter than the stride: few per document
            lo, hi = max(starts[r], pos), min(starts[r] + span, end)
            pieces.append(doc[lo - pos : hi - pos])
            r -= 1
        out.extend(reversed(pieces))
        pos = end
    return out


def source_windows(tokenizer, path: Path, fit: int, val: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """One calibration source cut into windows: (``fit`` windows to calibrate on, ``val`` validation
    windows), int64 ``[≤ n, seq_len]`` each, both spread evenly over the text and disjoint. The fitting
    windows do not depend on ``val``; fewer come back when the text is shorter."""
    docs = spread_text(read_texts(path), SPREAD_TEXT * fit * seq_len * CHARS_PER_TOKEN, fit)
    windows = token_windows(tokenizer, docs, seq_len)
    fit_idx = spread_indices(windows.shape[0], fit)
    taken = set(fit_idx)
    rest = [i for i in range(windows.shape[0]) if i not in taken]
    val_idx = [rest[j] for j in spread_indices(len(rest), val)] if val > 0 else []
    return windows[fit_idx], windows[val_idx]


def _shares(sources: list[CalibSource], samples: int) -> list[int]:
    """Windows per source for ``samples`` in all, in proportion to the sources' weights."""
    total_w = sum(s.weight for s in sources)
    if total_w <= 0:
        raise BadInput("calibration weights must be positive; e.g. --calib data.txt:0.7 --calib task.jsonl:0.3")
    return [max(1, math.ceil(samples * s.weight / total_w)) for s in sources]


def calibration_windows(tokenizer, sources: list[CalibSource], samples: int, seq_len: int) -> Tensor:
    """int64 ``[samples, seq_len]`` drawn from the sources in proportion to their weights, each
    source's windows spread over its whole text (:func:`source_windows`)."""
    parts = []
    for s, want in zip(sources, _shares(sources, samples), strict=True):
        got = source_windows(tokenizer, s.path, want, 0, seq_len)[0]
        if got.shape[0] == 0:
            raise BadInput(
                f"calibration file {s.path} is shorter than one {seq_len}-token sequence; "
                "give more text or lower --seq-len"
            )
        parts.append(got)
    return torch.cat(parts)[:samples]


def validation_windows(tokenizer, sources: list[CalibSource], calib_samples: int, val_samples: int,
                       seq_len: int) -> Tensor:
    """int64 ``[≤ val_samples, seq_len]``: calibration-text windows that :func:`calibration_windows`
    does not fit on (per source, the same share), spread over the rest of the text, so the
    validation split is never used to fit and the fitting windows are unchanged."""
    fits, wants = _shares(sources, calib_samples), _shares(sources, val_samples)
    parts = [source_windows(tokenizer, s.path, fit, want, seq_len)[1] for s, fit, want in zip(sources, fits, wants, strict=True)]
    return torch.cat(parts)[:val_samples]


@dataclass
class GramStore:
    """Float64 input Gram matrices, one per distinct input tensor, shared by name.

    sums[key]: Σ x xᵀ ``[in, in]`` float64; tokens[key]: N; owner[linear_name] = key.
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)

    def gram(self, linear_name: str) -> Tensor:
        """G = Σ x xᵀ / N ``[in, in]`` float64 for one Linear."""
        key = self.owner[linear_name]
        return self.sums[key] / max(self.tokens[key], 1)

    def groups(self) -> dict[str, list[str]]:
        """key -> the Linear names that share that Gram."""
        out: dict[str, list[str]] = {}
        for name, key in self.owner.items():
            out.setdefault(key, []).append(name)
        return out


class GramCollector:
    """Forward pre-hooks on ``linears`` that stream their input Gram matrices into a store."""

    def __init__(self, linears: dict[str, nn.Module], store: GramStore | None = None) -> None:
        self.linears = linears
        self.store = store or GramStore()
        self._batch_inputs: dict[int, tuple[Tensor, str]] = {}
        self._handles = []

    def __enter__(self) -> GramCollector:
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def end_batch(self) -> None:
        # The references kept during a batch stop ids from being recycled mid-forward.
        self._batch_inputs.clear()

    def _hook(self, name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = self._batch_inputs.get(id(x))
            if seen is not None and seen[0] is x:
                self.store.owner.setdefault(name, seen[1])
                return
            key = self.store.owner.setdefault(name, name)
            self._batch_inputs[id(x)] = (x, key)
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if not torch.isfinite(flat).all():
                raise BadInput(f"NaN/Inf in the calibration activations entering {name}; check the model weights")
            acc = self.store.sums.get(key)
            if acc is None:
                acc = self.store.sums[key] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
            acc.addmm_(flat.T, flat)
            self.store.tokens[key] = self.store.tokens.get(key, 0) + flat.shape[0]

        return hook


@torch.no_grad()
def collect_grams(
    model: nn.Module, linears: dict[str, nn.Module], windows: Tensor, batch_size: int = 8, progress: bool = True
) -> GramStore:
    """Run ``windows: [n, seq]`` through ``model`` and return the Gram store of ``linears``."""
    with GramCollector(linears) as col:
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="calibrate", unit="batch", leave=False, disable=not progress):
            model(windows[i : i + batch_size])
            col.end_batch()
    return col.store
