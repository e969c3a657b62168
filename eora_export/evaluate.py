"""Held-out scores of a causal LM on token windows: perplexity, KL to a reference, paired intervals.

Perplexity over a few dozen windows of one text cannot rank compensation methods: the spread
between text subsets is larger than the effect (docs: a 64-window run ranked EoRA last, all 466
windows ranked it first). The mean per-token KL(reference ‖ model) on the same tokens is paired
and far less noisy, and a bootstrap over windows says whether a difference is inside the noise.
Everything here keeps per-window sums so that pairing and resampling are exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm


def next_token_nll(model: nn.Module, ids: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of ``ids: [batch, seq]`` (each window predicts its tokens 1..seq-1)."""
    logits = model(ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


def window_scores(logits: Tensor, ids: Tensor, ref_logits: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-window sums over the predicted tokens 1..seq-1.

    logits, ref_logits: [b, seq, vocab]; ids: [b, seq] -> (nll [b], kl [b] or None), float64.
    KL(ref ‖ model) = Σ p_ref (log p_ref − log p_model), computed from float32 log-softmax.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).double().sum(-1)
    if ref_logits is None:
        return nll, None
    ref = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).double().sum(-1)
    return nll, kl


@dataclass
class Scores:
    """Per-window sums of one model on ``n`` windows, each predicting ``tokens_per_window`` tokens."""

    nll: Tensor  # [n] float64
    kl: Tensor | None  # [n] float64, KL(reference ‖ model); None without a reference
    tokens_per_window: int

    @property
    def tokens(self) -> int:
        return self.nll.numel() * self.tokens_per_window

    @property
    def mean_nll(self) -> float:
        return float(self.nll.sum()) / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else float(self.kl.sum()) / max(self.tokens, 1)

    def head(self, n: int) -> Scores:
        """The scores of the first ``n`` windows (exactly what scoring those windows alone gives)."""
        return Scores(self.nll[:n], None if self.kl is None else self.kl[:n], self.tokens_per_window)


LogitsFn = Callable[[Tensor], Tensor]  # ids [b, seq] -> logits [b, seq, vocab]


def model_logits(model: nn.Module) -> LogitsFn:
    return lambda ids: model(ids).logits


Reference = LogitsFn | Sequence[Tensor]  # a model, or its logits per batch (see reference_logits)


@torch.no_grad()
def reference_logits(reference: LogitsFn, windows: Tensor, batch_size: int = 8) -> list[Tensor]:
    """The reference's logits ``[b, seq, vocab]`` per batch of ``windows: [n, seq]``, to score
    many models against one reference without running it again (memory: n·seq·vocab floats)."""
    return [reference(windows[i : i + batch_size]).float() for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def score_many(fns: Mapping[str, LogitsFn], windows: Tensor, reference: Reference | None = None,
               reference_label: str | None = None, batch_size: int = 8, desc: str = "evaluate",
               progress: bool = True) -> dict[str, Scores]:
    """Scores of several models on ``windows: [n, seq]`` in one pass over the batches.

    The reference runs once per batch for all models (not once per model), and no logits are
    kept beyond one batch. ``reference`` is a logits function or the per-batch logits of
    :func:`reference_logits` (same ``batch_size``). With ``reference_label`` the reference is
    scored too, under that label (its KL is 0 by construction, computed all the same).
    """
    cached = reference is not None and not callable(reference)
    if cached and len(reference) != -(-windows.shape[0] // batch_size):
        raise ValueError(f"{len(reference)} cached reference batches do not cover {windows.shape[0]} windows in batches of {batch_size}")
    labels = list(fns) + ([reference_label] if reference_label is not None and reference is not None else [])
    nll: dict[str, list[Tensor]] = {k: [] for k in labels}
    kl: dict[str, list[Tensor]] = {k: [] for k in labels}
    for j, i in enumerate(tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False,
                               disable=not progress)):
        ids = windows[i : i + batch_size]
        ref = None if reference is None else (reference[j] if cached else reference(ids))
        outputs = {k: fn(ids) for k, fn in fns.items()} | ({reference_label: ref} if reference_label in labels else {})
        for k, logits in outputs.items():
            n, d = window_scores(logits, ids, ref)
            nll[k].append(n)
            if d is not None:
                kl[k].append(d)
    return {k: Scores(torch.cat(nll[k]), torch.cat(kl[k]) if kl[k] else None, windows.shape[1] - 1) for k in labels}


def score(logits_fn: LogitsFn, windows: Tensor, reference: Reference | None = None, batch_size: int = 8,
          desc: str = "evaluate", progress: bool = True) -> Scores:
    """Scores of ``logits_fn`` on ``windows: [n, seq]``; with ``reference``, also KL to it on the
    same tokens (the reference runs batch by batch beside the model, so no logits are stored)."""
    return score_many({"model": logits_fn}, windows, reference, None, batch_size, desc, progress)["model"]


def mean_nll(model: nn.Module, windows: Tensor, batch_size: int = 8, desc: str = "evaluate") -> float:
    """Mean next-token negative log-likelihood over ``windows: [n, seq]`` (every window
    predicts its tokens 1..seq-1; each token counts once)."""
    return score(model_logits(model), windows, None, batch_size, desc).mean_nll


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8, desc: str = "perplexity") -> float:
    return math.exp(mean_nll(model, windows, batch_size, desc))


