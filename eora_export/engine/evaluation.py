"""Scores at the head: the final norm and LM head applied to each path's last hidden states.

KL(fp16 ‖ model) is taken against the ``fp16`` path's logits batch by batch, so no logits are
stored; perplexity from the same logits (evaluate.window_scores).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..evaluate import Scores, window_scores


@torch.no_grad()
def head_scores(src, hidden: dict[str, Tensor], ids: Tensor, batch_size: int, device: torch.device,
                reference: str = "fp16") -> dict[str, Scores]:
    """Per-window NLL and KL sums per path from final hidden states ``[m, seq, h]`` (float32 head)."""
    head_name = "model.embed_tokens.weight" if src.tied else "lm_head.weight"
    head = src.read([head_name], torch.float32, device)[head_name]
    norm = src.final_norm(device)

    def logits(label: str, i: int) -> Tensor:
        return F.linear(norm(hidden[label][i : i + batch_size].to(device=device, dtype=torch.float32)), head).float()

    nll: dict[str, list[Tensor]] = {label: [] for label in hidden}
    kl: dict[str, list[Tensor]] = {label: [] for label in hidden}
    for i in range(0, ids.shape[0], batch_size):
        b_ids = ids[i : i + batch_size].to(device)
        ref = logits(reference, i) if reference in hidden else None
        for label in hidden:
            n, k = window_scores(ref if label == reference else logits(label, i), b_ids, ref)
            nll[label].append(n.cpu())
            if k is not None:
                kl[label].append(k.cpu())
    return {label: Scores(torch.cat(nll[label]), torch.cat(kl[label]) if kl[label] else None, ids.shape[1] - 1)
            for label in hidden}


def split_scores(scores: dict[str, Scores], sizes: list[int]) -> list[dict[str, Scores]]:
    """Scores over concatenated texts, split back per text (``sizes``: windows per text)."""
    out, start = [], 0
    for n in sizes:
        out.append({k: Scores(v.nll[start : start + n], None if v.kl is None else v.kl[start : start + n],
                              v.tokens_per_window) for k, v in scores.items()})
        start += n
    return out
