"""Deployable outputs on the CPU: the ``--out X.plan`` path without TensorRT or without a GPU, the
engine build against a fake TensorRT API, the Triton repository, and atomic writes.

One compression run on the tiny model is shared by this file, test_inspect.py and test_trtllm.py
(:func:`shared_run`); the CLI tests reuse it by standing in for ``engine.run`` (:func:`stand_in`).
"""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from eora_export.cli import main
from eora_export.config import RunConfig
from eora_export.deploy import engine_build as trt_build
from eora_export.deploy import graphs as deploy
from eora_export.deploy.engine_build import ShapeProfile, build_engine, trtexec_command
from eora_export.deploy.triton import TritonModel, config_pbtxt
from eora_export.engine import run
from eora_export.errors import MissingDependency

GROUP = 64  # TensorRT-LLM takes 64 or 128; the tiny model's widths are 128 and 256
RANK = 8


# --------------------------------------------------------------------------- the shared run


@functools.cache
def _shared(model_dir: str) -> tuple[RunConfig, object]:
    cfg = RunConfig(
        model=model_dir, out=Path(model_dir).parent / "shared_run.eora", rank=RANK, group_size=GROUP,
        calib=[str(Path(model_dir) / "calib.txt")], eval_file=str(Path(model_dir) / "calib.txt"),
        calib_samples=16, eval_samples=4, seq_len=64, sweep_ranks=[RANK], compare=False,
    )
    return cfg, run(cfg, progress=False)


def shared_run(model_dir: Path) -> tuple[RunConfig, object]:
    """(cfg, RunResult) of one compression of the tiny model, computed once per test session."""
    return _shared(str(model_dir))


def stand_in(result):
    """An ``engine.run`` that returns ``result`` after copying its output folder to the asked ``cfg.out``."""
    import shutil

    def fake_run(cfg, progress=True, **_kw):
        if Path(cfg.out).resolve() != Path(result.out).resolve():
            shutil.copytree(result.out, cfg.out, dirs_exist_ok=True)
        return result

    return fake_run


def cli_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """CLI flags that match the shared run, so its result is what the CLI would have computed."""
    return ["--model", str(model_dir), "--out", str(out), "--rank", str(RANK), "--group-size", str(GROUP),
            "--quiet", *extra]


