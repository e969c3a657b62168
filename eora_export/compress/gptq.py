"""GPTQ (Frantar et al., arXiv 2210.17323) on the calibration Gram, and the OBS engine it shares with SparseGPT.

The layer loss is tr((W − Q) G (W − Q)ᵀ) with G = XᵀX / N, the Gram from calibration
(the Hessian up to a factor 2, which changes nothing). Columns (input channels) are
processed left to right; each column is rounded, and its error, divided by the pivot of
the upper Cholesky factor U of H⁻¹, is pushed onto the columns not yet processed
(optimal brain surgeon). Updates inside a block of columns are applied at once, those
to the later columns lazily, once per block (GPTQ's lazy batch update).

* Groups are static (act-order off): the float16 scales of a group are fixed when its
  first column is reached, from the then-updated weights of the whole group, with
  :func:`eora_export.quant.group_scales` (or :func:`eora_export.quant.quantize`'s clip
  search). Codes are ``clamp(round(w / s))`` and values ``fp16(q · s)``, exactly
  :func:`eora_export.quant.quantize_with_scales`: the returned codes are recomputed by
  that function from the pre-rounding values and checked against the loop.
* Damping: 1% of the mean diagonal. Dead inputs (zero diagonal: the input never fired)
  are decoupled (their row/column of H is zero anyway) and simply rounded; their
  weights are kept, not zeroed, since nothing is known about them.
* The same loop, with ``bits=16`` (round to float16 only) and a 2:4 mask that is either
  given (fixed) or chosen every 4 columns from w² / U_jj² (SparseGPT's saliency, on the
  updated weights), is SparseGPT (Frantar & Alistarh, arXiv 2301.00774). With a fixed
  mask, pruned weights are set to exactly 0 and their error goes to the kept ones.

Float32 for the loop, float64 for the Cholesky of H. A 4096×4096 layer takes ≈ 6–10 s of
CPU time (measured on the shared 2-core machines; more wall time when they are busy), a
768×256 layer ≈ 0.3 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BadInput
from ..quant import QuantizedMatrix, dequantize, group_scales, qmax, quantize, quantize_with_scales
from .registry import LayerJob
from .threads import single_thread

DEFAULT_DAMP = 0.01
_BLOCK = 128


@dataclass
class ObsResult:
    """What :func:`obs_compress` produced.

    values: float32 ``[out, in]``, the weight the layer now computes with (fp16-exact).
    codes / scales: int8 codes and float16 scales for integer bit widths, else None.
    keep: bool ``[out, in]`` mask of the weights that were not pruned, or None.
    """

    values: Tensor
    codes: Tensor | None
    scales: Tensor | None
    keep: Tensor | None


def inverse_hessian_factor(gram: Tensor, damp: float = DEFAULT_DAMP, name: str = "layer") -> Tensor:
    """float32 upper Cholesky factor U of (G + damp·mean(diag G)·I)⁻¹ (H⁻¹ = Uᵀ U), dead inputs decoupled.

    One Cholesky of the reversed H gives H = R Rᵀ with R upper; then U = R⁻¹ (upper) is the
    upper Cholesky factor of H⁻¹. A fraction of the work of Cholesky → cholesky_inverse →
    Cholesky (4096²: ≈ 3 s instead of ≈ 17 s of CPU). Cholesky in float64, R⁻¹ in float32.
    """
    h = gram.to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise BadInput(f"the calibration Gram of {name} has NaN/Inf; check the model and the calibration data")
    diag = torch.diagonal(h)
    dead = diag <= 0
    alive_mean = diag[~dead].mean().item() if bool((~dead).any()) else 1.0
    if bool(dead.any()):
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = alive_mean
    h = h.flip(0, 1)
    lam = damp * alive_mean
    for _ in range(8):
        h.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().sub_(lam)
        lam *= 10.0
    else:
        raise BadInput(f"the calibration Gram of {name} is not positive semi-definite even after damping")
    r = chol.flip(0, 1).to(torch.float32)  # upper, H = R Rᵀ
    # With ≥ 1% damping cond(R) ≤ √(100·n), so float32 is accurate here (≈1e-6 relative).
    return _upper_inverse(r)


def _upper_inverse(r: Tensor, leaf: int = 512) -> Tensor:
    """R⁻¹ of an upper-triangular R by 2×2 block recursion (n³/3 flops in matmuls; a
    triangular solve against I does n³): [[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹ B C⁻¹], [0, C⁻¹]]."""
    n = r.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype), upper=True)
    h = n // 2
    a, c = _upper_inverse(r[:h, :h], leaf), _upper_inverse(r[h:, h:], leaf)
    out = torch.zeros_like(r)
    out[:h, :h] = a
    out[h:, h:] = c
    out[:h, h:] = -(a @ r[:h, h:]) @ c
    return out


def _block_size(group_size: int) -> int:
    unit = math.lcm(group_size, 4)  # blocks hold whole groups and whole 2:4 quads
    return unit * max(1, _BLOCK // unit)


@torch.no_grad()
def obs_compress(
    weight: Tensor,
    gram: Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    clip_search: bool = False,
    keep: Tensor | None = None,
    select_24: bool = False,
    damp: float = DEFAULT_DAMP,
    name: str = "layer",
    u: Tensor | None = None,
) -> ObsResult:
    """Round (``bits`` 3/4: group-wise integer; 16: float16) and/or 2:4-prune ``weight [out, in]``.

    keep: a fixed bool mask (True = kept); pruned weights become exactly 0.
    select_24: choose the 2:4 mask on the fly (SparseGPT); excludes ``keep``.
    u: :func:`inverse_hessian_factor` of ``gram`` with ``damp``, when the caller already has it
    (Linears sharing one Gram; it is most of the cost for wide layers).
    """
    if keep is not None and select_24:
        raise ValueError("give either a fixed mask or select_24, not both")
    rows, cols = weight.shape
    integer = bits != 16
    if integer and cols % group_size:
        raise ValueError(f"group size {group_size} does not divide {cols} columns of {name}")
    if select_24 and cols % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 input columns; {name} has {cols}")
    u = inverse_hessian_factor(gram, damp, name) if u is None else u
    masked = keep is not None or select_24
    # Transposed working layout [in, out]: an input column is a contiguous row here.
    wt = weight.detach().to(torch.float32).t().contiguous()
    kt = keep.to(torch.float32).t().contiguous() if keep is not None else torch.ones_like(wt)
    pre = torch.zeros_like(wt)  # the value each weight had when it was rounded
    out = torch.zeros_like(wt)  # the value it was rounded to
    scales = torch.zeros(cols // group_size, rows, dtype=torch.float16) if integer else None
    lo, hi = (-qmax(bits) - 1, qmax(bits)) if integer else (0, 0)
    scale = safe = pos = None
    bs = _block_size(group_size if integer else 4)
    with single_thread() as n_threads:
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            w1 = wt[i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = u[i1:i2, i1:i2]
            d1 = torch.diagonal(u1)
            for j in range(i2 - i1):
                c = i1 + j
                if select_24 and c % 4 == 0:
                    sal = w1[j : j + 4].square() / d1[j : j + 4].square().unsqueeze(1)
                    prune = torch.topk(sal, 2, dim=0, largest=False).indices
                    kt[c : c + 4].fill_(1.0).scatter_(0, prune, 0.0)
                if integer and c % group_size == 0:
                    grp = (w1[j : j + group_size] * kt[c : c + group_size]).t()
                    if clip_search:
                        sc = quantize(grp, bits, group_size, clip_search=True).scale[:, 0]
                    else:
                        sc = group_scales(grp, bits, group_size)[:, 0]
                    scales[c // group_size] = sc
                    scale = sc.float()
                    pos = scale > 0
                    safe = torch.where(pos, scale, torch.ones_like(scale))
                    if bool(pos.all()):
                        pos = None
                x = w1[j]
                if integer:  # exactly quant.quantize_with_scales, one column at a time
                    q = torch.round(x / safe).clamp_(lo, hi)
                    if pos is not None:
                        q.mul_(pos)
                    v = (q * scale).to(torch.float16).float()
                else:
                    v = x.to(torch.float16).float()
                if masked:
                    v.mul_(kt[c])
                    pre[c] = x * kt[c]
                else:
                    pre[c] = x
                out[c] = v
                e = (x - v).div_(d1[j])
                if j + 1 < i2 - i1:
                    w1[j + 1 :].addr_(u1[j, j + 1 :], e, alpha=-1.0)
                err1[j] = e
            if i2 < cols:
                torch.set_num_threads(n_threads)
                wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)
                torch.set_num_threads(1)
    out = out.t().contiguous()
    codes = None
    if integer:
        scales = scales.t().contiguous()
        codes = quantize_with_scales(pre.t(), scales, bits, group_size)
        if not torch.equal(dequantize(codes, scales, group_size), out.to(torch.float16)):
            raise AssertionError(f"GPTQ codes of {name} disagree with quant.quantize_with_scales")
    return ObsResult(out, codes, scales, kt.t().to(torch.bool).contiguous() if masked else None)


def gptq(
    weight: Tensor,
    gram: Tensor,
    bits: int,
    group_size: int,
    *,
    clip_search: bool = False,
    keep: Tensor | None = None,
    damp: float = DEFAULT_DAMP,
    name: str = "layer",
    u: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GPTQ codes (int8 ``[out, in]``) and float16 scales ``[out, in / group]``; ``keep`` fixes a 2:4 mask;
    ``u``: a precomputed :func:`inverse_hessian_factor` of ``gram``."""
    res = obs_compress(
        weight, gram, bits=bits, group_size=group_size, clip_search=clip_search, keep=keep, damp=damp, name=name, u=u
    )
    return res.codes, res.scales


def gptq_layer(job: LayerJob, cfg) -> QuantizedMatrix:
    """The registry's quantize step: GPTQ on the layer's Gram, a 2:4 mask kept fixed."""
    codes, scales = gptq(job.weight, job.gram(), cfg.bits, cfg.group_size, clip_search=cfg.clip_search, keep=job.keep, name=job.name)
    return QuantizedMatrix(codes, scales, cfg.bits, cfg.group_size)

