"""Rank allocation: greedy over convex hulls within a byte budget, never-worse rungs, budget parsing."""

import itertools

import pytest
import torch

from eora_export.compensate.apply import CompensationConfig
from eora_export.compensate.ranks import Rung, _hull, allocate, eora_ladder, ladder_ranks, parse_budget
from eora_export.compress import CompressedLinear
from eora_export.errors import UsageError
from eora_export.quant import quantize


def _ladder(errors: list[float], step_bytes: int = 100) -> list[Rung]:
    return [Rung(8 * i, step_bytes * i, e) for i, e in enumerate(errors)]


def test_allocation_spends_where_the_gain_per_byte_is_largest():
    ladders = {"flat": _ladder([10, 9.5, 9.0, 8.5]), "steep": _ladder([10, 4, 2, 1.5])}
    assert allocate(ladders, 200) == {"flat": 0, "steep": 16}
    assert allocate(ladders, 0) == {"flat": 0, "steep": 0}
    assert allocate(ladders, 10_000) == {"flat": 24, "steep": 24}


def test_a_layer_that_no_rank_helps_stays_at_zero():
    ladders = {"hurts": _ladder([5, 5.5, 6.0]), "helps": _ladder([5, 4, 3])}
    assert allocate(ladders, 10_000) == {"hurts": 0, "helps": 16}


def test_hull_skips_a_rung_that_a_higher_one_beats_per_byte():
    # 8 barely helps, 16 helps a lot: greedy on raw steps would stall at 0.
    hull = _hull(_ladder([10, 9.9, 2]))
    assert [r.rank for r in hull] == [0, 16]
    assert allocate({"a": _ladder([10, 9.9, 2]), "b": _ladder([10, 9, 8])}, 200) == {"a": 16, "b": 0}


def test_weights_scale_the_gains():
    ladders = {"a": _ladder([10, 5]), "b": _ladder([1, 0.4])}
    assert allocate(ladders, 100) == {"a": 8, "b": 0}
    assert allocate(ladders, 100, {"a": 0.01, "b": 1.0}) == {"a": 0, "b": 8}


def test_ladder_is_exact_eora_at_each_rung_and_judged_on_validation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    cl = CompressedLinear(quantize(w, 4, 32), w, False)
    x_fit, x_val = (torch.randn(n, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 64, dtype=torch.float64) for n in (500, 300))
    gram_fit, gram_val = x_fit.T @ x_fit / 500, x_val.T @ x_val / 300
    cfg = CompensationConfig(rank=16, lowrank_bits=16)
    ranks = ladder_ranks(48, 64, 16)
    assert ranks == [0, 8, 16, 24, 32, 40, 48]
    rungs, modules = eora_ladder(cl, gram_fit, gram_val, ranks, cfg)
    assert [r.rank for r in rungs] == ranks and rungs[0].bytes == 0
    assert all(a.bytes < b.bytes for a, b in itertools.pairwise(rungs))
    assert all(a.val_error > b.val_error for a, b in itertools.pairwise(rungs))
    from eora_export.compensate.eora import eora_factors, weighted_error

    b, a = eora_factors(w.double() - cl.weight.dequantize().double(), gram_fit, 16)
    assert torch.allclose(modules[16].residual_weight().double(), b @ a, atol=2e-3 * float((b @ a).abs().max()))
    # The cheap per-rung error equals tr(E G_val Eᵀ) with the stored factors.
    delta = w.double() - cl.weight.dequantize().double()
    assert rungs[2].val_error == pytest.approx(weighted_error(delta, gram_val, modules[16].b, modules[16].a), rel=1e-9)
    assert rungs[0].val_error == pytest.approx(weighted_error(delta, gram_val), rel=1e-12)
    # 4-bit factors: only group-compatible ranks are rungs.
    assert ladder_ranks(64, 96, 4) == [0, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize(("spec", "want"), [("32", ("rank", 32.0)), ("1.5MB", ("bytes", 1.5 * 2**20)),
                                             ("400kb", ("bytes", 400 * 1024.0)), ("1000B", ("bytes", 1000.0))])
def test_parse_budget(spec, want):
    assert parse_budget(spec) == want


@pytest.mark.parametrize("spec", ["", "-3", "0", "lots", "MB", "3XB"])
def test_bad_budget_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="--rank-budget"):
        parse_budget(spec)
