"""ONNX Runtime sessions for our graphs, including a CPU implementation of the fused node.

The fused ``eora::EoraLinear`` node runs as an onnxruntime-extensions PyOp: numpy code
with the unfused pattern's rounding points (each DequantizeLinear, each MatMul and each
Add rounds to float16; MatMuls accumulate in float32 as ORT's CPU MatMul does). PyOps
live in the ``ai.onnx.contrib`` domain with a fixed input list, so :func:`make_session`
renames each node to one of twelve variants (weight quantized or not × low-rank none,
quantized or float16 × bias or not) in a private copy of the model.

Exact-reference options (DESIGN §4): ``ORT_ENABLE_BASIC`` and
``session.qdq_matmulnbits_accuracy_level = "0"``, so DQ+MatMul never becomes MatMulNBits
with 8-bit activations.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from . import spec
from .fuse import node_attrs
from .initializers import unpack_int4_np

PYOP_DOMAIN = "ai.onnx.contrib"


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
            return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        proto = onnx.load(str(path))
    if fused is None:
        fused = has_fused_nodes(proto)
    if fused:
        proto = to_pyop_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), session_options(custom_ops=fused),
                                providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- numpy kernel


def dequantize(codes: np.ndarray, scale: np.ndarray, block: int, bits: int) -> np.ndarray:
    """float16 ``[K, N]`` = fp16(float32(q) * float32(scale[k // block, n])) (DequantizeLinear)."""
    q = unpack_int4_np(codes) if bits <= 4 else codes.astype(np.int8)
    s = np.repeat(scale.astype(np.float32), block, axis=0)
    return (q.astype(np.float32) * s).astype(np.float16)


def matmul16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float16 ``x @ w`` accumulated in float32 and rounded once (ORT CPU MatMul for fp16)."""
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]).astype(np.float32) @ w.astype(np.float32)
    return y.astype(np.float16).reshape(*lead, w.shape[1])


def eora_linear(inputs: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> np.ndarray:
    """The fused node in numpy, with the unfused pattern's float16 rounding points.

    inputs: by spec name (x ``[..., K]`` float16, w, w_scale, a, a_scale, b, b_scale, bias
    as the fused node holds them); returns float16 ``[..., N]``.
    """
    wb, lb = attrs["weight_bits"], attrs["lowrank_bits"]
    w = inputs["w"] if wb == 16 else dequantize(inputs["w"], inputs["w_scale"], attrs["group_size"], wb)
    y = matmul16(inputs["x"], w)
    if attrs["rank"]:
        a, b = inputs["a"], inputs["b"]
        if lb < 16:
            a = dequantize(a, inputs["a_scale"], attrs["lowrank_group_size"], lb)
            b = dequantize(b, inputs["b_scale"], attrs["lowrank_group_size"], lb)
        xa = matmul16(inputs["x"], a)
        y = (y.astype(np.float32) + matmul16(xa, b).astype(np.float32)).astype(np.float16)
    if attrs["has_bias"]:
        y = (y.astype(np.float32) + inputs["bias"].astype(np.float32)).astype(np.float16)
    return y


# --------------------------------------------------------------------------- PyOp glue


def _variant(attrs: Mapping[str, Any]) -> str:
    w = "q" if attrs["weight_bits"] < 16 else "f"
    r = "n" if not attrs["rank"] else ("q" if attrs["lowrank_bits"] < 16 else "f")
    return f"{spec.op_type()}_w{w}_r{r}_b{attrs['has_bias']}"


def _variant_attrs(name: str) -> dict[str, Any]:
    """Representative attrs of a variant name: enough to list its inputs and dtypes."""
    w, r, b = name.split("_")[1:]
    return {"weight_bits": 4 if w == "wq" else 16, "rank": 0 if r == "rn" else 2,
            "lowrank_bits": 4 if r == "rq" else 16, "has_bias": int(b[1])}


@lru_cache(maxsize=None)
def _register(name: str) -> None:
    """Register the PyOp of one variant with onnxruntime-extensions (once per process)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    probe = _variant_attrs(name)
    roles = spec.input_names(probe)
    f16, i8 = PyCustomOpDef.dt_float16, PyCustomOpDef.dt_int8
    types = [i8 if (r == "w" and probe["weight_bits"] < 16) or (r in ("a", "b") and probe["lowrank_bits"] < 16)
             else f16 for r in roles]
    attr_types = {n: PyCustomOpDef.dt_int64 if t == "int" else PyCustomOpDef.dt_string
                  for n, t in spec.attribute_types().items()}

    def kernel(*arrays: np.ndarray, **attrs: Any) -> np.ndarray:
        attrs = {k: (int(v) if attr_types[k] == PyCustomOpDef.dt_int64 else v) for k, v in attrs.items()}
        return eora_linear(dict(zip(roles, arrays)), attrs)

    onnx_op(op_type=name, inputs=types, outputs=[f16], attrs=attr_types)(kernel)


def to_pyop_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose EoraLinear nodes are the matching ``ai.onnx.contrib`` PyOps."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == spec.domain() and node.op_type == spec.op_type():
            attrs = node_attrs(node)
            if len(node.input) != len(spec.input_names(attrs)):
                raise ValueError(f"EoraLinear node {node.name!r} has {len(node.input)} inputs; its attributes "
                                 f"call for {spec.input_names(attrs)}")
            name = _variant(attrs)
            _register(name)
            node.op_type, node.domain = name, PYOP_DOMAIN
    if not any(o.domain == PYOP_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(PYOP_DOMAIN, 1))
    return out
