"""ONNX Runtime sessions for our graphs, including a CPU implementation of the fused node.

The fused ``eora::EoraLinear`` node runs as an onnxruntime-extensions PyOp: numpy code
with the spec's rounding points, which are :meth:`eora_export.eora_linear.EoraLinear.forward`'s:
products and sums accumulate in float32, x·A is rounded to float16 before the second
product, and the result is rounded once. (ORT's CPU EP has no float16 MatMul/Add on x86:
it runs the unfused pattern in float32 through inserted Casts and removes the
fp32→fp16→fp32 pairs between ops, so on the CPU the unfused pattern rounds only at its
output and x·A is not rounded. Fused and unfused CPU runs therefore agree to about one
float16 ulp, not bit for bit; see tests/test_onnx_fuse.py.) PyOps
live in the ``ai.onnx.contrib`` domain with a fixed input list, so :func:`make_session`
renames each node to one of twelve variants (weight quantized or not × low-rank none,
quantized or float16 × bias or not) in a private copy of the model. The PyOp API has no
float16 tensors, so float16 inputs reach it through ``Cast(to=FLOAT)`` and its float32
output (float16 values, exactly) goes back through ``Cast(to=FLOAT16)``: both casts are
lossless, so the node's result is unchanged.

Exact-reference options (docs/design.md §4): ``ORT_ENABLE_BASIC`` and
``session.qdq_matmulnbits_accuracy_level = "0"``, so DQ+MatMul never becomes MatMulNBits
with 8-bit activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from . import spec
from .fuse import node_attrs
from .initializers import unpack_int4_np

PYOP_DOMAIN = "ai.onnx.contrib"
# Fusions that change float16 rounding points: MatMul+Add -> Gemm adds the bias before the
# single final rounding, so the pattern would no longer round each product to float16.
DISABLED_OPTIMIZERS = ["MatMulAddFusion", "GemmActivationFusion"]


def session_options(*, custom_ops: bool = False) -> ort.SessionOptions:
    """Session options for exact reference runs (no MatMulNBits rewrite)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    if custom_ops:
        from onnxruntime_extensions import get_library_path

        so.register_custom_ops_library(get_library_path())
    return so


def has_fused_nodes(model: onnx.ModelProto) -> bool:
    return any(n.domain == spec.domain() and n.op_type == spec.op_type() for n in model.graph.node)


