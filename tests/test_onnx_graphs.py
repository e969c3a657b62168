"""graphs/: the committed example graphs and README equal a fresh tools/gen_graphs.py run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from eora_export.onnx import spec
from eora_export.onnx.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    loader = importlib.util.spec_from_file_location("gen_graphs", ROOT / "tools" / "gen_graphs.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(gen):
    return gen.expected_files()


def test_committed_files_are_fresh(fresh):
    for path, data in fresh.items():
        assert path.exists(), f"{path} missing; run python tools/gen_graphs.py"
        if path.suffix == ".onnx":
            # compare content, not bytes: serialization may differ across protobuf versions
            assert onnx.load(str(path)).graph == onnx.ModelProto.FromString(data).graph, \
                f"{path.name} is stale; run python tools/gen_graphs.py"
        else:
            assert path.read_bytes() == data, f"{path.name} is stale; run python tools/gen_graphs.py"


def test_example_graphs_follow_the_spec():
    pattern = onnx.load(str(ROOT / "graphs" / "eora_linear_pattern.onnx"))
    fused = onnx.load(str(ROOT / "graphs" / "eora_linear_fused.onnx"))
    for m in (pattern, fused):
        onnx.checker.check_model(m, full_check=True)
    (node,) = fused.graph.node
    assert (node.domain, node.op_type) == (spec.domain(), spec.op_type())
    attrs = spec.validate_attrs({a.name: helper.get_attribute_value(a) for a in node.attribute})
    assert [i.split(".")[-1] for i in node.input[1:]] == spec.input_names(attrs)[1:]
    inits = {t.name: t for t in fused.graph.initializer}
    for role, (dtype, shape) in spec.input_layouts(attrs).items():
        t = inits[f"linear.{role}"]
        assert helper.tensor_dtype_to_np_dtype(t.data_type) == np.dtype(dtype) and tuple(t.dims) == shape
    x = np.random.RandomState(0).standard_normal((1, 4, 256)).astype(np.float16)
    y_pattern = make_session(pattern).run(None, {"x": x})[0].astype(np.float32)
    y_fused = make_session(fused).run(None, {"x": x})[0].astype(np.float32)
    np.testing.assert_allclose(y_fused, y_pattern, rtol=0, atol=4e-3)


def test_readme_lists_every_attribute_and_input():
    text = (ROOT / "graphs" / "README.md").read_text()
    for name in [*spec.attribute_names(), *spec.ALL_INPUTS]:
        assert f"| {name} |" in text
