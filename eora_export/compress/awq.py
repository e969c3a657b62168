"""AWQ: activation-aware scales searched on the calibration Gram and folded into the model.

AWQ (Lin et al., arXiv 2306.00978) scales input channel i of a Linear by s_i before
rounding and divides its input by s_i, so W x = (W diag s)(diag(1/s) x). Here:

* s = a^α with a = √diag(G), the RMS magnitude of each input channel (G is the input
  Gram), normalised so that √(max s · min s) = 1; α is searched on a grid over [0, 1].
* The objective is the output error summed over the Linears that read the same input,
  Σ tr(E G Eᵀ) with E = Q(W diag s) diag(1/s) − W: the squared error of the layer
  outputs over the calibration tokens, from G alone, with no extra forward pass.
  α = 0 (s = 1) is plain RTN and is on the grid, so AWQ never does worse than RTN on
  this objective. We do not use ModelOpt's AWQ: it keeps a per-channel pre_quant_scale
  Mul before each Linear (and one per Linear, not per shared input), which our graph
  cannot carry; the Gram-based search is cheap and its scales fold exactly.
* The scales are folded, so no extra op remains at inference:
    q/k/v (shared s)  → divide ``input_layernorm.weight``,
    gate/up (shared)  → divide ``post_attention_layernorm.weight``,
    down_proj         → divide the rows of ``up_proj`` (and its bias),
    o_proj            → divide the rows of ``v_proj``; with grouped-query attention one
                        scale per v_proj output channel is searched and repeated over the
                        query heads that share it (HF ``repeat_kv`` order).
  The Gram of each scaled input is rescaled in place, G' = diag(1/s) G diag(1/s), so later
  steps (EoRA) see the Gram of the input the layer actually receives.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..calibration import GramStore
from .rtn import output_error, rtn

log = logging.getLogger(__name__)

AWQ_GRID = 11  # α = 0, 0.1, …, 1.0
# The search scores α on at most this many output rows per Linear (evenly spaced, the same
# rows for every α; rows quantize independently, so the score is exact on those rows). The
# "never worse than RTN" guarantee is exact for Linears with at most this many rows and holds
# on the sample beyond; a 4096² layer then costs 512·4096² per grid point instead of 4096³
# (q/k/v of width 4096: ≈ 23 s of CPU for the whole search).
AWQ_MAX_ROWS = 512
_LAYER_RE = re.compile(r"^(?P<layer>.+)\.(?P<block>self_attn|mlp)\.(?P<proj>[qkvo]_proj|gate_proj|up_proj|down_proj)$")


def activation_magnitude(gram: Tensor) -> Tensor:
    """float64 ``[in]`` √diag(G) / max, floored at 1e-4 so dead channels get no huge scale."""
    a = torch.diagonal(gram).to(torch.float64).clamp_min(0).sqrt()
    top = a.max()
    if top <= 0:
        return torch.ones_like(a)
    return (a / top).clamp_min(1e-4)


def awq_scales(
    terms: list[tuple[Tensor, Tensor, Tensor | None]],
    gram: Tensor,
    act: Tensor,
    bits: int,
    group_size: int,
    clip_search: bool,
    expand=None,
    grid: int = AWQ_GRID,
    max_rows: int = AWQ_MAX_ROWS,
) -> tuple[Tensor, float, float, float]:
    """Search α; returns (s float32 over ``act``'s channels, α, best error, error at α = 0).

    terms: (W to quantize, W reference, row weight or None) per Linear reading this input,
    ``[out, in]``; a row weight r undoes an earlier row fold (v_proj / up_proj rows ÷ r), so
    errors are measured in the original output units: E → diag(r) E.
    expand: maps a scale over ``act``'s channels to the ``in`` channels (GQA), or None.
    Errors are scored on at most ``max_rows`` rows of each Linear.
    """
    g32 = gram.to(torch.float32)
    sampled = []
    for work, ref, rows in terms:
        if work.shape[0] > max_rows:
            idx = torch.linspace(0, work.shape[0] - 1, max_rows).round().long()
            work, ref, rows = work[idx], ref[idx], rows[idx] if rows is not None else None
        sampled.append((work, ref, rows))
    best = (None, 0.0, float("inf"))
    base = float("inf")
    for i in range(grid):
        alpha = i / (grid - 1)
        if alpha == 0:
            s = torch.ones_like(act, dtype=torch.float32)
        else:
            s = act.pow(alpha)
            s = (s / (s.max() * s.min()).sqrt()).to(torch.float32)
        full = expand(s) if expand is not None else s
        err = 0.0
        for work, ref, rows in sampled:
            e = rtn(work * full, bits, group_size, clip_search).dequantize().float() / full - ref
            if rows is not None:
                e = e * rows.unsqueeze(1)
            err += output_error(e, g32)
        if alpha == 0:
            base = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], base


@dataclass
class AwqFold:
    """How a target was folded: reference = diag(1/out_scale) · W_original · diag(in_scale)."""

    alpha: float | None = None  # the α of its own input scale; None when its input was not scaled
    in_scale: Tensor | None = None  # float32 [in]
    out_scale: Tensor | None = None  # float32 [out] (v_proj / up_proj rows)


def _rescale_gram(grams: GramStore, name: str, s: Tensor) -> None:
    r = 1.0 / s.to(torch.float64)
    grams.sums[grams.owner[name]].mul_(r.unsqueeze(0) * r.unsqueeze(1))


def _is_plain_rmsnorm(norm: nn.Module) -> bool:
    # y = weight * x̂ (Llama, Mistral, Qwen2). Gemma's (1 + weight) form cannot be folded this way.
    kind = type(norm).__name__
    return kind.endswith("RMSNorm") and "Gemma" not in kind and getattr(norm, "weight", None) is not None


def _scale_rows(mod: nn.Linear, name: str, r: Tensor, work: dict, ref: dict, folds: dict) -> None:
    """Divide output rows of ``mod`` by r (in the working copies if it is a target, else in place)."""
    if name in ref:
        folds[name].out_scale = r
        ref[name] = ref[name] / r.unsqueeze(1)
        work[name] = work[name] / r.unsqueeze(1)
    else:
        mod.weight.data = (mod.weight.data.float() / r.unsqueeze(1)).to(mod.weight.dtype)
    if mod.bias is not None:
        mod.bias.data = (mod.bias.data.float() / r).to(mod.bias.dtype)


def _scale_cols(mod: nn.Linear, name: str, s: Tensor, work: dict, ref: dict, folds: dict, alpha: float) -> None:
    if name in ref:
        folds[name].in_scale = s
        folds[name].alpha = alpha
        ref[name] = ref[name] * s
        work[name] = work[name] * s
    else:
        mod.weight.data = (mod.weight.data.float() * s).to(mod.weight.dtype)


@torch.no_grad()
def awq_fold(
    model: nn.Module,
    names: list[str],
    grams: GramStore,
    work: dict[str, Tensor],
    ref: dict[str, Tensor],
    bits: int,
    group_size: int,
    clip_search: bool,
) -> dict[str, AwqFold]:
    """Search and fold AWQ scales for the decoder Linears in ``names``; returns how each was folded.

    Mutates ``work``/``ref`` (float32 working copies of the targets: columns × s, rows of
    v_proj/up_proj ÷ s), the model's RMSNorm weights and non-target Linears, and the Grams.
    Target Linears' own ``.weight`` is not touched here (the caller writes ``ref`` back).
    """
    layers: dict[str, dict[str, str]] = {}
    for n in names:
        m = _LAYER_RE.match(n)
        if m:
            layers.setdefault(m["layer"], {})[m["proj"]] = n
        else:
            warnings.warn(f"AWQ: {n} is not a Llama decoder projection; quantized without scaling", stacklevel=3)
    cfg = getattr(model, "config", None)
    folds = {n: AwqFold() for n in names}

    def search(group: list[str], gram_name: str, reduce=None, expand=None) -> tuple[Tensor, float]:
        gram = grams.gram(gram_name)
        act = activation_magnitude(gram)
        if reduce is not None:
            act = reduce(act)
        terms = [(work[n], ref[n], folds[n].out_scale) for n in group]
        s, alpha, err, base = awq_scales(terms, gram, act, bits, group_size, clip_search, expand)
        log.info("AWQ %s: alpha=%.1f output error %.4g -> %.4g", "+".join(group), alpha, base, err)
        return s, alpha

    for layer_name, projs in layers.items():
        layer = model.get_submodule(layer_name)
        attn, mlp = layer.self_attn, layer.mlp
        # o_proj and down_proj first: their folds rescale rows of v_proj / up_proj, which
        # the shared-input searches below then see.
        if "o_proj" in projs:
            o = projs["o_proj"]
            heads = cfg.num_attention_heads
            kv = getattr(cfg, "num_key_value_heads", None) or heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            n_rep = heads // kv
            if attn.o_proj.in_features != heads * head_dim or attn.v_proj.out_features != kv * head_dim:
                warnings.warn(f"AWQ: unexpected attention shapes in {layer_name}; {o} not scaled", stacklevel=3)
            else:
                def reduce(a, kv=kv, n_rep=n_rep, d=head_dim):
                    return a.view(kv, n_rep, d).square().mean(1).sqrt().reshape(-1)

                def expand(s, kv=kv, n_rep=n_rep, d=head_dim):
                    return s.view(kv, 1, d).expand(kv, n_rep, d).reshape(-1)

                s_v, alpha = search([o], o, reduce, expand)
                s_o = expand(s_v)
                _scale_cols(attn.o_proj, o, s_o, work, ref, folds, alpha)
                _scale_rows(attn.v_proj, f"{layer_name}.self_attn.v_proj", s_v, work, ref, folds)
                _rescale_gram(grams, o, s_o)
        if "down_proj" in projs:
            d = projs["down_proj"]
            s, alpha = search([d], d)
            _scale_cols(mlp.down_proj, d, s, work, ref, folds, alpha)
            _scale_rows(mlp.up_proj, f"{layer_name}.mlp.up_proj", s, work, ref, folds)
            _rescale_gram(grams, d, s)
        for norm, block, members in (
            (layer.input_layernorm, "self_attn", ("q_proj", "k_proj", "v_proj")),
            (layer.post_attention_layernorm, "mlp", ("gate_proj", "up_proj")),
        ):
            group = [projs[p] for p in members if p in projs]
            if not group:
                continue
            if not _is_plain_rmsnorm(norm) or len({grams.owner[n] for n in group}) != 1:
                warnings.warn(f"AWQ: cannot fold into {layer_name}'s norm; {group} not scaled", stacklevel=3)
                continue
            s, alpha = search(group, group[0])
            norm.weight.data = (norm.weight.data.double() / s.double()).to(norm.weight.dtype)
            parent = getattr(layer, block)
            for p in members:
                _scale_cols(getattr(parent, p), f"{layer_name}.{block}.{p}", s, work, ref, folds, alpha)
            _rescale_gram(grams, group[0], s)
    return folds


def awq_fold_step(model: nn.Module, names: list[str], grams: GramStore, work: dict, ref: dict, cfg) -> dict[str, AwqFold]:
    """The registry's fold step: :func:`awq_fold` with the settings of ``cfg`` (the weights are then rounded by RTN)."""
    return awq_fold(model, names, grams, work, ref, cfg.bits, cfg.group_size, cfg.clip_search)

