"""verify.py: Polygraphy runs, saved RunResults, and the comparison figures."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_helpers import compress_llama, tiny_llama

from eora_export.config import DeployConfig
from eora_export.deploy.verify import compare_models, nll, polygraphy_command, token_windows
from eora_export.onnx.export import export_baseline_onnx, export_onnx
from eora_export.onnx.runtime import make_session


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    base = export_baseline_onnx(tiny_llama(seed=0), d / "baseline.onnx")
    none = export_onnx(compress_llama(tiny_llama(seed=0), rank=0), d / "none.onnx")
    eora = export_onnx(compress_llama(tiny_llama(seed=0), rank=32, lowrank_bits=8), d / "eora.onnx", fused=True)
    return d, base, none, eora


@pytest.fixture(scope="module")
def windows():
    tokens = np.random.RandomState(0).randint(0, 512, size=100)
    return token_windows(tokens, 16, max_windows=3)


@pytest.fixture(scope="module")
def report(exported, windows):
    d, base, none, eora = exported
    return compare_models(base, {"same": base, "none": none, "eora": eora}, windows, d / "out")


def test_token_windows():
    w = token_windows(range(50), 16)
    assert w.shape == (3, 16) and w.dtype == np.int64 and w[1, 0] == 16
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(range(5), 16)


def test_nll_matches_torch_cross_entropy():
    logits = np.random.RandomState(1).standard_normal((10, 7)).astype(np.float32)
    tokens = np.random.RandomState(2).randint(0, 7, 10)
    total, n = nll(logits, tokens)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(),
                                             torch.from_numpy(tokens[1:]), reduction="sum")
    assert n == 9 and total == pytest.approx(float(want), rel=1e-12)


def test_identical_model_agrees_exactly(report):
    same = report.models[0]
    assert same.name == "same"
    assert same.max_abs_dlogits == 0.0 and same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(report.baseline.perplexity, rel=1e-12)


def test_compressed_models_differ_and_figures_are_sane(report):
    assert [m.name for m in report.models] == ["same", "none", "eora"]
    for m in report.models[1:]:
        assert 0 < m.max_abs_dlogits < 10 and 0 < m.mean_abs_dlogits <= m.max_abs_dlogits
        assert 0.0 <= m.top1_agreement <= 1.0
        assert np.isfinite(m.perplexity) and m.perplexity > 1
    # a random model over a 512-token vocabulary is near-uniform
    assert 300 < report.baseline.perplexity < 800
    assert report.baseline.max_abs_dlogits is None
    assert "eora" in report.table()


def test_saved_results_load_in_polygraphy(report, exported, windows):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    d, _, _, eora = exported
    results = RunResults.load(report.models[2].outputs_json)
    (name, iterations), = results.items()
    assert name == "onnxrt-eora" and len(iterations) == len(windows)
    direct = make_session(eora).run(None, {"input_ids": windows[1:2]})[0]
    np.testing.assert_array_equal(np.asarray(iterations[1]["logits"]), direct)
    feeds = load_json(report.inputs_json)
    np.testing.assert_array_equal(feeds[2]["input_ids"], windows[2:3])
    stored = json.loads((d / "out" / "verify.json").read_text())
    assert stored["models"][2]["top1_agreement"] == report.models[2].top1_agreement


def _replay_paths(cmd: str) -> dict[str, str]:
    argv = shlex.split(cmd)
    assert argv[:2] == ["polygraphy", "run"] and "--trt" in argv
    return {"model": argv[2], **{flag: argv[argv.index(flag) + 1] for flag in ("--plugins", "--load-inputs", "--load-outputs")}}


def test_polygraphy_command_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cmd = polygraphy_command("fused.onnx", "/opt/libeora_plugin.so", seq_len=16)
    assert cmd.startswith(f"polygraphy run {tmp_path / 'fused.onnx'} --trt --strongly-typed --plugins /opt/libeora_plugin.so")
    for part in (f"--load-inputs {tmp_path / 'inputs.json'}", f"--load-outputs {tmp_path / 'baseline_outputs.json'}",
                 "input_ids:[1,16]"):
        assert part in cmd


def test_polygraphy_command_names_the_plugin_by_absolute_path(monkeypatch, tmp_path):
    """Polygraphy loads --plugins with ctypes.CDLL: a bare name is looked up on the library path, not here."""
    from eora_export.deploy.plugin import DEFAULT_BUILD_DIR, LIB_NAME

    monkeypatch.chdir(tmp_path)
    paths = _replay_paths(polygraphy_command("g.onnx", "build/libeora_plugin.so", inputs_json="v/in.json",
                                             baseline_outputs="v/base.json"))
    assert paths == {"model": str(tmp_path / "g.onnx"), "--plugins": str(tmp_path / "build" / "libeora_plugin.so"),
                     "--load-inputs": str(tmp_path / "v" / "in.json"), "--load-outputs": str(tmp_path / "v" / "base.json")}
    # No plugin built yet: where `eora-export build-plugin` will put it.
    assert _replay_paths(polygraphy_command("g.onnx"))["--plugins"] == str(DEFAULT_BUILD_DIR / LIB_NAME)
    assert DEFAULT_BUILD_DIR.is_absolute()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for a stand-in shared library")
def test_printed_plugin_path_loads_the_way_polygraphy_loads_it(monkeypatch, tmp_path):
    """Polygraphy's LoadPlugins runs ``ctypes.CDLL(path)`` (polygraphy/backend/trt/loader.py): from another
    folder the printed path loads, while the bare name the replay used to print does not."""
    src = tmp_path / "stub.c"
    src.write_text("int eora_stub(void) { return 7; }\n")
    lib = tmp_path / "out" / "libeora_plugin.so"
    lib.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    monkeypatch.chdir(lib.parent)  # where the user ran eora-export, the library beside the graph
    printed = _replay_paths(polygraphy_command("g.onnx", "libeora_plugin.so"))["--plugins"]
    elsewhere = tmp_path / "gpu-machine-cwd"
    elsewhere.mkdir()
    load = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).eora_stub())"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ok = subprocess.run([sys.executable, "-c", load, printed], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "7", ok.stderr
    bare = subprocess.run([sys.executable, "-c", load, "libeora_plugin.so"], cwd=lib.parent, env=env, capture_output=True,
                          text=True)
    assert bare.returncode != 0 and "libeora_plugin.so" in bare.stderr, "dlopen does not search the current folder"


def test_verify_prints_an_absolute_replay_without_a_plugin(monkeypatch, tmp_path, capsys):
    """``--verify`` with a relative --out and no plugin built: every path of the printed replay is absolute."""
    from types import SimpleNamespace

    from eora_export.deploy import graphs as deploy

    build_dir = tmp_path / "checkout" / "build" / "trt_plugins"
    monkeypatch.setattr("eora_export.deploy.plugin.DEFAULT_BUILD_DIR", build_dir)
    monkeypatch.setattr("eora_export.deploy.plugin.find_library", lambda: None)
    monkeypatch.setattr(deploy, "verify_onnx", lambda *a, **k: SimpleNamespace(table=lambda: "table"))
    monkeypatch.chdir(tmp_path)
    cfg = SimpleNamespace(out=Path("demo.eora"), seq_len=32)
    paths = deploy.onnx_paths(Path("demo.onnx"))
    deploy.run_verify(DeployConfig(), cfg, SimpleNamespace(held=None), paths)
    line = capsys.readouterr().out.splitlines()[-1].strip()
    assert _replay_paths(line) == {"model": str(tmp_path / "demo.onnx"), "--plugins": str(build_dir / "libeora_plugin.so"),
                                   "--load-inputs": str(tmp_path / "demo.eora" / "verify" / "inputs.json"),
                                   "--load-outputs": str(tmp_path / "demo.eora" / "verify" / "baseline_outputs.json")}


def _polygraphy_cli() -> str | None:
    """The polygraphy script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "polygraphy"
    return str(beside) if beside.exists() else shutil.which("polygraphy")


