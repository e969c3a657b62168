"""Graphs from a finished folder: EoraLinear rebuilt from quantization.safetensors, the
``eora-export export`` subcommand, and streamed runs straight to X.onnx / X.plan / Triton."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from eora_export.cli import main
from eora_export.config import RunConfig
from eora_export.deploy.graphs import onnx_paths, write_onnx
from eora_export.engine import run
from eora_export.errors import MissingDependency, MissingInput, UsageError
from eora_export.folder import FolderResult, LazyLlama, load_modules

RANK, GROUP = 8, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(model_dir: Path, out: Path, **kw) -> RunConfig:
    calib = str(model_dir / "calib.txt")
    return RunConfig(model=str(model_dir), out=out, rank=RANK, group_size=GROUP, calib=[calib], eval_file=calib,
                     calib_samples=8, eval_samples=2, seq_len=32, compare=False, sweep_ranks=[RANK], batch_size=4, **kw)


def _cli_flags(model_dir: Path) -> list[str]:
    """The CLI spelling of :func:`_cfg`."""
    calib = str(model_dir / "calib.txt")
    return ["--model", str(model_dir), "--rank", str(RANK), "--group-size", str(GROUP), "--calib", calib, "--eval-file", calib,
            "--calib-samples", "8", "--eval-samples", "2", "--seq-len", "32", "--no-compare", "--sweep-ranks", str(RANK),
            "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory):
    """(cfg, RunResult) of one in-memory run with its output folder written (2:4 + INT4: every storage path)."""
    cfg = _cfg(tiny_model_dir, tmp_path_factory.mktemp("run") / "out", sparsity="magnitude")
    result = run(cfg, progress=False)
    return cfg, result


def _graph_tensors(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _assert_same_graph(a: Path, b: Path) -> None:
    ma, mb = onnx.load(str(a), load_external_data=False), onnx.load(str(b), load_external_data=False)
    assert [(n.op_type, list(n.input), list(n.output)) for n in ma.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in mb.graph.node]
    ta, tb = _graph_tensors(a), _graph_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), k


def test_folder_rebuilds_every_eoralinear_bit_for_bit(finished):
    cfg, result = finished
    rebuilt = dict(load_modules(cfg.out / "base"))
    assert rebuilt.keys() == result.modules.keys()
    adapter = load_file(cfg.out / "adapter" / "adapter_model.safetensors")
    for name, res in result.modules.items():
        mod, got = res.module, rebuilt[name]
        assert got.rank == mod.rank == RANK and got.sparse24 == mod.sparse24
        for attr in ("weight_q", "a_q", "b_q"):
            want, have = getattr(mod, attr), getattr(got, attr)
            assert (have.bits, have.group_size) == (want.bits, want.group_size), (name, attr)
            assert torch.equal(have.q, want.q) and torch.equal(have.scale, want.scale), (name, attr)
        # The adapter's fp16 values are exactly the codes times the scales.
        assert torch.equal(adapter[f"base_model.model.{name}.lora_A.weight"], got.a_q.dequantize())
        assert torch.equal(adapter[f"base_model.model.{name}.lora_B.weight"], got.b_q.dequantize())


def test_folder_export_writes_the_in_memory_graphs(finished, tmp_path):
    cfg, result = finished
    mem = write_onnx(result, tmp_path / "mem" / "m.onnx")
    folder = FolderResult(cfg.out, result.model_path)
    got = write_onnx(folder, tmp_path / "folder" / "f.onnx")
    for a, b in zip((mem.fused, mem.pattern, mem.baseline), (got.fused, got.pattern, got.baseline), strict=True):
        _assert_same_graph(a, b)
        assert Path(str(b) + ".data").is_file(), "a folder export streams its weights to external data"
    assert sum(n.op_type == "EoraLinear" for n in onnx.load(str(got.fused), load_external_data=False).graph.node) == 14


def test_lazy_model_holds_one_block_at_a_time(finished):
    cfg, _ = finished
    lazy = LazyLlama(cfg.out / "base", compensated=True)
    ckpt = lazy.model.layers._ckpt
    layers = iter(lazy.model.layers)
    first = next(layers)
    assert type(first.mlp.down_proj).__name__ == "EoraLinear"
    peak = len(ckpt.live)
    del first
    second = next(layers)
    assert len(ckpt.live) <= peak, "block 0 outlived its turn"
    assert type(second.self_attn.q_proj).__name__ == "EoraLinear"


def test_export_subcommand(finished, tmp_path, capsys):
    cfg, result = finished
    out = tmp_path / "sub" / "model.onnx"
    assert main(["export", str(cfg.out), "--out", str(out)]) == 0
    paths = onnx_paths(out)
    assert paths.fused.is_file() and paths.pattern.is_file() and paths.baseline.is_file()
    ref = write_onnx(result, tmp_path / "ref" / "r.onnx")
    _assert_same_graph(ref.fused, paths.fused)


@pytest.mark.parametrize("argv, code, needle", [
    (["export", "{missing}", "--out", "{tmp}/x.onnx"], MissingInput.exit_code, "not a folder"),
    (["export", "{folder}", "--out", "{tmp}/x"], UsageError.exit_code, "names no deployable output"),
    (["export", "{tmp}", "--out", "{tmp}/x.onnx"], MissingInput.exit_code, "quantization.json"),
    (["export", "{folder}", "--out", "{tmp}/x.onnx", "--model", "{missing}"], MissingInput.exit_code, "not"),
])
def test_export_subcommand_errors_are_one_line(finished, tmp_path, capsys, argv, code, needle):
    cfg, _ = finished
    argv = [a.format(missing=tmp_path / "nope", tmp=tmp_path, folder=cfg.out) for a in argv]
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("eora-export: error:") and needle in err[0], err
    assert not (tmp_path / "x.onnx").exists()


def test_export_needs_factor_codes_from_this_version(finished, tmp_path, capsys):
    """A folder whose quantization.safetensors lacks the factor codes is refused in one line."""
    cfg, _ = finished
    old = tmp_path / "old"
    shutil.copytree(cfg.out, old)
    from safetensors.torch import save_file

    q = load_file(old / "base" / "quantization.safetensors")
    save_file({k: v for k, v in q.items() if ".lora_" not in k}, str(old / "base" / "quantization.safetensors"))
    assert main(["export", str(old), "--out", str(tmp_path / "x.onnx")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no factor codes" in err[0]


def test_streamed_run_writes_the_same_graph_as_the_in_memory_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    flags = _cli_flags(tiny_model_dir)
    assert main([*flags, "--out", str(tmp_path / "mem" / "m.onnx")]) == 0
    assert main([*flags, "--stream", "--stream-act-dtype", "float32", "--out", str(tmp_path / "st" / "s.onnx")]) == 0
    _assert_same_graph(tmp_path / "mem" / "m.onnx", tmp_path / "st" / "s.onnx")
    report = json.loads((tmp_path / "st" / "s.eora" / "report.json").read_text())
    assert report["engine"]["streamed"]


def test_streamed_plan_without_tensorrt_leaves_a_build_script(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    lib = tmp_path / "libeora_plugin.so"
    lib.write_bytes(b"\x7fELF stand-in")
    plan = tmp_path / "out" / "engine.plan"
    code = main([*_cli_flags(tiny_model_dir), "--stream", "--plugin-lib", str(lib), "--out", str(plan)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eora-export:")]
    assert code == MissingDependency.exit_code and len(err) == 1 and "bash" in err[0], err
    assert not plan.exists()
    assert plan.with_suffix(".build.sh").is_file() and plan.with_suffix(".onnx").is_file()
    assert Path(str(plan.with_suffix(".onnx")) + ".data").is_file()


@pytest.mark.parametrize("extra, needle", [(["--format", "trtllm", "--out", "{tmp}/t"], "not streamed"),
                                           (["--verify", "--out", "{tmp}/v.onnx"], "--verify")])
def test_streaming_refuses_what_it_cannot_stream(tiny_model_dir, tmp_path, capsys, extra, needle):
    extra = [a.format(tmp=tmp_path) for a in extra]
    assert main([*_cli_flags(tiny_model_dir), "--stream", *extra]) == UsageError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert list(tmp_path.iterdir()) == []
