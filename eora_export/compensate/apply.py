"""Model surgery: compensate every compressed Linear and swap in ``EoraLinear`` modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import defaults
from ..calibration import GramStore
from ..eora_linear import EoraLinear
from ..errors import UsageError
from ..models import set_module
from ..quant import QuantizedMatrix, quantize
from .eora import GramRoot, check_finite, eora_factors_from_whitened, gram_root, svd_factors, weighted_error, whiten, whitened_error

METHODS = ("eora", "svd", "none")
LOWRANK_QUANTS = ("gptq", "rtn")


@dataclass(frozen=True)
class CompensationConfig:
    method: str = defaults.METHOD
    rank: int = defaults.RANK
    lowrank_bits: int = defaults.LOWRANK_BITS
    lowrank_group_size: int = defaults.LOWRANK_GROUP_SIZE  # 0: the largest of 128, 64, ... 2 dividing both rank and in
    lowrank_quant: str = defaults.LOWRANK_QUANT  # LOWRANK_QUANTS: rounding of the factors (see quantize_factors_in_metric)
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


@dataclass(frozen=True)
class FitMetric:
    """The metric factors were fitted in: error(B, A) = ‖M − B (A R)‖², M = target R.

    m: the whitened target ``[out, k]`` (ΔW R for EoRA, the effective error for error
    feedback); root: R with R Rᵀ = gram; gram: ``[in, in]`` (the Hessian GPTQ rounds A in).
    cache: shared by every metric on the same ``gram`` (Linears reading one input, the rungs of
    a rank ladder): it keeps GPTQ's inverse-Hessian factor, computed once (for in = 11008 it is
    ~1 min of CPU).
    """

    m: Tensor
    root: GramRoot
    gram: Tensor
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def hessian_factor(self) -> Tensor:
        from ..compress.gptq import inverse_hessian_factor  # the compressors import this module

        if "u" not in self.cache:
            self.cache["u"] = inverse_hessian_factor(self.gram, name="factor A")
        return self.cache["u"]

    def error(self, b: Tensor, a: Tensor) -> float:
        """‖M − B (A R)‖² for b [out, r], a [r, in] (float64; M may be the fast path's float32)."""
        ar = self.root.whiten(a.to(torch.float64))
        return float(torch.linalg.vector_norm(self.m.to(torch.float64) - b.to(torch.float64) @ ar) ** 2)


def _checked_pinv(h: Tensor) -> Tensor:
    """Pseudo-inverse of a small symmetric PSD ``h`` [r, r] (float64): eigenvalues at or below
    λ_max · r · eps are treated as zero, never divided by (zero rows of Â when the Gram holds
    fewer data directions than the rank). Device-agnostic, unlike lstsq's rank-revealing driver."""
    lam, q = torch.linalg.eigh(h)
    keep = lam > lam.max().clamp(min=0) * h.shape[0] * torch.finfo(torch.float64).eps
    q = q[:, keep]
    return (q / lam[keep]) @ q.T


def quantize_factors_in_metric(
    b: Tensor, a: Tensor, metric: FitMetric, bits: int, group: int
) -> tuple[QuantizedMatrix, QuantizedMatrix]:
    """b: [out, r], a: [r, in] -> quantized (B̂, Â) for the error ‖M − B̂ Â R‖² instead of ‖B − B̂‖, ‖A − Â‖.

    With B = U √S from the SVD, that error is Σᵢ sᵢ ‖(âᵢ − aᵢ) R‖² + (B's rounding): each row of
    A matters in the activation metric G = R Rᵀ, so Â is GPTQ on G (rows are independent in
    GPTQ, so the weights sᵢ change nothing). Given Â, the best float B is the least-squares
    B* = M (ÂR)ᵀ ((ÂR)(ÂR)ᵀ)⁺ (it also absorbs Â's rounding), and B̂ is GPTQ of B* on the
    r × r Hessian (ÂR)(ÂR)ᵀ. On the demo after SparseGPT 2:4 (rank 32, 4 bit) this closes
    ~75% of the gap between round-to-nearest factors and 16-bit ones in the fitted error
    (tools/factor_quant_error.py). Round-to-nearest is computed too and kept where it is
    better, so a layer is never worse than ``rtn``.
    """
    from ..compress.gptq import gptq  # the compressors import this module

    rtn = quantize_factors(b, a, bits, group)
    if a.shape[0] == 0 or not bool(a.abs().sum()):
        return rtn
    # With each group's range searched (clip_search), as the weights' RTN does: on the demo's INT3
    # GPTQ layers it removes another fifth of what remains to 16-bit factors.
    codes, scales = gptq(a.float(), metric.gram, bits, group, clip_search=True, name="factor A", u=metric.hessian_factor())
    aq = QuantizedMatrix(codes, scales, bits, group)
    ar = metric.root.whiten(aq.dequantize().double())  # [r, k]
    h_b = ar @ ar.T  # [r, r]
    b_star = (metric.m.double() @ ar.T) @ _checked_pinv(h_b)
    codes, scales = gptq(b_star.float(), h_b, bits, group, clip_search=True, name="factor B")
    bq = QuantizedMatrix(codes, scales, bits, group)
    if metric.error(bq.dequantize(), aq.dequantize()) < metric.error(rtn[0].dequantize(), rtn[1].dequantize()):
        return bq, aq
    return rtn


def factor_module(cl, b: Tensor, a: Tensor, cfg: CompensationConfig, bias: Tensor | None,
                  metric: FitMetric | None = None) -> EoraLinear:
    """EoraLinear of a CompressedLinear ``cl`` plus factors b [out, r], a [r, in] stored at cfg.lowrank_bits.

    metric: the metric b, a were fitted in; with ``cfg.lowrank_quant == "gptq"`` the factors are
    rounded in it (:func:`quantize_factors_in_metric`), else (and without one) to nearest.
    """
    rank, in_f = a.shape
    group = 0 if cfg.lowrank_bits == 16 else lowrank_group(rank, in_f, cfg.lowrank_group_size)
    if metric is not None and cfg.lowrank_bits != 16 and cfg.lowrank_quant == "gptq":
        bq, aq = quantize_factors_in_metric(b, a, metric, cfg.lowrank_bits, group)
    else:
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
            hessian_cache = roots.setdefault(("factor hessian", grams.owner[name]), {})
        if cfg.fast:
            # One float32 product M = ΔW R gives the factors and both error metrics (eora.whiten).
            m = whiten(delta, root32)
            before = whitened_error(m, root32)
        else:
            before = weighted_error(delta, gram)
            if cfg.method == "eora":
                check_finite(delta, "weight error ΔW")
                m = root.whiten(delta)
        if cfg.method == "none":
            module = EoraLinear(cl.weight, bias=biases.get(name), sparse24=cl.sparse24)
            results[name] = LayerResult(module, 0, before, before)
            continue
        rank = layer_rank(cfg.rank, out_f, in_f)
        metric = None
        if cfg.method == "eora":
            b, a = eora_factors_from_whitened(m, root, rank, fast=cfg.fast)
            metric = FitMetric(m, root, gram, hessian_cache)
        else:
            # The SVD baseline stays activation-blind: its factors are rounded to nearest.
            b, a = svd_factors(delta, rank, fast=cfg.fast)
        module = factor_module(cl, b, a, cfg, biases.get(name), metric)
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
