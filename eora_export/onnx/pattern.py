"""The canonical unfused ONNX subgraph of one ``EoraLinear`` (docs/design.md §4), emitter and matcher.

::

    x ─► MatMul(x, DQ(w, w_scale)) ───────────────────────┐
     └─► MatMul(x, DQ(a, a_scale)) ─► MatMul(·, DQ(b, b_scale)) ─► Add ─► (Add bias) ─► y

All tensors are float16; w is INT4 ``[K, N]`` (DequantizeLinear axis=0, block_size=g,
opset 21) or a plain float16 initializer (weight_bits 16); a ``[K, r]`` and b ``[r, N]``
are INT4 or INT8 behind a DequantizeLinear, or plain float16 (lowrank_bits 16).

One definition, :func:`template`, lists the steps for given spec attributes. The emitter
instantiates it; the matcher infers the attributes from a candidate and then checks the
graph against the same template, node for node, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper

from . import spec
from .initializers import array_tensor, int4_codes, int4_tensor, to_numpy

OPSET = 21
CONST_ROLES = ("w", "w_scale", "a", "a_scale", "b", "b_scale", "bias")


@dataclass(frozen=True)
class Step:
    """One node of the pattern: ``output = op(*inputs, **attrs)``, all names are roles."""

    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: tuple[tuple[str, int], ...] = ()


def template(attrs: Mapping[str, Any]) -> list[Step]:
    """The pattern's steps for validated spec attributes; the last step's output is ``y``."""
    steps: list[Step] = []
    w = "w"
    if attrs["weight_bits"] < 16:
        steps.append(Step("DequantizeLinear", ("w", "w_scale"), "w_dq",
                          (("axis", 0), ("block_size", attrs["group_size"]))))
        w = "w_dq"
    steps.append(Step("MatMul", ("x", w), "y_main"))
    out = "y_main"
    if attrs["rank"]:
        a, b = "a", "b"
        if attrs["lowrank_bits"] < 16:
            lg = attrs["lowrank_group_size"]
            steps.append(Step("DequantizeLinear", ("a", "a_scale"), "a_dq", (("axis", 0), ("block_size", lg))))
            steps.append(Step("DequantizeLinear", ("b", "b_scale"), "b_dq", (("axis", 0), ("block_size", lg))))
            a, b = "a_dq", "b_dq"
        steps.append(Step("MatMul", ("x", a), "xa"))
        steps.append(Step("MatMul", ("xa", b), "y_lowrank"))
        steps.append(Step("Add", (out, "y_lowrank"), "y_sum"))
        out = "y_sum"
    if attrs["has_bias"]:
        steps.append(Step("Add", (out, "bias"), "y_bias"))
    return steps


def output_role(steps: list[Step]) -> str:
    return steps[-1].output


def internal_name(prefix: str, role: str) -> str:
    """Name of an intermediate tensor of the pattern (and of its producing node)."""
    return f"{prefix}/{role}"


def const_name(prefix: str, role: str) -> str:
    """Name of a constant input (initializer) of the pattern."""
    return f"{prefix}.{role}"


def make_nodes(steps: list[Step], binding: Mapping[str, str], prefix: str) -> list[NodeProto]:
    """NodeProtos of ``steps``; ``binding`` maps roles to tensor names (x, y, constants)."""
    last = output_role(steps)

    def name_of(role: str) -> str:
        if role == last:
            return binding["y"]
        return binding.get(role) or internal_name(prefix, role)

    return [
        helper.make_node(s.op, [name_of(r) for r in s.inputs], [name_of(s.output)],
                         name=internal_name(prefix, s.output), **dict(s.attrs))
        for s in steps
    ]


# --------------------------------------------------------------------------- weights


@dataclass
class LinearWeights:
    """The constants of one EoraLinear in ONNX layout (``[K, N]`` = torch weight transposed).

    w: int8 codes ``[K, N]`` (weight_bits 3/4) or float16 ``[K, N]``; w_scale float16
    ``[K/g, N]``; a ``[K, r]``, b ``[r, N]`` int8 codes or float16, scales ``[K/lg, r]``
    and ``[r/lg, N]``; bias float16 ``[N]``. ``attrs`` are validated spec attributes.
    """

    attrs: dict[str, Any]
    w: np.ndarray
    w_scale: np.ndarray | None = None
    a: np.ndarray | None = None
    a_scale: np.ndarray | None = None
    b: np.ndarray | None = None
    b_scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    _: None = field(default=None, repr=False)

    @classmethod
    def from_module(cls, mod: Any) -> LinearWeights:
        """From an :class:`eora_export.eora_linear.EoraLinear` (torch layout ``[rows, cols]``)."""
        wq, aq, bq = mod.weight_q, mod.a_q, mod.b_q
        attrs = spec.layer_attrs(mod)

        def codes(m: Any) -> tuple[np.ndarray, np.ndarray | None]:
            if m.bits == 16:
                return m.q.detach().to(dtype=_torch_f16()).T.contiguous().numpy(), None
            return (m.q.detach().T.contiguous().numpy().astype(np.int8),
                    m.scale.detach().T.contiguous().numpy().astype(np.float16))

        w, ws = codes(wq)
        out = cls(attrs, w, ws)
        if mod.rank:
            out.a, out.a_scale = codes(aq)
            out.b, out.b_scale = codes(bq)
        if mod.bias is not None:
            out.bias = mod.bias.detach().cpu().numpy().astype(np.float16)
        return out

    def initializer(self, role: str, name: str) -> TensorProto:
        """The initializer of a constant role in pattern form (INT4 for 3/4-bit codes)."""
        arr = getattr(self, role)
        bits = {"w": self.attrs["weight_bits"], "a": self.attrs["lowrank_bits"],
                "b": self.attrs["lowrank_bits"]}.get(role, 16)
        if bits <= 4:
            return int4_tensor(name, arr)
        if bits == 8:
            return array_tensor(name, arr.astype(np.int8))
        return array_tensor(name, arr.astype(np.float16))


def _torch_f16() -> Any:
    import torch

    return torch.float16


def emit(prefix: str, x: str, y: str, weights: LinearWeights) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes and initializers of the canonical pattern computing ``y`` from ``x``.

    Initializers are named ``{prefix}.{role}``, intermediate tensors ``{prefix}/{role}``.
    """
    steps = template(weights.attrs)
    roles = [r for r in spec.input_names(weights.attrs) if r != "x"]
    binding = {"x": x, "y": y, **{r: const_name(prefix, r) for r in roles}}
    inits = [weights.initializer(r, binding[r]) for r in roles]
    return make_nodes(steps, binding, prefix), inits