@pytest.fixture
def run_cli(tiny_model_dir, monkeypatch, capsys):
    """``main(argv)`` with the shared run standing in for compute; returns (code, stdout, stderr)."""
    _, result = shared_run(tiny_model_dir)
    monkeypatch.setattr("eora_export.engine.run", stand_in(result))
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what --quiet sets, restored after the test

    def run(out: Path, *extra: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(cli_args(tiny_model_dir, out, *extra))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def debris(folder: Path) -> list[str]:
    """Temporary names atomic writers use (.name.XXXX.tmp / .old)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old")))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("eora-export:")]


# --------------------------------------------------------------------------- a fake TensorRT


class FakeTRT(types.ModuleType):
    """Just enough of the ``tensorrt`` module for build_engine (and inspect) to run; records calls."""

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 5

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class LayerInformationFormat(enum.IntEnum):
        JSON = 1

    def __init__(self, build_result: object = b"ftrt-fake-engine") -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.13.0.35"
        self.calls: list[tuple] = []
        self.build_result = build_result
        trt = self

        class Logger:
            WARNING, ERROR = 2, 1

            def __init__(self, level: int) -> None:
                self.level = level

        class Registry:
            def load_library(self, path: str) -> None:
                trt.calls.append(("load_library", path))

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"|tuned"

        class Profile:
            def set_shape(self, name, lo, opt, hi) -> None:
                trt.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

        class Config:
            cache = None

            def set_memory_pool_limit(self, pool, size) -> None:
                trt.calls.append(("workspace", pool, size))

            def add_optimization_profile(self, profile) -> None:
                trt.calls.append(("add_profile",))

            def create_timing_cache(self, data: bytes) -> Cache:
                trt.calls.append(("create_timing_cache", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> Cache:
                return self.cache

        class Builder:
            def __init__(self, logger) -> None:
                trt.calls.append(("builder",))

            def get_plugin_registry(self) -> Registry:
                return Registry()

            def create_network(self, flags: int) -> object:
                trt.calls.append(("create_network", flags))
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network, config) -> object:
                trt.calls.append(("build",))
                return trt.build_result

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                trt.calls.append(("parse", path))
                return True

        class Engine:
            num_io_tensors, num_layers, num_optimization_profiles = 2, 3, 1
            names = ("input_ids", "logits")

            def get_tensor_name(self, i: int) -> str:
                return self.names[i]

            def get_tensor_mode(self, name: str) -> str:
                return "TensorIOMode.INPUT" if name == "input_ids" else "TensorIOMode.OUTPUT"

            def get_tensor_dtype(self, name: str) -> str:
                return "DataType.INT64" if name == "input_ids" else "DataType.HALF"

            def get_tensor_shape(self, name: str) -> list[int]:
                return [-1, -1] if name == "input_ids" else [-1, -1, 178]

            def create_engine_inspector(self) -> object:
                return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps(
                    {"Layers": ["embed", "model.layers.0.self_attn.q_proj [EoraLinear]", "lm_head"]}))

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def get_plugin_registry(self) -> Registry:
                return Registry()

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                trt.calls.append(("deserialize", len(data)))
                return Engine() if data.startswith(b"ftrt") else None

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime

    def named(self, what: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == what]


@pytest.fixture
def fake_trt(monkeypatch):
    """A fake ``tensorrt`` and a visible (fake) GPU: build_engine runs end to end on the CPU."""
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return trt


@pytest.fixture
def no_tensorrt(monkeypatch):
    """``import tensorrt`` fails, whatever this machine has installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def plugin_lib(tmp_path, monkeypatch) -> Path:
    """A stand-in libeora_plugin.so (only copied and named, never loaded here)."""
    lib = tmp_path / "plugin" / "libeora_plugin.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF fake plugin")
    monkeypatch.setenv("EORA_PLUGIN_LIB", str(lib))
    return lib


# --------------------------------------------------------------------------- --out X.plan without TensorRT


def _check_build_script(script: Path, plan: Path) -> str:
    text = script.read_text()
    assert os.access(script, os.X_OK)
    want = trtexec_command(Path(plan.with_suffix(".onnx").name), Path(plan.name), None,
                           ShapeProfile(batch=(1, 1, 8), seq=(1, 128, 256)), Path(plan.with_suffix(".timing.cache").name))
    assert f'{want} --dynamicPlugins="$PLUGIN"' in text
    for flag in ("--stronglyTyped", "--minShapes=input_ids:1x1", "--optShapes=input_ids:1x128", "--maxShapes=input_ids:8x256",
                 f"--onnx={plan.stem}.onnx", f"--saveEngine={plan.name}", f"--timingCacheFile={plan.stem}.timing.cache"):
        assert flag in text, flag
    return text


def test_plan_without_tensorrt_writes_onnx_and_build_script(run_cli, no_tensorrt, plugin_lib, tmp_path):
    plan = tmp_path / "out" / "demo.plan"
    code, out, err = run_cli(plan)
    assert code == MissingDependency.exit_code == 5
    lines = error_lines(err)
    assert len(lines) == 1, err
    script = plan.with_suffix(".build.sh")
    assert "TensorRT" in lines[0] and "not installed" in lines[0] and f"bash {script}" in lines[0]
    assert not plan.exists(), "no plan may exist after a build that did not happen"
    assert script.is_file() and plan.with_suffix(".onnx").is_file()
    fused = onnx.load(str(plan.with_suffix(".onnx")))
    assert sum(n.op_type == "EoraLinear" for n in fused.graph.node) == 14
    text = _check_build_script(script, plan)
    # The plugin library travels beside the script and the script points at it.
    assert (plan.parent / "libeora_plugin.so").read_bytes() == plugin_lib.read_bytes()
    assert 'PLUGIN="$HERE/libeora_plugin.so"' in text
    # The script runs as printed, from another folder: trtexec gets the files beside it.
    args = _run_script_with_fake_trtexec(script, tmp_path)
    assert args["plugin_exists"] and args["onnx_exists"] and Path(args["cwd"]) == plan.parent
    assert args["argv"][:3] == ["--onnx=demo.onnx", "--saveEngine=demo.plan", "--stronglyTyped"]
    assert (tmp_path / "out" / "demo.eora" / "report.json").is_file()
    assert debris(plan.parent) == []
    assert "wrote" in out and str(script) in out


