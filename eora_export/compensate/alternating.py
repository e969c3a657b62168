"""``--method eora-alt``: compressed weights and EoRA factors fitted in turn (LoftQ's alternation,
in the activation metric).

Plain EoRA takes the compressor's W_c as given and fits B A to ΔW = W − W_c. The compressor never
sees that a low-rank term will follow, so it spends its (fixed) accuracy on error the factors
would have removed anyway. Alternating, per Linear, with its calibration Gram G:

    W_c ← compress(W − B A)           the run's own compressor: its 2:4 sparsifier (mask chosen anew)
                                      and its quantizer
    B A ← EoRA_r(W − W_c, G)          factors quantized as shipped (their rounding is seen next round)

Each step lowers ‖(W − W_c − B A) X‖ for its own variable in the metric the compressor uses
(GPTQ's and the refit's, G) or approximately (RTN's, the plain norm), so the fitted error usually
falls but is not guaranteed to: the round with the lowest activation-weighted error is kept,
round 0 being plain EoRA, so the method never ends behind EoRA on its calibration data.
The exported graph is unchanged (INT4 / 2:4 W_c plus factors); only the codes differ.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..compress import CompressedLinear
from ..compress.registry import NO_QUANT, QUANTIZERS, LayerJob
from ..compress.sparse24 import is_24, magnitude_24, sparsegpt_24
from ..eora_linear import EoraLinear
from ..methods import BlockInputs, Method, register
from ..quant import QuantizedMatrix, quantize
from .apply import CompensationConfig, FitMetric, LayerResult, compensate_layers, factor_module
from .eora import eora_factors_from_whitened
from .feedback import LayerFit, PairedGrams, feedback_block, linear_term, paired_error, ridge, whiten_pinv

ROUNDS = 3  # compressor/factor rounds after plain EoRA (measured on the demo: README, Recovery methods)
# eora-fb-alt's ridge, in units of mean(diag G_c) (its pull is toward W, not toward W_c as in eora-fb).
# Chosen on the demo's validation split with --rank-budget 32 among 0.0003, 0.001, 0.003, 0.01: KL
# recovered on it after SparseGPT 2:4 86.8, 87.2, 87.1, 86.9%; after INT3 GPTQ 74.0, 73.9, 73.3, 74.0%
# (tools/recovery_experiments.py; README, Recovery methods).
FB_ALT_DAMP = 0.001


def requantize(target: torch.Tensor, gram: torch.Tensor, sparse: bool, run, name: str) -> QuantizedMatrix:
    """W_c for ``target`` [out, in] with the run's compressor: its 2:4 sparsifier when ``sparse``
    (SparseGPT's OBS updates, or magnitude), then its quantizer with the mask kept."""
    mask = None
    if sparse:
        # The 2:4 mask is chosen again for W − B A: keeping the compressor's first mask and only
        # refitting the kept weights recovered ~2.6 points less on the demo (README, Recovery methods).
        target, mask = sparsegpt_24(target, gram, name=name) if run.sparsity == "sparsegpt" else magnitude_24(target)
    if run.quant == NO_QUANT:
        qm = quantize(target, 16, 0)
    else:
        qm = QUANTIZERS[run.quant].quantize(LayerJob(name, target, lambda: gram, mask), run.compress_config())
    if sparse and not (is_24(qm.q) and is_24(qm.dequantize())):
        raise AssertionError(f"{name}: re-compressed weight lost its 2:4 pattern")
    return qm


def alternate(inputs: BlockInputs, comp: CompensationConfig, ranks: dict[str, int] | None,
              rounds: int = ROUNDS) -> dict[str, LayerResult]:
    """EoRA, then ``rounds`` of (re-compress W − B A, re-fit B A); per layer the best round."""
    comp = replace(comp, method="eora")
    compressed: dict[str, CompressedLinear] = dict(inputs.compressed)
    roots = inputs.cache.setdefault("roots", {})
    best = compensate_layers(compressed, inputs.grams, comp, inputs.biases, False, roots)
    before = {n: r.error_before for n, r in best.items()}
    current = best
    for _ in range(rounds):
        nxt = {}
        for n, cl in compressed.items():
            target = cl.reference.float() - current[n].module.residual_weight().float()
            nxt[n] = replace(cl, weight=requantize(target, inputs.grams.gram(n), cl.sparse24, inputs.run, n))
        compressed = nxt
        current = compensate_layers(compressed, inputs.grams, comp, inputs.biases, False, roots)
        best = {n: current[n] if current[n].error_after < best[n].error_after else best[n] for n in best}
    return {n: LayerResult(r.module, r.rank, before[n], r.error_after) for n, r in best.items()}


def feedback_target_weight(w: torch.Tensor, g: PairedGrams) -> torch.Tensor:
    """T [out, in] (float64) with ‖W X_fp − Ŵ X_c‖²/N + δ‖Ŵ − W‖² = ‖(Ŵ − T) R‖² + const for every Ŵ.

    w: FP weight [out, in]; R Rᵀ = G_c + δI (``g.root``). T = (W C + δ W)(G_c + δI)⁻¹: the
    weight that, fed the compressed path's inputs X_c, best reproduces the FP outputs, pulled
    toward W where X_c carries little data (δ, as in eora-fb). The ridge pulls toward W rather
    than toward W_c here because W_c itself is re-fitted.
    """
    w = w.to(torch.float64)
    return g.root.unwhiten_rows(whiten_pinv(linear_term(w, g.cross, g.resid) + ridge(g.gram_c, g.damp) * w, g.root))


def feedback_alternate_fit(run, rounds: int = ROUNDS) -> LayerFit:
    """The per-Linear fit of ``--method eora-fb-alt``: alternation on the feedback target.

    Minimises ‖(T − W_c − B A) R‖² (:func:`feedback_target_weight`) over the compressor's codes
    and rank-r factors in turn: round 0 is eora-fb on the compressor's W_c; each later round
    re-compresses T − B A with the run's compressor on the Hessian G_c + δI, then re-fits B A.
    A Linear without factors (rank 0 from --rank-budget) gets W_c or compress(T), whichever is
    better. The best round by that objective is kept; errors reported are the undamped
    ‖W X_fp − Ŵ X_c‖² / N.
    """

    def fit(name: str, cl, g: PairedGrams, rank: int, cfg: CompensationConfig, bias, shrink: float) -> LayerResult:
        if shrink:
            raise ValueError("eora-fb-alt takes no shrink")
        w = cl.reference.double()
        t = feedback_target_weight(w, g)

        def undamped(w_hat: torch.Tensor) -> float:
            return paired_error(w, w_hat, g.gram_fp, g.cross, g.gram_c, g.resid)

        current, factors = cl, None
        best = best_hat = None
        best_err = float("inf")
        for k in range(rounds + 1 if rank else 2):
            if k:
                target = t if factors is None else t - factors.residual_weight().double()
                current = replace(cl, weight=requantize(target.float(), g.hessian, cl.sparse24, run, name))
            w_c = current.weight.dequantize().double()
            if rank:
                m = g.root.whiten(t - w_c)
                b, a = eora_factors_from_whitened(m, g.root, rank, fast=cfg.fast)
                factors = factor_module(current, b, a, cfg, bias, FitMetric(m, g.root, g.hessian, g.cache))
                w_hat = w_c + factors.residual_weight().double()
                module = factors
            else:
                module, w_hat = EoraLinear(current.weight, bias=bias, sparse24=current.sparse24), w_c
            err = float(g.root.whiten(t - w_hat).square().sum())
            if err < best_err:
                best, best_err, best_hat = module, err, w_hat
        return LayerResult(best, rank, undamped(cl.weight.dequantize().double()), undamped(best_hat))

    return fit


register(Method("eora-alt", "EoRA alternating with the compressor: W_c re-fitted to W − BA, then BA to W − W_c, "
                "best round per layer", alternate, plain_error=True))
register(Method("eora-fb-alt", "error feedback and alternation together: W_c re-compressed and BA re-fitted against the "
                "FP outputs from the compressed path's own inputs", lambda inputs, comp, ranks: feedback_block(
                    inputs, comp, ranks, feedback_alternate_fit(inputs.run), FB_ALT_DAMP), own_stream=True, allocates=True))
