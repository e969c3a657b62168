"""``EoraLinear``: the PyTorch reference of the fused op, the numerical truth downstream.

y = x W_cᵀ + (x Aᵀ) Bᵀ + bias, with W_c, A, B stored exactly as the ONNX graph and the
TensorRT plugin store them (see graphs/eora_linear.spec.json). The ONNX pattern, the
fused node and the CUDA kernel are all tested against :meth:`EoraLinear.forward`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quant import QuantizedMatrix


class EoraLinear(nn.Module):
    """A compressed Linear plus a quantized low-rank residual.

    weight: W_c ``[out, in]``; a: A ``[r, in]``; b: B ``[out, r]`` (or None when r = 0);
    bias: ``[out]`` or None.
    """

    def __init__(
        self,
        weight: QuantizedMatrix,
        a: QuantizedMatrix | None = None,
        b: QuantizedMatrix | None = None,
        bias: Tensor | None = None,
        sparse24: bool = False,
    ) -> None:
        super().__init__()
        if (a is None) != (b is None):
            raise ValueError("low-rank factors come in pairs: give both a and b, or neither")
        self.out_features, self.in_features = weight.shape
        self.rank = 0 if a is None else a.shape[0]
        if a is not None and (a.shape[1] != self.in_features or b.shape != (self.out_features, self.rank)):
            raise ValueError(
                f"factor shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                f"[{self.out_features}, {self.in_features}] weight"
            )
        self.weight_q = weight
        self.a_q = a
        self.b_q = b
        self.sparse24 = sparse24
        # Dequantized copies are what forward uses; they are exactly the graph's values.
        self.register_buffer("weight", weight.dequantize(), persistent=False)
        self.register_buffer("a", None if a is None else a.dequantize(), persistent=False)
        self.register_buffer("b", None if b is None else b.dequantize(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float16))

    @property
    def weight_bits(self) -> int:
        return self.weight_q.bits

    @property
    def lowrank_bits(self) -> int:
        return 16 if self.a_q is None else self.a_q.bits

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., in]`` -> ``[..., out]`` in x's dtype.

        Products run in float32. With float16 input the intermediate x Aᵀ is rounded to
        float16, as the unfused graph (three fp16 MatMuls) does.
        """
        x32 = x.float()
        y = x32 @ self.weight.float().T
        if self.rank:
            xa = x32 @ self.a.float().T
            if x.dtype == torch.float16:
                xa = xa.half().float()
            y = y + xa @ self.b.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def residual_weight(self) -> Tensor:
        """float32 ``[out, in]``: B A, the dense form of the low-rank path (zero when r = 0)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features)
        return self.b.float() @ self.a.float()

    def storage_bytes(self) -> int:
        total = self.weight_q.storage_bytes()
        if self.rank:
            total += self.a_q.storage_bytes() + self.b_q.storage_bytes()
        if self.bias is not None:
            total += self.bias.numel() * 2
        return total

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"weight_bits={self.weight_bits}, lowrank_bits={self.lowrank_bits}, "
            f"sparse24={self.sparse24}"
        )
