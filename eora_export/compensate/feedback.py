"""Error-feedback EoRA: compensate a layer against the FP model's outputs, from the inputs the
compressed (and already compensated) upstream layers actually produce.

Plain EoRA fits ΔW = W − W_c on the FP inputs X (G = X Xᵀ / N) and ignores that, once the
upstream layers are compressed, the layer sees other inputs X_c. Error feedback minimises

    ‖W X_fp − (W_c + B A) X_c‖²_F / N      (X_fp, X_c: [in, N], the same N tokens)

over rank-r B A. With G_c = X_c X_cᵀ / N and the cross-Gram C = X_fp X_cᵀ / N the
unconstrained minimiser is M* = W C G_c⁺ − W_c, and for any M the objective splits
(Pythagoras: the residual of M* is orthogonal to the rows of X_c) as

    f(M) = f(M*) + tr((M* − M) G_c (M* − M)ᵀ),

so the rank-r problem is plain EoRA on the effective error ΔW_eff = W C G_c⁺ − W_c in the
G_c metric. With a root G_c = R Rᵀ, ΔW_eff R = W C R⁺ᵀ − W_c R: the pseudo-inverse only
ever divides by the root's kept √λ (same eps rule as :func:`eora.gram_root`), never by an
unchecked eigenvalue. When X_c = X_fp (C = G_c) this is exactly EoRA on W − W_c.

With ``residual`` the target also carries the residual stream: a Linear whose output is added to
it (o_proj, down_proj) is fitted to W X_fp + E, E = R_fp − R_c the residual stream's own error
at that addition (what upstream compression left there), so the block's output, not only the
Linear's, is matched: the linear term gains D = E X_cᵀ / N [out, in] and nothing else changes.

``shrink`` (0 ≤ s ≤ 1) blends the target toward plain EoRA: ΔW_s = (1 − s) ΔW_eff + s ΔW
(both in the G_c metric). s = 0 is full feedback; the driver in tools/ measures it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..eora_linear import EoraLinear
from ..methods import BlockInputs, Method, register
from ..models import residual_source, set_module
from .apply import CompensationConfig, FitMetric, LayerResult, factor_module, swapped
from .eora import GramRoot, _check_rank, check_finite, eora_factors_from_whitened, gram_root
from .paired_inputs import PairedInputs, Residual, shared_inputs

# Ridge of the feedback regression, in units of mean(diag G_c); see feedback_target. Chosen on the
# demo's validation split (calibration windows never fitted on) among 0.001, 0.003, 0.01, 0.03 with
# --rank-budget 32: 0.003 was best or tied on INT4 RTN, SparseGPT 2:4 and INT3 GPTQ; 0 (no ridge)
# was far worse than plain EoRA (tools/recovery_experiments.py, README "Recovery methods").
DEFAULT_DAMP = 0.003
# o_proj and down_proj also absorb the residual stream's error (module docstring). Measured on the
# demo with --rank-budget 32, 4-bit factors, KL recovered on the validation split without -> with:
# eora-fb-alt after INT4 RTN 91.4 -> 93.4%, SparseGPT 2:4 87.6 -> 90.8%, INT3 GPTQ 74.6 -> 79.9%;
# eora-fb after INT3 GPTQ 72.3 -> 76.7% (tools/recovery_experiments.py; README, Recovery methods).
ABSORB_RESIDUAL = True


def whiten_pinv(x: Tensor, root: GramRoot) -> Tensor:
    """``x: [out, in]`` -> x R⁺ᵀ ``[out, k]`` (so that (x G⁺) R = x R⁺ᵀ for G = R Rᵀ).

    Eigen root R = Q_k √Λ_k: x Q_k / √λ_k (only kept eigenvalues are divided by).
    Cholesky root R = L: x L⁻ᵀ by a triangular solve.
    """
    if root.chol is not None:
        # x L⁻ᵀ = (L⁻¹ xᵀ)ᵀ
        return torch.linalg.solve_triangular(root.chol, x.T, upper=False).T
    return (x @ root.basis) / root.sqrt_eig


def linear_term(w: Tensor, cross: Tensor, resid: Residual | None) -> Tensor:
    """Y X_cᵀ / N for the target Y = W X_fp (+ E): W C (+ D) ``[out, in]`` float64."""
    y = w.to(torch.float64) @ cross.to(torch.float64)
    return y if resid is None else y + resid.cross_c


def target_energy(w: Tensor, gram_fp: Tensor, resid: Residual | None) -> float:
    """‖Y‖² / N for Y = W X_fp (+ E)."""
    w = w.to(torch.float64)
    energy = float(((w @ gram_fp.to(torch.float64)) * w).sum())
    return energy if resid is None else energy + resid.sq + 2 * float((w * resid.cross_fp).sum())


def paired_error(w: Tensor, w_hat: Tensor, gram_fp: Tensor, cross: Tensor, gram_c: Tensor,
                 resid: Residual | None = None) -> float:
    """‖Y − Ŵ X_c‖² / N, Y = W X_fp (+ E), for w, w_hat [out, in]."""
    w_hat = w_hat.to(torch.float64)
    return _expanded_error(target_energy(w, gram_fp, resid), linear_term(w, cross, resid), w_hat,
                           w_hat @ gram_c.to(torch.float64))


def _expanded_error(energy: float, y_cross: Tensor, w_hat: Tensor, w_hat_gram: Tensor) -> float:
    """‖Y‖² − 2⟨Ŵ, Y X_cᵀ⟩ + ⟨Ŵ G_c, Ŵ⟩ (all / N) from its parts: ``y_cross`` = Y X_cᵀ / N and
    ``w_hat_gram`` = Ŵ G_c, both [out, in] float64."""
    return energy - 2 * float((y_cross * w_hat).sum()) + float((w_hat_gram * w_hat).sum())


@dataclass(frozen=True)
class FeedbackTarget:
    """The whitened effective error of one layer and the objective's constant part.

    m_star: M* R = ΔW_eff R ``[out, k]`` float64 (the exact objective's optimum, whitened);
    m: the matrix whose top-r SVD gives the factors (= m_star unless shrunk);
    before: f(0) = ‖W X_fp − W_c X_c‖² / N; floor: f(M*), the best any full-rank
    correction on X_c reaches.
    """

    m_star: Tensor
    m: Tensor
    root: GramRoot
    before: float
    floor: float  # nan with damping (then f(M*) is not the undamped objective's minimum)
    p: Tensor  # P = W C − W_c G_c [out, in]
    gram_c: Tensor  # [in, in]


def feedback_target(
    w: Tensor, w_c: Tensor, gram_fp: Tensor, cross: Tensor, gram_c: Tensor,
    root: GramRoot | None = None, shrink: float = 0.0, damp: float = 0.0, resid: Residual | None = None,
) -> FeedbackTarget:
    """Whitened effective error for error-feedback EoRA.

    w: FP weight [out, in]; w_c: compressed weight [out, in]; gram_fp = X_fp X_fpᵀ / N,
    cross = X_fp X_cᵀ / N, gram_c = X_c X_cᵀ / N, all [in, in] over the same tokens.
    damp: ridge δ = damp · mean(diag G_c): minimise f(M) + δ‖M‖²_F, i.e. EoRA in the metric
    G_c + δI on ΔW_eff = (W C − W_c G_c)(G_c + δI)⁻¹. Without it the regression W C G_c⁺
    follows directions the calibration barely excites (tiny λ), its factors get huge entries
    there and 4-bit factor quantization wrecks them (measured on the demo: worse than EoRA).
    root: a precomputed root of G_c + δI (share it between Linears reading the same input).
    resid: the residual stream's error at this Linear's output (module docstring).
    """
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must be in [0, 1], got {shrink}")
    if damp < 0:
        raise ValueError(f"damp must be ≥ 0, got {damp}")
    for t, what in ((w, "FP weight"), (w_c, "compressed weight"), (cross, "cross-Gram")):
        check_finite(t, what)
    w, w_c = w.to(torch.float64), w_c.to(torch.float64)
    gram_fp, cross, gram_c = (g.to(torch.float64) for g in (gram_fp, cross, gram_c))
    root = root if root is not None else gram_root(damped(gram_c, damp))
    y_cross, w_c_gram = linear_term(w, cross, resid), w_c @ gram_c
    p = y_cross - w_c_gram  # (Y − W_c X_c) X_cᵀ / N: the objective's linear term
    m_star = whiten_pinv(p, root)
    m = m_star if not shrink else (1.0 - shrink) * m_star + shrink * root.whiten(w - w_c)
    before = _expanded_error(target_energy(w, gram_fp, resid), y_cross, w_c, w_c_gram)  # f(0)
    floor = before - float((m_star * m_star).sum()) if not damp else float("nan")
    return FeedbackTarget(m_star, m, root, max(before, 0.0), floor, p, gram_c)


def ridge(gram: Tensor, damp: float) -> float:
    """δ = damp · mean(diag G): the ridge of :func:`damped`, in the Gram's own scale."""
    return damp * float(gram.diagonal().to(torch.float64).mean())


def damped(gram: Tensor, damp: float) -> Tensor:
    """G + δI with δ = :func:`ridge` ([in, in] float64)."""
    if not damp:
        return gram
    g = gram.to(torch.float64, copy=True)
    g.diagonal().add_(ridge(g, damp))
    return g


def feedback_error(t: FeedbackTarget, b: Tensor | None = None, a: Tensor | None = None) -> float:
    """f(B A) = ‖Y − (W_c + B A) X_c‖² / N, Y = W X_fp (+ E), for b [out, r], a [r, in] (the undamped
    objective): f(0) − 2⟨B A, P⟩ + tr(B A G_c Aᵀ Bᵀ), P = (Y − W_c X_c) X_cᵀ / N; costs r · in · (out + in)."""
    if b is None:
        return t.before
    b, a = b.to(torch.float64), a.to(torch.float64)
    linear = float(((b.T @ t.p) * a).sum())
    quad = float(((a @ t.gram_c @ a.T) * (b.T @ b)).sum())
    return t.before - 2 * linear + quad


def feedback_factors(
    w: Tensor, w_c: Tensor, gram_fp: Tensor, cross: Tensor, gram_c: Tensor, rank: int,
    root: GramRoot | None = None, fast: bool = False, shrink: float = 0.0, damp: float = 0.0,
    resid: Residual | None = None,
) -> tuple[Tensor, Tensor, FeedbackTarget]:
    """Rank-``rank`` B [out, rank], A [rank, in] (float64) minimising ‖W X_fp (+ E) − (W_c + BA) X_c‖²/N
    (shrink = 0; E with ``resid``), plus the target to measure any factors with (:func:`feedback_error`).
    """
    _check_rank(w, rank)
    t = feedback_target(w, w_c, gram_fp, cross, gram_c, root, shrink, damp, resid)
    b, a = eora_factors_from_whitened(t.m, t.root, rank, fast=fast)
    return b, a, t


@dataclass(frozen=True)
class PairedGrams:
    """One shared input's statistics over the same calibration tokens, all [in, in] float64:
    G_fp = X_fp X_fpᵀ / N, C = X_fp X_cᵀ / N, G_c = X_c X_cᵀ / N; ``hessian`` = G_c + δI with
    δ = ``damp`` · mean(diag G_c) (:func:`damped`), formed once per shared input, and its ``root``;
    ``resid``: the residual stream's error at the output of a Linear reading this input alone
    (o_proj, down_proj; :meth:`PairedInputs.residual`), else None."""

    gram_fp: Tensor
    cross: Tensor
    gram_c: Tensor
    hessian: Tensor
    root: GramRoot
    damp: float
    resid: Residual | None = None
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # FitMetric's, for G_c + δI


# fit(name, compressed Linear, paired Grams, rank, cfg, bias, shrink) -> LayerResult
LayerFit = Callable[[str, object, PairedGrams, int, CompensationConfig, "Tensor | None", float], LayerResult]


def fit_factors(name: str, cl, g: PairedGrams, rank: int, cfg: CompensationConfig, bias: Tensor | None,
                shrink: float = 0.0) -> LayerResult:
    """EoRA-fb for one Linear: factors on the compressor's W_c (rank 0: W_c alone); errors are
    the undamped objective f (:func:`feedback_error`)."""
    w, w_c = cl.reference.double(), cl.weight.dequantize().double()
    if rank == 0:
        target = feedback_target(w, w_c, g.gram_fp, g.cross, g.gram_c, g.root, shrink, g.damp, g.resid)
        return LayerResult(EoraLinear(cl.weight, bias=bias, sparse24=cl.sparse24), 0, target.before, target.before)
    b, a, target = feedback_factors(w, w_c, g.gram_fp, g.cross, g.gram_c, rank, g.root, cfg.fast, shrink, g.damp,
                                    g.resid)
    module = factor_module(cl, b, a, cfg, bias, FitMetric(target.m, g.root, g.hessian, g.cache))
    return LayerResult(module, rank, target.before, feedback_error(target, module.b.double(), module.a.double()))


# --------------------------------------------------------------------------------------
# The walk: layer groups in forward order, each fitted on the inputs its compensated
# upstream produces.
# --------------------------------------------------------------------------------------


@torch.no_grad()
def feedback_walk(
    units: list[list[str]],
    compressed: dict,
    fp_modules: dict[str, torch.nn.Module],
    c_module: Callable[[str], torch.nn.Module],
    install: Callable[[str, torch.nn.Module], None],
    forward_fp: Callable[[Tensor], object],
    forward_c: Callable[[Tensor], object],
    batches: Callable[[], Iterable[Tensor]],
    cfg: CompensationConfig,
    biases: dict[str, Tensor | None] | None = None,
    shrink: float = 0.0,
    damp: float = DEFAULT_DAMP,
    ranks: dict[str, int] | None = None,
    fit: LayerFit | None = None,
    residual: Callable[[str], tuple[torch.nn.Module, torch.nn.Module] | None] | None = None,
) -> dict[str, LayerResult]:
    """Error-feedback EoRA over ``units`` in forward order.

    units: lists of Linear names fitted together from one pass (a shared-input group such as
    q/k/v, or a whole block); every unit sees the inputs produced by the compressed model with
    all earlier units already compensated (``install`` puts each EoraLinear into the model
    that ``forward_c`` runs, ``c_module(name)`` is what is installed there now).
    compressed[name]: CompressedLinear (``weight`` [out, in], ``reference`` = W).
    forward_fp / forward_c: run one calibration batch through the FP / compressed model (or
    block); batches(): the calibration batches, the same for both. ranks: per-layer ranks
    (e.g. from :func:`ranks.budget_compensate`; 0: no factors) instead of cfg.rank.
    fit: what one Linear gets from its paired Grams (default :func:`fit_factors`, EoRA-fb's
    closed form; ``--method eora-fb-alt`` also re-compresses the weight).
    residual(name): the (FP, compressed) modules whose input is the residual stream the Linear's
    output is added to, or None; given, such a Linear also absorbs that stream's error.
    """
    biases = biases or {}
    fit = fit or fit_factors
    results: dict[str, LayerResult] = {}
    for unit in units:
        # One hooked module per distinct input tensor: Linears reading the same input share
        # G_fp, C, G_c (found by identity, as calibration.GramCollector does).
        keys = shared_inputs(unit, fp_modules, forward_fp, next(iter(batches())))
        # A stream's error has the width of one output: only a Linear reading its input alone takes it.
        streams = {k: residual(names[0]) for k, names in keys.items() if residual and len(names) == 1}
        paired = PairedInputs({k: fp_modules[k] for k in keys}, {k: c_module(k) for k in keys},
                              residuals={k: m for k, m in streams.items() if m is not None})
        paired.run(forward_fp, forward_c, batches())
        for key, names in keys.items():
            gram_fp, cross, gram_c = paired.grams(key)
            hessian = damped(gram_c, damp)
            shared = PairedGrams(gram_fp, cross, gram_c, hessian, gram_root(hessian, fast=cfg.fast), damp,
                                 paired.residual(key))
            for name in names:
                rank = min(cfg.rank if ranks is None else ranks[name], *compressed[name].reference.shape)
                results[name] = fit(name, compressed[name], shared, rank, cfg, biases.get(name), shrink)
        for name in unit:
            install(name, results[name].module)
    return results


FEEDBACK_UNITS = ("input", "block")


def walk_units(names: list[str], unit: str, owner: dict[str, str]) -> list[list[str]]:
    """Split ``names`` (model order) into the walk's units.

    "input": the Linears reading one input tensor (``owner``: name -> shared-input key, e.g.
    GramStore.owner): q/k/v, then o, then gate/up, then down, so each sublayer sees its
    compensated predecessors. "block": one unit per decoder block (``.layers.N.``).
    """
    if unit not in FEEDBACK_UNITS:
        raise ValueError(f"unknown feedback unit {unit!r}; use one of {FEEDBACK_UNITS}")
    units: dict[str, list[str]] = {}
    for name in names:
        key = owner.get(name, name) if unit == "input" else _block_of(name)
        units.setdefault(key, []).append(name)
    return list(units.values())


def _block_of(name: str) -> str:
    m = re.search(r"(^|\.)layers\.(\d+)\.", name)
    return m.group(0) if m else name


def feedback_compensate_model(
    model: torch.nn.Module,
    compressed: dict,
    owner: dict[str, str],
    calib: Tensor,
    cfg: CompensationConfig,
    biases: dict[str, Tensor | None] | None = None,
    batch_size: int = 8,
    unit: str = "input",
    shrink: float = 0.0,
    damp: float = DEFAULT_DAMP,
    ranks: dict[str, int] | None = None,
    fit: LayerFit | None = None,
    residual: bool = ABSORB_RESIDUAL,
) -> dict[str, LayerResult]:
    """Error-feedback EoRA for a whole in-memory model (tools/recovery_experiments.py and tests; runs
    give ``--method eora-fb`` through :func:`feedback_block`, one decoder block at a time).

    model: the compressed model *before* any swap, whose target Linears still hold the
    reference weights (``compress_model``'s contract; with AWQ those are the folded weights),
    so a deep copy of it is the FP reference whose Linear inputs match ``reference``.
    calib: [n, seq] token windows; owner: GramStore.owner (shared inputs, model order).
    The model is returned unchanged; the results hold the EoraLinear modules.
    """
    fp = copy.deepcopy(model)
    fp_linears = {n: fp.get_submodule(n) for n in compressed}
    plain = {n: EoraLinear(c.weight, bias=(biases or {}).get(n), sparse24=c.sparse24) for n, c in compressed.items()}
    with swapped(model, plain):
        return feedback_walk(
            walk_units(list(compressed), unit, owner), compressed, fp_linears, model.get_submodule,
            lambda n, m: set_module(model, n, m), fp, model,
            lambda: [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)],
            cfg, biases, shrink, damp, ranks, fit, residual_pair(fp, model) if residual else None,
        )


