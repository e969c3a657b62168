"""The one engine, streamed and in memory (issues #8, #15), on a tiny random Llama saved as 2
shards + index.

Checks: for every method, --stream gives outputs identical to the in-memory run (same
flags); a run killed after block 0 and resumed equals an uninterrupted run; the loader never
holds more than one block's tensors; the writers make standard safetensors files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eora_export.checkpoint import StreamingCheckpoint, count_parameters
from eora_export.config import RunConfig
from eora_export.engine import run
from eora_export.engine.state import MANIFEST
from eora_export.errors import UsageError
from eora_export.safetensors_io import SafetensorsWriter, ShardedWriter

# A Llama decoder layer holds 7 Linear weights and 2 RMSNorm weights (no biases).
TENSORS_PER_BLOCK = 9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Crash(RuntimeError):
    """Stands in for a kill between blocks."""


@pytest.fixture(scope="module")
def sharded_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The shared tiny model re-saved as two shards (embed + block 0 | block 1 + head) with an index."""
    out = tmp_path_factory.mktemp("sharded") / "model"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(tiny_model_dir / "model.safetensors")
    first = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    second = {k: v for k, v in state.items() if k not in first}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, part in zip(names, (first, second), strict=True):
        save_file(part, str(out / name), metadata={"format": "pt"})
    wmap = {k: names[0] for k in first} | {k: names[1] for k in second}
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    return out


def _cfg(model_dir: Path, out: Path, **kw) -> RunConfig:
    calib = str(model_dir / "calib.txt")
    return RunConfig(
        model=str(model_dir),
        out=out,
        rank=8,
        calib=[calib],
        eval_file=calib,
        calib_samples=8,
        eval_samples=2,
        seq_len=32,
        group_size=64,
        batch_size=4,
        **({"compare": False, "sweep_ranks": [8]} | kw),
    )


