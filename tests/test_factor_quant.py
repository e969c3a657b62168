"""Factors rounded in the metric they were fitted in (``--lowrank-quant gptq``, the default)."""

from types import SimpleNamespace

import pytest
import torch

from eora_export.compensate.apply import (
    CompensationConfig,
    FitMetric,
    compensate_layers,
    quantize_factors,
    quantize_factors_in_metric,
)
from eora_export.compensate.eora import eora_factors_from_whitened, gram_root
from eora_export.compress import CompressedLinear
from eora_export.quant import quantize

F64 = torch.float64


def _layer(seed: int = 0, d_out: int = 96, d_in: int = 128, n: int = 4000):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    # Inputs with a decaying spectrum and a few outlier channels, as LLM activations have.
    scale = torch.logspace(0, -2, d_in, dtype=F64)
    scale[torch.randperm(d_in, generator=g)[:4]] *= 20
    x = torch.randn(n, d_in, generator=g, dtype=F64) * scale
    gram = x.T @ x / n
    return w, gram


@pytest.mark.parametrize("bits", [4, 8])
def test_metric_rounding_beats_round_to_nearest_and_keeps_the_format(bits):
    w, gram = _layer()
    w_c = quantize(w, 3, 128).dequantize().double()
    root = gram_root(gram)
    m = root.whiten(w.double() - w_c)
    metric = FitMetric(m, root, gram)
    b, a = eora_factors_from_whitened(m, root, 16, fast=False)
    rtn_b, rtn_a = quantize_factors(b, a, bits, 16)
    gq_b, gq_a = quantize_factors_in_metric(b, a, metric, bits, 16)
    for q, ref in ((gq_b, rtn_b), (gq_a, rtn_a)):
        assert (q.bits, q.group_size, q.q.shape, q.scale.shape) == (ref.bits, ref.group_size, ref.q.shape, ref.scale.shape)
        assert int(q.q.min()) >= -(2 ** (bits - 1)) and int(q.q.max()) < 2 ** (bits - 1)
    exact = metric.error(b, a)
    rtn = metric.error(rtn_b.dequantize(), rtn_a.dequantize())
    gq = metric.error(gq_b.dequantize(), gq_a.dequantize())
    assert exact < gq < rtn
    if bits == 4:
        # A real share of the rounding loss is gone (here ~27%; on the demo's layers ~70%).
        assert gq - exact < 0.85 * (rtn - exact)


def test_metric_rounding_is_never_worse_and_handles_zero_factors():
    _w, gram = _layer(1)
    root = gram_root(gram)
    # A target the factors capture exactly: rounding to nearest can hardly be beaten; the
    # function must then return the round-to-nearest factors, not something worse.
    b = torch.randn(96, 8, dtype=F64)
    a = torch.randn(8, 128, dtype=F64)
    metric = FitMetric(root.whiten(b @ a), root, gram)
    gq_b, gq_a = quantize_factors_in_metric(b, a, metric, 4, 8)
    rtn_b, rtn_a = quantize_factors(b, a, 4, 8)
    assert metric.error(gq_b.dequantize(), gq_a.dequantize()) <= metric.error(rtn_b.dequantize(), rtn_a.dequantize())
    zb, za = quantize_factors_in_metric(torch.zeros(96, 8, dtype=F64), torch.zeros(8, 128, dtype=F64), metric, 4, 8)
    assert not zb.dequantize().any() and not za.dequantize().any()


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_eora_layers_fit_better_with_metric_rounding_and_svd_keeps_round_to_nearest(fast):
    w, gram = _layer(2)
    cl = CompressedLinear(quantize(w, 3, 128), w, False)

    grams = SimpleNamespace(owner={"l": "l"}, gram=lambda _name: gram)  # a GramStore of one Linear
    eora = {q: compensate_layers({"l": cl}, grams, CompensationConfig(method="eora", rank=16, lowrank_quant=q, fast=fast), progress=False)
            for q in ("gptq", "rtn")}
    assert eora["gptq"]["l"].error_after < eora["rtn"]["l"].error_after
    svd = {q: compensate_layers({"l": cl}, grams, CompensationConfig(method="svd", rank=16, lowrank_quant=q, fast=fast), progress=False)
           for q in ("gptq", "rtn")}
    assert torch.equal(svd["gptq"]["l"].module.a_q.q, svd["rtn"]["l"].module.a_q.q)


def test_linears_sharing_an_input_share_one_inverse_hessian(monkeypatch):
    """GPTQ's inverse-Hessian factor is most of the rounding's cost on wide layers: once per Gram."""
    import importlib

    gptq_mod = importlib.import_module("eora_export.compress.gptq")

    calls = []
    real = gptq_mod.inverse_hessian_factor
    monkeypatch.setattr(gptq_mod, "inverse_hessian_factor", lambda gram, *a, **k: calls.append(gram.shape[0]) or real(gram, *a, **k))
    w, gram = _layer(3)
    layers = {n: CompressedLinear(quantize(w + i, 3, 128), w + i, False) for i, n in enumerate(("q", "k", "v"))}
    grams = SimpleNamespace(owner=dict.fromkeys(layers, "q"), gram=lambda _name: gram)
    res = compensate_layers(layers, grams, CompensationConfig(method="eora", rank=16), progress=False)
    # One factor of the 128-wide input Gram (A's Hessian); B's r × r Hessians are per layer and tiny.
    assert sorted(calls) == [16, 16, 16, 128] and all(r.rank == 16 for r in res.values())


def test_rank_above_the_data_rank_gives_finite_factors_never_worse_than_rtn():
    """20 calibration tokens for 128 inputs: G has rank 20, a rank-32 A has zero rows and the
    r × r Hessian of B is singular; nothing is divided by its zero eigenvalues."""
    w, _ = _layer(4)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(5), dtype=F64)
    gram = x.T @ x / 20
    w_c = quantize(w, 3, 128).dequantize().double()
    root = gram_root(gram)
    assert root.data_rank == 20
    m = root.whiten(w.double() - w_c)
    metric = FitMetric(m, root, gram)
    b, a = eora_factors_from_whitened(m, root, 32, fast=False)
    gq_b, gq_a = quantize_factors_in_metric(b, a, metric, 4, 32)
    assert torch.isfinite(gq_b.dequantize()).all() and torch.isfinite(gq_a.dequantize()).all()
    rtn_b, rtn_a = quantize_factors(b, a, 4, 32)
    assert metric.error(gq_b.dequantize(), gq_a.dequantize()) <= metric.error(rtn_b.dequantize(), rtn_a.dequantize())
