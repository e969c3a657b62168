"""Compression of the decoder Linears: INT4/INT3 group-wise weights, 2:4 sparsity, or both.

Every result ends in an :class:`eora_export.quant.QuantizedMatrix`, the exact weight the
exported graph computes with (bits 3/4 with group scales; bits 16 holding the float16
2:4-sparse weight when only sparsity is applied). Nothing else stays at inference: AWQ's
scales are folded into the preceding RMSNorm / Linear rows.

Order: sparsify (mask + sparse weights W_s, from the FP Gram), then AWQ folding if asked,
then quantize the kept weights: RTN of W_s, GPTQ of W_s with the mask fixed (pruned weights
stay 0, the OBS updates land on kept weights), or RTN of the AWQ-scaled W_s. Zeros stay
exactly zero under symmetric quantization; the 2:4 pattern of the final codes is asserted.
GPTQ also uses ``clip_search`` (per-group range shrink when each group starts; measured on
a 4096² layer: output error 15.3 → 11.4). SparseGPT: ModelOpt's masks (refit by our OBS
update, see :mod:`.sparse24`) or our own; ``CompressedLinear.method`` says which ran.

Files: :mod:`.rtn` (RTN, and ``output_error``), :mod:`.gptq` (GPTQ and the OBS engine),
:mod:`.awq` (AWQ scale search and folding), :mod:`.sparse24` (magnitude, SparseGPT, ModelOpt
masks). Each is registered below in :mod:`.registry` by the name ``--quant`` / ``--sparsity``
uses; a new quantizer is its own file plus one registration line here.

Model changes (documented contract): ``compress_model`` never changes a target Linear's
weight *except* with ``quant="awq"``, where function-preserving folding needs it: each
target's ``.weight`` is then overwritten with its folded full-precision weight (exactly
``CompressedLinear.reference``, in the model's dtype), the RMSNorm weights and non-target
rows (v_proj / up_proj when not targets) are rescaled, and the affected Grams in
``grams`` are rescaled in place. The FP model's outputs are unchanged (up to rounding in
the model's dtype), and ``module.weight == reference`` holds for every target on return.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import defaults
from ..calibration import GramStore
from ..errors import BadInput, UsageError
from ..quant import QuantizedMatrix, divisor_hint, quantize
from .awq import AwqFold, awq_fold, awq_fold_step
from .gptq import gptq, gptq_layer
from .registry import (
    NO_QUANT,
    NO_SPARSITY,
    QUANTIZERS,
    SPARSIFIERS,
    LayerJob,
    Quantizer,
    Sparsifier,
    quant_choices,
    register_quantizer,
    register_sparsifier,
    sparsity_choices,
)
from .rtn import output_error, rtn, rtn_layer
from .sparse24 import SPARSEGPT_BACKENDS, is_24, magnitude, magnitude_24, modelopt_masks, refit_24, sparsegpt, sparsegpt_24
from .threads import single_thread

# One line per compressor; the order is the order of the CLI choices.
register_quantizer(Quantizer("rtn", rtn_layer))
register_quantizer(Quantizer("gptq", gptq_layer, needs_gram=True))
register_quantizer(Quantizer("awq", rtn_layer, needs_gram=True, fold=awq_fold_step))  # folded, then RTN
register_sparsifier(Sparsifier("sparsegpt", sparsegpt, needs_gram=True))
register_sparsifier(Sparsifier("magnitude", magnitude))

__all__ = ["AwqFold", "CompressConfig", "CompressedLinear", "compress_model", "output_error", "quant_choices", "sparsity_choices"]
# Re-exported names some callers and tests reach through this package.
_REEXPORTED = (awq_fold, gptq, rtn, magnitude_24, modelopt_masks, refit_24, sparsegpt_24)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressConfig:
    quant: str = defaults.QUANT  # a registered quantizer (registry.quant_choices()) or "none"
    bits: int = defaults.BITS  # 3 | 4
    group_size: int = defaults.GROUP_SIZE
    sparsity: str = defaults.SPARSITY  # "none" or a registered sparsifier (2:4 along the input dim)
    clip_search: bool = True  # RTN/AWQ (and GPTQ) range search per group


@dataclass
class CompressedLinear:
    weight: QuantizedMatrix  # W_c, torch layout [out, in]
    reference: Tensor  # float32 [out, in]: the full-precision W that ΔW = reference − W_c is measured against
    sparse24: bool
    method: str = ""  # what ran, e.g. "sparsegpt[modelopt-mask+obs-refit] + gptq int4 g128"
    awq: AwqFold | None = None  # AWQ only: reference = diag(1/out_scale) · W_original · diag(in_scale)


def _validate(linears: dict[str, nn.Linear], grams: GramStore, cfg: CompressConfig) -> None:
    """The library's own guard (compress_model may be called without the CLI's checks)."""
    if cfg.quant not in quant_choices():
        raise UsageError(f"unknown quantization method {cfg.quant!r}; use one of {', '.join(quant_choices())}")
    if cfg.sparsity not in sparsity_choices():
        raise UsageError(f"unknown sparsity method {cfg.sparsity!r}; use one of {', '.join(sparsity_choices())}")
    if cfg.quant != NO_QUANT:
        if cfg.bits not in (3, 4):
            raise UsageError(f"weight bits must be 3 or 4, got {cfg.bits}")
        if cfg.group_size <= 0:
            raise UsageError(f"group size must be positive, got {cfg.group_size}")
    needs_gram = (cfg.quant != NO_QUANT and QUANTIZERS[cfg.quant].needs_gram) or (
        cfg.sparsity != NO_SPARSITY and SPARSIFIERS[cfg.sparsity].needs_gram)
    if not linears:
        raise UsageError("no Linear layers to compress")
    for name, mod in linears.items():
        if name.split(".")[-1] in ("lm_head", "embed_tokens"):
            raise UsageError(f"{name} is not a decoder Linear; only q/k/v/o/gate/up/down projections are compressed")
        w = mod.weight
        if w.dim() != 2:
            raise BadInput(f"{name} has a {w.dim()}-D weight; expected a Linear [out, in]")
        if not torch.isfinite(w).all():
            raise BadInput(f"{name} has NaN/Inf weights; the checkpoint is corrupt, re-download or re-export it")
        cols = w.shape[1]
        if cfg.quant != NO_QUANT and cols % cfg.group_size:
            raise UsageError(
                f"group size {cfg.group_size} does not divide in_features={cols} of {name}; "
                f"choose a group size that divides {cols} (e.g. --group-size {divisor_hint(cols)})"
            )
        if cfg.sparsity != NO_SPARSITY and cols % 4:
            raise UsageError(f"2:4 sparsity needs in_features divisible by 4; {name} has {cols}; use --sparsity none")
        if needs_gram and name not in grams.owner:
            raise UsageError(f"no calibration Gram for {name}; collect Grams for every Linear to compress")


@torch.no_grad()
def compress_model(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    grams: GramStore,
    cfg: CompressConfig,
    calib_windows: Tensor,
    *,
    sparsegpt_backend: str = "auto",
) -> dict[str, CompressedLinear]:
    """Compress ``linears`` (name -> module of ``model``); see the module docstring for what changes.

    sparsegpt_backend: "auto" (ModelOpt on a deep copy when it is ≤ 2 GiB, else or on any
    ModelOpt failure our own SparseGPT), "modelopt" (ModelOpt or raise), "own".
    """
    with single_thread():
        _validate(linears, grams, cfg)
    if sparsegpt_backend not in SPARSEGPT_BACKENDS:
        raise UsageError(f"unknown SparseGPT backend {sparsegpt_backend!r}; use one of {SPARSEGPT_BACKENDS}")
    t0 = time.perf_counter()
    names = list(linears)
    ref = {n: linears[n].weight.detach().float().clone() for n in names}
    work = dict(ref)
    keep: dict[str, Tensor | None] = dict.fromkeys(names)
    parts = []

    if cfg.sparsity != NO_SPARSITY:
        sparse_w, masks, how = SPARSIFIERS[cfg.sparsity].sparsify(model, names, ref, grams, calib_windows, sparsegpt_backend)
        work.update(sparse_w)
        keep.update(masks)
        parts.append(how)

    quantizer = QUANTIZERS.get(cfg.quant)
    folds: dict[str, AwqFold] = {}
    if quantizer is not None and quantizer.fold is not None:
        folds = quantizer.fold(model, names, grams, work, ref, cfg)
        for n in names:  # write the folded FP weight back so the FP model stays function-preserving
            w = linears[n].weight
            w.data = ref[n].to(w.dtype)
            ref[n] = w.data.float().clone()
            if keep[n] is None:
                work[n] = ref[n]

    out: dict[str, CompressedLinear] = {}
    for n in names:
        if quantizer is not None:
            qm = quantizer.quantize(LayerJob(n, work[n], lambda n=n: grams.gram(n), keep[n]), cfg)
        else:
            qm = quantize(work[n], 16, 0)
        sparse = keep[n] is not None
        with single_thread():
            if sparse and not (is_24(qm.q) and is_24(qm.dequantize())):
                raise AssertionError(f"{n}: compressed weight lost its 2:4 pattern")
        desc = " + ".join(parts + ([f"{cfg.quant} int{cfg.bits} g{cfg.group_size}"] if cfg.quant != NO_QUANT else []))
        out[n] = CompressedLinear(qm, ref[n], sparse, desc or "fp16", folds.get(n))
    log.info("compressed %d Linears (%s) in %.1f s", len(out), out[names[0]].method, time.perf_counter() - t0)
    return out