def pattern_model(weights: LinearWeights, prefix: str = "linear") -> onnx.ModelProto:
    """A one-layer model ``y = EoraLinear(x)``, x float16 ``[batch, seq, K]``."""
    k, n = weights.attrs["in_features"], weights.attrs["out_features"]
    nodes, inits = emit(prefix, "x", "y", weights)
    graph = helper.make_graph(
        nodes, "eora_linear_pattern",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="eora_export")
    model.ir_version = 10
    return model


# --------------------------------------------------------------------------- matcher


class GraphIndex:
    """Producers, consumers and initializers of a graph, by tensor name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = {}
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in list(graph.input) + list(graph.value_info) + list(graph.output)}

    def const_source(self, name: str) -> tuple[str, NodeProto | None] | None:
        """If ``name`` is a MatMul right-hand side built from an initializer, how.

        Returns ("init", None) for a plain initializer, ("dq", node) for
        DequantizeLinear(initializer, initializer), else None.
        """
        if name in self.inits and name not in self.graph_inputs:
            return "init", None
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") \
                and node.input and node.input[0] in self.inits:
            return "dq", node
        return None


@dataclass
class Match:
    """An exact occurrence of the pattern: validated attrs, role -> tensor binding, nodes."""

    attrs: dict[str, Any]
    binding: dict[str, str]
    nodes: list[NodeProto]
    prefix: str


class NoMatch(Exception):
    """A candidate that is close to the pattern but not exactly it; ``str()`` says why."""


def _attr_ints(node: NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bits_of(t: TensorProto, role: str) -> int:
    if t.data_type == TensorProto.INT4:
        return 4
    if t.data_type == TensorProto.INT8:
        return 8
    if t.data_type == TensorProto.FLOAT16:
        return 16
    raise NoMatch(f"{role} is {TensorProto.DataType.Name(t.data_type)}; the pattern takes INT4, INT8 or FLOAT16")


def is_sparse24(w: np.ndarray) -> bool:
    """True when every 4 consecutive rows k of each column n hold at most 2 non-zeros."""
    k = w.shape[0]
    if k % 4:
        return False
    nz = (w != 0).reshape(k // 4, 4, -1).sum(axis=1)
    return bool((nz <= 2).all())


def lowrank_chain(index: GraphIndex, y_other: str, x: str) -> tuple[NodeProto, NodeProto] | None:
    """(MatMul(x, A), MatMul(·, B)) producing ``y_other``, if that is its shape."""
    l2 = index.producer.get(y_other)
    if l2 is None or l2.op_type != "MatMul" or index.const_source(l2.input[1]) is None:
        return None
    l1 = index.producer.get(l2.input[0])
    if l1 is None or l1.op_type != "MatMul" or l1.input[0] != x or index.const_source(l1.input[1]) is None:
        return None
    return l1, l2


def is_main_candidate(index: GraphIndex, node: NodeProto) -> bool:
    """A MatMul of a constant that is not one of the two products of a low-rank chain."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return False
    if index.const_source(node.input[1]) is None:
        return False
    prev = index.producer.get(node.input[0])
    if prev is not None and prev.op_type == "MatMul" and index.const_source(prev.input[1]) is not None:
        return False  # second product (xa @ B) of a chain
    return not any(u.op_type == "MatMul" and len(u.input) == 2 and u.input[0] == node.output[0]
                   and index.const_source(u.input[1]) is not None
                   for u in index.consumers.get(node.output[0], []))


