"""Held-out perplexity of a causal LM on token windows."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm


def next_token_nll(model: nn.Module, ids: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of ``ids: [batch, seq]`` (each window predicts its tokens 1..seq-1)."""
    logits = model(ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def mean_nll(model: nn.Module, windows: Tensor, batch_size: int = 8, desc: str = "evaluate") -> float:
    """Mean next-token negative log-likelihood over ``windows: [n, seq]`` (every window
    predicts its tokens 1..seq-1; each token counts once)."""
    total, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        ids = windows[i : i + batch_size]
        total += float(next_token_nll(model, ids, reduction="sum"))
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8, desc: str = "perplexity") -> float:
    return math.exp(mean_nll(model, windows, batch_size, desc))
