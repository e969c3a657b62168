"""Held-out scores of a causal LM on token windows: perplexity, KL to a reference, paired intervals.

Perplexity over a few dozen windows of one text cannot rank compensation methods: the spread
between text subsets is larger than the effect (docs: a 64-window run ranked EoRA last, all 466
windows ranked it first). The mean per-token KL(reference ‖ model) on the same tokens is paired
and far less noisy, and a bootstrap over windows says whether a difference is inside the noise.
Everything here keeps per-window sums so that pairing and resampling are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


LogitsFn = Callable[[Tensor], Tensor]  # ids [b, seq] -> logits [b, seq, vocab]


def model_logits(model: nn.Module) -> LogitsFn:
    return lambda ids: model(ids).logits


@torch.no_grad()
def score(logits_fn: LogitsFn, windows: Tensor, reference: LogitsFn | None = None, batch_size: int = 8,
          desc: str = "evaluate", progress: bool = True) -> Scores:
    """Scores of ``logits_fn`` on ``windows: [n, seq]``; with ``reference``, also KL to it on the
    same tokens (the reference runs batch by batch beside the model, so no logits are stored)."""
    nll, kl = [], []
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        ids = windows[i : i + batch_size]
        ref = reference(ids) if reference is not None else None
        n, k = window_scores(logits_fn(ids), ids, ref)
        nll.append(n)
        if k is not None:
            kl.append(k)
    return Scores(torch.cat(nll), torch.cat(kl) if kl else None, windows.shape[1] - 1)


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
    n = d.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (samples, n), generator=gen)
    means = d[idx].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDiff(float(d.mean()), low, high, level)


def recovered_share(compressed_kl: float, compensated_kl: float) -> float:
    """Share of the compressed model's KL to the reference that compensation removed (1 = all of it)."""
    return 1.0 - compensated_kl / compressed_kl if compressed_kl > 0 else 0.0