def _run_script_with_fake_trtexec(script: Path, tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``bash script`` from ``tmp_path`` with a trtexec that records what it was given."""
    import subprocess

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "trtexec.json"
    fake = bin_dir / "trtexec"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
plugin = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--dynamicPlugins="))
onnx = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--onnx="))
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "plugin_exists": os.path.isfile(plugin),
           "plugin": plugin, "onnx_exists": os.path.isfile(onnx)}}, open({str(record)!r}, "w"))
""")
    fake.chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    rel = os.path.relpath(script, tmp_path)
    proc = subprocess.run(["bash", rel], cwd=tmp_path, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(record.read_text())


def test_plan_without_plugin_library_points_the_script_at_the_build_folder(run_cli, no_tensorrt, monkeypatch, tmp_path):
    """No plugin here: the script takes $EORA_PLUGIN_LIB, else the absolute path `eora-export build-plugin`
    writes, never a bare name (trtexec dlopens --dynamicPlugins, which searches the library path only)."""
    build_dir = tmp_path / "checkout" / "build" / "trt_plugins"
    monkeypatch.setattr("eora_export.deploy.plugin.DEFAULT_BUILD_DIR", build_dir)
    monkeypatch.delenv("EORA_PLUGIN_LIB", raising=False)
    monkeypatch.setattr("eora_export.deploy.plugin.find_library", lambda: None)
    plan = tmp_path / "demo.plan"
    code, _, err = run_cli(plan)
    assert code == 5 and len(error_lines(err)) == 1
    script = plan.with_suffix(".build.sh")
    assert f'"${{EORA_PLUGIN_LIB:-{build_dir / "libeora_plugin.so"}}}"' in script.read_text()
    assert not (tmp_path / "libeora_plugin.so").exists() and not plan.exists()
    # Not built yet: the script stops with one line that says how to get it.
    import subprocess

    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "EORA_PLUGIN_LIB"})
    assert proc.returncode == 3 and f"no plugin library at {build_dir / 'libeora_plugin.so'}" in proc.stderr
    assert "eora-export build-plugin" in proc.stderr and len(proc.stderr.splitlines()) == 1
    # Built by build-plugin: trtexec gets its absolute path.
    build_dir.mkdir(parents=True)
    (build_dir / "libeora_plugin.so").write_bytes(b"fake")
    args = _run_script_with_fake_trtexec(script, tmp_path)
    assert args["plugin_exists"] and args["plugin"] == str(build_dir / "libeora_plugin.so")
    # A relative $EORA_PLUGIN_LIB is taken from where the script is started, not from its folder.
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / "libeora_plugin.so").write_bytes(b"fake")
    args = _run_script_with_fake_trtexec(script, tmp_path, {"EORA_PLUGIN_LIB": "libs/libeora_plugin.so"})
    assert args["plugin_exists"] and args["plugin"] == str((tmp_path / "libs" / "libeora_plugin.so").resolve())