@pytest.fixture(scope="module")
def in_memory(sharded_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    cfg = _cfg(sharded_dir, tmp_path_factory.mktemp("mem") / "out")
    return cfg.out, run(cfg, progress=False).report


def _all_tensors(folder: Path, rel: str) -> dict[str, torch.Tensor]:
    """Every tensor of one output file; ``base/model`` gathers all its shards."""
    if rel == "base/model":
        files = sorted((folder / "base").glob("model*.safetensors"))
    else:
        files = [folder / rel]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_same_files(a: Path, b: Path, rels=("base/model", "base/quantization.safetensors", "adapter/adapter_model.safetensors")) -> None:
    for rel in rels:
        ta, tb = _all_tensors(a, rel), _all_tensors(b, rel)
        assert set(ta) == set(tb), (rel, sorted(set(ta) ^ set(tb))[:5])
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (rel, k)
    for rel in ("base/quantization.json", "adapter/adapter_config.json", "adapter/eora_adapter.json", "base/config.json"):
        assert (a / rel).is_file() == (b / rel).is_file(), rel
        if (a / rel).is_file():
            assert json.loads((a / rel).read_text()) == json.loads((b / rel).read_text()), rel


def test_loader_holds_one_block_at_a_time(sharded_dir: Path):
    ckpt = StreamingCheckpoint(sharded_dir)
    assert ckpt.num_layers == 2 and len(set(ckpt.weight_map.values())) == 2
    stored = {k: v for f in sorted(sharded_dir.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert count_parameters(sharded_dir) == sum(t.numel() for t in stored.values())
    layer = ckpt.load_layer(0)
    assert len(ckpt.live) == TENSORS_PER_BLOCK
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in layer.parameters())
    del layer
    assert len(ckpt.live) == 0, "a block's tensors outlived the block"
    layer = ckpt.load_layer(1)
    assert ckpt.live.peak == TENSORS_PER_BLOCK
    # The weights are the checkpoint's, upcast exactly.
    with safe_open(str(sharded_dir / ckpt.weight_map["model.layers.1.mlp.down_proj.weight"]), framework="pt") as f:
        ref = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(layer.mlp.down_proj.weight, ref.float())


def _comparable(report: dict) -> dict:
    """A report without what says where and how fast the run ran (timings, engine, --stream, --out)."""
    drop = ("timings", "engine", "table")
    config = {k: v for k, v in report["config"].items() if k not in ("stream", "out")}
    return {k: v for k, v in report.items() if k not in drop} | {"config": config}


METHOD_FLAGS = {
    "eora": {}, "svd": {}, "none": {}, "eora-fb": {},
    "lsi": {"bits": 3, "lsi_epochs": 1}, "lsi+eora": {"bits": 3, "lsi_epochs": 1},
    "eora budget": {"rank_budget": "8", "val_samples": 4},
    "eora-alt": {"sparsity": "magnitude"},
    "eora-fb-alt": {"sparsity": "sparsegpt", "quant": "gptq"},
    "eora-fb-alt budget": {"rank_budget": "8", "val_samples": 4},
}


@pytest.mark.parametrize("case", list(METHOD_FLAGS))
def test_streamed_equals_in_memory_for_every_method(sharded_dir: Path, tmp_path: Path, case: str):
    method = case.split()[0]
    kw = {"method": method, "compare": True, "sweep_ranks": [4, 8], **METHOD_FLAGS[case]}
    mem = run(_cfg(sharded_dir, tmp_path / "mem", **kw), progress=False)
    streamed = run(_cfg(sharded_dir, tmp_path / "str", stream=True, **kw), progress=False)
    assert mem.model is not None and streamed.model is None
    assert streamed.report["engine"]["streamed"] and not mem.report["engine"]["streamed"]
    rels = ("base/model", "base/quantization.safetensors") + (("adapter/adapter_model.safetensors",) if method not in ("none", "lsi") else ())
    _assert_same_files(mem.out, streamed.out, rels)
    assert _comparable(streamed.report) == _comparable(mem.report)
    assert streamed.report["table"] == mem.report["table"]
    labels = set(mem.report["perplexity"])
    assert f"compressed+{method}" in labels or method == "none"
    if method != "none":
        assert {"compressed+svd", "compressed+eora"} <= labels  # compared beside the method
    assert (mem.out / "per_layer_error.png").is_file()
    assert not (tmp_path / "str.stream-work").exists(), "the work folder should be removed after success"
    assert not list(tmp_path.glob(".mem.work-*")), "the in-memory run's work folder should be gone"


def test_streamed_run_loads_one_block_at_a_time(sharded_dir: Path, in_memory, tmp_path: Path):
    mem_out, mem_report = in_memory
    report = run(_cfg(sharded_dir, tmp_path / "out", stream=True), progress=False).report
    _assert_same_files(mem_out, tmp_path / "out")
    assert report["layers"] == mem_report["layers"]
    assert report["calibration"]["shared_grams"] == mem_report["calibration"]["shared_grams"] == 8
    assert report["engine"]["peak_live_loaded_tensors"] == TENSORS_PER_BLOCK


def test_resume_after_a_crash_equals_an_uninterrupted_run(sharded_dir: Path, in_memory, tmp_path: Path):
    mem_out, _ = in_memory
    # Default float16 activations, sequential calibration, the fast (randomized) path and a
    # sharded base: the settings where a resume could go wrong (RNG, saved states, shards).
    opts = dict(stream=True, stream_inputs="compressed", fast=True, act_dtype="float16")
    ref_cfg = _cfg(sharded_dir, tmp_path / "ref", **opts)
    run(ref_cfg, progress=False, max_shard_bytes=100_000)

    work = tmp_path / "work"
    cfg = _cfg(sharded_dir, tmp_path / "out", work_dir=work, **opts)

    def crash_after_block_0(index: int, _entry: dict) -> None:
        if index == 0:
            raise _Crash("killed")

    with pytest.raises(_Crash):
        run(cfg, progress=False, max_shard_bytes=100_000, on_block_done=crash_after_block_0)
    assert not cfg.out.exists()
    manifest = json.loads((work / MANIFEST).read_text())
    assert manifest["next_block"] == 1 and (work / "block_00000.safetensors").is_file()

    with pytest.raises(UsageError, match="other settings"):
        run(replace(cfg, rank=4, resume=True), progress=False, max_shard_bytes=100_000)

    blocks_run = []
    report = run(replace(cfg, resume=True), progress=False, max_shard_bytes=100_000,
                 on_block_done=lambda i, _e: blocks_run.append(i)).report
    assert blocks_run == [1], "resume must redo no finished block"
    assert report["engine"]["resumed_from_block"] == 1
    _assert_same_files(ref_cfg.out, cfg.out)
    assert len(list((cfg.out / "base").glob("model-*-of-*.safetensors"))) > 1
    assert (cfg.out / "base" / "model.safetensors.index.json").is_file()
    # RTN codes depend on the weights alone: identical to the in-memory pipeline's even
    # with float16, sequentially calibrated activations (the factors, lora_*, do not).
    mem_q = _all_tensors(mem_out, "base/quantization.safetensors")
    got_q = _all_tensors(cfg.out, "base/quantization.safetensors")
    assert mem_q.keys() == got_q.keys()
    weights = [k for k in mem_q if ".weight_" in k]
    assert weights and all(torch.equal(mem_q[k], got_q[k]) for k in weights)


def test_sharded_base_loads_with_transformers(sharded_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(sharded_dir, tmp_path / "out")
    run(replace(cfg, stream=True), progress=False, evaluate=False, max_shard_bytes=60_000)
    model = AutoModelForCausalLM.from_pretrained(cfg.out / "base", dtype=torch.float32)
    q = _all_tensors(cfg.out, "base/model")["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, q.float())


def test_safetensors_writer_round_trip(tmp_path: Path):
    tensors = {
        "a": torch.randn(3, 5).half(),
        "b": torch.arange(7, dtype=torch.int8),
        "c": torch.zeros(2, 4, dtype=torch.uint8),
    }
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="expected a"):
        SafetensorsWriter(tmp_path / "y.safetensors", specs).write("b", tensors["b"])
    sharded = ShardedWriter(tmp_path, specs, max_shard_bytes=16, metadata={"format": "pt"})
    for k, v in tensors.items():
        sharded.write(k, v)
    sharded.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert all(torch.equal(load_file(tmp_path / index["weight_map"][k])[k], v) for k, v in tensors.items())
