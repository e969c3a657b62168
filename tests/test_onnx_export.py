"""Whole-model export: tiny random Llama (GQA) with EoraLinear modules, ORT vs PyTorch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_helpers import compress_llama, tiny_llama

from eora_export.eora_linear import EoraLinear
from eora_export.onnx import spec
from eora_export.onnx.export import export_baseline_onnx, export_onnx
from eora_export.onnx.runtime import make_session

# Measured on the tiny model: max |Δlogits| ORT vs PyTorch ≈ 1e-3 (logits |·| ≲ 1.5).
LOGITS_ATOL = 5e-3
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64
DEMO = Path(__file__).resolve().parents[1] / "eora_export" / "demo_model"


@pytest.fixture(scope="module")
def model():
    return compress_llama(tiny_llama(seed=0), rank=16)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model, prompt):
    with torch.no_grad():
        return model(prompt).logits.float().numpy()


@pytest.fixture(scope="module")
def kv_session(model, tmp_path_factory):
    return make_session(export_onnx(model, tmp_path_factory.mktemp("kv") / "model.onnx", kv_cache=True))


def _empty_cache(batch: int) -> dict[str, np.ndarray]:
    return {f"past_key_values.{i}.{k}": np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float16)
            for i in range(LAYERS) for k in ("key", "value")}


def _run(session, feeds):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _next_cache(out):
    return {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(LAYERS) for k in ("key", "value")}


@pytest.mark.parametrize("fused", [False, True], ids=["pattern", "fused"])
def test_logits_match_pytorch(model, prompt, reference, tmp_path, fused):
    path = export_onnx(model, tmp_path / "m.onnx", fused=fused)
    onnx.checker.check_model(str(path), full_check=True)
    logits = make_session(path).run(None, {"input_ids": prompt.numpy()})[0]
    assert logits.dtype == np.float16 and logits.shape == (2, 12, 512)
    np.testing.assert_allclose(logits.astype(np.float32), reference, rtol=0, atol=LOGITS_ATOL)
    n_eora = sum(isinstance(m, EoraLinear) for m in model.modules())
    n_fused = sum(n.op_type == spec.op_type() for n in onnx.load(str(path)).graph.node)
    assert n_fused == (n_eora if fused else 0)


def test_fused_export_equals_fused_pattern_export(model, tmp_path):
    from eora_export.onnx.fuse import fuse

    a = onnx.load(str(export_onnx(model, tmp_path / "a.onnx", fused=True)))
    b, report = fuse(onnx.load(str(export_onnx(model, tmp_path / "b.onnx"))))
    assert not report.unmatched
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}


def test_kv_cache_prompt_and_incremental_decoding(model, prompt, reference, kv_session):
    # Prompt with an empty cache (past_len = 0) gives the full logits ...
    out = _run(kv_session, {"input_ids": prompt[:, :8].numpy(), **_empty_cache(2)})
    np.testing.assert_allclose(out["logits"].astype(np.float32), reference[:, :8], rtol=0, atol=LOGITS_ATOL)
    assert out["present.0.key"].shape == (2, KV_HEADS, 8, HEAD_DIM)
    # ... then one token at a time with the cache reproduces the remaining positions.
    for t in range(8, 12):
        out = _run(kv_session, {"input_ids": prompt[:, t:t + 1].numpy(), **_next_cache(out)})
        np.testing.assert_allclose(out["logits"][:, 0].astype(np.float32), reference[:, t], rtol=0,
                                   atol=LOGITS_ATOL)
    assert out["present.1.value"].shape == (2, KV_HEADS, 12, HEAD_DIM)


def greedy_full_recompute(model, ids, steps: int) -> list[int]:
    """Greedy decoding by our own definition: re-run the whole sequence for every token and take
    the argmax. A library's ``generate`` is no reference: its defaults (cache, logits processors,
    generation config) move between releases, as transformers 5.24's did."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, ids.shape[1]:].tolist()


def test_greedy_generation_matches_pytorch(model, kv_session):
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    want = greedy_full_recompute(model, ids, 32)
    out = _run(kv_session, {"input_ids": ids.numpy(), **_empty_cache(1)})
    got = []
    for _ in range(32):
        got.append(int(out["logits"][0, -1].argmax()))
        out = _run(kv_session, {"input_ids": np.array([[got[-1]]], np.int64), **_next_cache(out)})
    assert got == want


def test_baseline_export(prompt, tmp_path):
    base = tiny_llama(seed=0)
    with torch.no_grad():
        ref = base(prompt).logits.float().numpy()
    path = export_baseline_onnx(base, tmp_path / "base.onnx")
    logits = make_session(path).run(None, {"input_ids": prompt.numpy()})[0]
    np.testing.assert_allclose(logits.astype(np.float32), ref, rtol=0, atol=LOGITS_ATOL)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "DequantizeLinear" not in ops and spec.op_type() not in ops


def test_baseline_export_rejects_compressed_model(model, tmp_path):
    with pytest.raises(ValueError, match="EoraLinear"):
        export_baseline_onnx(model, tmp_path / "x.onnx")


def test_external_data_and_atomic_write(model, prompt, tmp_path):
    inline = make_session(export_onnx(model, tmp_path / "inline.onnx")).run(None, {"input_ids": prompt.numpy()})[0]
    path = export_onnx(model, tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size > path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    big = [t for t in proto.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    got = make_session(path).run(None, {"input_ids": prompt.numpy()})[0]
    np.testing.assert_array_equal(got, inline)
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data", "inline.onnx"]  # no temp files left


def test_sparse24_int4_model_exports_sparse_nodes(prompt, tmp_path):
    m = compress_llama(tiny_llama(seed=2), rank=8, sparse24=True, lowrank_bits=8, lowrank_group_size=8)
    with torch.no_grad():
        ref = m(prompt).logits.float().numpy()
    path = export_onnx(m, tmp_path / "s.onnx", fused=True)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == spec.op_type()]
    assert nodes and all(any(a.name == "sparse24" and a.i == 1 for a in n.attribute) for n in nodes)
    logits = make_session(path).run(None, {"input_ids": prompt.numpy()})[0]
    np.testing.assert_allclose(logits.astype(np.float32), ref, rtol=0, atol=LOGITS_ATOL)


def test_non_llama_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        export_onnx(torch.nn.Linear(4, 4), tmp_path / "x.onnx")


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo model not trained yet")
def test_demo_model_export(tmp_path):
    from transformers import LlamaForCausalLM

    demo = LlamaForCausalLM.from_pretrained(DEMO, dtype=torch.float16, attn_implementation="eager").eval()
    compress_llama(demo, rank=16, group_size=64)
    ids = torch.randint(0, demo.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = demo(ids).logits.float().numpy()
    session = make_session(export_onnx(demo, tmp_path / "demo.onnx", fused=True))
    logits = session.run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(logits.astype(np.float32), ref, rtol=0, atol=max(LOGITS_ATOL, 4e-3 * np.abs(ref).max()))
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.95
