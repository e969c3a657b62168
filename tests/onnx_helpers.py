"""Test helpers: random EoraLinear modules and tiny random Llama models using them."""

from __future__ import annotations

import torch
from torch import nn

from eora_export import quant
from eora_export.eora_linear import EoraLinear

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prune24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs (torch ``[out, in]``, along in)."""
    out, k = w.shape
    g = w.reshape(out, k // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(out, k)


def make_eora_linear(
    in_features: int, out_features: int, rank: int = 16, *, weight_bits: int = 4, lowrank_bits: int = 4,
    group_size: int = 64, lowrank_group_size: int = 8, sparse24: bool = False, bias: bool = False,
    seed: int = 0, weight: torch.Tensor | None = None, factor_scale: float = 0.05,
) -> EoraLinear:
    """An EoraLinear with a random (or given float ``[out, in]``) weight and random factors."""
    gen = torch.Generator().manual_seed(seed)
    w = weight.float() if weight is not None else torch.randn(out_features, in_features, generator=gen) * 0.05
    if sparse24:
        w = prune24(w)
    wq = quant.quantize(w, weight_bits, group_size)
    a = b = None
    if rank:
        a = quant.quantize(torch.randn(rank, in_features, generator=gen) * factor_scale, lowrank_bits,
                           lowrank_group_size)
        b = quant.quantize(torch.randn(out_features, rank, generator=gen) * factor_scale, lowrank_bits,
                           lowrank_group_size)
    bvec = torch.randn(out_features, generator=gen) * 0.1 if bias else None
    return EoraLinear(wq, a, b, bvec, sparse24=sparse24)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides):
    """A random float16 LlamaForCausalLM (eager attention), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.config._attn_implementation = "eager"
    return model.half().eval()


def compress_llama(model: nn.Module, rank: int = 16, *, weight_bits: int = 4, lowrank_bits: int = 4,
                   group_size: int = 64, lowrank_group_size: int = 8, sparse24: bool = False,
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every decoder Linear (except names in ``skip``) for an EoraLinear, in place.

    Rank alternates between ``rank`` and 0 so that both kinds of node appear.
    """
    i = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR_NAMES:
                lin = getattr(parent, name, None)
                if not isinstance(lin, nn.Linear) or name in skip:
                    continue
                r = rank if i % 2 == 0 else 0
                mod = make_eora_linear(
                    lin.in_features, lin.out_features, r, weight_bits=weight_bits, lowrank_bits=lowrank_bits,
                    group_size=group_size, lowrank_group_size=lowrank_group_size, sparse24=sparse24,
                    bias=lin.bias is not None, seed=i, weight=lin.weight.detach(), factor_scale=0.02,
                )
                if lin.bias is not None:
                    mod.bias.copy_(lin.bias.detach().half())
                setattr(parent, name, mod)
                i += 1
    return model
