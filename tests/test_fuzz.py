"""Fuzzing untrusted inputs (GitHub issue #9): the ONNX fusion pass, ``inspect``, the
calibration reader and the EoRA math on hostile Gram matrices.

Malformed or hostile input must give an error the CLI reports in one line (ValueError,
an ONNX/protobuf decode error, an EoraError), never a crash (IndexError, KeyError,
TypeError, RecursionError...) or a hang. Each example runs under a wall-clock alarm, so
a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import contextlib
import math
import signal

import onnx
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_helpers import make_eora_linear

from eora_export.calibration import read_texts
from eora_export.errors import BadInput, EoraError
from eora_export.onnx.fuse import fuse, unfuse
from eora_export.onnx.pattern import LinearWeights, pattern_model

# What "an error, not a crash" means for graph input.
GRAPH_ERRORS = (ValueError, EoraError, DecodeError, onnx.checker.ValidationError)
EXAMPLE_LIMIT_S = 20  # generous: the machine may be shared; a hang takes forever
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=True)


@contextlib.contextmanager
def time_limit(seconds: float = EXAMPLE_LIMIT_S):
    """Fail (TimeoutError) if the block runs longer than ``seconds`` (main thread, POSIX)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s: a hang on hostile input")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- ONNX graphs

_CONFIGS = [
    dict(rank=8, lowrank_bits=4, lowrank_group_size=8),
    dict(rank=0),
    dict(rank=8, lowrank_bits=8, lowrank_group_size=8, bias=True),
    dict(rank=8, lowrank_bits=16, weight_bits=16, sparse24=True),
]


def _valid_models() -> list[onnx.ModelProto]:
    models = []
    for i, cfg in enumerate(_CONFIGS):
        mod = make_eora_linear(64, 32, group_size=32, seed=i, **cfg)
        models.append(pattern_model(LinearWeights.from_module(mod), prefix=f"l{i}"))
    return models


VALID = _valid_models()
VALID_BYTES = [m.SerializeToString() for m in VALID]
FUSED = [fuse(m)[0] for m in VALID]


def _fuse_and_back(model: onnx.ModelProto) -> None:
    """fuse, then unfuse what came out, then unfuse the input as given: errors allowed, crashes not."""
    with time_limit():
        try:
            fused, report = fuse(model)
            report.summary()
            unfuse(fused)
        except GRAPH_ERRORS:
            pass
        try:
            unfuse(model)
        except GRAPH_ERRORS:
            pass


def _load(data: bytes) -> onnx.ModelProto | None:
    try:
        return onnx.load_from_string(data)
    except GRAPH_ERRORS:
        return None


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_into_fuse(data):
    model = _load(data)
    if model is not None:
        _fuse_and_back(model)


@FUZZ
@given(st.sampled_from(range(len(VALID_BYTES))), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
       st.one_of(st.none(), st.integers(0, 1 << 20)))