def make_session(model: str | Path | onnx.ModelProto, fused: bool | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession with the exact-reference options.

    model: a path or a ModelProto. fused: whether the graph holds EoraLinear nodes that
    need the PyOp; None detects it. Unfused files are handed to ORT by path (external
    data stays on disk); fused ones are rewritten in memory.
    """
    proto = model if isinstance(model, onnx.ModelProto) else None
    if proto is None:
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"no ONNX file at {path}; export one first")
        if fused is None:
            fused = has_fused_nodes(onnx.load(str(path), load_external_data=False))
        if not fused:
            return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"],
                                        disabled_optimizers=DISABLED_OPTIMIZERS)
        proto = onnx.load(str(path))
    if fused is None:
        fused = has_fused_nodes(proto)
    if fused:
        proto = to_pyop_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), session_options(custom_ops=fused),
                                providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS)


# --------------------------------------------------------------------------- numpy kernel


def dequantize(codes: np.ndarray, scale: np.ndarray, block: int, bits: int) -> np.ndarray:
    """float16 ``[K, N]`` = fp16(float32(q) * float32(scale[k // block, n])) (DequantizeLinear)."""
    q = unpack_int4_np(codes) if bits <= 4 else codes.astype(np.int8)
    s = np.repeat(scale.astype(np.float32), block, axis=0)
    return (q.astype(np.float32) * s).astype(np.float16)


def eora_linear(inputs: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> np.ndarray:
    """The fused node in numpy: y = fp16(x·W + fp16(x·A)·B + bias), sums in float32.

    inputs: by spec name (x ``[..., K]`` float16, w, w_scale, a, a_scale, b, b_scale, bias
    as the fused node holds them); returns float16 ``[..., N]``.
    """
    wb, lb = attrs["weight_bits"], attrs["lowrank_bits"]
    x = inputs["x"]
    lead = x.shape[:-1]
    x32 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    w = inputs["w"] if wb == 16 else dequantize(inputs["w"], inputs["w_scale"], attrs["group_size"], wb)
    y = x32 @ w.astype(np.float32)
    if attrs["rank"]:
        a, b = inputs["a"], inputs["b"]
        if lb < 16:
            a = dequantize(a, inputs["a_scale"], attrs["lowrank_group_size"], lb)
            b = dequantize(b, inputs["b_scale"], attrs["lowrank_group_size"], lb)
        xa = (x32 @ a.astype(np.float32)).astype(np.float16)  # the spec's one inner rounding
        y = y + xa.astype(np.float32) @ b.astype(np.float32)
    if attrs["has_bias"]:
        y = y + inputs["bias"].astype(np.float32)
    return y.astype(np.float16).reshape(*lead, y.shape[-1])


# --------------------------------------------------------------------------- PyOp glue


def _variant(attrs: Mapping[str, Any]) -> str:
    w = "q" if attrs["weight_bits"] < 16 else "f"
    r = "n" if not attrs["rank"] else ("q" if attrs["lowrank_bits"] < 16 else "f")
    return f"{spec.op_type()}_w{w}_r{r}_b{attrs['has_bias']}"


@cache
def _register(name: str) -> None:
    """Register the PyOp of one variant with onnxruntime-extensions (once per process)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    roles, int8_roles = _variant_roles(name)
    f32, i8 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8
    types = [i8 if r in int8_roles else f32 for r in roles]
    attr_types = {n: PyCustomOpDef.dt_int64 if t == "int" else PyCustomOpDef.dt_string
                  for n, t in spec.attribute_types().items()}

    def kernel(*arrays: np.ndarray, **attrs: Any) -> np.ndarray:
        attrs = {k: (int(v) if attr_types[k] == PyCustomOpDef.dt_int64 else v) for k, v in attrs.items()}
        feeds = {r: (a if r in int8_roles else a.astype(np.float16)) for r, a in zip(roles, arrays, strict=True)}
        return eora_linear(feeds, attrs).astype(np.float32)

    onnx_op(op_type=name, inputs=types, outputs=[f32], attrs=attr_types)(kernel)


def _variant_roles(name: str) -> tuple[list[str], set[str]]:
    """Input roles of a variant and those that are int8 (packed or plain codes)."""
    w, r, b = name.split("_")[1:]
    probe = {"weight_bits": 4 if w == "wq" else 16, "rank": 0 if r == "rn" else 2,
             "lowrank_bits": 4 if r == "rq" else 16, "has_bias": int(b[1])}
    int8_roles = {"w"} if w == "wq" else set()
    if r == "rq":
        int8_roles |= {"a", "b"}
    return spec.input_names(probe), int8_roles


def to_pyop_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose EoraLinear nodes are the matching ``ai.onnx.contrib`` PyOps."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.domain != spec.domain() or node.op_type != spec.op_type():
            kept = onnx.NodeProto()
            kept.CopyFrom(node)  # copies survive clearing the repeated field below
            nodes.append(kept)
            continue
        attrs = node_attrs(node)
        if len(node.input) != len(spec.input_names(attrs)):
            raise ValueError(f"EoraLinear node {node.name!r} has {len(node.input)} inputs; its attributes "
                             f"call for {spec.input_names(attrs)}")
        name = _variant(attrs)
        _register(name)
        roles, int8_roles = _variant_roles(name)
        inputs = []
        for role, tensor in zip(roles, node.input, strict=True):
            if role in int8_roles:
                inputs.append(tensor)
                continue
            cast = f"{node.name}/pyop_in/{role}"
            nodes.append(helper.make_node("Cast", [tensor], [cast], name=cast, to=onnx.TensorProto.FLOAT))
            inputs.append(cast)
        y32 = f"{node.name}/pyop_out"
        nodes.append(helper.make_node(name, inputs, [y32], name=f"{node.name}/pyop", domain=PYOP_DOMAIN,
                                      **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        nodes.append(helper.make_node("Cast", [y32], [node.output[0]], name=f"{node.name}/pyop_cast",
                                      to=onnx.TensorProto.FLOAT16))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain == PYOP_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(PYOP_DOMAIN, 1))
    return out