def test_plan_message_and_script_are_absolute_for_a_relative_out(run_cli, no_tensorrt, plugin_lib, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(Path("rel") / "demo.plan")
    assert code == 5
    (line,) = error_lines(err)
    assert line.endswith(f"bash {tmp_path / 'rel' / 'demo.build.sh'}")


def test_build_engine_message_names_absolute_paths(no_tensorrt, monkeypatch, tmp_path):
    """The trtexec line in build_engine's error runs from any folder, with the plugin by absolute path."""
    import shlex

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingDependency) as e:
        build_engine(Path("m.onnx"), Path("m.plan"), Path("lib/libeora_plugin.so"), ShapeProfile(), Path("m.cache"))
    argv = shlex.split(str(e.value).split("TensorRT: ", 1)[1])
    assert argv[0] == "trtexec"
    flags = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    for flag, name in (("--onnx", "m.onnx"), ("--saveEngine", "m.plan"), ("--dynamicPlugins", "lib/libeora_plugin.so"),
                       ("--timingCacheFile", "m.cache")):
        assert flags[flag] == str(tmp_path / name), flag


def test_plan_with_tensorrt_but_no_gpu(run_cli, plugin_lib, monkeypatch, tmp_path):
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = tmp_path / "demo.plan"
    code, _, err = run_cli(plan)
    assert code == 5
    lines = error_lines(err)
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and f"bash {plan.with_suffix('.build.sh')}" in lines[0]
    assert not plan.exists() and plan.with_suffix(".onnx").is_file()
    _check_build_script(plan.with_suffix(".build.sh"), plan)
    assert trt.calls == [], "nothing may be built without a GPU"


def test_timing_cache_elsewhere_is_named_by_full_path(run_cli, no_tensorrt, plugin_lib, tmp_path):
    cache = tmp_path / "caches" / "shared.cache"
    plan = tmp_path / "out" / "demo.plan"
    code, _, _ = run_cli(plan, "--timing-cache", str(cache))
    assert code == 5
    assert f"--timingCacheFile={cache.resolve()}" in plan.with_suffix(".build.sh").read_text()


# --------------------------------------------------------------------------- build_engine against a fake TensorRT


@pytest.fixture
def fused_onnx(tiny_model_dir) -> Path:
    """The shared run's fused graph (written once per test session)."""
    return shared_onnx(tiny_model_dir).fused


@functools.cache
def _shared_onnx(model_dir: str) -> deploy.OnnxSet:
    _, result = _shared(model_dir)
    return deploy.write_onnx(result, Path(model_dir).parent / "shared_onnx" / "model.onnx")


def shared_onnx(model_dir: Path) -> deploy.OnnxSet:
    """Fused, pattern and FP16 graphs of the shared run, exported once per test session."""
    return _shared_onnx(str(model_dir))


def test_build_engine_end_to_end_with_fake_tensorrt(fake_trt, fused_onnx, plugin_lib, tmp_path):
    plan, cache = tmp_path / "model.plan", tmp_path / "model.timing.cache"
    profile = ShapeProfile(batch=(1, 2, 8), seq=(1, 64, 256))
    assert build_engine(fused_onnx, plan, plugin_lib, profile, cache) == plan
    assert plan.read_bytes() == b"ftrt-fake-engine"
    flags = fake_trt.named("create_network")
    assert flags == [("create_network", 1 << int(FakeTRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED))]
    assert fake_trt.named("load_library") == [("load_library", str(plugin_lib))]
    # The plugin is registered before the ONNX parser meets the EoraLinear nodes.
    order = [c[0] for c in fake_trt.calls]
    assert order.index("load_library") < order.index("parse") < order.index("build")
    assert fake_trt.named("parse") == [("parse", str(fused_onnx))]
    assert fake_trt.named("set_shape") == [("set_shape", "input_ids", (1, 1), (2, 64), (8, 256))]
    assert fake_trt.named("create_timing_cache") == [("create_timing_cache", b"")]
    assert cache.read_bytes() == b"|tuned"
    # A second build starts from the first build's timing cache and extends it.
    fake_trt.calls.clear()
    build_engine(fused_onnx, plan, plugin_lib, profile, cache)
    assert fake_trt.named("create_timing_cache") == [("create_timing_cache", b"|tuned")]
    assert cache.read_bytes() == b"|tuned|tuned"
    assert debris(tmp_path) == []


