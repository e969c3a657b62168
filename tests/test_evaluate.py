"""The held-out measures: per-window NLL and KL sums, and the paired bootstrap."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from eora_export.evaluate import Scores, paired_bootstrap, recovered_share, score, window_scores


def test_window_scores_match_cross_entropy_and_kl_definition():
    torch.manual_seed(0)
    logits, ref = torch.randn(4, 9, 17), torch.randn(4, 9, 17)
    ids = torch.randint(0, 17, (4, 9))
    nll, kl = window_scores(logits, ids, ref)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 17), ids[:, 1:].reshape(-1), reduction="none").view(4, 8).sum(1)
    assert torch.allclose(nll.float(), ce, atol=1e-4)
    p = F.softmax(ref[:, :-1], -1)
    manual = (p * (p.log() - F.log_softmax(logits[:, :-1], -1))).sum((-1, -2))
    assert torch.allclose(kl.float(), manual, atol=1e-4)
    assert (kl > 0).all()
    assert torch.allclose(window_scores(ref, ids, ref)[1], torch.zeros(4, dtype=torch.float64), atol=1e-6)


def test_score_pairs_model_and_reference_on_the_same_windows():
    torch.manual_seed(1)
    table = torch.randn(13, 13)
    windows = torch.randint(0, 13, (10, 6))

    def ref_fn(ids):
        return table[ids]

    def noisy(ids):  # a perturbation that differs across the vocabulary, so the distribution moves
        return table[ids] + 0.5 * torch.sin(ids.float()[..., None] + torch.arange(13.0))

    def shifted(ids):  # the same shift on every logit of a position: softmax, and so KL, unchanged
        return table[ids] + 0.5 * torch.sin(ids.float())[..., None]

    s = score(noisy, windows, ref_fn, batch_size=3, progress=False)
    assert s.nll.shape == s.kl.shape == (10,)
    assert s.tokens == 50
    assert s.perplexity == pytest.approx(math.exp(s.nll.sum().item() / 50))
    assert s.mean_kl > 1e-3
    assert score(ref_fn, windows, ref_fn, progress=False).mean_kl == pytest.approx(0.0, abs=1e-6)
    assert score(shifted, windows, ref_fn, progress=False).mean_kl == pytest.approx(0.0, abs=1e-6)


def test_paired_bootstrap_separates_a_real_shift_from_noise():
    torch.manual_seed(2)
    base = torch.rand(200) * 100  # large spread between windows, shared by both models
    shifted = base + 0.5 + 0.1 * torch.randn(200)
    real = paired_bootstrap(shifted, base, tokens_per_window=1)
    assert real.significant and real.low < 0.5 < real.high
    tied = paired_bootstrap(base + 0.1 * torch.randn(200), base, tokens_per_window=1)
    assert not tied.significant and tied.low < 0 < tied.high
    # Unpaired, the same 0.5 shift would drown in the window spread (std ≈ 29 / sqrt(200) ≈ 2).
    unpaired = paired_bootstrap(shifted, base[torch.randperm(200)], tokens_per_window=1)
    assert not unpaired.significant
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_bootstrap(base, base[:3], 1)


def test_recovered_share():
    assert recovered_share(2.0, 0.5) == pytest.approx(0.75)
    assert recovered_share(2.0, 3.0) == pytest.approx(-0.5)
    assert recovered_share(0.0, 0.1) == 0.0


def test_score_many_runs_the_reference_once_per_batch_and_matches_score():
    from eora_export.evaluate import reference_logits, score_many

    torch.manual_seed(3)
    table = torch.randn(11, 11)
    windows = torch.randint(0, 11, (7, 5))
    calls = []

    def ref_fn(ids):
        calls.append(ids.shape[0])
        return table[ids]

    fns = {"a": lambda ids: table[ids] * 0.9, "b": lambda ids: table[ids] + 0.1 * torch.cos(ids.float())[..., None]}
    many = score_many(fns, windows, ref_fn, "ref", batch_size=3, progress=False)
    assert calls == [3, 3, 1], "one reference call per batch for all models"
    assert list(many) == ["a", "b", "ref"]
    for k, fn in fns.items():
        alone = score(fn, windows, ref_fn, batch_size=3, progress=False)
        assert torch.equal(many[k].nll, alone.nll) and torch.equal(many[k].kl, alone.kl)
    assert many["ref"].mean_kl == 0.0
    # cached reference logits give the same numbers; a cache of the wrong length is refused
    cached = reference_logits(ref_fn, windows, batch_size=3)
    again = score(fns["a"], windows, cached, batch_size=3, progress=False)
    assert torch.equal(again.kl, many["a"].kl)
    with pytest.raises(ValueError, match="cached reference batches"):
        score(fns["a"], windows, cached[:2], batch_size=3, progress=False)
    # the first windows' scores are those of scoring the first windows alone
    head = score(fns["b"], windows[:3], ref_fn, batch_size=3, progress=False)
    assert torch.equal(many["b"].head(3).kl, head.kl)


def test_recovered_share_interval_and_ranking_with_ties():
    from eora_export.evaluate import bootstrap_recovered, ranking

    torch.manual_seed(4)
    base = torch.rand(300) + 0.5
    half = 0.5 * base * (1 + 0.2 * torch.randn(300)).clamp_min(0)
    rec = bootstrap_recovered(base, half)
    assert rec["low"] < rec["share"] < rec["high"] and rec["low"] < 0.5 < rec["high"]
    assert rec["share"] == pytest.approx(recovered_share(float(base.sum()), float(half.sum())))
    same = base + 0.01 * (torch.randn(300) - 0.0)
    scores = {k: Scores(torch.zeros(300, dtype=torch.float64), v.double(), 1) for k, v in
              {"ref": torch.zeros(300), "c": base, "half": half, "same": same}.items()}
    line, pairs = ranking(scores, "kl")
    assert line.startswith("ref < half < ") and " ~ " in line, line
    assert [p["significant"] for p in pairs] == [True, True, False]
    # perplexity ranking: all NLL equal -> every neighbour tied
    line, _ = ranking(scores, "nll")
    assert line.count(" ~ ") == 3, line
