"""The canonical pattern: spec rules, emitter ⇄ matcher, and ORT vs EoraLinear.forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_helpers import make_eora_linear

from eora_export.onnx import spec
from eora_export.onnx.pattern import GraphIndex, LinearWeights, infer, pattern_model
from eora_export.onnx.runtime import make_session, session_options

# (weight_bits, sparse24, rank, lowrank_bits, lowrank_group, bias)
CASES = [
    pytest.param(4, False, 16, 4, 8, False, id="int4-r16-lr4"),
    pytest.param(4, False, 0, 16, 0, False, id="int4-r0"),
    pytest.param(3, False, 32, 8, 16, True, id="int3-r32-lr8-bias"),
    pytest.param(16, True, 8, 4, 8, False, id="sparse24-r8-lr4"),
    pytest.param(16, True, 0, 16, 0, False, id="sparse24-r0"),
    pytest.param(4, True, 64, 16, 0, False, id="sparse24-int4-r64-lr16"),
    pytest.param(4, True, 128, 4, 64, True, id="sparse24-int4-r128-lr4-bias"),
    pytest.param(4, False, 128, 8, 32, False, id="int4-r128-lr8"),
]


def _module(wb, sparse, rank, lb, lg, bias, k=256, n=192):
    return make_eora_linear(k, n, rank, weight_bits=wb, lowrank_bits=lb, group_size=64,
                            lowrank_group_size=lg or 8, sparse24=sparse, bias=bias, seed=rank + wb)


def ulp16(v: float) -> float:
    """Spacing of float16 numbers at magnitude v."""
    return float(np.spacing(np.float16(max(abs(v), 2.0**-14))))


@pytest.mark.parametrize(("wb", "sparse", "rank", "lb", "lg", "bias"), CASES)
def test_pattern_in_ort_matches_module(wb, sparse, rank, lb, lg, bias):
    mod = _module(wb, sparse, rank, lb, lg, bias)
    model = pattern_model(LinearWeights.from_module(mod))
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(3, 7, mod.in_features, generator=torch.Generator().manual_seed(1)).half()
    ref = mod(x).float().numpy()
    got = make_session(model).run(None, {"x": x.numpy()})[0]
    assert got.dtype == np.float16 and got.shape == ref.shape
    # ORT's CPU EP runs the fp16 chain in fp32 (x·A not rounded); the module rounds x·A.
    # Bound: two float16 ulps at the output's scale.
    tol = 2 * ulp16(np.abs(ref).max())
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=0, atol=tol)
    if rank == 0:
        assert (got == ref.astype(np.float16)).mean() > 0.99


@pytest.mark.parametrize(("wb", "sparse", "rank", "lb", "lg", "bias"), CASES)
def test_matcher_recovers_emitted_attributes(wb, sparse, rank, lb, lg, bias):
    weights = LinearWeights.from_module(_module(wb, sparse, rank, lb, lg, bias))
    model = pattern_model(weights)
    index = GraphIndex(model.graph)
    main = next(n for n in model.graph.node if n.name.endswith("/y_main"))
    match = infer(index, main)
    if wb == 16 and rank == 0 and not sparse:
        assert match is None
        return
    assert match is not None
    assert match.attrs == weights.attrs
    assert len(match.nodes) == len(model.graph.node)
    assert match.attrs["sparse24"] == int(sparse)


def test_dense_fp16_linear_is_not_a_pattern():
    weights = LinearWeights.from_module(make_eora_linear(64, 32, 0, weight_bits=16))
    model = pattern_model(weights)
    assert infer(GraphIndex(model.graph), model.graph.node[0]) is None


def test_emitted_initializers_follow_layout():
    mod = make_eora_linear(256, 128, 16, lowrank_bits=4, group_size=128, lowrank_group_size=8, bias=True)
    model = pattern_model(LinearWeights.from_module(mod), prefix="p")
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["p.w"].data_type == onnx.TensorProto.INT4 and list(inits["p.w"].dims) == [256, 128]
    assert len(inits["p.w"].raw_data) == 256 * 128 // 2
    assert list(inits["p.w_scale"].dims) == [2, 128]
    assert list(inits["p.a"].dims) == [256, 16] and list(inits["p.a_scale"].dims) == [32, 16]
    assert list(inits["p.b"].dims) == [16, 128] and list(inits["p.b_scale"].dims) == [2, 128]
    # Element 2j in the low nibble: the first byte holds W[0, 0] (low) and W[0, 1] (high).
    codes = mod.weight_q.q.T.numpy()
    byte0 = inits["p.w"].raw_data[0]
    assert (byte0 & 0xF) == (int(codes[0, 0]) & 0xF) and (byte0 >> 4) == (int(codes[0, 1]) & 0xF)


@pytest.mark.parametrize(
    ("attrs", "names"),
    [
        ({"weight_bits": 4, "rank": 8, "lowrank_bits": 4, "has_bias": 1},
         ["x", "w", "w_scale", "a", "a_scale", "b", "b_scale", "bias"]),
        ({"weight_bits": 16, "rank": 0, "lowrank_bits": 16, "has_bias": 0}, ["x", "w"]),
        ({"weight_bits": 3, "rank": 4, "lowrank_bits": 16, "has_bias": 0}, ["x", "w", "w_scale", "a", "b"]),
        ({"weight_bits": 16, "rank": 2, "lowrank_bits": 8, "has_bias": 1},
         ["x", "w", "a", "a_scale", "b", "b_scale", "bias"]),
    ],
)
def test_input_order_rule(attrs, names):
    assert spec.input_names(attrs) == names


def _attrs(**over):
    a = {"in_features": 256, "out_features": 128, "rank": 16, "weight_bits": 4, "group_size": 128,
         "lowrank_bits": 4, "lowrank_group_size": 8, "sparse24": 0, "has_bias": 0}
    a.update(over)
    return a


def test_validate_fills_plugin_strings():
    out = spec.validate_attrs(_attrs())
    assert out["plugin_version"] == "1" and out["plugin_namespace"] == "eora"
    assert list(out) == spec.attribute_names()


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"weight_bits": 5}, "weight_bits=5"),
        ({"group_size": 100}, "group_size=100"),
        ({"rank": 15}, "rank=15"),
        ({"lowrank_group_size": 0}, "lowrank_group_size=0"),
        ({"out_features": 127}, "out_features=127"),
        ({"colour": 1}, "unknown EoraLinear attribute"),
        ({"plugin_version": "2"}, "plugin_version"),
        ({"rank": 0, "lowrank_bits": 16, "lowrank_group_size": 8}, "lowrank_group_size=8"),
    ],
)
def test_validate_rejects(over, needle):
    with pytest.raises(ValueError, match=needle):
        spec.validate_attrs(_attrs(**over))


def test_missing_attribute_named():
    a = _attrs()
    del a["sparse24"]
    with pytest.raises(ValueError, match="'sparse24' is missing"):
        spec.validate_attrs(a)


def test_session_options_are_exact_reference():
    so = session_options()
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert so.graph_optimization_level.name == "ORT_ENABLE_BASIC"


def test_package_spec_copy_matches_canonical():
    """The package-data copy (for installed wheels) must equal graphs/eora_linear.spec.json."""
    root = Path(__file__).resolve().parents[1]
    canonical = root / "graphs" / spec.SPEC_FILENAME
    packaged = root / "eora_export" / "onnx" / spec.SPEC_FILENAME
    assert packaged.read_bytes() == canonical.read_bytes(), "run python tools/gen_graphs.py"
    assert spec.spec_path().read_bytes() == canonical.read_bytes()