class _Serialized:
    """An IHostMemory stand-in that notes whether the final plan exists while it is being written."""

    def __init__(self, plan: Path, fail: bool = False) -> None:
        self.plan, self.fail, self.plan_existed = plan, fail, None

    def __bytes__(self) -> bytes:
        self.plan_existed = self.plan.exists()
        if self.fail:
            raise OSError(28, "No space left on device")
        return b"ftrt-new-engine"


def test_plan_is_written_atomically(fake_trt, fused_onnx, tmp_path):
    plan = tmp_path / "model.plan"
    fake_trt.build_result = ser = _Serialized(plan)
    build_engine(fused_onnx, plan, None, ShapeProfile(), None)
    assert ser.plan_existed is False and plan.read_bytes() == b"ftrt-new-engine"
    # A write that fails half way leaves the previous plan exactly as it was, and no temp file.
    fake_trt.build_result = ser = _Serialized(plan, fail=True)
    with pytest.raises(OSError, match="No space"):
        build_engine(fused_onnx, plan, None, ShapeProfile(), None)
    assert plan.read_bytes() == b"ftrt-new-engine" and debris(tmp_path) == []


def test_failed_build_leaves_no_plan(fake_trt, fused_onnx, tmp_path):
    fake_trt.build_result = None
    plan = tmp_path / "model.plan"
    with pytest.raises(MissingDependency, match="failed to build"):
        build_engine(fused_onnx, plan, None, ShapeProfile(), tmp_path / "c.cache")
    assert not plan.exists() and not (tmp_path / "c.cache").exists() and debris(tmp_path) == []


def test_parse_failure_is_one_line(fake_trt, fused_onnx, tmp_path, monkeypatch):
    class BadParser(fake_trt.OnnxParser):
        num_errors = 2

        def parse_from_file(self, path: str) -> bool:
            return False

        def get_error(self, i: int) -> str:
            return f"No importer registered for op: EoraLinear ({i})"

    monkeypatch.setattr(fake_trt, "OnnxParser", BadParser)
    with pytest.raises(MissingDependency) as e:
        build_engine(fused_onnx, tmp_path / "m.plan", None)
    assert "\n" not in str(e.value) and "EoraLinear" in str(e.value)
    assert not (tmp_path / "m.plan").exists()


def test_bad_profile_is_refused_before_anything_runs(fake_trt, fused_onnx, tmp_path):
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_engine(fused_onnx, tmp_path / "m.plan", None, ShapeProfile(seq=(1, 2048, 1024)))
    assert fake_trt.calls == []


def test_plan_via_cli_with_fake_tensorrt(run_cli, fake_trt, plugin_lib, tmp_path):
    plan = tmp_path / "demo.plan"
    code, out, err = run_cli(plan, "--max-batch", "4", "--max-seq", "128", "--opt-seq", "32")
    assert code == 0, err
    assert plan.read_bytes() == b"ftrt-fake-engine" and f"engine: {plan}" in out
    assert fake_trt.named("set_shape") == [("set_shape", "input_ids", (1, 1), (1, 32), (4, 128))]
    assert plan.with_suffix(".timing.cache").is_file() and not plan.with_suffix(".build.sh").exists()


def test_missing_tensorrt_reason_branches(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert "not installed" in trt_build.missing_tensorrt_reason()
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in trt_build.missing_tensorrt_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trt_build.missing_tensorrt_reason() is None


# --------------------------------------------------------------------------- Triton


def _model_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("platform", ["tensorrt_plan", "onnxruntime_onnx"])
def test_config_pbtxt_follows_tritons_schema(platform):
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = _model_config(config_pbtxt(TritonModel("eora_llm", 32000, 8), platform))
    assert cfg.name == "eora_llm" and cfg.platform == platform and cfg.max_batch_size == 8
    (inp,), (out,) = cfg.input, cfg.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input_ids", pb.TYPE_INT64, [-1])
    assert (out.name, out.data_type, list(out.dims)) == ("logits", pb.TYPE_FP16, [-1, 32000])
    assert cfg.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb.ModelInstanceGroup.KIND_GPU)]


