"""Graph pass: canonical pattern ⇄ one ``eora::EoraLinear`` node per compensated Linear.

:func:`fuse` replaces each exact occurrence of :func:`pattern.template` by a single node
(attributes per the spec, inputs in the spec's order, packed INT4 re-typed as INT8
``[K, N/2]`` with the same bytes). Near misses — an extra op in between, a shared weight,
a wrong dtype — are left untouched and listed with the reason; a pattern is never fused
in part. :func:`unfuse` emits the template again from the node, so a round trip restores
the same graph (node names aside) and therefore bit-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import spec
from .initializers import retype_int4_as_int8, retype_int8_as_int4
from .pattern import (
    OPSET,
    GraphIndex,
    Match,
    NoMatch,
    infer,
    is_main_candidate,
    lowrank_chain,
    make_nodes,
    template,
)


@dataclass
class FuseReport:
    """fused: ``{"name", "attrs"}`` per node made; unmatched: ``(node name, reason)``."""

    fused: list[dict[str, Any]] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"fused {len(self.fused)} EoraLinear node(s), left {len(self.unmatched)} near miss(es)"]
        lines += [f"  not fused: {name}: {why}" for name, why in self.unmatched]
        return "\n".join(lines)


def _check_model(model: Any) -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        raise ValueError(f"expected an onnx.ModelProto, got {type(model).__name__}; load it with onnx.load(path)")
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset < OPSET:
        raise ValueError(f"model has ONNX opset {opset}; blocked DequantizeLinear needs opset >= {OPSET}, "
                         "re-export with eora_export.onnx.export")
    return model


# Arity of the standard ops the matcher indexes by position: (min inputs, max inputs).
_ARITY = {"MatMul": (2, 2), "Add": (2, 2), "DequantizeLinear": (2, 3)}
# Python exceptions that mean "the graph breaks the ONNX spec" if the matcher meets them anyway.
_MALFORMED = (IndexError, KeyError, TypeError, AttributeError, OverflowError, RecursionError, UnicodeError)


def _check_structure(graph: onnx.GraphProto) -> None:
    """ValueError for a graph the matcher cannot index: a hostile or corrupt file, not a near miss."""
    produced: set[str] = set()
    for node in graph.node:
        label = node.name if isinstance(node.name, str) and node.name else node.op_type
        names = (node.name, node.op_type, node.domain, *node.input, *node.output)
        if not all(isinstance(s, str) for s in names):
            raise ValueError(f"malformed ONNX graph: node {label!r} has names that are not UTF-8 text")
        if not node.output or not all(node.output):
            raise ValueError(f"malformed ONNX graph: {node.op_type} node {label!r} has a missing or empty output")
        for o in node.output:
            if o in produced:
                raise ValueError(f"malformed ONNX graph: tensor {o!r} is produced by more than one node")
            produced.add(o)
        if node.domain in ("", "ai.onnx") and node.op_type in _ARITY:
            lo, hi = _ARITY[node.op_type]
            if not lo <= len(node.input) <= hi or len(node.output) != 1:
                raise ValueError(f"malformed ONNX graph: {node.op_type} node {label!r} has {len(node.input)} inputs and "
                                 f"{len(node.output)} outputs")
            for a in node.attribute:
                if a.type != onnx.AttributeProto.INT:
                    raise ValueError(f"malformed ONNX graph: {node.op_type} node {label!r} attribute {a.name!r} is not an int")
    for t in graph.initializer:
        if not isinstance(t.name, str):
            raise ValueError("malformed ONNX graph: an initializer name is not UTF-8 text")


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport]:
    """Return a fused copy of ``model`` and the report; ``model`` is not modified.

    A malformed graph (hostile or corrupt file) raises ValueError, never another exception.
    """
    _check_model(model)
    _check_structure(model.graph)
    try:
        return _fuse(model)
    except _MALFORMED as e:
        raise ValueError(f"malformed ONNX graph ({type(e).__name__}: {e}); check the file with onnx.checker") from e


def _fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(graph)
    report = FuseReport()
    matches: list[Match] = []
    claimed: set[int] = set()
    for node in graph.node:
        if id(node) in claimed or not is_main_candidate(index, node):
            continue
        try:
            m = infer(index, node)
        except NoMatch as e:
            report.unmatched.append((node.name or node.output[0], str(e)))
            continue
        if m is not None and not any(id(n) in claimed for n in m.nodes):
            matches.append(m)
            claimed.update(id(n) for n in m.nodes)
    matches = _drop_beside_orphan_chains(index, matches, claimed, report)

    # Rebuild the node list: each match's nodes become one node at its last node's place.
    last_of = {id(m.nodes[-1]): m for m in matches}
    members = {id(n) for m in matches for n in m.nodes}
    new_nodes = []
    for node in graph.node:
        if id(node) in last_of:
            new_nodes.append(_fused_node(last_of[id(node)]))
        elif id(node) not in members:
            new_nodes.append(node)
    retype = {m.binding[r]: r for m in matches for r in ("w", "a", "b")
              if r in m.binding and _bits(m.attrs, r) <= 4}
    _replace_nodes(graph, new_nodes)
    for i, t in enumerate(graph.initializer):
        if t.name in retype:
            graph.initializer[i].CopyFrom(retype_int4_as_int8(t))
    _drop_value_info(graph)
    if matches:
        _set_opset(out, spec.domain(), 1)
    report.fused = [{"name": m.prefix, "attrs": m.attrs} for m in matches]
    return out, report


def _drop_beside_orphan_chains(index: GraphIndex, matches: list[Match], claimed: set[int],
                               report: FuseReport) -> list[Match]:
    """Reject rank-0 matches that a broken low-rank path on the same input may belong to.

    A chain MatMul(MatMul(x, A), B) that no exact match claimed means some pattern on x was
    not exact (e.g. an op between the low-rank product and the Add). Its main product may
    then have matched as a rank-0 pattern; fusing it would fuse half a pattern.
    """
    orphans = []
    for node in index.graph.node:
        if node.op_type != "MatMul" or id(node) in claimed:
            continue
        for user in index.consumers.get(node.output[0], []):
            chain = lowrank_chain(index, user.output[0], node.input[0]) if user.op_type == "MatMul" else None
            if chain is not None and id(chain[1]) not in claimed:
                orphans.append(chain)
    keep = []
    for m in matches:
        hit = [c for c in orphans if c[0].input[0] == m.binding["x"] and m.attrs["rank"] == 0
               and _out_dim(index, c[1]) == m.attrs["out_features"]]
        if hit:
            report.unmatched.append((m.prefix, f"a low-rank path on the same input ({hit[0][1].name!r}) reaches "
                                               "the output through ops outside the pattern"))
        else:
            keep.append(m)
    for l1, _l2 in orphans:
        report.unmatched.append((l1.name or l1.output[0], "low-rank path MatMul(MatMul(x, A), B) is not "
                                                          "followed by the pattern's Add with its main MatMul"))
    return keep


def _out_dim(index: GraphIndex, matmul: onnx.NodeProto) -> int:
    kind, dq = index.const_source(matmul.input[1])
    t = index.inits[matmul.input[1] if kind == "init" else dq.input[0]]
    return int(t.dims[-1]) if t.dims else -1


def _bits(attrs: dict[str, Any], role: str) -> int:
    return attrs["weight_bits"] if role == "w" else attrs["lowrank_bits"]


def _fused_node(m: Match) -> onnx.NodeProto:
    inputs = [m.binding[r] for r in spec.input_names(m.attrs)]
    return helper.make_node(spec.op_type(), inputs, [m.binding["y"]], name=m.prefix,
                            domain=spec.domain(), **m.attrs)


def unfuse(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with every ``eora::EoraLinear`` node replaced by the canonical pattern.

    A malformed graph (hostile or corrupt file) raises ValueError, never another exception.
    """
    _check_model(model)
    _check_structure(model.graph)
    try:
        return _unfuse(model)
    except _MALFORMED as e:
        raise ValueError(f"malformed ONNX graph ({type(e).__name__}: {e}); check the file with onnx.checker") from e


