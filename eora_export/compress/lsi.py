"""LSI: Learnable Singular-value Increments (Gao et al., arXiv 2406.16299), block by block.

Each target Linear weight W ``[out, in]`` gets an SVD W = U diag(σ) Vᵀ and learnable
increments δ ``[k]`` (k = min(out, in), init 0)::

    W' = U diag(σ + δ) Vᵀ = W + U diag(δ) Vᵀ

and, optionally, a learnable clip per quantization group (OmniQuant's LWC)::

    scale = fp16(absmax_group(W') · clip / qmax),   clip = clip0 · 2·sigmoid(γ),  γ init 0

W' is written as ``W + U diag(δ) Vᵀ`` (not ``U diag(σ + δ) Vᵀ``) so that at δ = 0 it *is* W,
bit for bit, whatever the SVD's rounding; and the clip is ``2·sigmoid(γ)`` (not OmniQuant's
``sigmoid(γ)`` with γ = 4, clip 0.982) so that at γ = 0 it is exactly 1.0. Together these make
the invariant "zero training steps return exactly the starting RTN codes and scales"
structural rather than a special case.

Training, one decoder block at a time (OmniQuant's scheme, chosen here on purpose):

* input of block i: the calibration activations after the already-quantized blocks 0..i-1
  (so block i also learns to absorb the error that reaches it);
* target: the full-precision block i applied to the full-precision activations;
* loss: MSE of the block output, with every target Linear of the block replaced by its
  fake-quantized W' (rounding through a straight-through estimator); AdamW on δ and γ
  only, everything else frozen. A block whose calibration MSE ends above its start keeps
  its starting weights, so LSI never ships a block worse (on its data) than its start.

The start is plain RTN (clip 1.0), or the scales of a ``base`` quantization (pass
``compress_model``'s RTN-with-clip-search result: on the demo model that start gave the
lower KL and perplexity; tools/lsi_demo.py).

The fake quantization in training computes exactly the float16 values the export stores
(same scale rounding, same round-half-to-even, same fp16 product), so the loss the optimizer
sees is the loss of the weights we ship. The output is an ordinary
:class:`~eora_export.quant.QuantizedMatrix` (codes from :func:`~eora_export.quant.quantize_with_scales`
with the learned scales): no inference cost, and EoRA can run on it afterwards
(``compensate_layers(lsi_compress(...), grams, cfg)`` is ``lsi+eora``).

2:4 sparsity is not supported: a sparse base is refused with a UsageError (δ moves every
entry of W, so keeping a mask would need a projected update; not worth it before it is
asked for).

Memory: one block's parameters plus two activation streams (FP and quantized), each
``[n_windows, seq, hidden]``, stored in float16 when they would exceed
:data:`FP32_STREAM_LIMIT_BYTES` (computed in the block's dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UsageError
from ..quant import QuantizedMatrix, check_group, group_scales, qmax, quantize_with_scales

# Two streams above this many bytes in float32 are kept in float16 instead (a 7B model with
# 128 x 2048 calibration tokens: 2 x 4 GiB in float32, 2 x 2 GiB in float16).
FP32_STREAM_LIMIT_BYTES = 2 << 30


@dataclass(frozen=True)
class LsiConfig:
    """Options of :func:`lsi_compress`.

    lr: AdamW step for δ in units of the matrix's mean singular value (δ = mean(σ) · ε, ε
        is the parameter), so one setting fits layers of any scale.
    clip_lr: AdamW step for γ (clip = clip0 · 2·sigmoid(γ); d clip/dγ = 0.5 at γ = 0).
    batch_size: calibration windows per optimizer step.
    activations: "auto" (float16 streams only when float32 would exceed
        FP32_STREAM_LIMIT_BYTES), "float32" or "float16".
    """

    bits: int = 4
    group_size: int = 128
    epochs: int = 5
    lr: float = 1e-3
    clip_lr: float = 1e-2
    batch_size: int = 4
    use_clip: bool = True
    seed: int = 0
    weight_decay: float = 0.0  # decay pulls δ and γ back to the RTN start; off by default
    activations: str = "auto"
    target: str = "fp"  # "fp": FP block on FP inputs (OmniQuant); "local": FP block on the quantized inputs
    progress: bool = True

    def validate(self) -> None:
        if self.bits not in (3, 4, 8):
            raise UsageError(f"LSI weight bits must be 3, 4 or 8, got {self.bits}")
        if self.group_size <= 0:
            raise UsageError(f"group size must be positive, got {self.group_size}")
        if self.epochs < 0 or self.batch_size <= 0:
            raise UsageError(f"LSI needs epochs >= 0 and batch size > 0, got {self.epochs} and {self.batch_size}")
        if self.lr < 0 or self.clip_lr < 0 or self.weight_decay < 0:
            raise UsageError("LSI learning rates and weight decay must be non-negative")
        if self.target not in ("fp", "local"):
            raise UsageError(f"LSI target must be 'fp' or 'local', got {self.target!r}")
        if self.activations not in ("auto", "float32", "float16"):
            raise UsageError(f"activations must be auto, float32 or float16, got {self.activations!r}")


# --------------------------------------------------------------------------------------
# Differentiable fake quantization
# --------------------------------------------------------------------------------------


def ste_round(x: Tensor) -> Tensor:
    """round(x) forward (half to even, like quant.quantize_with_scales), identity backward."""
    return x + (torch.round(x) - x).detach()


def ste_fp16(x: Tensor) -> Tensor:
    """Rounding to float16 forward, identity backward (kept in ``x``'s dtype)."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def lsi_weight(w: Tensor, u: Tensor, vh: Tensor, delta: Tensor) -> Tensor:
    """W' = W + U diag(δ) Vᵀ ``[out, in]``; w: [out, in], u: [out, k], vh: [k, in], delta: [k]."""
    return w + (u * delta) @ vh


def lsi_clip(gamma: Tensor | None, clip0: Tensor | None) -> Tensor | float:
    """Clip factor per group ``[out, in // group]`` (or the scalar 1.0 without LWC): clip0 · 2·sigmoid(γ)."""
    clip: Tensor | float = 1.0 if gamma is None else 2 * torch.sigmoid(gamma)
    if clip0 is not None:
        clip = clip0 * clip
    return clip


def lsi_quantize_linear(
    w: Tensor,
    u: Tensor,
    vh: Tensor,
    delta: Tensor,
    bits: int,
    group_size: int,
    gamma: Tensor | None = None,
    clip0: Tensor | None = None,
    round_fn: Callable[[Tensor], Tensor] = ste_round,
    fp16_fn: Callable[[Tensor], Tensor] = ste_fp16,
) -> Tensor:
    """Fake-quantized W' ``[out, in]`` in ``w``'s dtype, differentiable in δ and γ.

    w: [out, in]; u: [out, k]; vh: [k, in]; delta: [k]; gamma, clip0: [out, in // group_size]
    or None. The forward values equal ``lsi_export(...).dequantize()`` exactly (float32 inputs):
    scale = fp16(absmax · clip / qmax), codes = round_half_even(W' / scale) in the code
    range, value = fp16(code · scale).

    Clamping happens *before* rounding (identical values: the bounds are integers) so that
    the straight-through surrogate ``clamp(v) + const`` has no kink where a code sits on the
    bound; its gradient is then exactly what finite differences of that surrogate give.
    round_fn / fp16_fn are the two non-differentiable roundings (swappable in tests).
    """
    out_f, in_f = w.shape
    check_group(in_f, group_size, "weight")
    wp = lsi_weight(w, u, vh, delta).reshape(out_f, in_f // group_size, group_size)
    # Same expression and order as quant.group_scales: amax * clip / qmax, then fp16.
    scale = fp16_fn(wp.abs().amax(-1) * lsi_clip(gamma, clip0) / qmax(bits))
    live = scale > 0
    safe = torch.where(live, scale, torch.ones_like(scale))
    v = (wp / safe[..., None]).clamp(-qmax(bits) - 1, qmax(bits))
    codes = round_fn(v) * live[..., None]  # all-zero groups (scale 0) get code 0, as in quant.py
    return fp16_fn(codes * scale[..., None]).reshape(out_f, in_f)


@torch.no_grad()
def lsi_export(
    w: Tensor,
    u: Tensor,
    vh: Tensor,
    delta: Tensor,
    bits: int,
    group_size: int,
    gamma: Tensor | None = None,
    clip0: Tensor | None = None,
) -> QuantizedMatrix:
    """The shipped weight: W' quantized with exactly the learned scales (same args as
    :func:`lsi_quantize_linear`). At δ = 0, γ = 0, clip0 = None this is ``quant.quantize(w,
    bits, group_size)`` bit for bit."""
    wp = lsi_weight(w.float(), u.float(), vh.float(), delta.float())
    clip = lsi_clip(None if gamma is None else gamma.float(), None if clip0 is None else clip0.float())
    scale = group_scales(wp, bits, group_size, clip=clip)
    return QuantizedMatrix(quantize_with_scales(wp, scale, bits, group_size), scale, bits, group_size)


def initial_clip(w: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """clip0 ``[out, in // group]`` reproducing the float16 ``scale`` of a base quantizer:
    fp16(absmax · clip0 / qmax) == scale (float32 error is far below half an fp16 ulp).
    All-zero groups get 1.0."""
    amax = w.detach().float().reshape(w.shape[0], -1, group_size).abs().amax(-1)
    return torch.where(amax > 0, scale.float() * qmax(bits) / torch.where(amax > 0, amax, 1.0), 1.0)


class LsiLinear(nn.Module):
    """A Linear whose weight is the fake-quantized W' (training-time stand-in).

    weight: [out, in] (the FP W); bias: [out] or None; clip0: [out, in // group] or None.
    Parameters: ``eps`` [k] (δ = mean(σ) · eps) and, with LWC, ``gamma`` [out, in // group].
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | None, bits: int, group_size: int, use_clip: bool, clip0: Tensor | None
    ) -> None:
        super().__init__()
        w = weight.detach().float().clone()
        out_f, in_f = w.shape
        check_group(in_f, group_size, "weight")
        # float32 SVD is enough: W' = W + U diag(δ) Vᵀ is exactly W at δ = 0 whatever the
        # basis' rounding, and a slightly non-orthogonal basis only reparametrizes δ.
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.bits, self.group_size = bits, group_size
        self.register_buffer("w", w)
        self.register_buffer("u", u.contiguous())
        self.register_buffer("vh", vh.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("clip0", None if clip0 is None else clip0.float())
        self.sigma_scale = float(s.mean()) if s.numel() else 1.0
        self.eps = nn.Parameter(torch.zeros(s.numel()))
        self.gamma = nn.Parameter(torch.zeros(out_f, in_f // group_size)) if use_clip else None

    def delta(self) -> Tensor:
        """δ ``[k]`` in the units of σ."""
        return self.eps * self.sigma_scale

    def fake_weight(self) -> Tensor:
        """float32 ``[out, in]``: the values the export will store, with STE gradients."""
        return lsi_quantize_linear(
            self.w, self.u, self.vh, self.delta(), self.bits, self.group_size, self.gamma, self.clip0
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out] in x's dtype (computed in float32)."""
        y = F.linear(x.float(), self.fake_weight(), self.bias)
        return y.to(x.dtype)

    def export(self) -> QuantizedMatrix:
        return lsi_export(self.w, self.u, self.vh, self.delta(), self.bits, self.group_size, self.gamma, self.clip0)


class _FixedLinear(nn.Module):
    """A Linear computing with a fixed float32 weight [out, in] (propagating the quantized stream)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)
