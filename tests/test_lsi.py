"""LSI: the straight-through gradient, the zero-training invariant, and that training helps."""

from __future__ import annotations

import pytest
import torch

from eora_export.compensate.apply import swapped
from eora_export.compress import CompressedLinear
from eora_export.compress.lsi import LsiConfig, lsi_export, lsi_quantize_linear, ste_round
from eora_export.compress.lsi_train import lsi_compress
from eora_export.eora_linear import EoraLinear
from eora_export.errors import UsageError
from eora_export.models import target_linears
from eora_export.quant import QuantizedMatrix, quantize


def _layer(out_f: int, in_f: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return g, w, u, s, vh


def test_ste_round_values_and_gradient():
    x = torch.tensor([-1.5, -0.5, 0.4, 0.5, 1.5, 2.6], requires_grad=True)
    y = ste_round(x)
    assert torch.equal(y, torch.round(x.detach()))  # half to even, like quant.quantize_with_scales
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("use_clip", [False, True])
def test_ste_gradient_equals_finite_differences_with_rounding_removed(use_clip):
    """Autograd through the STE equals central finite differences of the same loss with every
    rounding replaced by the identity plus its offset frozen at the base point (the function
    the STE differentiates; round's own derivative is zero almost everywhere)."""
    out_f, in_f, group, bits = 6, 16, 8, 3
    g, w, u, s, vh = _layer(out_f, in_f, seed=0)
    delta0 = torch.randn(s.numel(), generator=g, dtype=torch.float64) * 0.05 * s.mean()
    gamma0 = torch.randn(out_f, in_f // group, generator=g, dtype=torch.float64) * 0.3 if use_clip else None
    x = torch.randn(40, in_f, generator=g, dtype=torch.float64)
    target = x @ w.T

    def loss_of(weight: torch.Tensor) -> torch.Tensor:
        return (x @ weight.T - target).square().mean()

    # Autograd with the straight-through roundings, recording each rounding's offset.
    offsets: dict[str, list[torch.Tensor]] = {"round": [], "fp16": []}

    def recording(kind, fn):
        def f(t):
            off = (fn(t) - t).detach()
            offsets[kind].append(off)
            return t + off
        return f

    delta = delta0.clone().requires_grad_(True)
    gamma = None if gamma0 is None else gamma0.clone().requires_grad_(True)
    loss = loss_of(lsi_quantize_linear(
        w, u, vh, delta, bits, group, gamma,
        round_fn=recording("round", torch.round),
        fp16_fn=recording("fp16", lambda t: t.half().double()),
    ))
    loss.backward()
    # The recorded function is the shipped one: same values as with the default STE functions.
    assert loss.item() == loss_of(lsi_quantize_linear(w, u, vh, delta0, bits, group, gamma0)).item()
    assert offsets["round"][0].abs().max() > 0.1  # rounding really happened

    def surrogate(d: torch.Tensor, gm: torch.Tensor | None) -> float:
        it = {k: iter(v) for k, v in offsets.items()}
        wq = lsi_quantize_linear(
            w, u, vh, d, bits, group, gm,
            round_fn=lambda t: t + next(it["round"]), fp16_fn=lambda t: t + next(it["fp16"]),
        )
        return loss_of(wq).item()

    eps = 1e-6
    fd = torch.empty_like(delta0)
    for k in range(delta0.numel()):
        e = torch.zeros_like(delta0)
        e[k] = eps
        fd[k] = (surrogate(delta0 + e, gamma0) - surrogate(delta0 - e, gamma0)) / (2 * eps)
    assert delta.grad.abs().max() > 1e-3
    torch.testing.assert_close(delta.grad, fd, rtol=1e-5, atol=1e-9)
    if use_clip:
        fd_g = torch.empty_like(gamma0)
        for idx in range(gamma0.numel()):
            e = torch.zeros_like(gamma0).reshape(-1)
            e[idx] = eps
            e = e.reshape(gamma0.shape)
            fd_g.view(-1)[idx] = (surrogate(delta0, gamma0 + e) - surrogate(delta0, gamma0 - e)) / (2 * eps)
        assert gamma.grad.abs().max() > 1e-3
        torch.testing.assert_close(gamma.grad, fd_g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bits", [3, 4])
def test_fake_quant_values_are_the_exported_values(bits):
    """Training sees exactly the float16 weights the export ships, at the start and after moving."""
    g, w, u, s, vh = _layer(32, 256, seed=bits, dtype=torch.float32)
    w[3, :128] = 0  # an all-zero group: scale 0, codes 0
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    zero_d = torch.zeros(s.numel())
    zero_g = torch.zeros(32, 2)
    rtn = quantize(w, bits, 128)
    for gamma in (None, zero_g):
        start = lsi_export(w, u, vh, zero_d, bits, 128, gamma)
        assert torch.equal(start.q, rtn.q) and torch.equal(start.scale, rtn.scale)
        fake = lsi_quantize_linear(w, u, vh, zero_d, bits, 128, gamma)
        assert torch.equal(fake, rtn.dequantize().float())
    d = torch.randn(s.numel(), generator=g) * 0.02 * s.mean()
    gm = torch.randn(32, 2, generator=g) * 0.5
    moved = lsi_export(w, u, vh, d, bits, 128, gm)
    assert torch.equal(lsi_quantize_linear(w, u, vh, d, bits, 128, gm), moved.dequantize().float())
    assert not torch.equal(moved.q, rtn.q)


# ----------------------------------------------------------------------------- tiny Llama


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(1))
    return model, target_linears(model), windows


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zero_epochs_returns_exactly_rtn(tiny):
    model, linears, windows = tiny
    before = _snapshot(model)
    for use_clip in (True, False):
        res = lsi_compress(model, linears, LsiConfig(bits=3, epochs=0, use_clip=use_clip, progress=False), windows)
        assert list(res) == list(linears)
        for n, cl in res.items():
            rtn = quantize(linears[n].weight, 3, 128)
            assert torch.equal(cl.weight.q, rtn.q) and torch.equal(cl.weight.scale, rtn.scale), n
            assert (cl.weight.bits, cl.weight.group_size, cl.sparse24) == (3, 128, False)
            assert torch.equal(cl.reference, linears[n].weight.float())
    # From a base (RTN with clip search): zero epochs give the base's codes and scales.
    base = {n: CompressedLinear(quantize(m.weight, 4, 128, clip_search=True), m.weight.float().clone(), False)
            for n, m in linears.items()}
    res = lsi_compress(model, linears, LsiConfig(bits=4, epochs=0, progress=False), windows, base=base)
    for n, cl in res.items():
        assert torch.equal(cl.weight.q, base[n].weight.q) and torch.equal(cl.weight.scale, base[n].weight.scale), n
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _final_hidden_mse(model, modules, windows) -> float:
    with torch.no_grad():
        ref = model.model(windows).last_hidden_state
        with swapped(model, modules):
            out = model.model(windows).last_hidden_state
    return float((out - ref).square().mean())


@pytest.mark.parametrize("bits", [3, 4])
def test_training_lowers_block_output_error_vs_rtn(tiny, bits):
    model, linears, windows = tiny
    before = _snapshot(model)
    stats: list[dict] = []
    cfg = LsiConfig(bits=bits, epochs=3, batch_size=4, progress=False)
    res = lsi_compress(model, linears, cfg, windows, stats=stats)
    assert [s["block"] for s in stats] == [0, 1]
    for s in stats:
        assert s["mse_end"] < 0.97 * s["mse_start"], s
    # Model level: the decoder's output with LSI weights is closer to FP than with RTN.
    rtn = {n: EoraLinear(quantize(m.weight, bits, 128), bias=m.bias) for n, m in linears.items()}
    lsi = {n: EoraLinear(cl.weight, bias=linears[n].bias) for n, cl in res.items()}
    e_rtn, e_lsi = _final_hidden_mse(model, rtn, windows), _final_hidden_mse(model, lsi, windows)
    assert e_lsi < 0.97 * e_rtn, (e_lsi, e_rtn)
    for cl in res.values():
        assert isinstance(cl.weight, QuantizedMatrix) and cl.weight.q.dtype == torch.int8
        assert cl.weight.q.min() >= -(2 ** (bits - 1)) and cl.weight.q.max() <= 2 ** (bits - 1) - 1
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the FP model is left as it was
    assert all(p.requires_grad for p in model.parameters())


def test_refuses_sparse_base_and_mismatched_settings(tiny):
    model, linears, windows = tiny
    name, lin = next(iter(linears.items()))
    cfg = LsiConfig(bits=4, epochs=0, progress=False)
    sparse = {name: CompressedLinear(quantize(lin.weight, 4, 128), lin.weight.float().clone(), True)}
    with pytest.raises(UsageError, match="2:4"):
        lsi_compress(model, {name: lin}, cfg, windows, base=sparse)
    other_bits = {name: CompressedLinear(quantize(lin.weight, 3, 128), lin.weight.float().clone(), False)}
    with pytest.raises(UsageError, match="does not match"):
        lsi_compress(model, {name: lin}, cfg, windows, base=other_bits)
    with pytest.raises(UsageError, match="decoder block"):
        lsi_compress(model, {"lm_head": model.lm_head}, LsiConfig(bits=4, group_size=128, epochs=0), windows)
    for bad in (LsiConfig(epochs=-1), LsiConfig(target="both"), LsiConfig(bits=5), LsiConfig(activations="int8")):
        with pytest.raises(UsageError):
            bad.validate()


def test_a_block_that_training_made_worse_keeps_its_starting_weights(tiny):
    model, linears, windows = tiny
    stats: list[dict] = []
    cfg = LsiConfig(bits=4, epochs=1, lr=50.0, clip_lr=50.0, batch_size=8, progress=False)  # absurd steps
    res = lsi_compress(model, linears, cfg, windows, stats=stats)
    assert stats and all(s["mse_end"] <= s["mse_start"] for s in stats)
    kept = [s for s in stats if s["mse_end"] == s["mse_start"]]
    assert kept, "the absurd learning rate should have made at least one block worse"
    for s in kept:
        for n in s["linears"]:
            rtn = quantize(linears[n].weight, 4, 128)
            assert torch.equal(res[n].weight.q, rtn.q) and torch.equal(res[n].weight.scale, rtn.scale)