def residual_pair(fp: torch.nn.Module, c: torch.nn.Module) -> Callable[[str], tuple[torch.nn.Module, torch.nn.Module] | None]:
    """name -> (FP, compressed) module whose input is the residual stream the Linear adds to
    (:func:`models.residual_source`), for ``feedback_walk``'s ``residual``."""

    def pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        source = residual_source(name, fp)
        return None if source is None else (fp.get_submodule(source), c.get_submodule(source))

    return pair


@dataclass
class _Pair:
    """One calibration batch on both sides: the FP block's inputs and this path's own ``[b, seq, h]``."""

    fp: Tensor
    c: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.fp.shape

    @property
    def ndim(self) -> int:
        return self.fp.ndim


def feedback_block(inputs: BlockInputs, comp: CompensationConfig, ranks: dict[str, int] | None,
                   fit: LayerFit | None = None, damp: float = DEFAULT_DAMP,
                   residual: bool = ABSORB_RESIDUAL) -> dict[str, LayerResult]:
    """``--method eora-fb`` on one decoder block: each shared-input group of Linears fitted to the
    FP block's outputs from the inputs its path really gets (``inputs.own_inputs``: what the
    compressed and compensated upstream blocks produce; inside the block, the groups before it
    already compensated). The FP side is a copy of the block with its reference weights.
    residual: o_proj and down_proj are fitted to the block's FP residual stream as well
    (:data:`ABSORB_RESIDUAL`)."""
    host, bs = inputs.host, inputs.run.batch_size
    fp = copy.deepcopy(host)
    fp_linears = {n: fp.get_submodule(n) for n in inputs.compressed}
    plain = {n: EoraLinear(c.weight, bias=inputs.biases.get(n), sparse24=c.sparse24) for n, c in inputs.compressed.items()}
    own = inputs.own_inputs if inputs.own_inputs is not None else inputs.calib
    batches = [_Pair(inputs.calib[i : i + bs], own[i : i + bs]) for i in range(0, inputs.calib.shape[0], bs)]
    with swapped(host, plain):
        return feedback_walk(
            walk_units(list(inputs.compressed), "input", inputs.grams.owner), inputs.compressed, fp_linears,
            host.get_submodule, lambda n, m: set_module(host, n, m), lambda b: fp(b.fp), lambda b: host(b.c),
            lambda: batches, comp, inputs.biases, damp=damp, ranks=ranks, fit=fit,
            residual=residual_pair(fp, host) if residual else None,
        )


register(Method("eora-fb", "error-feedback EoRA: each layer fitted to the FP outputs from the inputs its compressed and "
                "compensated upstream produces (o/down: to the FP residual stream too)", feedback_block, own_stream=True, allocates=True))
