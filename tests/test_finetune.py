"""``eora-export finetune``: zero steps give the input back bit for bit, training lowers the loss
without touching the base, the init comparison, the building blocks, and one-line errors.

Everything runs on the tiny random Llama of conftest.py (2:4 + INT4, rank 8, 32-token windows).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eora_export.cli import main
from eora_export.compensate.apply import swapped
from eora_export.config import RunConfig
from eora_export.engine import run
from eora_export.eora_linear import EoraLinear
from eora_export.evaluate import mean_nll
from eora_export.finetune.job import FinetuneConfig, build_report, compare_inits, prepare, train_from
from eora_export.finetune.train import INITS, TrainableEora, batch_schedule, lora_init, requantize, split_windows
from eora_export.quant import quantize

SEQ = 32
FLAGS = ("--seq-len", str(SEQ), "--eval-samples", "4", "--batch-size", "4", "--quiet")


@pytest.fixture(scope="module")
def export(tiny_model_dir, tmp_path_factory) -> Path:
    """An eora-export folder of the tiny model: 2:4 + INT4 g64, EoRA rank 8, 4-bit factors."""
    out = tmp_path_factory.mktemp("ft") / "export"
    cfg = RunConfig(model=str(tiny_model_dir), out=out, rank=8, group_size=64, sparsity="magnitude",
                    calib=[str(tiny_model_dir / "calib.txt")], eval_file=str(tiny_model_dir / "calib.txt"),
                    calib_samples=16, eval_samples=4, seq_len=SEQ, sweep_ranks=[], compare=False)
    run(cfg, progress=False)
    return out


@pytest.fixture
def finetune(tiny_model_dir, export, monkeypatch, capsys):
    """``eora-export finetune`` on the tiny export; returns (code, stdout, stderr)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what --quiet sets, restored after the test

    def run(out: Path | None, *extra: str, adapter: Path | None = None, data: Path | None = None) -> tuple[int, str, str]:
        argv = ["finetune", "--model", str(tiny_model_dir), "--adapter", str(adapter or export / "adapter"),
                "--data", str(data or tiny_model_dir / "calib.txt"), *FLAGS, *extra]
        if out is not None:
            argv += ["--out", str(out)]
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _equal_tensors(a: Path, b: Path, keys=None) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    keys = set(x) if keys is None else keys
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in keys)


# --------------------------------------------------------------------------- the CLI


def test_zero_steps_give_back_the_input_adapter_bit_for_bit(finetune, export, tmp_path):
    out = tmp_path / "ft0"
    code, stdout, err = finetune(out, "--steps", "0")
    assert code == 0, err
    assert _equal_tensors(export / "adapter/adapter_model.safetensors", out / "adapter/adapter_model.safetensors")
    # The factor codes, not only their values: quantizing dequantized values again is not idempotent.
    assert _equal_tensors(export / "base/quantization.safetensors", out / "base/quantization.safetensors")
    assert _equal_tensors(export / "base/model.safetensors", out / "base/model.safetensors")
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["start"] == ppl["trained_requantized"]
    assert report["requantization"]["lowrank_bits"] == 4  # the input's, from eora_adapter.json
    meta = json.loads((out / "adapter/eora_adapter.json").read_text())
    assert meta["finetune"]["steps"] == 0 and meta["sparsity"] == "magnitude"
    assert "+ trained, 4-bit" in stdout


def test_training_lowers_the_loss_and_leaves_the_base_untouched(finetune, export, tmp_path):
    before = _digest(export / "base")
    out = tmp_path / "ft"
    code, _, err = finetune(out, "--steps", "8", "--lr", "3e-3")
    assert code == 0, err
    assert _digest(export / "base") == before  # the input folder
    assert _equal_tensors(export / "base/model.safetensors", out / "base/model.safetensors")  # W_c as written
    q_in = load_file(str(export / "base/quantization.safetensors"))
    weight_keys = {k for k in q_in if ".weight" in k}
    assert weight_keys and _equal_tensors(export / "base/quantization.safetensors", out / "base/quantization.safetensors", weight_keys)
    assert not _equal_tensors(export / "adapter/adapter_model.safetensors", out / "adapter/adapter_model.safetensors")
    report = json.loads((out / "report.json").read_text())
    loss = report["loss"]
    assert loss["steps"] == 8 and len(loss["curve"]) == 8
    assert loss["train_nll_after"] < loss["train_nll_before"]
    assert loss["last_mean"] < loss["first_mean"]
    assert all(math.isfinite(v) for v in report["perplexity"].values())
    assert (out / "loss_curve.png").is_file()
    # The written adapter is a PEFT LoRA adapter of the same layout as the input.
    cfg_in = json.loads((export / "adapter/adapter_config.json").read_text())
    cfg_out = json.loads((out / "adapter/adapter_config.json").read_text())
    assert {k: cfg_in[k] for k in ("r", "lora_alpha", "target_modules")} == {k: cfg_out[k] for k in ("r", "lora_alpha", "target_modules")}


