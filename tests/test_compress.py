"""eora_export.compress: RTN / GPTQ / AWQ INT4-INT3, 2:4 sparsity (magnitude, SparseGPT), and both."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from eora_export.calibration import collect_grams
from eora_export.compress import CompressConfig, compress_model, output_error
from eora_export.compress import sparse24 as sp
from eora_export.compress.gptq import obs_compress
from eora_export.errors import BadInput, UsageError
from eora_export.quant import QuantizedMatrix, dequantize, quantize

GROUP = 64


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few outlier channels, as real LLM activations have (gives AWQ something to do)
        for layer in model.model.layers:
            layer.input_layernorm.weight[torch.randperm(256)[:8]] *= 20
            layer.post_attention_layernorm.weight[torch.randperm(256)[:8]] *= 20
    return model


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model = _tiny_llama()
    windows = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    grams = collect_grams(model, _linears(model), windows)
    return model, windows, grams


def _run(setup, backend="own", **kw):
    """compress_model on fresh copies; returns (model copy, grams copy, results, original weights)."""
    model, windows, grams = setup
    model, grams = copy.deepcopy(model), copy.deepcopy(grams)
    linears = _linears(model)
    orig = {n: m.weight.detach().clone() for n, m in linears.items()}
    res = compress_model(model, linears, grams, CompressConfig(**kw), windows, sparsegpt_backend=backend)
    return model, grams, res, orig


def _errors(res, grams, orig=None) -> dict[str, float]:
    """tr(E G Eᵀ) per Linear, E = W_c − W, in the original (unfolded) coordinates when orig is given."""
    out = {}
    for n, r in res.items():
        wc = r.weight.dequantize().double()
        if orig is None:
            out[n] = output_error(wc - r.reference.double(), grams.gram(n))
            continue
        if r.awq is not None and r.awq.out_scale is not None:
            wc = wc * r.awq.out_scale.double().unsqueeze(1)
        if r.awq is not None and r.awq.in_scale is not None:
            wc = wc / r.awq.in_scale.double()
        out[n] = output_error(wc - orig[n].double(), grams.gram(n))
    return out


def _check_codes(qm: QuantizedMatrix, bits: int, shape) -> None:
    assert isinstance(qm, QuantizedMatrix)
    assert qm.bits == bits and qm.group_size == GROUP and qm.shape == tuple(shape)
    assert qm.q.dtype == torch.int8 and qm.scale.dtype == torch.float16
    assert qm.scale.shape == (shape[0], shape[1] // GROUP)
    assert int(qm.q.min()) >= -(2 ** (bits - 1)) and int(qm.q.max()) <= 2 ** (bits - 1) - 1
    deq = qm.dequantize()
    assert deq.dtype == torch.float16 and torch.isfinite(deq).all()
    # every value is its code times its own group's scale, nothing else
    assert torch.equal(deq, dequantize(qm.q, qm.scale, GROUP))
    s = qm.scale.float().repeat_interleave(GROUP, 1)
    assert torch.equal((s * qm.q.float()).half(), deq)


@pytest.mark.parametrize("quant,bits", [("rtn", 4), ("rtn", 3), ("gptq", 4), ("gptq", 3), ("awq", 4)])
def test_methods_give_group_quantized_matrices(setup, quant, bits):
    model, _, res, _ = _run(setup, quant=quant, bits=bits, group_size=GROUP)
    linears = _linears(model)
    assert set(res) == set(linears)
    for n, r in res.items():
        _check_codes(r.weight, bits, linears[n].weight.shape)
        assert not r.sparse24 and r.reference.dtype == torch.float32
        assert torch.equal(r.reference, linears[n].weight.float())  # the module holds the reference
        assert quant in r.method


def test_gptq_beats_rtn(setup):
    _, grams, rtn, _ = _run(setup, quant="rtn", group_size=GROUP)
    _, _, gptq, _ = _run(setup, quant="gptq", group_size=GROUP)
    e_rtn, e_gptq = _errors(rtn, grams), _errors(gptq, grams)
    assert sum(e_gptq.values()) < 0.5 * sum(e_rtn.values())
    for n in e_rtn:
        assert e_gptq[n] < e_rtn[n], n


def test_gptq_on_correlated_inputs_and_dead_channels():
    torch.manual_seed(0)
    x = torch.randn(2048, 32) @ torch.randn(32, 128) + 0.05 * torch.randn(2048, 128)
    x[:, 5] = 0  # a dead input channel
    g = (x.T.double() @ x.double()) / x.shape[0]
    w = torch.randn(96, 128) * 0.1
    for bits in (3, 4):
        res = obs_compress(w, g, bits=bits, group_size=32)
        rtn = quantize(w, bits, 32)
        assert output_error(res.values.double() - w.double(), g) < 0.5 * output_error(
            rtn.dequantize().double() - w.double(), g
        )
        # the dead column is rounded, not zeroed
        assert torch.count_nonzero(res.values[:, 5]) > 0
        assert torch.equal(dequantize(res.codes, res.scales, 32).float(), res.values)


def test_awq_not_worse_than_rtn_and_function_preserving(setup):
    model0, windows, grams0 = setup
    with torch.no_grad():
        logits0 = model0(windows[:2]).logits
    _, _, rtn, _ = _run(setup, quant="rtn", group_size=GROUP)
    model, grams, awq, orig = _run(setup, quant="awq", group_size=GROUP)
    e_rtn = _errors(rtn, grams0)
    e_awq = _errors(awq, grams0, orig)  # both measured on the original model's outputs
    for n in e_rtn:
        if n.endswith(("o_proj", "down_proj")):  # own input, own rows: exact guarantee
            assert e_awq[n] <= e_rtn[n] * (1 + 1e-5), n
    for layer in (0, 1):
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            keys = [n for n in e_rtn if n.startswith(f"model.layers.{layer}.") and n.endswith(members)]
            assert sum(e_awq[k] for k in keys) <= sum(e_rtn[k] for k in keys)
    assert sum(e_awq.values()) < 0.9 * sum(e_rtn.values())
    assert any(r.awq.alpha for r in awq.values())  # something was actually scaled
    # the folded FP model computes the same function ...
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, model0.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(windows[:2]).logits, logits0, rtol=1e-4, atol=1e-4)
    # ... and the in-place rescaled Grams are those of the folded model's inputs
    fresh = collect_grams(model, _linears(model), windows)
    for n in awq:
        g, h = grams.gram(n), fresh.gram(n)
        assert float((g - h).norm() / h.norm()) < 1e-5, n


@pytest.mark.parametrize(
    "quant,sparsity",
    [("none", "magnitude"), ("none", "sparsegpt"), ("rtn", "magnitude"), ("gptq", "sparsegpt"), ("awq", "magnitude")],
)
def test_24_pattern(setup, quant, sparsity):
    _, _, res, _ = _run(setup, quant=quant, sparsity=sparsity, group_size=GROUP)
    for n, r in res.items():
        assert r.sparse24, n
        deq = r.weight.dequantize()
        assert sp.is_24(r.weight.q) and sp.is_24(deq), n
        quads = (deq != 0).reshape(deq.shape[0], -1, 4).sum(-1)
        assert int(quads.max()) <= 2
        if quant == "none":
            assert r.weight.bits == 16 and r.weight.q.dtype == torch.float16
        else:
            _check_codes(r.weight, 4, deq.shape)
    assert sparsity in next(iter(res.values())).method


def test_sparsegpt_beats_magnitude(setup):
    _, grams, mag, _ = _run(setup, quant="none", sparsity="magnitude")
    _, _, sgpt, _ = _run(setup, quant="none", sparsity="sparsegpt")
    e_mag, e_sgpt = _errors(mag, grams), _errors(sgpt, grams)
    for n in e_mag:
        assert e_sgpt[n] < e_mag[n], n
    assert sum(e_sgpt.values()) < 0.5 * sum(e_mag.values())
    assert all(r.method == "sparsegpt[own]" for r in sgpt.values())


def test_sparsegpt_falls_back_when_modelopt_fails(setup, monkeypatch):
    def broken(*a, **k):
        raise ImportError("no modelopt here")

    monkeypatch.setattr("eora_export.compress.sparse24.modelopt_masks", broken)
    with pytest.warns(UserWarning, match="using our own SparseGPT"):
        _, _, res, _ = _run(setup, backend="auto", quant="none", sparsity="sparsegpt")
    assert all(r.method == "sparsegpt[own]" and sp.is_24(r.weight.q) for r in res.values())
    with pytest.raises(ImportError):
        _run(setup, backend="modelopt", quant="none", sparsity="sparsegpt")


def test_modelopt_sparsegpt(setup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("modelopt.torch.sparsity")
    model, windows, grams = setup
    names = [n for n in _linears(model) if n.startswith("model.layers.0.")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = sp.modelopt_masks(model, names, windows)
    # the caller's model is untouched and still a plain HF model
    assert all(type(m) is nn.Linear for m in _linears(model).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for n in names:
        w, g = model.get_submodule(n).weight.detach().float(), grams.gram(n)
        assert masks[n].shape == w.shape and sp.is_24(masks[n].int())
        refit = sp.refit_24(w, g, masks[n])
        own, _ = sp.sparsegpt_24(w, g)
        mag, _ = sp.magnitude_24(w)
        e = {k: output_error(v.double() - w.double(), g) for k, v in (("refit", refit), ("own", own), ("mag", mag))}
        assert e["refit"] < e["mag"] and e["refit"] < 1.1 * e["own"], (n, e)


def test_bad_inputs_give_one_line_errors(setup):
    with pytest.raises(UsageError, match=r"group size 96 does not divide in_features=256 of model\.layers\.0\.") as ei:
        _run(setup, quant="rtn", group_size=96)
    assert "\n" not in str(ei.value) and "--group-size 128" in str(ei.value)
    with pytest.raises(UsageError, match="bits must be 3 or 4"):
        _run(setup, quant="gptq", bits=5)
    with pytest.raises(UsageError, match="unknown quantization method"):
        _run(setup, quant="int4")
    model, windows, grams = setup
    bad = copy.deepcopy(model)
    bad.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(BadInput, match=r"model\.layers\.1\.mlp\.down_proj has NaN/Inf"):
        compress_model(bad, _linears(bad), grams, CompressConfig(), windows)
