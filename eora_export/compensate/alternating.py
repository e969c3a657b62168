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
from ..methods import BlockInputs, Method, register
from ..quant import QuantizedMatrix, quantize
from .apply import CompensationConfig, LayerResult, compensate_layers

ROUNDS = 3  # compressor/factor rounds after plain EoRA (measured on the demo: README, Recovery methods)


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


register(Method("eora-alt", "EoRA alternating with the compressor: W_c re-fitted to W − BA, then BA to W − W_c, "
                "best round per layer", alternate, plain_error=True))