def test_a_fine_tuned_output_can_be_fine_tuned_again_at_other_bits(finetune, tmp_path):
    first = tmp_path / "a"
    assert finetune(first, "--steps", "2")[0] == 0
    second = tmp_path / "b"
    code, _, err = finetune(second, "--steps", "0", "--lowrank-bits", "16", adapter=first / "adapter")
    assert code == 0, err
    a, b = load_file(str(first / "adapter/adapter_model.safetensors")), load_file(str(second / "adapter/adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # 4-bit values stored as fp16: the same numbers
    layers = json.loads((second / "base/quantization.json").read_text())["layers"]
    assert {e["lowrank_bits"] for e in layers.values() if e["rank"]} == {16}


def test_compare_inits_reports_every_init(tiny_model_dir, export):
    cfg = FinetuneConfig(adapter=export / "adapter", data=tiny_model_dir / "calib.txt", model=str(tiny_model_dir), seq_len=SEQ,
                         eval_samples=4, batch_size=4, steps=4, lr=3e-3, compare_inits=True)
    session = prepare(cfg)
    run = train_from(session, "eora", progress=False, eval_at=(2,))
    rows = compare_inits(session, {"eora": run}, progress=False)
    assert list(rows) == list(INITS) and rows["eora"] is run
    assert set(run.ppl_at) == {2}
    report = build_report(session, run, rows)
    table = report["compare_inits"]
    assert set(table["rows"]) == set(INITS)
    for row in table["rows"].values():
        assert all(math.isfinite(row[k]) for k in ("ppl_start", "ppl_trained", "ppl_trained_requantized"))
        assert len(row["train_loss"]["curve"]) == 4
    # B = 0: LoRA starts as the bare compressed model; EoRA starts as the input adapter. Which init ends
    # better is not asserted: on a random tiny model compression barely moves perplexity (README has the demo).
    assert table["rows"]["lora"]["ppl_start"] == pytest.approx(session.ppl["compressed"], rel=1e-4)
    with swapped(session.model, session.start):
        adapter_ppl = math.exp(mean_nll(session.model, session.held))
    assert table["rows"]["eora"]["ppl_start"] == pytest.approx(adapter_ppl, rel=1e-5)
    assert all(init in table["table"] for init in INITS) and table["table"] in report["table"]


def test_interrupt_leaves_no_output(finetune, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("eora_export.finetune.job.train_factors", interrupted)
    out = tmp_path / "ft"
    code, _, err = finetune(out, "--steps", "3")
    assert code == 130 and "no partial output" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_onnx_output_runs_the_fine_tuned_factors(finetune, export, tmp_path):
    """--out X.onnx: the folder beside it, then graphs whose logits are the fine-tuned model's."""
    from eora_export.finetune.folders import load_adapter, load_base, start_modules
    from eora_export.models import load_model
    from eora_export.onnx.runtime import make_session

    graph = tmp_path / "ft.onnx"
    code, stdout, err = finetune(graph, "--steps", "3", "--lr", "1e-2")
    assert code == 0, err
    folder = tmp_path / "ft.eora"
    assert (folder / "adapter").is_dir() and graph.is_file() and "ONNX:" in stdout

    def torch_logits(adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
        model, _ = load_model(folder / "base")
        modules = start_modules(load_base(folder / "base"), load_adapter(adapter_dir), {})
        with swapped(model, modules), torch.no_grad():
            return model(ids).logits.float()

    ids = torch.randint(0, 150, (1, 16), generator=torch.Generator().manual_seed(0))
    session = make_session(graph.with_name("ft.pattern.onnx"))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]).float()
    tuned, before = torch_logits(folder / "adapter", ids), torch_logits(export / "adapter", ids)
    # fp16 graph vs float32 PyTorch: far closer to the fine-tuned model than the training moved it.
    assert (got - tuned).abs().mean() < 0.25 * (tuned - before).abs().mean()


def _broken_adapter(export: Path, tmp_path: Path) -> Path:
    """A copy of the adapter whose first layer's factors have the wrong width."""
    bad = tmp_path / "bad" / "adapter"
    shutil.copytree(export / "adapter", bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = state[key][:, :-2].contiguous()
    save_file(state, str(bad / "adapter_model.safetensors"))
    return bad


def _other_sparsity(export: Path, tmp_path: Path) -> Path:
    other = tmp_path / "other" / "adapter"
    shutil.copytree(export / "adapter", other)
    meta = json.loads((other / "eora_adapter.json").read_text()) | {"sparsity": "none"}
    (other / "eora_adapter.json").write_text(json.dumps(meta))
    return other


@pytest.mark.parametrize("case, exit_code, needle", [
    ("missing adapter", 3, "adapter folder"),
    ("missing base", 3, "base"),
    ("adapter of another shape", 4, "do not fit"),
    ("adapter of another compression", 4, "sparsity"),
    ("missing data", 3, "--data"),
    ("data shorter than a window", 4, "shorter than one"),
    ("negative steps", 2, "--steps"),
    ("bad lowrank bits", 2, "--lowrank-bits"),
    ("bad heldout fraction", 2, "--heldout-fraction"),
    ("trtllm", 2, "finetune writes"),
    ("out is the input", 2, "--out"),
    ("unknown flag", 2, "unrecognized"),
])
def test_bad_input_is_one_line_with_its_exit_code(finetune, export, tmp_path, case, exit_code, needle):
    out = tmp_path / "out"
    kwargs, extra = {}, []
    if case == "missing adapter":
        kwargs["adapter"] = tmp_path / "nowhere"
    elif case == "missing base":
        kwargs["adapter"] = tmp_path / "lone" / "adapter"
        shutil.copytree(export / "adapter", kwargs["adapter"])
    elif case == "adapter of another shape":
        kwargs["adapter"] = _broken_adapter(export, tmp_path)
        extra = ["--base", str(export / "base")]
    elif case == "adapter of another compression":
        kwargs["adapter"] = _other_sparsity(export, tmp_path)
        extra = ["--base", str(export / "base")]
    elif case == "missing data":
        kwargs["data"] = tmp_path / "none.txt"
    elif case == "data shorter than a window":
        kwargs["data"] = tmp_path / "short.txt"
        kwargs["data"].write_text("too short")
    elif case == "negative steps":
        extra = ["--steps", "-1"]
    elif case == "bad lowrank bits":
        extra = ["--lowrank-bits", "5"]
    elif case == "bad heldout fraction":
        extra = ["--heldout-fraction", "1"]
    elif case == "trtllm":
        extra = ["--format", "trtllm"]
    elif case == "out is the input":
        out = export
    else:
        extra = ["--no-such-flag"]
    code, _, err = finetune(out, "--steps", "1", *extra, **kwargs)
    assert code == exit_code, err
    # Other tests may have imported tqdm before --quiet could switch it off: count our lines only.
    lines = [line for line in err.splitlines() if line.startswith("eora-export:")]
    assert len(lines) == 1 and lines[0].startswith("eora-export: error:") and needle in lines[0], err
    assert "Traceback" not in err
    if case != "out is the input":
        assert not out.exists()


# --------------------------------------------------------------------------- building blocks


def test_requantize_keeps_the_codes_of_unchanged_factors_and_requantizes_trained_ones():
    torch.manual_seed(0)
    w = quantize(torch.randn(16, 32), 4, 16)
    b, a = quantize(torch.randn(16, 4) * 0.1, 4, 4), quantize(torch.randn(4, 32) * 0.1, 4, 4)
    start = {"l": EoraLinear(w, a, b)}
    layer = TrainableEora(start["l"].weight, start["l"].a, start["l"].b)
    same = requantize(start, {"l": layer}, 4)["l"]
    assert same.a_q is a and same.b_q is b
    # Round trip through values alone would not do: the re-derived fp16 scale can move by an ulp.
    with torch.no_grad():
        layer.a.add_(0.01)
    moved = requantize(start, {"l": layer}, 4)["l"]
    assert moved.a_q is not a and moved.b_q is b and moved.a_q.bits == 4
    fp16 = requantize(start, {"l": layer}, 16)["l"]
    assert fp16.lowrank_bits == 16 and torch.equal(fp16.a, layer.a.detach().half())


def test_trainable_module_computes_the_eora_op():
    torch.manual_seed(0)
    w = quantize(torch.randn(8, 16), 4, 16)
    mod = EoraLinear(w, quantize(torch.randn(2, 16), 16, 0), quantize(torch.randn(8, 2), 16, 0), bias=torch.randn(8))
    layer = TrainableEora(mod.weight, mod.a, mod.b, mod.bias)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(layer(x), mod(x), atol=1e-5)
    assert [n for n, p in layer.named_parameters()] == ["a", "b"]


def test_schedule_split_and_lora_init_are_deterministic():
    first, again = batch_schedule(10, 4, 6, seed=3), batch_schedule(10, 4, 6, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert sorted(torch.cat(first[:2]).tolist() + first[2][:2].tolist()) == list(range(10))  # an epoch covers every window once
    train, held = split_windows(torch.arange(20).reshape(10, 2), 0.25)
    assert train.shape == (7, 2) and held.shape == (3, 2) and held[0, 0] == 14
    b, a = lora_init(6, 100, 4, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 0.1 and a.shape == (4, 100)


def test_jsonl_data_splits_into_train_and_held_out_windows(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from eora_export.finetune.job import data_windows

    text = (tiny_model_dir / "calib.txt").read_text()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": text[i : i + 500]}) for i in range(0, len(text), 500)))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = FinetuneConfig(adapter=tmp_path, data=data, seq_len=SEQ, heldout_fraction=0.2, eval_samples=3)
    train, held = data_windows(cfg, tok)
    again = data_windows(cfg, tok)
    assert held.shape == (3, SEQ) and train.shape[0] >= 4 * 3 and torch.equal(train, again[0])