def test_triton_repository_without_tensorrt_serves_the_pattern_on_onnxruntime(run_cli, no_tensorrt, plugin_lib, tiny_model_dir,
                                                                             monkeypatch, tmp_path):
    import onnxruntime as ort
    from tritonclient.grpc import model_config_pb2 as pb

    repo = tmp_path / "repo"
    monkeypatch.chdir(tmp_path)  # a relative --out: the printed commands still name absolute paths
    code, out, err = run_cli(Path("repo"), "--format", "triton", "--triton-name", "tiny")
    assert code == 0, err
    cfg = _model_config((repo / "tiny" / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    vocab = shared_run(tiny_model_dir)[1].model.config.vocab_size
    assert list(cfg.output[0].dims) == [-1, vocab] and cfg.output[0].data_type == pb.TYPE_FP16
    model_file = repo / "tiny" / "1" / "model.onnx"
    graph = onnx.load(str(model_file))
    assert not any(n.op_type == "EoraLinear" for n in graph.graph.node), "ONNX Runtime gets the unfused pattern"
    # The config's shapes are the model's: [batch, seq] int64 in, [batch, seq, vocab] fp16 out.
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input_ids": np.ones((2, 5), dtype=np.int64)})
    assert logits.shape == (2, 5, vocab) and logits.dtype == np.float16
    readme = (repo / "tiny" / "README.md").read_text()
    assert f"tritonserver --model-repository {repo}\n" in readme
    # How to get the engine: built on the serving image's TensorRT, the plugin by absolute path.
    assert f"--backend-config=tensorrt,plugins={plugin_lib}`" in readme
    assert "TensorRT is the version of the Triton image that will serve it" in readme
    assert f"serve it: tritonserver --model-repository {repo}\n" in out
    assert "note:" in err and debris(tmp_path) == []


def test_triton_repository_with_tensorrt_holds_the_plan(run_cli, fake_trt, plugin_lib, tmp_path):
    repo = tmp_path / "repo"
    code, out, err = run_cli(repo, "--format", "triton")
    assert code == 0, err
    cfg = _model_config((repo / "eora_llm" / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"
    assert (repo / "eora_llm" / "1" / "model.plan").read_bytes() == b"ftrt-fake-engine"
    assert f"--backend-config=tensorrt,plugins={plugin_lib}" in out
    assert fake_trt.named("load_library") == [("load_library", str(plugin_lib))]
    # A plan loads only under the TensorRT that built it: the config and the README say which one.
    text = (repo / "eora_llm" / "config.pbtxt").read_text()
    assert text.startswith(f"# model.plan was built with TensorRT {fake_trt.__version__}: serve it with a Triton image of "
                           "that same TensorRT version")
    readme = (repo / "eora_llm" / "README.md").read_text()
    assert f"model.plan was built with TensorRT {fake_trt.__version__}" in readme and "same TensorRT version" in readme
    assert f"tritonserver --model-repository {repo} --backend-config=tensorrt,plugins={plugin_lib}\n" in readme
    assert (tmp_path / "repo.eora" / "model.timing.cache").is_file(), "Triton builds reuse a timing cache too"


def test_triton_write_is_atomic(run_cli, no_tensorrt, monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    (repo / "eora_llm").mkdir(parents=True)
    (repo / "eora_llm" / "config.pbtxt").write_text("keep me")
    (repo / "other_model").mkdir()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("eora_export.deploy.triton.write_model_dir", broken)
    code, _, err = run_cli(repo, "--format", "triton")
    assert code == 4 and len(error_lines(err)) == 1
    # The old model folder is intact and the repository's other models are untouched.
    assert sorted(p.name for p in repo.iterdir()) == ["eora_llm", "other_model"]
    assert (repo / "eora_llm" / "config.pbtxt").read_text() == "keep me"
    assert debris(tmp_path) == []