def infer(index: GraphIndex, main: NodeProto) -> Match | None:
    """Infer the attributes and role binding around a main MatMul, then check it exactly.

    Returns None when ``main`` is an ordinary Linear (plain float16 weight, no low-rank
    path, not 2:4) or not a MatMul of a constant at all; raises :class:`NoMatch` with the
    reason when it looks like the pattern but is not exactly it.
    """
    x, wsrc = main.input[0], main.input[1]
    src = index.const_source(wsrc)
    if src is None:
        return None
    binding: dict[str, str] = {"x": x, "y_main": main.output[0]}
    attrs: dict[str, Any] = {}
    kind, dq = src
    if kind == "dq":
        w = index.inits[dq.input[0]]
        if w.data_type != TensorProto.INT4:
            raise NoMatch(f"weight {w.name!r} is {TensorProto.DataType.Name(w.data_type)}; the pattern needs INT4")
        codes = int4_codes(w)
        attrs["weight_bits"] = 3 if codes.size and codes.min() >= -4 and codes.max() <= 3 else 4
        attrs["group_size"] = int(_attr_ints(dq).get("block_size", 0))
        binding.update(w=w.name, w_dq=wsrc)
        if len(dq.input) > 1:
            binding["w_scale"] = dq.input[1]
        dense = codes
    else:
        w = index.inits[wsrc]
        if w.data_type != TensorProto.FLOAT16:
            return None
        attrs["weight_bits"], attrs["group_size"] = 16, 0
        binding["w"] = w.name
        dense = to_numpy(w)
    if len(w.dims) != 2:
        raise NoMatch(f"weight {w.name!r} has shape {list(w.dims)}; the pattern needs a [K, N] matrix")
    attrs["in_features"], attrs["out_features"] = int(w.dims[0]), int(w.dims[1])
    attrs["sparse24"] = int(is_sparse24(dense))

    tail = main.output[0]
    attrs["rank"], attrs["lowrank_bits"], attrs["lowrank_group_size"] = 0, 16, 0
    users = index.consumers.get(tail, [])
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        others = [i for i in add.input if i != tail]
        chain = lowrank_chain(index, others[0], x) if len(others) == 1 else None
        if chain is not None:
            l1, l2 = chain
            _bind_factor(index, l1.input[1], "a", binding, attrs)
            _bind_factor(index, l2.input[1], "b", binding, attrs)
            binding.update(xa=l1.output[0], y_lowrank=l2.output[0], y_sum=add.output[0])
            tail = add.output[0]
    users = index.consumers.get(tail, [])
    attrs["has_bias"] = 0
    if len(users) == 1 and users[0].op_type == "Add" and tail not in index.outputs:
        others = [i for i in users[0].input if i != tail]
        bias = index.inits.get(others[0]) if len(others) == 1 else None
        if bias is not None and list(bias.dims) == [attrs["out_features"]]:
            attrs["has_bias"] = 1
            binding.update(bias=bias.name, y_bias=users[0].output[0])
    if kind == "init" and not attrs["rank"] and not attrs["sparse24"]:
        return None  # an ordinary float16 Linear: nothing to fuse
    try:
        attrs = spec.validate_attrs(attrs)
    except ValueError as e:
        raise NoMatch(str(e)) from None
    return check(index, attrs, binding)