def _unfuse(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: i for i, t in enumerate(graph.initializer)}
    new_nodes = []
    for node in graph.node:
        if node.domain != spec.domain() or node.op_type != spec.op_type():
            new_nodes.append(node)
            continue
        attrs = node_attrs(node)
        roles = spec.input_names(attrs)
        if len(node.input) != len(roles) or len(node.output) != 1:
            raise ValueError(f"EoraLinear node {node.name!r} has {len(node.input)} inputs and {len(node.output)} "
                             f"outputs; its attributes call for inputs {roles} and one output")
        binding = dict(zip(roles, node.input, strict=True))
        binding["y"] = node.output[0]
        for role, (dtype, shape) in spec.input_layouts(attrs).items():
            if binding[role] not in inits:
                raise ValueError(f"EoraLinear node {node.name!r}: input {role} ({binding[role]!r}) is not an "
                                 "initializer; the node takes constant weights")
            t = graph.initializer[inits[binding[role]]]
            want = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            if t.data_type != want or tuple(t.dims) != shape:
                raise ValueError(f"EoraLinear node {node.name!r}: {role} is "
                                 f"{TensorProto.DataType.Name(t.data_type)} {list(t.dims)}, the spec needs "
                                 f"{dtype} {list(shape)}")
            if role in ("w", "a", "b") and _bits(attrs, role) <= 4:
                graph.initializer[inits[t.name]].CopyFrom(retype_int8_as_int4(t))
        new_nodes.extend(make_nodes(template(attrs), binding, node.name or node.output[0]))
    _replace_nodes(graph, new_nodes)
    if not any(n.domain == spec.domain() for n in graph.node):
        kept = [o for o in out.opset_import if o.domain != spec.domain()]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    return out


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Validated spec attributes of an EoraLinear node (ValueError naming the node if bad)."""
    raw = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    try:
        return spec.validate_attrs(raw)
    except ValueError as e:
        raise ValueError(f"EoraLinear node {node.name!r}: {e}") from None


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    kept = [onnx.NodeProto() for _ in nodes]
    for dst, src in zip(kept, nodes, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(kept)


def _drop_value_info(graph: onnx.GraphProto) -> None:
    """Drop value_info of tensors no node produces any more (the pattern's intermediates)."""
    produced = {o for n in graph.node for o in n.output}
    kept = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def emit_fused(prefix: str, x: str, y: str, weights: Any) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """One fused node and its initializers for ``weights`` (:class:`pattern.LinearWeights`).

    Goes through the emitter and :func:`fuse` on a one-layer graph, so a directly fused
    export is, by construction, what fusing the unfused export gives. An ordinary float16
    Linear (weight_bits 16, rank 0, not 2:4) stays a plain MatMul, as :func:`fuse` leaves it.
    """
    from .pattern import emit, pattern_model

    a = weights.attrs
    if a["weight_bits"] == 16 and not a["rank"] and not a["sparse24"]:
        return emit(prefix, x, y, weights)  # a plain float16 MatMul: fuse() leaves it alone too
    fused_model, report = fuse(pattern_model(weights, prefix))
    if len(report.fused) != 1:
        raise RuntimeError(f"the emitted pattern of {prefix!r} did not fuse: {report.summary()}")
    node = fused_model.graph.node[0]
    node.input[0] = x
    node.output[0] = y
    return [node], list(fused_model.graph.initializer)