def test_mutated_bytes_of_valid_graphs_into_fuse(which, flips, cut):
    data = bytearray(VALID_BYTES[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    model = _load(bytes(data))
    if model is not None:
        _fuse_and_back(model)


# Structural mutations: each takes (graph, draw) and edits the graph in place.
def _m_op_type(g, d):
    n = d(st.sampled_from(list(g.node)))
    n.op_type = d(st.sampled_from(["MatMul", "Add", "DequantizeLinear", "Mul", "EoraLinear", "", "Identity"]))


def _m_domain(g, d):
    n = d(st.sampled_from(list(g.node)))
    n.domain = d(st.sampled_from(["", "ai.onnx", "eora", "com.microsoft", "x" * 300]))


def _m_drop_input(g, d):
    n = d(st.sampled_from(list(g.node)))
    if n.input:
        del n.input[d(st.integers(0, len(n.input) - 1))]


def _m_drop_outputs(g, d):
    n = d(st.sampled_from(list(g.node)))
    del n.output[:]


def _m_extra_io(g, d):
    n = d(st.sampled_from(list(g.node)))
    names = [t for m in g.node for t in (*m.input, *m.output)] + ["", "nope"]
    (n.input if d(st.booleans()) else n.output).append(d(st.sampled_from(names)))


def _m_rewire(g, d):
    """Point an input at any tensor name: cycles, self-loops, graph outputs, missing names."""
    n = d(st.sampled_from(list(g.node)))
    names = [t for m in g.node for t in (*m.input, *m.output)] + [i.name for i in g.initializer] + ["", "ghost"]
    if n.input:
        n.input[d(st.integers(0, len(n.input) - 1))] = d(st.sampled_from(names))


def _m_duplicate_node(g, d):
    n = d(st.sampled_from(list(g.node)))
    g.node.append(n)


def _m_drop_node(g, d):
    del g.node[d(st.integers(0, len(g.node) - 1))]


def _m_reorder(g, d):
    nodes = list(g.node)
    perm = d(st.permutations(range(len(nodes))))
    kept = [onnx.NodeProto() for _ in nodes]
    for dst, i in zip(kept, perm, strict=True):
        dst.CopyFrom(nodes[i])
    del g.node[:]
    g.node.extend(kept)


def _m_attribute(g, d):
    n = d(st.sampled_from(list(g.node)))
    name = d(st.sampled_from(["block_size", "axis", "rank", "in_features", "out_features", "group_size", "lowrank_bits",
                              "weight_bits", "sparse24", "has_bias", "plugin_version", "bogus"]))
    value = d(st.one_of(st.integers(-(1 << 62), 1 << 62), st.sampled_from([0, -1, 1, 3, 7, 16, 64, 1 << 31]),
                        st.text(max_size=8), st.lists(st.integers(-4, 4), max_size=3), st.floats(allow_nan=True)))
    keep = [a for a in n.attribute if a.name != name]
    del n.attribute[:]
    n.attribute.extend(keep)
    n.attribute.append(helper.make_attribute(name, value) if not (isinstance(value, list) and not value)
                       else helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS))


def _m_attribute_type(g, d):
    """An attribute whose declared type disagrees with its payload (as a hand-made file may have)."""
    n = d(st.sampled_from(list(g.node)))
    if n.attribute:
        a = n.attribute[d(st.integers(0, len(n.attribute) - 1))]
        a.type = d(st.sampled_from(list(onnx.AttributeProto.AttributeType.values())))


def _m_init_dims(g, d):
    t = d(st.sampled_from(list(g.initializer)))
    dims = d(st.lists(st.one_of(st.integers(-3, 70), st.sampled_from([1 << 31, 1 << 40, (1 << 63) - 1])), max_size=4))
    del t.dims[:]
    t.dims.extend(dims)


def _m_init_type(g, d):
    t = d(st.sampled_from(list(g.initializer)))
    t.data_type = d(st.sampled_from([*TensorProto.DataType.values(), 999]))


def _m_init_data(g, d):
    t = d(st.sampled_from(list(g.initializer)))
    choice = d(st.integers(0, 3))
    if choice == 0:
        t.raw_data = t.raw_data[: d(st.integers(0, max(len(t.raw_data), 1)))]
    elif choice == 1:
        t.raw_data = d(st.binary(max_size=64))
    elif choice == 2:
        t.ClearField("raw_data")
        t.int32_data.extend(d(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=8)))
    else:
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        for k, v in (("location", d(st.sampled_from(["/dev/zero", "../../etc/passwd", "missing.bin", ""]))),
                     ("offset", str(d(st.integers(0, 1 << 40)))), ("length", str(d(st.integers(0, 1 << 40))))):
            e = t.external_data.add()
            e.key, e.value = k, v


def _m_init_name(g, d):
    t = d(st.sampled_from(list(g.initializer)))
    names = [x for n in g.node for x in (*n.input, *n.output)] + ["", "x", "y"]
    t.name = d(st.sampled_from(names))


def _m_drop_init(g, d):
    del g.initializer[d(st.integers(0, len(g.initializer) - 1))]


def _m_graph_io(g, d):
    which = d(st.sampled_from(["input", "output"]))
    vals = getattr(g, which)
    if vals and d(st.booleans()):
        del vals[:]
    else:
        names = [x for n in g.node for x in (*n.input, *n.output)] + [t.name for t in g.initializer] + ["z"]
        vals.append(helper.make_tensor_value_info(d(st.sampled_from(names)), d(st.sampled_from([1, 10, 6, 0])), None))


def _m_value_info(g, d):
    names = [x for n in g.node for x in n.output] + ["v"]
    g.value_info.append(helper.make_tensor_value_info(d(st.sampled_from(names)), d(st.sampled_from([1, 10, 0, 16])), ["a", 3]))


MUTATIONS = [_m_op_type, _m_domain, _m_drop_input, _m_drop_outputs, _m_extra_io, _m_rewire, _m_duplicate_node, _m_drop_node,
             _m_reorder, _m_attribute, _m_attribute_type, _m_init_dims, _m_init_type, _m_init_data, _m_init_name, _m_drop_init,
             _m_graph_io, _m_value_info]


def _mutate(base: onnx.ModelProto, data) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4), label="mutations"):
        if model.graph.node and model.graph.initializer:
            mutation(model.graph, lambda s: data.draw(s))
    if data.draw(st.booleans(), label="opset"):
        model.opset_import[0].version = data.draw(st.sampled_from([0, 1, 13, 20, 21, 22, 1 << 40]))
    return model


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.data())
def test_mutated_pattern_graphs_into_fuse(which, data):
    _fuse_and_back(_mutate(VALID[which], data))


@FUZZ
@given(st.sampled_from(range(len(FUSED))), st.data())
def test_mutated_fused_graphs_into_unfuse(which, data):
    _fuse_and_back(_mutate(FUSED[which], data))


