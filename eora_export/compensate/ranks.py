"""Rank allocation under a factor-byte budget, and the never-worse rule, on a validation split.

Each Linear gets a ladder of candidate ranks (0 and multiples of RANK_STEP, group-compatible:
:func:`apply.lowrank_group` must accept them). For every rung we know the exact factor bytes
(quantized as they will be stored) and the layer's error on validation inputs that were never
used to fit: tr(E G_val Eᵀ), E = ΔW − B_r A_r with the stored (quantized) factors. EoRA's
factors are nested (the top-r singular triplets of one SVD), so one SVD per layer gives the
whole ladder.

Allocation is greedy on gain per byte over each layer's lower convex hull (a rung whose gain
per byte is beaten by a higher rung is skipped, so non-concave ladders do not stall it):
repeatedly take the step with the largest validation-error drop per extra byte that still
fits the budget. A layer whose validation error no rank lowers stays at rank 0 (never worse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError
from .apply import CompensationConfig, FitMetric, factor_module, lowrank_group, quantize_factors
from .eora import _split_sqrt, gram_root
from .feedback import damped

RANK_STEP = 8  # rungs of the ladder: multiples of 8 keep every factor group ≥ 8 wide
LADDER_REACH = 4  # ladders reach this multiple of the average rank a budget buys


def ladder_top(average_rank: float) -> int:
    """Top rung of every ladder for a budget worth ``average_rank`` on average (at least one step)."""
    return max(RANK_STEP, int(LADDER_REACH * average_rank))


@dataclass(frozen=True)
class Rung:
    rank: int
    bytes: int  # factor bytes as stored (codes + scales of A and B)
    val_error: float  # tr(E G_val Eᵀ) with the stored factors


def ladder_ranks(max_rank: int, in_features: int, lowrank_bits: int, step: int = RANK_STEP) -> list[int]:
    """0 and the multiples of ``step`` up to ``max_rank`` that the factor quantizer accepts."""
    ranks = [0]
    for r in range(step, max_rank + 1, step):
        if lowrank_bits == 16:
            ranks.append(r)
            continue
        try:
            lowrank_group(r, in_features)
        except UsageError:
            continue
        ranks.append(r)
    return ranks


def eora_ladder(cl, gram_fit: Tensor, gram_val: Tensor, ranks: list[int], cfg: CompensationConfig,
                damp: float = 0.0, cache: dict | None = None) -> tuple[list[Rung], dict]:
    """Rungs of one CompressedLinear ``cl`` (weight [out, in], reference [out, in]).

    gram_fit: the calibration Gram the factors are fitted on; gram_val: the validation Gram
    they are judged on, both [in, in]. damp: fit in the ridge metric G + δI (feedback.damped).
    cache: shared by the ladders of Linears with the same ``gram_fit`` (:class:`apply.FitMetric`).
    Returns (rungs, the rung's EoraLinear by rank, its factors quantized as they will ship:
    in the fitted metric with ``cfg.lowrank_quant == "gptq"``, bias-free).
    """
    w_c = cl.weight.dequantize().double()
    delta = cl.reference.double() - w_c
    gram = damped(gram_fit, damp)
    root = gram_root(gram)
    metric = FitMetric(root.whiten(delta), root, gram, {} if cache is None else cache)
    u, s, vh = torch.linalg.svd(metric.m, full_matrices=False)
    g_val = gram_val.to(torch.float64)
    # tr(E G Eᵀ) = tr(ΔW G ΔWᵀ) − 2⟨B A, ΔW G⟩ + ⟨A G Aᵀ, BᵀB⟩: one out·in² product per layer,
    # then r·in·(out + in) per rung instead of out·in² each.
    p = delta @ g_val
    base = float((p * delta).sum())
    rungs, modules = [Rung(0, 0, base)], {}
    for r in ranks:
        if r == 0:
            continue
        b, a_white = _split_sqrt(u, s, vh, r, delta.shape[0])
        a = root.unwhiten_rows(a_white)
        module = factor_module(cl, b, a, cfg, None, metric)
        nbytes = module.storage_bytes() - module.weight_q.storage_bytes()
        bq, aq = module.b.double(), module.a.double()
        err = base - 2 * float(((bq.T @ p) * aq).sum()) + float(((aq @ g_val @ aq.T) * (bq.T @ bq)).sum())
        rungs.append(Rung(r, nbytes, err))
        modules[r] = module
    return rungs, modules


def eora_ladders(compressed: dict, grams, val_grams, cfg: CompensationConfig, max_rank: int,
                 damp: float = 0.0) -> tuple[dict[str, list[Rung]], dict[str, dict]]:
    """:func:`eora_ladder` of every CompressedLinear in ``compressed`` (ranks up to ``max_rank``,
    clamped per layer), the Linears reading one input sharing GPTQ's inverse-Hessian factor.
    grams / val_grams: GramStore of the fitting and of the validation windows.
    Returns (rungs by name, the rungs' EoraLinear by name and rank)."""
    ladders, modules, caches = {}, {}, {}
    for n, cl in compressed.items():
        out_f, in_f = cl.weight.shape
        ranks = ladder_ranks(min(max_rank, out_f, in_f), in_f, cfg.lowrank_bits)
        cache = caches.setdefault(grams.owner[n], {})
        ladders[n], modules[n] = eora_ladder(cl, grams.gram(n), val_grams.gram(n), ranks, cfg, damp, cache)
    return ladders, modules


def _hull(rungs: list[Rung]) -> list[Rung]:
    """The lower convex hull of (bytes, val_error) from rank 0, keeping only error-lowering rungs."""
    pts = sorted(rungs, key=lambda x: x.bytes)
    hull = [pts[0]]
    for p in pts[1:]:
        if p.val_error >= hull[-1].val_error:
            continue  # costs more, does not help: never worth it
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is under the chord a→p? keep it; otherwise drop b (p gives more per byte).
            if (b.val_error - a.val_error) * (p.bytes - a.bytes) <= (p.val_error - a.val_error) * (b.bytes - a.bytes):
                break
            hull.pop()
        hull.append(p)
    return hull


def allocate(ladders: dict[str, list[Rung]], budget_bytes: int, weights: dict[str, float] | None = None) -> dict[str, int]:
    """Rank per layer maximising the summed (weighted) validation-error drop within ``budget_bytes``.

    weights: per-layer multipliers of the error (default 1). Greedy over convex hulls.
    """
    weights = weights or {}
    hulls = {n: _hull(r) for n, r in ladders.items()}
    pos = dict.fromkeys(ladders, 0)
    spent = 0
    while True:
        best, best_ratio = None, 0.0
        for n, h in hulls.items():
            i = pos[n]
            if i + 1 >= len(h):
                continue
            extra = h[i + 1].bytes - h[i].bytes
            if spent + extra > budget_bytes:
                continue
            gain = (h[i].val_error - h[i + 1].val_error) * weights.get(n, 1.0)
            ratio = gain / max(extra, 1)
            if ratio > best_ratio:
                best, best_ratio = n, ratio
        if best is None:
            break
        i = pos[best]
        spent += hulls[best][i + 1].bytes - hulls[best][i].bytes
        pos[best] = i + 1
    return {n: hulls[n][pos[n]].rank for n in ladders}


def parse_budget(spec: str) -> tuple[str, float]:
    """``--rank-budget``: an average rank (``32``) or factor bytes (``1.5MB``, ``400KB``, ``123456B``)."""
    s = spec.strip().upper()
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            try:
                value = float(s[: -len(suffix)]) * mult
            except ValueError:
                break
            if value > 0:
                return "bytes", value
            break
    else:
        try:
            value = float(s)
        except ValueError:
            value = -1.0
        if value > 0:
            return "rank", value
    raise UsageError(f"--rank-budget {spec!r}: give an average rank (e.g. 32) or factor bytes (e.g. 1.5MB, 400KB)")


def budget_bytes(shapes: dict[str, tuple[int, int]], cfg: CompensationConfig, kind: str, value: float) -> int:
    """Factor bytes of a ``--rank-budget`` over layers of ``shapes`` (name -> (out, in)): as
    given, or what uniform rank ``value`` would store."""
    if kind == "bytes":
        return int(value)
    total = 0
    for out_f, in_f in shapes.values():
        r = min(round(value / 2) * 2, out_f, in_f)  # even, as quantized factors need
        if r <= 0:
            continue
        group = 0 if cfg.lowrank_bits == 16 else lowrank_group(r, in_f, cfg.lowrank_group_size)
        # Storage of zero factors equals that of any factors of the same shape and group.
        bq, aq = quantize_factors(torch.zeros(out_f, r), torch.zeros(r, in_f), cfg.lowrank_bits, group)
        total += bq.storage_bytes() + aq.storage_bytes()
    return total


def budget_compensate(
    compressed: dict, grams, val_grams, cfg: CompensationConfig, budget: int,
    biases: dict[str, Tensor | None] | None = None, relative: bool = False, damp: float = 0.0,
    max_rank: int | None = None,
) -> tuple[dict, dict[str, int]]:
    """EoRA with ranks allocated within ``budget`` factor bytes by validation gain per byte.

    grams / val_grams: GramStore of the fitting and of the validation windows (FP inputs).
    relative: weigh each layer's gain by 1 / its uncompensated validation error (measured
    alternative; raw errors are the default). max_rank: top of the ladders (default :func:`ladder_top` of
    cfg.rank). Returns (LayerResult per layer, ranks).
    """
    from ..eora_linear import EoraLinear
    from .apply import LayerResult

    biases = biases or {}
    ladders, modules = eora_ladders(compressed, grams, val_grams, cfg, max_rank or ladder_top(cfg.rank), damp)
    weights = {n: 1.0 / max(lad[0].val_error, 1e-30) for n, lad in ladders.items()} if relative else None
    chosen = allocate(ladders, budget, weights)
    out = {}
    for n, cl in compressed.items():
        r = chosen[n]
        m = modules[n].get(r)
        module = EoraLinear(cl.weight, m.a_q if r else None, m.b_q if r else None, bias=biases.get(n), sparse24=cl.sparse24)
        rung = next(x for x in ladders[n] if x.rank == r)
        out[n] = LayerResult(module, r, ladders[n][0].val_error, rung.val_error)
    return out, chosen
