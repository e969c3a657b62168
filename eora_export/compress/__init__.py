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
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..calibration import GramStore
from ..errors import BadInput, UsageError
from ..quant import QuantizedMatrix, divisor_hint, quantize
from .gptq import gptq, single_thread
from .int4 import AwqFold, awq_fold, output_error, rtn
from .sparse24 import is_24, magnitude_24, modelopt_masks, refit_24, sparsegpt_24

__all__ = ["AwqFold", "CompressConfig", "CompressedLinear", "compress_model", "output_error"]

log = logging.getLogger(__name__)

QUANT_METHODS = ("none", "rtn", "gptq", "awq")
SPARSITY_METHODS = ("none", "sparsegpt", "magnitude")
SPARSEGPT_BACKENDS = ("auto", "modelopt", "own")
# "auto" runs ModelOpt on a deep copy of the model only while that copy is small.
MODELOPT_MAX_COPY_BYTES = 2 << 30


@dataclass(frozen=True)
class CompressConfig:
    quant: str = "rtn"  # "none" | "rtn" | "gptq" | "awq"
    bits: int = 4  # 3 | 4
    group_size: int = 128
    sparsity: str = "none"  # "none" | "sparsegpt" | "magnitude"   (2:4 along the input dim)
    clip_search: bool = True  # RTN/AWQ (and GPTQ) range search per group


@dataclass
class CompressedLinear:
    weight: QuantizedMatrix  # W_c, torch layout [out, in]
    reference: Tensor  # float32 [out, in]: the full-precision W that ΔW = reference − W_c is measured against
    sparse24: bool
    method: str = ""  # what ran, e.g. "sparsegpt[modelopt-mask+obs-refit] + gptq int4 g128"
    awq: AwqFold | None = None  # AWQ only: reference = diag(1/out_scale) · W_original · diag(in_scale)


def _validate(linears: dict[str, nn.Linear], grams: GramStore, cfg: CompressConfig) -> None:
    if cfg.quant not in QUANT_METHODS:
        raise UsageError(f"unknown quantization method {cfg.quant!r}; use one of {', '.join(QUANT_METHODS)}")
    if cfg.sparsity not in SPARSITY_METHODS:
        raise UsageError(f"unknown sparsity method {cfg.sparsity!r}; use one of {', '.join(SPARSITY_METHODS)}")
    if cfg.quant != "none":
        if cfg.bits not in (3, 4):
            raise UsageError(f"weight bits must be 3 or 4, got {cfg.bits}")
        if cfg.group_size <= 0:
            raise UsageError(f"group size must be positive, got {cfg.group_size}")
    needs_gram = cfg.quant in ("gptq", "awq") or cfg.sparsity == "sparsegpt"
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
        if cfg.quant != "none" and cols % cfg.group_size:
            raise UsageError(
                f"group size {cfg.group_size} does not divide in_features={cols} of {name}; "
                f"choose a group size that divides {cols} (e.g. --group-size {divisor_hint(cols)})"
            )
        if cfg.sparsity != "none" and cols % 4:
            raise UsageError(f"2:4 sparsity needs in_features divisible by 4; {name} has {cols}; use --sparsity none")
        if needs_gram and name not in grams.owner:
            raise UsageError(f"no calibration Gram for {name}; collect Grams for every Linear to compress")


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sparsegpt(
    model: nn.Module, names: list[str], ref: dict[str, Tensor], grams: GramStore, windows: Tensor, backend: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """(sparse weights, masks, which implementation ran)."""
    masks = None
    if backend == "auto" and _model_bytes(model) > MODELOPT_MAX_COPY_BYTES:
        log.info("SparseGPT: model too large for a ModelOpt deep copy; using our own SparseGPT")
    elif backend in ("auto", "modelopt"):
        try:
            device = next(model.parameters()).device
            masks = modelopt_masks(model, names, windows.to(device))
        except Exception as e:  # any ModelOpt failure means: use ours
            if backend == "modelopt":
                raise
            warnings.warn(
                f"ModelOpt SparseGPT unavailable ({type(e).__name__}: {e}); using our own SparseGPT", stacklevel=3
            )
    work, keep = {}, {}
    if masks is not None:
        for n in names:
            work[n] = refit_24(ref[n], grams.gram(n), masks[n], name=n)
            keep[n] = masks[n]
        return work, keep, "sparsegpt[modelopt-mask+obs-refit]"
    for n in names:
        work[n], keep[n] = sparsegpt_24(ref[n], grams.gram(n), name=n)
    return work, keep, "sparsegpt[own]"


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

    if cfg.sparsity == "magnitude":
        for n in names:
            work[n], keep[n] = magnitude_24(ref[n])
        parts.append("magnitude 2:4")
    elif cfg.sparsity == "sparsegpt":
        work, keep, how = _sparsegpt(model, names, ref, grams, calib_windows, sparsegpt_backend)
        log.info("2:4 sparsity by %s", how)
        parts.append(how)

    folds: dict[str, AwqFold] = {}
    if cfg.quant == "awq":
        folds = awq_fold(model, names, grams, work, ref, cfg.bits, cfg.group_size, cfg.clip_search)
        for n in names:  # write the folded FP weight back so the FP model stays function-preserving
            w = linears[n].weight
            w.data = ref[n].to(w.dtype)
            ref[n] = w.data.float().clone()
            if keep[n] is None:
                work[n] = ref[n]

    out: dict[str, CompressedLinear] = {}
    for n in names:
        if cfg.quant in ("rtn", "awq"):
            qm = rtn(work[n], cfg.bits, cfg.group_size, cfg.clip_search)
        elif cfg.quant == "gptq":
            codes, scales = gptq(
                work[n], grams.gram(n), cfg.bits, cfg.group_size, clip_search=cfg.clip_search, keep=keep[n], name=n
            )
            qm = QuantizedMatrix(codes, scales, cfg.bits, cfg.group_size)
        else:
            qm = quantize(work[n], 16, 0)
        sparse = keep[n] is not None
        with single_thread():
            if sparse and not (is_24(qm.q) and is_24(qm.dequantize())):
                raise AssertionError(f"{n}: compressed weight lost its 2:4 pattern")
        desc = " + ".join(parts + ([f"{cfg.quant} int{cfg.bits} g{cfg.group_size}"] if cfg.quant != "none" else []))
        out[n] = CompressedLinear(qm, ref[n], sparse, desc or "fp16", folds.get(n))
    log.info("compressed %d Linears (%s) in %.1f s", len(out), out[names[0]].method, time.perf_counter() - t0)
    return out
