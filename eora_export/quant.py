"""Group-wise symmetric integer quantization, shared by weights and low-rank factors.

One convention everywhere (graphs/eora_linear.spec.json): a matrix in the PyTorch
layout ``[rows, cols]`` (a Linear weight ``[out, in]``, factor A ``[r, in]``, factor
B ``[out, r]``) is blocked along ``cols``, the contraction dimension. The value of a
code is ``fp16(float32(q) * float32(scale))``: exactly what ONNX DequantizeLinear with
a float16 scale computes, so the weight we evaluate is the weight the graph runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (3, 4, 8, 16)


@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized ``[rows, cols]`` matrix.

    q: int8 ``[rows, cols]`` codes in ``[-2^(bits-1), 2^(bits-1) - 1]`` (unpacked), or
       the float16 matrix itself when ``bits == 16``.
    scale: float16 ``[rows, cols // group_size]``; None when ``bits == 16``.
    """

    q: Tensor
    scale: Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> Tensor:
        """float16 ``[rows, cols]``: the values the graph computes with."""
        if self.bits == 16:
            return self.q.to(torch.float16)
        return dequantize(self.q, self.scale, self.group_size)

    def storage_bytes(self) -> int:
        """Bytes in the exported graph (packed codes plus float16 scales)."""
        rows, cols = self.shape
        if self.bits == 16:
            return rows * cols * 2
        code_bits = 4 if self.bits <= 4 else 8
        return rows * cols * code_bits // 8 + self.scale.numel() * 2


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_group(cols: int, group_size: int, what: str = "matrix") -> None:
    if group_size <= 0 or cols % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the {what}'s {cols} input columns; "
            f"choose a group size that divides {cols} (e.g. {divisor_hint(cols)})"
        )


def divisor_hint(n: int) -> int:
    """The largest of 128, 64, ... 2 dividing ``n`` (for error messages), else ``n``."""
    for g in (128, 64, 32, 16, 8, 4, 2):
        if n % g == 0:
            return g
    return n


def group_scales(w: Tensor, bits: int, group_size: int, clip: Tensor | float = 1.0) -> Tensor:
    """float16 ``[rows, cols // group_size]`` scales: clip * absmax(group) / qmax."""
    rows, cols = w.shape
    check_group(cols, group_size)
    amax = w.detach().float().reshape(rows, cols // group_size, group_size).abs().amax(-1)
    return (amax * clip / qmax(bits)).to(torch.float16)


def quantize_with_scales(w: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """int8 ``[rows, cols]`` codes of ``w`` for given float16 scales (round half to even)."""
    s = scale.float().repeat_interleave(group_size, dim=1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w.float() / safe).clamp_(-qmax(bits) - 1, qmax(bits))
    return torch.where(s > 0, q, torch.zeros_like(q)).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """float16 ``[rows, cols]`` = fp16(q * scale)."""
    s = scale.float().repeat_interleave(group_size, dim=1)
    return (q.float() * s).to(torch.float16)


def quantize(
    w: Tensor, bits: int, group_size: int, clip_search: bool = False
) -> QuantizedMatrix:
    """Quantize ``w: [rows, cols]`` group-wise along ``cols``.

    clip_search: per group, try shrinking the range (1.0 .. 0.7 of absmax) and keep the
    clip with the smallest squared error; cheap and helps 3-bit RTN a lot.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; use one of {SUPPORTED_BITS}")
    if bits == 16:
        return QuantizedMatrix(w.detach().to(torch.float16).clone(), None, 16, 0)
    if not clip_search:
        scale = group_scales(w, bits, group_size)
        return QuantizedMatrix(quantize_with_scales(w, scale, bits, group_size), scale, bits, group_size)
    rows, cols = w.shape
    best_err = torch.full((rows, cols // group_size), float("inf"))
    best_scale = group_scales(w, bits, group_size)
    for c in torch.linspace(1.0, 0.7, 7).tolist():
        scale = group_scales(w, bits, group_size, clip=c)
        deq = dequantize(quantize_with_scales(w, scale, bits, group_size), scale, group_size)
        err = (deq.float() - w.float()).square().reshape(rows, -1, group_size).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return QuantizedMatrix(
        quantize_with_scales(w, best_scale, bits, group_size), best_scale, bits, group_size
    )


def fake_quantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """float16 ``[rows, cols]``: round trip through :func:`quantize`."""
    return quantize(w, bits, group_size).dequantize()


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 codes in [-8, 7] two per byte along the last dim: ``[..., n] -> uint8 [..., n/2]``.

    Element 2j goes to the low nibble, 2j+1 to the high nibble (the ONNX INT4 layout).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({q.shape[-1]}) of int4 values per row")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., n/2]`` -> int8 ``[..., n]``."""
    p = packed.to(torch.uint8)
    lo = (p & 0xF).to(torch.int16)
    hi = ((p >> 4) & 0xF).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(both > 7, both - 16, both).to(torch.int8)