@pytest.mark.skipif(_polygraphy_cli() is None, reason="polygraphy CLI not installed")
def test_polygraphy_cli_replays_saved_outputs(report, exported):
    """The saved files work with the real CLI (onnxrt here; --trt on a GPU machine)."""
    _, base, _, _ = exported
    cmd = [_polygraphy_cli(), "run", str(base), "--onnxrt",
           "--load-inputs", report.inputs_json, "--load-outputs", report.baseline.outputs_json,
           "--atol", "1e-3", "--rtol", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout + done.stderr


# --------------------------------------------------------------------------- compare --trt


def _replay(path: Path) -> str:
    return polygraphy_command(path, "/x/libeora_plugin.so", inputs_json="in.json", baseline_outputs="base.json")


def test_compare_trt_without_tensorrt_names_the_replay_command(monkeypatch, tmp_path):
    from eora_export.cli.commands import _compare_trt
    from eora_export.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependency) as e:
        _compare_trt({"eora": tmp_path / "eora.onnx"}, None, _replay, tmp_path)
    msg = str(e.value)
    assert "TensorRT" in msg and "polygraphy run" in msg and "--trt" in msg and str(tmp_path / "eora.onnx") in msg
    assert "\n" not in msg


def test_compare_trt_runs_each_model_and_fails_on_a_failed_check(monkeypatch, tmp_path, capsys):
    from eora_export.cli import commands
    from eora_export.deploy import engine_build as build
    from eora_export.errors import MissingInput

    monkeypatch.setattr(build, "missing_tensorrt_reason", lambda: None)
    monkeypatch.setattr(commands.shutil, "which", lambda name: "/usr/bin/polygraphy")
    models = {"svd": tmp_path / "svd.onnx", "eora": tmp_path / "eora.onnx"}
    with pytest.raises(MissingInput, match=re.escape(f"plugin library {tmp_path / 'missing.so'} not found")):
        commands._compare_trt(models, tmp_path / "missing.so", _replay, tmp_path)
    with pytest.raises(MissingInput, match=r"plugin library /\S+/libeora_plugin\.so not found"):
        commands._compare_trt(models, None, _replay, tmp_path)
    plugin = tmp_path / "libeora_plugin.so"
    plugin.write_bytes(b"\x7fELF")
    ran = []

    def fake_run(cmd, check):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if "svd.onnx" in cmd[2] else 3)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert commands._compare_trt(models, plugin, _replay, tmp_path) == 1
    assert [c[2] for c in ran] == [str(models["svd"]), str(models["eora"])]
    assert all(c[:2] == ["polygraphy", "run"] and "--trt" in c for c in ran)
    out = capsys.readouterr().out
    assert "TensorRT svd: matches" in out and "TensorRT eora: check FAILED (polygraphy exit 3)" in out
    ran.clear()
    assert commands._compare_trt({"svd": models["svd"]}, plugin, _replay, tmp_path) == 0
