"""``eora-export inspect``: every kind of output it knows, and malformed input as one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_deploy import RANK, FakeTRT, error_lines, shared_onnx, shared_run

from eora_export.adapter import save_peft_adapter
from eora_export.cli import main
from eora_export.deploy.triton import TritonModel, write_repository
from eora_export.describe import describe, inspect_path
from eora_export.describe import detect as ins
from eora_export.errors import BadInput, MissingInput

LAYERS = 14  # 7 Linears in each of the tiny model's 2 layers


@pytest.fixture(scope="module")
def graphs(tiny_model_dir):
    return shared_onnx(tiny_model_dir)


@pytest.fixture(scope="module")
def output_dir(tiny_model_dir, tmp_path_factory) -> Path:
    _, result = shared_run(tiny_model_dir)
    out = tmp_path_factory.mktemp("inspect") / "run"
    shutil.copytree(result.out, out)
    return out


# --------------------------------------------------------------------------- ONNX


def test_fused_graph(graphs):
    info = inspect_path(graphs.fused)
    assert info["kind"] == "onnx" and info["eora_linear_nodes"] == LAYERS and info["pattern_layers"] == []
    assert info["plugin"]["versions"] == ["1"] and info["plugin"]["namespaces"] == ["eora"]
    q = next(la for la in info["fused_layers"] if la["name"].endswith("layers.0.self_attn.q_proj"))
    assert (q["in_features"], q["out_features"], q["rank"], q["weight_bits"], q["group_size"], q["sparse24"]) == (128, 128, RANK, 4, 64, 0)
    assert info["inputs"][0]["name"] == "input_ids" and info["outputs"][0]["name"] == "logits"
    assert info["initializer_bytes"] > 0 and info["external_data_bytes"] == 0
    text = describe(graphs.fused)
    assert f"fused: {LAYERS} EoraLinear node(s), plugin EoraLinear version 1 namespace eora" in text
    assert "model.layers.1.mlp.down_proj" in text


def test_pattern_and_baseline_graphs(graphs):
    info = inspect_path(graphs.pattern)
    assert info["eora_linear_nodes"] == 0 and len(info["pattern_layers"]) == LAYERS and info["near_misses"] == []
    assert {la["rank"] for la in info["pattern_layers"]} == {RANK}
    assert f"unfused: {LAYERS} EoraLinear pattern(s)" in describe(graphs.pattern)
    base = inspect_path(graphs.baseline)
    assert base["eora_linear_nodes"] == 0 and base["pattern_layers"] == []
    assert "no EoraLinear nodes or patterns" in describe(graphs.baseline)


def test_json_output(graphs):
    data = json.loads(describe(graphs.fused, as_json=True))
    assert data["kind"] == "onnx" and data["eora_linear_nodes"] == LAYERS


def _bad(path: Path, words: str) -> None:
    with pytest.raises(BadInput, match=words) as e:
        describe(path)
    assert "\n" not in str(e.value)


def test_malformed_onnx_is_a_one_line_error(graphs, tmp_path, monkeypatch):
    (tmp_path / "random.onnx").write_bytes(bytes(range(256)) * 8)
    _bad(tmp_path / "random.onnx", "not a readable ONNX model|holds no ONNX graph")
    (tmp_path / "empty.onnx").write_bytes(b"")
    _bad(tmp_path / "empty.onnx", "holds no ONNX graph")
    data = graphs.fused.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "cut.onnx", "not a readable ONNX model|holds no ONNX graph")
    monkeypatch.setattr(ins, "MAX_ONNX_BYTES", 1000)
    _bad(graphs.fused, "at most 2 GiB")


def test_external_data_may_not_leave_the_folder(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT16, [4, 4], b"\0" * 32, raw=True)
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "32")):
        w.external_data.add(key=key, value=value)
    (tmp_path / "secret.bin").write_bytes(b"\1" * 32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sub = tmp_path / "graphs"
    sub.mkdir()
    onnx.save(model, str(sub / "m.onnx"))
    info = inspect_path(sub / "m.onnx")
    assert "not a file beside the graph" in info["pattern_note"] and info["external_data_bytes"] == 32


def test_invalid_fused_node_is_reported_not_raised(graphs, tmp_path):
    model = onnx.load(str(graphs.fused))
    node = next(n for n in model.graph.node if n.op_type == "EoraLinear")
    for a in node.attribute:
        if a.name == "weight_bits":
            a.i = 5
    onnx.save(model, str(tmp_path / "bad.onnx"))
    info = inspect_path(tmp_path / "bad.onnx")
    assert info["eora_linear_nodes"] == LAYERS - 1 and len(info["invalid_fused_nodes"]) == 1
    assert "invalid EoraLinear node" in describe(tmp_path / "bad.onnx")


# --------------------------------------------------------------------------- plans


def test_plan_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"ftrt" + bytes(60))
    plan.with_suffix(".onnx").write_bytes(b"x")
    info = inspect_path(plan)
    assert info["magic_ok"] and info["engine"] is None and "needs TensorRT" in info["note"]
    assert info["beside"]["fused_onnx"] == str(plan.with_suffix(".onnx"))
    assert "TensorRT plan magic" in describe(plan)
    (tmp_path / "empty.plan").write_bytes(b"")
    _bad(tmp_path / "empty.plan", "is empty")


def test_plan_with_tensorrt_lists_bindings_and_layers(tmp_path, monkeypatch):
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "libeora_plugin.so").write_bytes(b"fake")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"ftrt-fake-engine")
    engine = inspect_path(plan)["engine"]
    assert [t["name"] for t in engine["io_tensors"]] == ["input_ids", "logits"]
    assert engine["io_tensors"][1]["shape"] == [-1, -1, 178] and engine["eora_linear_layers"] == 1
    assert trt.named("load_library") == [("load_library", str(tmp_path / "libeora_plugin.so"))]
    assert "input  input_ids INT64" in describe(plan)
    plan.write_bytes(b"not an engine")
    _bad(plan, "could not deserialize")


# --------------------------------------------------------------------------- folders


def test_output_folder(output_dir):
    info = inspect_path(output_dir)
    assert info["kind"] == "eora_output" and info["layers"] == LAYERS
    assert info["adapter"]["ranks"] == {RANK: LAYERS} and info["adapter"]["problems"] == []
    assert info["base"]["bits"] == 4 and info["base"]["layers"] == LAYERS
    text = describe(output_dir)
    assert "perplexity" in text and f"r={RANK}" in text and "quantization.safetensors" in text


def test_adapter_folder_and_layout_problems(output_dir, tmp_path):
    info = inspect_path(output_dir / "adapter")
    assert info["kind"] == "peft_adapter" and info["scaling"] == 1.0 and info["layers"] == LAYERS
    # A broken layout (A and B ranks disagree) is reported, not raised.
    a = torch.zeros(4, 8, dtype=torch.float16)
    b = torch.zeros(6, 3, dtype=torch.float16)
    from safetensors.torch import save_file

    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    save_file({"base_model.model.l.0.q_proj.lora_A.weight": a, "base_model.model.l.0.q_proj.lora_B.weight": b},
              str(bad / "adapter_model.safetensors"))
    assert any("is not [r, in] / [out, r]" in p for p in inspect_path(bad)["problems"])


def test_corrupt_json_and_safetensors(output_dir, tmp_path):
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(output_dir / "adapter", broken)
    (broken / "adapter_config.json").write_text("{not json")
    _bad(broken, "not valid JSON")
    (broken / "adapter_config.json").write_text("[1, 2]")
    _bad(broken, "not a JSON object")
    (broken / "adapter_config.json").write_text('{"r": "many", "lora_alpha": 4}')
    _bad(broken, "unexpected content")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text('{"config": [1, 2], "layers": 3}')
    _bad(tmp_path / "run", "unexpected content")
    (broken / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    _bad(broken, "not valid JSON")
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    _bad(broken, "header of 1000000000000 bytes")
    (broken / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
    _bad(broken, "header is not a JSON object")
    header = json.dumps({"t": {"dtype": "F16", "shape": [9], "data_offsets": [0, 99]}}).encode()
    (broken / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(18))
    _bad(broken, "lies past the end of the file")


def test_triton_repository(graphs, tmp_path):
    repo = tmp_path / "repo"
    write_repository(graphs.pattern, repo, TritonModel("tiny", 178, 4))
    (repo / "README.md").write_text("serve:\n    tritonserver --model-repository /x\n")
    info = inspect_path(repo)
    assert info["kind"] == "triton_repository" and info["serve"] == ["tritonserver --model-repository /x"]
    model = info["models"][0]
    assert model["config"]["schema"] and model["config"]["platform"] == "onnxruntime_onnx"
    assert model["config"]["inputs"] == [{"name": "input_ids", "dtype": "TYPE_INT64", "dims": [-1]}]
    assert list(model["versions"]["1"]) == ["model.onnx"]
    assert "platform onnxruntime_onnx, max_batch_size 4, dynamic batching on" in describe(repo)
    assert inspect_path(repo / "tiny")["kind"] == "triton_model"
    (repo / "tiny" / "config.pbtxt").write_text('name: "tiny"\nplatform: 12\n')
    _bad(repo, "not a valid Triton ModelConfig")


def test_trtllm_style_folders(output_dir, tmp_path):
    """A TRT-LLM output folder is recognised by its layout (the export itself: test_trtllm.py)."""
    import shutil

    out = tmp_path / "llm"
    shutil.copytree(output_dir / "adapter", out / "lora")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (out / "checkpoint" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A16_AWQ", "group_size": 64}}))
    shutil.copy(output_dir / "base" / "quantization.safetensors", out / "checkpoint" / "model.safetensors")
    info = inspect_path(out)
    assert info["kind"] == "trtllm_output" and info["checkpoint"]["quant_algo"] == "W4A16_AWQ"
    assert info["lora"]["r"] == RANK
    assert "checkpoint/ (LLM API)" in describe(out)


def test_unknown_things(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _bad(tmp_path / "notes.txt", "not something eora-export writes")
    (tmp_path / "folder").mkdir()
    _bad(tmp_path / "folder", "not an eora-export output folder")
    with pytest.raises(MissingInput):
        describe(tmp_path / "absent.onnx")


def test_cli(graphs, tmp_path, capsys):
    assert main(["inspect", str(graphs.fused)]) == 0
    assert "EoraLinear" in capsys.readouterr().out
    assert main(["inspect", "--json", str(graphs.fused)]) == 0
    assert json.loads(capsys.readouterr().out)["eora_linear_nodes"] == LAYERS
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 100)
    assert main(["inspect", str(tmp_path / "bad.onnx")]) == BadInput.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err == error_lines("\n".join(err))
    assert main(["inspect", str(tmp_path / "absent")]) == MissingInput.exit_code


def test_adapter_written_by_save_peft_adapter_round_trips(tmp_path, tiny_model_dir):
    _, result = shared_run(tiny_model_dir)
    save_peft_adapter({n: r.module for n, r in result.modules.items()}, tmp_path / "a", "base", {"method": "eora"})
    info = inspect_path(tmp_path / "a")
    assert info["layers"] == LAYERS and info["eora"] == {"method": "eora"}
