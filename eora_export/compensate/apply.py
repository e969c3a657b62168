"""Model surgery: compensate every compressed Linear and swap in ``EoraLinear`` modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import defaults
from ..calibration import GramStore
from ..eora_linear import EoraLinear
from ..errors import UsageError
from ..models import set_module
from ..quant import QuantizedMatrix, quantize
from .eora import eora_factors_from_root, eora_factors_from_whitened, gram_root, svd_factors, weighted_error, whiten, whitened_error

METHODS = ("eora", "svd", "none")


@dataclass(frozen=True)
class CompensationConfig:
    method: str = defaults.METHOD
    rank: int = defaults.RANK
    lowrank_bits: int = defaults.LOWRANK_BITS
    lowrank_group_size: int = defaults.LOWRANK_GROUP_SIZE  # 0: the largest of 128, 64, ... 2 dividing both rank and in
    fast: bool = False  # Cholesky + randomized SVD instead of eigh + full SVD


@dataclass
class LayerResult:
    """What one Linear got: its module and the activation-weighted errors tr(E G Eᵀ)."""

    module: EoraLinear
    rank: int
    error_before: float
    error_after: float


def lowrank_group(rank: int, in_features: int, requested: int = 0) -> int:
    """Block size along K for both factors: it must divide ``rank`` and ``in_features``."""
    if requested:
        if rank % requested or in_features % requested:
            raise UsageError(
                f"--lowrank-group-size {requested} must divide the rank ({rank}) and the layer width ({in_features})"
            )
        return requested
    for g in (128, 64, 32, 16, 8, 4, 2):
        if rank % g == 0 and in_features % g == 0:
            return g
    raise UsageError(f"rank {rank} is odd; quantized factors need an even rank (or --lowrank-bits 16)")


def layer_rank(requested: int, out_features: int, in_features: int) -> int:
    """Rank clamped to what a [out, in] layer allows (documented: clamp, and report it)."""
    return min(requested, out_features, in_features)


def quantize_factors(b: Tensor, a: Tensor, bits: int, group: int) -> tuple[QuantizedMatrix, QuantizedMatrix]:
    """b: [out, r], a: [r, in] float -> quantized, each blocked along its own K (r for b, in for a)."""
    return quantize(b.float(), bits, group), quantize(a.float(), bits, group)


def factor_module(cl, b: Tensor, a: Tensor, cfg: CompensationConfig, bias: Tensor | None) -> EoraLinear:
    """EoraLinear of a CompressedLinear ``cl`` plus factors b [out, r], a [r, in] stored at cfg.lowrank_bits."""
    rank, in_f = a.shape
    group = 0 if cfg.lowrank_bits == 16 else lowrank_group(rank, in_f, cfg.lowrank_group_size)
    bq, aq = quantize_factors(b, a, cfg.lowrank_bits, group)
    return EoraLinear(cl.weight, aq, bq, bias=bias, sparse24=cl.sparse24)


def compensate_layers(
    compressed: dict,
    grams: GramStore,
    cfg: CompensationConfig,
    biases: dict[str, Tensor | None] | None = None,
    progress: bool = True,
    roots: dict | None = None,
) -> dict[str, LayerResult]:
    """EoraLinear per compressed Linear. ``compressed[name]`` has ``weight`` (QuantizedMatrix
    [out, in]), ``reference`` (float [out, in]) and ``sparse24``. Gram roots are computed
    once per shared input; ``roots`` (a dict kept by the caller) shares them across calls on
    the same Grams and the same ``cfg.fast`` (methods and ranks of one block)."""
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method '{cfg.method}'; use one of {', '.join(METHODS)}")
    if cfg.method != "none" and cfg.rank <= 0:
        raise UsageError(f"--rank must be positive for --method {cfg.method}, got {cfg.rank}")
    biases = biases or {}
    roots = {} if roots is None else roots
    results = {}
    for name, cl in tqdm(compressed.items(), desc=f"compensate ({cfg.method})", unit="layer", disable=not progress, leave=False):
        w_c = cl.weight.dequantize().double()
        delta = cl.reference.double() - w_c
        gram = grams.gram(name)
        out_f, in_f = delta.shape
        root = root32 = m = None
        if cfg.fast or cfg.method == "eora":
            key = (grams.owner[name], cfg.fast)
            if key not in roots:
                r = gram_root(gram, fast=cfg.fast)
                roots[key] = (r, r.to(torch.float32) if cfg.fast else None)
            root, root32 = roots[key]
        if cfg.fast:
            # One float32 product M = ΔW R gives the factors and both error metrics (eora.whiten).
            m = whiten(delta, root32)
            before = whitened_error(m, root32)
        else:
            before = weighted_error(delta, gram)
        if cfg.method == "none":
            module = EoraLinear(cl.weight, bias=biases.get(name), sparse24=cl.sparse24)
            results[name] = LayerResult(module, 0, before, before)
            continue
        rank = layer_rank(cfg.rank, out_f, in_f)
        if cfg.method == "eora":
            b, a = eora_factors_from_whitened(m, root, rank) if cfg.fast else eora_factors_from_root(delta, root, rank)
        else:
            b, a = svd_factors(delta, rank, fast=cfg.fast)
        module = factor_module(cl, b, a, cfg, biases.get(name))
        if cfg.fast:
            after = whitened_error(m, root32, module.b, module.a)
        else:
            after = weighted_error(delta, gram, module.b.double(), module.a.double())
        results[name] = LayerResult(module, rank, before, after)
    return results


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily put ``modules`` into ``model`` (by qualified name); restore on exit."""
    old = {name: set_module(model, name, mod) for name, mod in modules.items()}
    try:
        yield model
    finally:
        for name, mod in old.items():
            set_module(model, name, mod)