def _bind_factor(index: GraphIndex, src_name: str, role: str, binding: dict[str, str],
                 attrs: dict[str, Any]) -> None:
    kind, dq = index.const_source(src_name)
    if kind == "init":
        t = index.inits[src_name]
        bits, group = _bits_of(t, role), 0
        if bits != 16:
            raise NoMatch(f"factor {role} {t.name!r} is an integer initializer used without DequantizeLinear")
        binding[role] = t.name
    else:
        t = index.inits[dq.input[0]]
        bits, group = _bits_of(t, role), int(_attr_ints(dq).get("block_size", 0))
        binding.update({role: t.name, f"{role}_dq": src_name})
        if len(dq.input) > 1:
            binding[f"{role}_scale"] = dq.input[1]
    if role == "a":
        attrs["rank"] = int(t.dims[1]) if len(t.dims) == 2 else -1
        attrs["lowrank_bits"], attrs["lowrank_group_size"] = bits, group
    elif (bits, group) != (attrs["lowrank_bits"], attrs["lowrank_group_size"]):
        raise NoMatch(f"factors a and b differ in storage ({attrs['lowrank_bits']}/{bits} bits, "
                      f"block {attrs['lowrank_group_size']}/{group}); the node takes one lowrank format")


def check(index: GraphIndex, attrs: dict[str, Any], binding: dict[str, str]) -> Match:
    """Verify the graph holds exactly :func:`template` (attrs) under ``binding``."""
    steps = template(attrs)
    last = output_role(steps)
    binding = dict(binding)
    binding["y"] = binding[last]
    nodes: list[NodeProto] = []
    for s in steps:
        name = binding.get(s.output)
        node = index.producer.get(name) if name else None
        if node is None:
            raise NoMatch(f"no node produces the pattern's {s.output}")
        want_inputs = [binding.get(r, "?") for r in s.inputs]
        if node.op_type != s.op or node.domain not in ("", "ai.onnx"):
            raise NoMatch(f"{s.output} comes from {node.op_type}, the pattern has {s.op}")
        if list(node.input) != want_inputs:
            raise NoMatch(f"{node.op_type} {node.name!r} has inputs {list(node.input)}, the pattern "
                          f"needs exactly {want_inputs}")
        if _attr_ints(node) != dict(s.attrs):
            raise NoMatch(f"{node.op_type} {node.name!r} has attributes {_attr_ints(node)}, the "
                          f"pattern needs {dict(s.attrs)}")
        nodes.append(node)
    # Intermediate tensors must feed only the next step of the pattern.
    for s in steps[:-1]:
        users = index.consumers.get(binding[s.output], [])
        if len(users) != 1 or binding[s.output] in index.outputs:
            raise NoMatch(f"intermediate {s.output} ({binding[s.output]!r}) is used outside the pattern "
                          f"({len(users)} consumers); a shared tensor cannot be fused")
    roles = [r for r in spec.input_names(attrs) if r != "x"]
    layouts = _pattern_layouts(attrs)
    for r in roles:
        t = index.inits.get(binding[r])
        if t is None or binding[r] in index.graph_inputs:
            raise NoMatch(f"{r} ({binding[r]!r}) is not an initializer; the node needs constant weights")
        users = index.consumers.get(t.name, [])
        if len(users) != 1:
            raise NoMatch(f"initializer {t.name!r} ({r}) is shared by {len(users)} nodes; "
                          "a shared weight cannot be fused")
        dtype, shape = layouts[r]
        if t.data_type != dtype or tuple(t.dims) != shape:
            raise NoMatch(f"{r} {t.name!r} is {TensorProto.DataType.Name(t.data_type)} {list(t.dims)}; the "
                          f"pattern needs {TensorProto.DataType.Name(dtype)} {list(shape)}")
    for role in ("x", "y"):
        elem = index.types.get(binding[role])
        if elem is not None and elem != TensorProto.FLOAT16:
            raise NoMatch(f"{role} ({binding[role]!r}) is {TensorProto.DataType.Name(elem)}, the pattern is FLOAT16")
    main = next(n for s, n in zip(steps, nodes, strict=True) if s.output == "y_main")
    prefix = main.name[: -len("/y_main")] if main.name.endswith("/y_main") else (main.name or main.output[0])
    binding = {r: binding[r] for r in ["x", "y", *roles]}
    return Match(attrs, binding, nodes, prefix)


def _pattern_layouts(attrs: Mapping[str, Any]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(TensorProto dtype, shape) of each constant in pattern form (INT4 unpacked dims)."""
    out = {}
    for role, (dtype, shape) in spec.input_layouts(attrs).items():
        code = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.INT8
        bits = {"w": attrs["weight_bits"], "a": attrs["lowrank_bits"], "b": attrs["lowrank_bits"]}.get(role, 16)
        if bits <= 4:
            code, shape = TensorProto.INT4, (shape[0], shape[1] * 2)
        out[role] = (code, shape)
    return out