def test_external_data_pointing_anywhere_is_refused_quickly():
    """A hostile initializer naming /dev/zero (endless) or a path outside the model folder."""
    for location in ("/dev/zero", "../../../../etc/passwd"):
        model = onnx.ModelProto()
        model.CopyFrom(VALID[3])  # float16 weight, read by value during matching
        t = model.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", str(1 << 40))):
            e = t.external_data.add()
            e.key, e.value = k, v
        _fuse_and_back(model)


# --------------------------------------------------------------------------- inspect


@FUZZ
@given(st.one_of(st.binary(max_size=2048), st.builds(lambda i, f: VALID_BYTES[i][: f % (len(VALID_BYTES[i]) + 1)],
                                                      st.integers(0, len(VALID_BYTES) - 1), st.integers(0, 1 << 16))),
       st.sampled_from([".onnx", ".plan", ".engine", ".json", ".safetensors", ""]))
def test_inspect_on_hostile_files(tmp_path_factory, data, suffix):
    from eora_export.describe import describe

    path = tmp_path_factory.mktemp("inspect") / f"hostile{suffix}"
    path.write_bytes(data)
    with time_limit():
        for as_json in (False, True):
            try:
                text = describe(path, as_json=as_json)
            except GRAPH_ERRORS:
                continue
            assert isinstance(text, str)


# --------------------------------------------------------------------------- calibration reader


@FUZZ
@given(st.one_of(st.binary(max_size=4096), st.text(max_size=2048).map(lambda s: s.encode("utf-8", "surrogatepass")),
                 st.lists(st.one_of(st.text(max_size=40), st.sampled_from(['{"text": "a"}', '{"text": 1}', "[]", "null", '{"text": "\\ud800"}'])),
                          max_size=20).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))),
       st.sampled_from([".txt", ".jsonl", ".json", ".md", ""]))
@example(b"[" * 100_000, ".jsonl")  # nesting deep enough to exhaust the JSON parser's recursion
@example(b'{"text": ' * 50_000, ".json")
@example(b"\xff\xfe" + "text".encode("utf-16-le"), ".txt")
@example(b'{"text": "ab\\ud800cd"}\n', ".jsonl")  # valid JSON, a lone surrogate in the text
def test_calibration_reader_on_any_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("calib") / f"calib{suffix}"
    path.write_bytes(data)
    with time_limit():
        try:
            docs = read_texts(path)
        except BadInput as e:
            assert "\n" not in str(e).strip() and str(path) in str(e)
            return
    assert docs and all(isinstance(d, str) for d in docs)
    for d in docs:
        d.encode("utf-8")  # tokenizers reject lone surrogates (TypeError): the reader must not hand them on


# --------------------------------------------------------------------------- EoRA math on hostile Grams


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.integers(1, 24), st.integers(0, 24), st.sampled_from([1e-300, 1e-150, 1e-12, 1.0, 1e12, 1e150]),
       st.sampled_from(["random", "zero", "rank1", "near-singular", "negative-rounding"]), st.booleans(), st.integers(0, 2**31))
def test_eora_on_hostile_grams_is_finite_and_never_worse(n_in, data_rank, scale, kind, fast, seed):
    from eora_export.compensate.eora import eora_factors, weighted_error

    gen = torch.Generator().manual_seed(seed)
    n_out, rank = 12, max(1, min(4, n_in))
    x = torch.randn(max(data_rank, 1), n_in, generator=gen, dtype=torch.float64)
    if kind == "zero":
        g = torch.zeros(n_in, n_in, dtype=torch.float64)
    elif kind == "rank1":
        g = x[:1].T @ x[:1]
    elif kind == "near-singular":
        q, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen, dtype=torch.float64))
        g = q @ torch.diag(torch.logspace(0, -14, n_in, dtype=torch.float64)) @ q.T
    elif kind == "negative-rounding":
        g = x.T @ x
        g = g - torch.eye(n_in, dtype=torch.float64) * 1e-14 * float(g.abs().max())
    else:
        g = x.T @ x / max(data_rank, 1)
    g = g * scale
    dw = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * 0.01
    with time_limit():
        b, a = eora_factors(dw, g, rank, fast=fast)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    before = weighted_error(dw, g)
    after = weighted_error(dw, g, b, a)
    assert math.isfinite(after)
    # The optimum is never worse than no compensation (up to rounding relative to the scale of G).
    assert after <= before + 1e-9 * max(abs(before), float(g.abs().max()) * float(dw.abs().max()) ** 2 * n_in * n_in)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fast", [False, True])
def test_eora_refuses_non_finite_grams(bad, fast):
    from eora_export.compensate.eora import eora_factors

    g = torch.eye(8, dtype=torch.float64)
    g[2, 3] = g[3, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        eora_factors(torch.randn(4, 8, dtype=torch.float64), g, 2, fast=fast)
