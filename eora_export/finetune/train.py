"""Fine-tuning of the low-rank factors on a frozen compressed base (QLoRA-style).

Only A and B of each compensated Linear are trained, in float32, with AdamW; W_c stays
exactly the exported grid. Training starts from one of three initialisations:

* ``eora``  the exported EoRA factors (the paper's proposal: a better start than LoRA's),
* ``svd``   plain SVD of ΔW = W − W_c (activation-blind), quantized as an export would be,
* ``lora``  PEFT's default: A Kaiming-uniform, B = 0 (the model starts as the bare compressed one).

Everything here works on tensors and modules; reading and writing folders is folders.py,
the order of steps job.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..compensate.apply import lowrank_group, quantize_factors
from ..compensate.eora import svd_factors
from ..eora_linear import EoraLinear
from ..errors import BadInput, UsageError
from ..evaluate import next_token_nll
from ..quant import QuantizedMatrix, quantize

INITS = ("eora", "svd", "lora")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0:
            raise UsageError(f"--steps must be 0 or more, got {self.steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size <= 0:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be 0 or more, got {self.weight_decay}")


class TrainableEora(nn.Module):
    """The EoraLinear op with trainable float32 factors: y = x W_cᵀ + (x Aᵀ) Bᵀ + bias.

    weight: W_c ``[out, in]`` (frozen buffer), a: A ``[r, in]``, b: B ``[out, r]`` (parameters),
    bias: ``[out]`` or None (frozen).
    """

    def __init__(self, weight: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.a = nn.Parameter(a.detach().float().clone())
        self.b = nn.Parameter(b.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., in]`` -> ``[..., out]`` (float32 math, x's dtype out)."""
        x32 = x.float()
        y = F.linear(x32, self.weight, self.bias) + F.linear(F.linear(x32, self.a), self.b)
        return y.to(x.dtype)


def split_windows(windows: Tensor, heldout_fraction: float) -> tuple[Tensor, Tensor]:
    """``[n, seq]`` -> (train ``[n - k, seq]``, held-out ``[k, seq]``) with k = ceil(n · fraction).

    The held-out part is the tail of the text: a contiguous cut, so no held-out window
    shares a document boundary region with the training windows beyond the one at the cut.
    """
    n = windows.shape[0]
    k = max(1, math.ceil(n * heldout_fraction))
    if n - k < 1:
        raise BadInput(f"the data gives {n} window(s); need at least 2 to train on one and hold one out "
                       "(give more text, lower --seq-len, or pass --eval-data)")
    return windows[: n - k], windows[n - k :]


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Window indices for each step: seeded permutations of ``range(n)`` walked in batches
    (a new permutation each epoch). Every init in a comparison sees the same batches."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    batches = []
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def lora_init(out_features: int, in_features: int, rank: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """PEFT's default LoRA init: A ``[r, in]`` Kaiming-uniform (a = √5, i.e. U(±1/√in)), B ``[out, r]`` zero."""
    bound = 1.0 / math.sqrt(in_features)
    a = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
    return torch.zeros(out_features, rank), a


def initial_factors(
    kind: str,
    start: dict[str, EoraLinear],
    reference: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """float32 (B ``[out, r]``, A ``[r, in]``) per compensated Linear of ``start``, same ranks.

    eora: ``start``'s own (dequantized) factors. svd: SVD of ``reference[name]`` (W, float
    ``[out, in]``) − W_c, quantized with ``start``'s factor settings, so it starts where an
    ``--method svd`` export would. lora: :func:`lora_init`, seeded.
    """
    if kind not in INITS:
        raise UsageError(f"unknown --init {kind}; use one of {', '.join(INITS)}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in start.items():
        if not mod.rank:
            continue
        if kind == "eora":
            out[name] = (mod.b.float().clone(), mod.a.float().clone())
        elif kind == "lora":
            out[name] = lora_init(mod.out_features, mod.in_features, mod.rank, gen)
        else:
            if reference is None:
                raise ValueError("the svd init needs the FP16 reference weights")
            b, a = svd_factors(reference[name].double() - mod.weight.double(), mod.rank)
            if mod.lowrank_bits != 16:
                b, a = (m.dequantize() for m in quantize_factors(b, a, mod.lowrank_bits, mod.a_q.group_size))
            out[name] = (b.float(), a.float())
    return out


def trainable_modules(start: dict[str, EoraLinear], factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, TrainableEora]:
    """One :class:`TrainableEora` per entry of ``factors``, on ``start``'s W_c and bias."""
    return {n: TrainableEora(start[n].weight, a, b, start[n].bias) for n, (b, a) in factors.items()}


def train_factors(
    model: nn.Module,
    layers: dict[str, TrainableEora],
    windows: Tensor,
    cfg: TrainConfig,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on the factors of ``layers`` (already swapped into ``model``) over ``windows: [n, seq]``.

    Returns the training loss of every step. Everything else in ``model`` must already be frozen;
    this is checked, because a forgotten ``requires_grad`` would silently train the base.
    """
    params = [p for mod in layers.values() for p in (mod.a, mod.b)]
    mine = {id(p) for p in params}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
    if stray:
        raise ValueError(f"base parameters would be trained: {stray[:3]}")
    if cfg.steps == 0 or not params:
        return []
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    bar = tqdm(batch_schedule(windows.shape[0], cfg.batch_size, cfg.steps, cfg.seed), desc="finetune", unit="step",
               disable=not progress, leave=False)
    for step, idx in enumerate(bar, 1):
        loss = next_token_nll(model, windows[idx])
        if not torch.isfinite(loss):
            raise BadInput(f"the training loss became {float(loss)} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def _same(q: QuantizedMatrix, values: Tensor) -> bool:
    return torch.equal(q.dequantize().float(), values.float())


def requantize(
    start: dict[str, EoraLinear],
    trained: dict[str, TrainableEora],
    bits: int,
    group_size: int = 0,
) -> dict[str, EoraLinear]:
    """EoraLinear per Linear of ``start`` with the trained factors stored at ``bits``.

    group_size: factor group (0: the layer's own when it still fits, else the largest of
    128…2 dividing rank and width). A factor that training did not change and that is
    stored at the same bits keeps its exact codes: re-quantizing dequantized values is not
    idempotent (the fp16 scale of max|q·s|/qmax can land one ulp off), and zero steps must
    give back the input adapter bit for bit.
    """
    out = {}
    for name, mod in start.items():
        if name not in trained:
            out[name] = mod
            continue
        a, b = trained[name].a.detach(), trained[name].b.detach()
        if bits == 16:
            aq, bq = quantize(a, 16, 0), quantize(b, 16, 0)
        else:
            own = mod.a_q.group_size if mod.lowrank_bits == bits else 0
            group = lowrank_group(mod.rank, mod.in_features, group_size or own)
            bq, aq = quantize_factors(b, a, bits, group)
        if mod.lowrank_bits == bits and (bits == 16 or mod.a_q.group_size == aq.group_size):
            aq = mod.a_q if _same(mod.a_q, a) else aq
            bq = mod.b_q if _same(mod.b_q, b) else bq
        out[name] = EoraLinear(mod.weight_q, aq, bq, bias=mod.bias, sparse24=mod.sparse24)
    return out
