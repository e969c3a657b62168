"""Bad input, table-driven (GitHub issue #9): exit code, one stderr line naming the problem,
and nothing left behind (no output folder, no temporary debris).

Each case corrupts a copy of the tiny model from conftest (or passes a bad flag or file),
runs ``eora-export`` in-process through ``cli.main`` and checks the three facts. Most are
caught by ``validate.preflight`` before the model is loaded; the activation NaN case runs
until the first calibration batch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eora_export.cli import main
from eora_export.config import RunConfig
from eora_export.engine import run
from eora_export.errors import BadInput, UsageError

SHORT = "Too short for a window."


@dataclass
class Env:
    """Where one case runs: ``model`` (a copy to corrupt at will), ``out``, ``tmp``."""

    model: Path
    out: Path
    tmp: Path
    argv: dict[str, list[str]] = field(default_factory=dict)  # flag -> values (an empty list drops the flag)
    extra: list[str] = field(default_factory=list)

    def calib(self) -> Path:
        return self.model / "calib.txt"


def _base_argv(env: Env) -> list[str]:
    flags: dict[str, list[str]] = {
        "--model": [str(env.model)], "--out": [str(env.out)], "--calib": [str(env.calib())],
        "--eval-file": [str(env.calib())], "--seq-len": ["32"], "--calib-samples": ["4"], "--eval-samples": ["2"],
        "--group-size": ["64"], "--rank": ["8"], "--sweep-ranks": ["8"],
    }
    flags.update(env.argv)
    argv = []
    for flag, values in flags.items():
        for v in values:
            argv += [flag, v]
    return [*argv, "--no-compare", "--quiet", *env.extra]


# --------------------------------------------------------------------------- corruptions


def _config(env: Env, **changes) -> None:
    path = env.model / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _tensors(env: Env, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = env.model / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _set_value(name: str, value: float) -> Callable[[Env], None]:
    def mutate(env: Env) -> None:
        def edit(state):
            state[name] = state[name].clone()
            state[name].view(-1)[5] = value
        _tensors(env, edit)
    return mutate


def _fuse_qkv(env: Env) -> None:
    def edit(state):
        p = "model.layers.0.self_attn."
        state[p + "qkv_proj.weight"] = torch.cat([state.pop(p + f"{n}_proj.weight") for n in "qkv"])
    _tensors(env, edit)


def _gptq_layer(env: Env) -> None:
    def edit(state):
        state["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(16, 128, dtype=torch.int32)
    _tensors(env, edit)


def _huge_attention(env: Env) -> None:
    """Finite weights whose attention scores overflow float32: NaN activations, not NaN weights."""
    def edit(state):
        for n in ("q_proj", "k_proj"):
            key = f"model.layers.0.self_attn.{n}.weight"
            state[key] = state[key].float() * 1e30
    _tensors(env, edit)


def _truncate(env: Env) -> None:
    path = env.model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_weights(env: Env) -> None:
    (env.model / "model.safetensors").write_bytes(os.urandom(4096))


def _missing_shard(env: Env) -> None:
    state = load_file(env.model / "model.safetensors")
    (env.model / "model.safetensors").unlink()
    names = sorted(state)
    first = {k: state[k] for k in names[: len(names) // 2]}
    save_file(first, str(env.model / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    wmap = {k: "model-00001-of-00002.safetensors" if k in first else "model-00002-of-00002.safetensors" for k in names}
    (env.model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _write(name: str, data: bytes | str, flag: str = "--calib") -> Callable[[Env], None]:
    def mutate(env: Env) -> None:
        path = env.tmp / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
        env.argv[flag] = [str(path)]
    return mutate


def _argv(**flags) -> Callable[[Env], None]:
    def mutate(env: Env) -> None:
        for k, v in flags.items():
            env.argv["--" + k.replace("_", "-")] = [] if v is None else [str(x) for x in (v if isinstance(v, list) else [v])]
    return mutate


def _extra(*args: str) -> Callable[[Env], None]:
    def mutate(env: Env) -> None:
        env.extra += list(args)
    return mutate


def _out_under_file(env: Env) -> None:
    (env.tmp / "a_file").write_text("x")
    env.out = env.tmp / "a_file" / "sub"


def _out_is_file(env: Env) -> None:
    env.out.parent.mkdir(parents=True, exist_ok=True)
    env.out.write_text("keep me")


def _out_is_foreign_folder(env: Env) -> None:
    env.out.mkdir(parents=True)
    (env.out / "notes.txt").write_text("keep me")


def _out_is_model(env: Env) -> None:
    env.out = env.model


def _out_read_only(env: Env) -> None:
    parent = env.out.parent
    parent.mkdir(parents=True, exist_ok=True)
    parent.chmod(0o500)
    if os.access(parent, os.W_OK):
        parent.chmod(0o700)
        pytest.skip("running as root: chmod does not stop writes (the under-a-file case covers unwritable --out)")


def _no_disk_space(env: Env, monkeypatch) -> None:
    import eora_export.validate as validate

    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))


def _rm(*names: str) -> Callable[[Env], None]:
    def mutate(env: Env) -> None:
        for n in names:
            (env.model / n).unlink()
    return mutate


def _rewrite(name: str, text: str) -> Callable[[Env], None]:
    def mutate(env: Env) -> None:
        (env.model / name).write_text(text)
    return mutate


# id, mutation, exit code, words the one stderr line must hold
CASES: list[tuple[str, Callable, int, tuple[str, ...]]] = [
    # usage (2)
    ("rank-zero", _argv(rank=0), 2, ("--rank", "positive")),
    ("rank-negative", _argv(rank=-4), 2, ("--rank", "positive")),
    ("rank-odd", _argv(rank=5), 2, ("--rank 5", "odd")),
    ("sweep-rank-odd", _argv(sweep_ranks="4,7"), 2, ("--sweep-ranks 7", "odd")),
    ("sweep-rank-zero", _argv(sweep_ranks="0,4"), 2, ("--sweep-ranks", "positive")),
    ("lowrank-group-bad", _argv(lowrank_group_size=3), 2, ("--lowrank-group-size 3", "divide")),
    ("group-size-100", _argv(group_size=100), 2, ("--group-size 100", "in_features=128", "--group-size 128")),
    ("group-size-zero", _argv(group_size=0), 2, ("--group-size", "positive")),
    ("bits-5", _argv(bits=5), 2, ("--bits",)),
    ("lowrank-bits-5", _argv(lowrank_bits=5), 2, ("--lowrank-bits",)),
    ("seq-len-1", _argv(seq_len=1), 2, ("--seq-len",)),
    ("batch-size-0", _argv(batch_size=0), 2, ("--batch-size",)),
    ("unknown-flag", _extra("--bogus"), 2, ("unrecognized", "--bogus")),
    ("not-an-int", _argv(rank="lots"), 2, ("--rank", "invalid int")),
    ("only-matches-nothing", _argv(only="*.attn.*"), 2, ("--only", "matches no Linear", "model.layers.0.self_attn.q_proj")),
    ("skip-everything", _argv(skip="*"), 2, ("no Linear layers selected",)),
    ("calib-weight-zero", lambda env: env.argv.update({"--calib": [f"{env.calib()}:0"]}), 2, ("--calib", "weight", "positive")),
    ("kv-cache-needs-graph", _extra("--kv-cache"), 2, ("--kv-cache",)),
    ("format-onnx-needs-suffix", _argv(format="onnx"), 2, ("--format onnx", ".onnx")),
    ("out-under-a-file", _out_under_file, 2, ("a_file", "is a file")),
    ("out-is-a-file", _out_is_file, 2, ("existing file",)),
    ("out-is-a-foreign-folder", _out_is_foreign_folder, 2, ("other content",)),
    ("out-is-the-model", _out_is_model, 2, ("--out",)),
    ("out-read-only", _out_read_only, 2, ("cannot write",)),
    ("no-disk-space", _no_disk_space, 2, ("disk space", "free")),
    # missing input (3)
    ("model-missing", lambda env: env.argv.update({"--model": [str(env.tmp / "nope")]}), 3, ("nope", "not found")),
    ("weights-missing", _rm("model.safetensors"), 3, ("no weight files",)),
    ("shard-missing", _missing_shard, 3, ("model-00002-of-00002.safetensors", "missing")),
    ("tokenizer-missing", _rm("tokenizer.json", "tokenizer_config.json"), 3, ("no tokenizer",)),
    ("calib-missing", lambda env: env.argv.update({"--calib": [str(env.tmp / "none.txt")]}), 3, ("none.txt", "not found")),
    ("eval-file-missing", lambda env: env.argv.update({"--eval-file": [str(env.tmp / "none.txt")]}), 3, ("none.txt", "not found")),
    # bad input (4)
    ("config-missing", _rm("config.json"), 4, ("config.json",)),
    ("config-not-json", _rewrite("config.json", "{not json"), 4, ("config.json", "JSON")),
    ("config-not-object", _rewrite("config.json", "[1, 2]"), 4, ("config.json", "not an object")),
    ("architecture-unsupported", lambda env: _config(env, architectures=["GPT2LMHeadModel"]), 4,
     ("unsupported architecture", "GPT2LMHeadModel", "LlamaForCausalLM")),
    ("config-size-not-int", lambda env: _config(env, hidden_size="128"), 4, ("hidden_size", "positive integer")),
    ("config-does-not-match-weights", lambda env: _config(env, intermediate_size=512), 4, ("[512, 128]", "do not match")),
    ("config-already-quantized", lambda env: _config(env, quantization_config={"quant_method": "gptq"}), 4,
     ("already quantized", "gptq")),
    ("weights-truncated", _truncate, 4, ("model.safetensors", "truncated or corrupt")),
    ("weights-garbage", _garbage_weights, 4, ("model.safetensors", "truncated or corrupt")),
    ("weight-nan", _set_value("model.layers.1.mlp.down_proj.weight", float("nan")), 4, ("model.layers.1.mlp.down_proj", "NaN/Inf")),
    ("weight-inf-outside-linears", _set_value("model.norm.weight", float("inf")), 4, ("model.norm", "NaN/Inf")),
    ("activation-nan", _huge_attention, 4, ("NaN/Inf", "activations", "model.layers.0.self_attn.o_proj")),
    ("layer-fused-qkv", _fuse_qkv, 4, ("unsupported layers", "q_proj", "model.layers.0.self_attn.qkv_proj")),
    ("layer-already-quantized", _gptq_layer, 4, ("already quantized", "qweight")),
    ("tokenizer-broken", _rewrite("tokenizer.json", "{broken"), 4, ("tokenizer", "does not load")),
    ("calib-empty", _write("empty.txt", ""), 4, ("empty.txt", "empty")),
    ("calib-blank", _write("blank.txt", "\n\n   \n\n"), 4, ("blank.txt", "empty")),
    ("calib-binary", _write("data.bin", bytes(range(256)) * 64), 4, ("data.bin", "binary")),
    ("calib-too-short", _write("short.txt", SHORT), 4, ("short.txt", "shorter than one 32-token")),
    ("calib-jsonl-invalid", _write("bad.jsonl", '{"text": "fine"}\n{oops\n'), 4, ("bad.jsonl:2", "not valid JSON")),
    ("calib-jsonl-no-text", _write("notext.jsonl", '{"body": "no text field"}\n'), 4, ("notext.jsonl:1", "'text'")),
    ("calib-is-a-folder", lambda env: env.argv.update({"--calib": [str(env.tmp)]}), 4, ("not a file",)),
    ("eval-file-too-short", _write("short_eval.txt", SHORT, "--eval-file"), 4, ("held-out", "shorter than one 32-token")),
]


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".old")) if folder.is_dir() else []


@pytest.fixture
def quiet_transformers(monkeypatch):
    """In-process runs: tqdm and transformers were imported before --quiet set TQDM_DISABLE (which
    they read at import), so silence their bars here; test_real_process_prints_one_line runs the real thing."""
    from transformers.utils import logging as hf_logging

    from eora_export import calibration

    monkeypatch.setattr(calibration, "tqdm", lambda it, *a, **k: it)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize(("mutate", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tiny_model_dir, tmp_path, capsys, monkeypatch, quiet_transformers, mutate, code, words):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    env = Env(model=model, out=tmp_path / "outs" / "out", tmp=tmp_path)
    if mutate.__code__.co_argcount == 2:
        mutate(env, monkeypatch)
    else:
        mutate(env)
    before = {p: p.read_bytes() for p in [env.out] if p.is_file()} | {p: p.read_bytes() for p in env.out.glob("*") if p.is_file()}
    capsys.readouterr()
    try:
        got = main(_base_argv(env))
    finally:
        env.out.parent.chmod(0o700) if env.out.parent.is_dir() else None
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code, err
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("eora-export: error: "), line
    for w in words:
        assert w in line, (w, line)
    assert len(line) < 400, line
    # Nothing written: the output is as before (absent, or the user's file/folder untouched), no debris.
    for p, data in before.items():
        assert p.read_bytes() == data
    if not before and env.out != env.model:
        assert not env.out.exists()
    for folder in {env.out.parent, tmp_path / "outs", env.model}:
        assert _debris(folder) == [], folder


def test_usage_error_printed_once_under_torchrun(capsys, monkeypatch):
    """Every torchrun rank parses the same command line: rank 0 alone prints its usage error, all exit 2.
    The silent ranks wait for rank 0 to leave first (torchrun stops the rest when one exits)."""
    cli_main = sys.modules["eora_export.cli.main"]

    naps = []
    monkeypatch.setattr(cli_main.time, "sleep", naps.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines, waits in (("0", 1, []), ("1", 0, [cli_main.FOLLOWER_GRACE_S])):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        naps.clear()
        assert main(["--model", "demo", "--no-such-flag"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == lines, (rank, err)
        assert naps == waits, rank

    def stopped(seconds):  # torchrun's SIGTERM during the wait, once rank 0 has exited
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main.time, "sleep", stopped)
    assert main(["--model", "demo", "--no-such-flag"]) == 2
    assert capsys.readouterr().err.strip() == ""
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process always prints, whatever RANK says
    assert main(["--model", "demo", "--no-such-flag"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    env = Env(model=tiny_model_dir, out=tmp_path / "out", tmp=tmp_path)
    env.argv["--group-size"] = ["100"]
    with pytest.raises(UsageError, match="--group-size 100"):
        main([*_base_argv(env), "--debug"])
    env.argv["--group-size"] = ["64"]
    env.argv["--calib"] = [str(tmp_path / "short.txt")]
    (tmp_path / "short.txt").write_text(SHORT)
    with pytest.raises(BadInput, match="shorter than one"):
        main([*_base_argv(env), "--debug"])


def test_real_process_prints_one_line(tiny_model_dir, tmp_path):
    """The installed entry point, not just main(): no warnings or progress on stderr."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    env = Env(model=model, out=tmp_path / "out", tmp=tmp_path)
    _set_value("model.layers.0.self_attn.v_proj.weight", float("-inf"))(env)
    done = subprocess.run([sys.executable, "-m", "eora_export.cli", *_base_argv(env)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert "model.layers.0.self_attn.v_proj" in done.stderr and not env.out.exists()


# --------------------------------------------------------------------------- after the checks


@pytest.fixture(scope="module")
def clamped_run(tiny_model_dir, tmp_path_factory):
    """A run with --rank 200, larger than every layer of the tiny model (128 / 64 wide)."""
    calib = str(tiny_model_dir / "calib.txt")
    cfg = RunConfig(
        model=str(tiny_model_dir), out=tmp_path_factory.mktemp("clamped") / "out", rank=200, calib=[calib], eval_file=calib,
        calib_samples=4, eval_samples=2, seq_len=32, group_size=64, compare=False, sweep_ranks=[200],
    )
    return cfg, run(cfg, progress=False)


def test_rank_larger_than_a_layer_is_clamped_and_reported(clamped_run):
    cfg, result = clamped_run
    clamped = result.report["rank_clamped"]
    assert clamped["model.layers.0.self_attn.q_proj"] == 128
    assert clamped["model.layers.0.self_attn.k_proj"] == 64  # 2 kv heads x 32
    assert clamped["model.layers.1.mlp.down_proj"] == 128
    assert len(clamped) == 14  # every Linear of the tiny model is narrower than 200
    ranks = {row["name"]: row["rank"][cfg.method] for row in result.report["layers"]}
    assert ranks == clamped


def test_out_of_disk_while_writing_keeps_the_previous_output(clamped_run, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing: exit 4, one line, the earlier output intact, no debris."""
    _, result = clamped_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    (out / "base").mkdir()
    (out / "base" / "model.safetensors").write_bytes(b"old weights")

    def full_disk(report, path):
        Path(path).write_text("{partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("eora_export.engine.assemble.write_json", full_disk)
    env = Env(model=Path(result.model_path), out=out, tmp=tmp_path)
    capsys.readouterr()
    assert main(_base_argv(env)) == 4
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("eora-export:")]  # not progress bars
    assert len(err) == 1 and "No space left on device" in err[0] and "disk space" in err[0], err
    assert (out / "report.json").read_text() == '{"previous": true}'
    assert (out / "base" / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
