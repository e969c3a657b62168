"""Round-to-nearest group-wise INT4/INT3 quantization, and the output error quantizers are scored by.

RTN is :func:`eora_export.quant.quantize` itself (optionally with its per-group clip search).
"""

from __future__ import annotations

from torch import Tensor

from ..quant import QuantizedMatrix, quantize
from .registry import LayerJob
from .threads import single_thread


def rtn(w: Tensor, bits: int, group_size: int, clip_search: bool = True) -> QuantizedMatrix:
    """Round-to-nearest group-wise quantization (the shared quantizer)."""
    with single_thread():
        return quantize(w.detach().float(), bits, group_size, clip_search)


def output_error(e: Tensor, gram: Tensor) -> float:
    """tr(E G Eᵀ): the mean squared output error over the calibration tokens, summed over outputs."""
    e = e.to(gram.dtype)
    return float(((e @ gram) * e).sum())


def rtn_layer(job: LayerJob, cfg) -> QuantizedMatrix:
    """The registry's quantize step (also AWQ's, after folding)."""
    return rtn(job.weight, cfg.bits, cfg.group_size, cfg.clip_search)

