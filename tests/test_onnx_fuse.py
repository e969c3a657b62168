"""fuse ⇄ unfuse: exact round trips, the fused node on the CPU, near misses, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import make_eora_linear

from eora_export import quant
from eora_export.eora_linear import EoraLinear
from eora_export.onnx import spec
from eora_export.onnx.fuse import fuse, unfuse
from eora_export.onnx.pattern import LinearWeights, pattern_model
from eora_export.onnx.runtime import eora_linear, make_session

CONFIGS = [
    dict(rank=16, lowrank_bits=4, lowrank_group_size=8),
    dict(rank=0),
    dict(rank=32, lowrank_bits=8, lowrank_group_size=16, bias=True),
    dict(rank=8, lowrank_bits=16, weight_bits=16, sparse24=True),
    dict(rank=64, lowrank_bits=4, lowrank_group_size=32, weight_bits=3, sparse24=True, bias=True),
]


def _pattern(cfg, k=256, n=128, prefix="lin"):
    mod = make_eora_linear(k, n, group_size=64, seed=7, **cfg)
    return mod, pattern_model(LinearWeights.from_module(mod), prefix=prefix)


def _x(k=256):
    return torch.randn(2, 9, k, generator=torch.Generator().manual_seed(3)).half()


def _ops(model):
    return [(n.domain, n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_round_trip_restores_graph_and_outputs(cfg):
    _, model = _pattern(cfg)
    fused, report = fuse(model)
    assert len(report.fused) == 1 and not report.unmatched
    assert _ops(fused) == [(spec.domain(), spec.op_type())]
    back = unfuse(fused)
    assert back.graph == model.graph  # identical, node names included
    x = _x().numpy()
    np.testing.assert_array_equal(make_session(back).run(None, {"x": x})[0],
                                  make_session(model).run(None, {"x": x})[0])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fused_node_in_ort(cfg):
    mod, model = _pattern(cfg)
    fused, _ = fuse(model)
    onnx.checker.check_model(fused)
    x = _x()
    got = make_session(fused).run(None, {"x": x.numpy()})[0]
    unfused = make_session(model).run(None, {"x": x.numpy()})[0].astype(np.float32)
    ref = mod(x).numpy()
    # The PyOp has the spec's (= EoraLinear.forward's) rounding points: equal up to float32
    # summation order — at most one float16 ulp, except near zero (cancellation), 1e-4.
    d = np.abs(got.astype(np.float32) - ref.astype(np.float32))
    ulp = np.spacing(np.maximum(np.abs(got), np.abs(ref))).astype(np.float32)
    assert (d <= np.maximum(ulp, 1e-4)).all()
    assert (got == ref).mean() > 0.99
    # ORT's CPU run of the unfused pattern does not round x·A to float16 (see runtime.py).
    np.testing.assert_allclose(got.astype(np.float32), unfused, rtol=0, atol=2 * float(ulp.max()))


def test_int4_initializers_keep_their_bytes():
    _, model = _pattern(dict(rank=16, lowrank_bits=4, lowrank_group_size=8))
    before = {t.name: t for t in model.graph.initializer}
    fused, _ = fuse(model)
    for t in fused.graph.initializer:
        if before[t.name].data_type == TensorProto.INT4:
            assert t.data_type == TensorProto.INT8
            assert list(t.dims) == [before[t.name].dims[0], before[t.name].dims[1] // 2]
            assert t.raw_data == before[t.name].raw_data
    # and the original model is untouched
    assert all(n.domain == "" for n in model.graph.node)


def _exact_module():
    """Codes, power-of-two scales and x on a coarse grid: every float32 sum is exact, so
    summation order cannot matter and only the float16 rounding points decide the bits."""
    gen = torch.Generator().manual_seed(5)

    def qm(rows, cols, bits, group, scale):
        lim = 2 ** (bits - 1)
        q = torch.randint(-lim, lim, (rows, cols), generator=gen, dtype=torch.int8)
        return quant.QuantizedMatrix(q, torch.full((rows, cols // group), scale, dtype=torch.float16), bits, group)

    w, a, b = qm(64, 128, 4, 32, 2.0**-4), qm(16, 128, 8, 16, 2.0**-7), qm(64, 16, 8, 16, 2.0**-3)
    bias = torch.randint(-64, 64, (64,), generator=gen).float() / 256
    x = torch.randint(-64, 64, (3, 5, 128), generator=gen).half() / 16
    return EoraLinear(w, a, b, bias), x


def test_fused_kernel_rounds_where_the_spec_says():
    mod, x = _exact_module()
    fused, _ = fuse(pattern_model(LinearWeights.from_module(mod)))
    got = make_session(fused).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, mod(x).numpy())
    # x·A really is rounded: without that rounding the result differs somewhere.
    unrounded = (x.float() @ mod.weight.float().T + (x.float() @ mod.a.float().T) @ mod.b.float().T
                 + mod.bias.float()).half().numpy()
    assert (unrounded != got).any()
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    roles = spec.input_names(attrs)
    arrays = {r: (x.numpy() if r == "x" else inits[n]) for r, n in zip(roles, fused.graph.node[0].input, strict=True)}
    np.testing.assert_array_equal(eora_linear(arrays, attrs), got)


# ----------------------------------------------------------------------------- near misses


def _graph_copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _assert_left_alone(model, needle):
    fused, report = fuse(model)
    assert not report.fused
    assert report.unmatched and any(needle in why for _, why in report.unmatched), report.summary()
    assert fused.graph == model.graph


def test_extra_op_between_lowrank_and_add_is_left_alone():
    _, model = _pattern(dict(rank=16, lowrank_bits=4, lowrank_group_size=8))
    m = _graph_copy(model)
    add = next(n for n in m.graph.node if n.op_type == "Add")
    lowrank = add.input[1]
    m.graph.node.append(helper.make_node("Identity", [lowrank], ["lin/extra"], name="extra"))
    add.input[1] = "lin/extra"
    _assert_left_alone(m, "low-rank")


def test_shared_weight_is_left_alone():
    _, model = _pattern(dict(rank=0))
    m = _graph_copy(model)
    m.graph.node.append(helper.make_node("MatMul", ["x", "lin/w_dq"], ["y2"], name="second_user"))
    m.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT16, None))
    _assert_left_alone(m, "shared")


def test_wrong_scale_dtype_is_left_alone():
    _, model = _pattern(dict(rank=0))
    m = _graph_copy(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == "lin.w_scale":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float32), t.name))
    _assert_left_alone(m, "FLOAT")


def test_zero_point_is_left_alone():
    _, model = _pattern(dict(rank=0))
    m = _graph_copy(model)
    zp = helper.make_tensor("lin.zp", TensorProto.INT4, [4, 128], [0] * 512)
    m.graph.initializer.append(zp)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    dq.input.append("lin.zp")
    _assert_left_alone(m, "exactly")


def test_only_broken_layer_is_left_alone():
    """One good and one broken pattern in a graph: the good one fuses, the other is listed."""
    _, good = _pattern(dict(rank=16, lowrank_bits=4, lowrank_group_size=8), n=256, prefix="good")
    _, bad = _pattern(dict(rank=16, lowrank_bits=4, lowrank_group_size=8), n=256, prefix="bad")
    g = _graph_copy(good)
    for node in bad.graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.input[:] = ["y" if i == "x" else i for i in node.input]
        node.output[:] = ["z" if o == "y" else o for o in node.output]
        g.graph.node.append(node)
    g.graph.initializer.extend(bad.graph.initializer)
    del g.graph.output[:]
    g.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT16, None))
    mul = helper.make_node("Mul", ["bad/y_lowrank", "bad.one"], ["bad/scaled"], name="bad/extra")
    g.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float16), "bad.one"))
    add = next(n for n in g.graph.node if n.name == "bad/y_sum")
    add.input[1] = "bad/scaled"
    g.graph.node.append(mul)
    fused, report = fuse(g)
    assert [f["name"] for f in report.fused] == ["good"]
    assert report.unmatched
    assert sum(n.op_type == spec.op_type() for n in fused.graph.node) == 1
    x = _x().numpy()
    np.testing.assert_allclose(make_session(fused).run(None, {"x": x})[0].astype(np.float32),
                               make_session(g).run(None, {"x": x})[0].astype(np.float32), rtol=0, atol=4e-3)


# ----------------------------------------------------------------------------- malformed input


def test_fuse_rejects_non_model():
    with pytest.raises(ValueError, match=r"expected an onnx\.ModelProto"):
        fuse(b"not a model")


def test_fuse_rejects_old_opset():
    _, model = _pattern(dict(rank=0))
    m = _graph_copy(model)
    m.opset_import[0].version = 17
    with pytest.raises(ValueError, match="opset 17"):
        fuse(m)


def test_unfuse_rejects_bad_attribute():
    _, model = _pattern(dict(rank=16, lowrank_bits=4, lowrank_group_size=8))
    fused, _ = fuse(model)
    for a in fused.graph.node[0].attribute:
        if a.name == "weight_bits":
            a.i = 5
    with pytest.raises(ValueError, match="weight_bits=5"):
        unfuse(fused)


def test_unfuse_rejects_wrong_input_count():
    _, model = _pattern(dict(rank=16, lowrank_bits=4, lowrank_group_size=8))
    fused, _ = fuse(model)
    del fused.graph.node[0].input[-1]
    with pytest.raises(ValueError, match="inputs"):
        unfuse(fused)


def test_unfuse_rejects_wrong_container_shape():
    _, model = _pattern(dict(rank=0))
    fused, _ = fuse(model)
    t = next(t for t in fused.graph.initializer if t.name == "lin.w")
    t.dims[1] = t.dims[1] * 2
    with pytest.raises(ValueError, match="spec needs int8"):
        unfuse(fused)