@dataclass(frozen=True)
class PairedDiff:
    """Mean per-token difference a − b over paired windows, with a bootstrap interval."""

    diff: float
    low: float
    high: float
    level: float

    @property
    def significant(self) -> bool:
        """True where the interval excludes zero: the two are ranked, not tied in the noise."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high, "level": self.level, "significant": self.significant}


def paired_bootstrap(a: Tensor, b: Tensor, tokens_per_window: int, samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> PairedDiff:
    """Percentile bootstrap over windows of the mean per-token difference of two per-window sums.

    a, b: [n] per-window sums on the same windows (nll or kl). Windows are resampled as pairs,
    which is what makes the interval tight: both models see the same hard and easy text.
    """
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError(f"paired_bootstrap needs two equal non-empty [n] tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = (a - b).double() / tokens_per_window
    idx = _resample(d.numel(), samples, seed)
    low, high = _interval(d[idx].mean(dim=1), level)
    return PairedDiff(float(d.mean()), low, high, level)


def _resample(n: int, samples: int, seed: int) -> Tensor:
    """[samples, n] window indices drawn with replacement; one seed, so every interval of a
    report resamples the same windows."""
    return torch.randint(0, n, (samples, n), generator=torch.Generator().manual_seed(seed))


def _interval(stats: Tensor, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = torch.quantile(stats.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def recovered_share(compressed_kl: float, compensated_kl: float) -> float:
    """Share of the compressed model's KL to the reference that compensation removed (1 = all of it)."""
    return 1.0 - compensated_kl / compressed_kl if compressed_kl > 0 else 0.0


def bootstrap_recovered(compressed_kl: Tensor, compensated_kl: Tensor, samples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> dict:
    """Share of KL recovered with a bootstrap interval over windows.

    compressed_kl, compensated_kl: [n] per-window KL sums on the same windows. The share is
    a ratio of sums, so each resample recomputes both sums on the same drawn windows.
    """
    if compressed_kl.shape != compensated_kl.shape or compressed_kl.numel() == 0:
        raise ValueError("bootstrap_recovered needs two equal non-empty [n] tensors")
    share = recovered_share(float(compressed_kl.sum()), float(compensated_kl.sum()))
    idx = _resample(compressed_kl.numel(), samples, seed)
    c, m = compressed_kl.double()[idx].sum(1), compensated_kl.double()[idx].sum(1)
    low, high = _interval(torch.where(c > 0, 1 - m / c.clamp_min(1e-300), torch.zeros_like(c)), level)
    return {"share": share, "low": low, "high": high, "level": level}


def ranking(scores: Mapping[str, Scores], metric: str, samples: int = 2000, level: float = 0.95,
            seed: int = 0) -> tuple[str, list[dict]]:
    """Models ordered best first by ``metric`` ("kl" or "nll"), each neighbour pair joined by
    "<" where the paired interval excludes zero and "~" where the difference is inside the noise.

    Returns the one-line ranking and the pairs [{a, b, metric, diff, low, high, significant}]
    (diff = mean per-token a − b, so negative when a is better).
    """
    def values(s: Scores) -> Tensor | None:
        return s.kl if metric == "kl" else s.nll

    labels = sorted((k for k, s in scores.items() if values(s) is not None), key=lambda k: float(values(scores[k]).sum()))
    if not labels:
        return "", []
    line, pairs = labels[0], []
    for a, b in itertools.pairwise(labels):
        d = paired_bootstrap(values(scores[a]), values(scores[b]), scores[a].tokens_per_window, samples, level, seed)
        pairs.append({"a": a, "b": b, "metric": metric, **d.as_dict()})
        line += (" < " if d.significant else " ~ ") + b
    return line, pairs


def text_report(scores: Mapping[str, Scores], reference: str = "fp16", baseline: str = "compressed",
                samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Everything a report says about one held-out text, from per-window scores of each model.

    perplexity and mean per-token KL(reference ‖ model) per model; for each model other than
    the reference and the baseline, the paired change against the baseline (mean NLL, as a
    relative perplexity change, and KL) and the share of the baseline's KL it recovered, with
    bootstrap intervals over windows; the rankings by KL and by perplexity with ties marked;
    and the per-window sums, so that runs on the same text can be paired later.
    """
    # reference and baseline first, then the others as given: the order of the report's tables
    scores = {k: scores[k] for k in sorted(scores, key=lambda k: (k != reference, k != baseline))}
    first = next(iter(scores.values()))
    out: dict = {
        "windows": int(first.nll.numel()), "predicted_tokens": first.tokens,
        "bootstrap": {"samples": samples, "level": level, "unit": "window", "seed": seed},
        "perplexity": {k: s.perplexity for k, s in scores.items()},
        "kl": {k: s.mean_kl for k, s in scores.items() if s.kl is not None},
        "vs_baseline": {}, "kl_recovered": {},
    }
    base = scores.get(baseline)
    for k, s in scores.items():
        if base is None or k in (reference, baseline):
            continue
        nll = paired_bootstrap(s.nll, base.nll, s.tokens_per_window, samples, level, seed)
        entry = {"nll": nll.as_dict(), "ppl_change": {"diff": math.expm1(nll.diff), "low": math.expm1(nll.low),
                                                      "high": math.expm1(nll.high), "significant": nll.significant}}
        if s.kl is not None and base.kl is not None:
            entry["kl"] = paired_bootstrap(s.kl, base.kl, s.tokens_per_window, samples, level, seed).as_dict()
            out["kl_recovered"][k] = bootstrap_recovered(base.kl, s.kl, samples, level, seed)
        out["vs_baseline"][k] = entry
    out["ranking"] = {}
    out["pairs"] = []
    for metric in ("kl", "nll"):
        line, pairs = ranking(scores, metric, samples, level, seed)
        if line:
            out["ranking"]["kl" if metric == "kl" else "perplexity"] = line
            out["pairs"] += pairs
    out["per_window"] = {k: {"nll": s.nll.tolist(), **({"kl": s.kl.tolist()} if s.kl is not None else {})}
                         for k, s in scores.items()}
    return out
