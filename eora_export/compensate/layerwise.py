"""The per-layer methods: each Linear compensated alone from its calibration Gram.

``eora`` (the eigenspace-projected SVD, EoRA), ``svd`` (plain SVD of ΔW, the baseline EoRA must
beat) and ``none`` (the compressed weights alone).
"""

from __future__ import annotations

from dataclasses import replace

from ..methods import BlockInputs, Method, register
from .apply import CompensationConfig, LayerResult, compensate_layers


def layerwise(kind: str):
    """The block-level compensate function of per-layer method ``kind`` (eora, svd or none)."""

    def compensate(inputs: BlockInputs, comp: CompensationConfig, ranks: dict[str, int] | None) -> dict[str, LayerResult]:
        cfg = replace(comp, method=kind)
        roots = inputs.cache.setdefault("roots", {})
        if ranks is None or kind == "none":
            return compensate_layers(inputs.compressed, inputs.grams, cfg, inputs.biases, inputs.progress, roots)
        # Per-layer ranks (--rank-budget): layers grouped by rank, rank 0 left uncompensated.
        out: dict[str, LayerResult] = {}
        for r in sorted(set(ranks.values())):
            part = {n: c for n, c in inputs.compressed.items() if ranks[n] == r}
            step = replace(cfg, method="none") if r == 0 else replace(cfg, rank=r)
            out.update(compensate_layers(part, inputs.grams, step, inputs.biases, inputs.progress, roots))
        return {n: out[n] for n in inputs.compressed}

    return compensate


register(Method("eora", "EoRA: the SVD of ΔW projected into the eigenspace of the calibration inputs (default)",
                layerwise("eora"), allocates=True, sweeps=True, plain_error=True))
register(Method("svd", "plain SVD of ΔW, the baseline EoRA must beat", layerwise("svd"), sweeps=True, plain_error=True))
register(Method("none", "no compensation: the compressed weights alone", layerwise("none"), compare=(),
                uses_rank=False, plain_error=True))
