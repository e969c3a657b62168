"""Every run reports perplexity and KL(fp16 ‖ model) on two held-out texts, with paired intervals,
and its summary marks differences inside the noise instead of ranking them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eora_export.config import RunConfig
from eora_export.engine import run
from eora_export.engine.report import summary_table
from eora_export.evaluate import Scores, text_report
from eora_export.report import format_accuracy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OOD = (
    "Sailing ships crossed the northern sea for centuries. Fishermen mended their nets by lamplight, "
    "and the harbour master kept a ledger of every boat that left before dawn. Storms came in autumn. "
) * 30

LABELS = {"fp16", "compressed", "compressed+svd", "compressed+eora"}


def _cfg(model_dir: Path, out: Path, ood: Path, **kw) -> RunConfig:
    calib = str(model_dir / "calib.txt")
    args = dict(model=str(model_dir), out=out, rank=8, calib=[calib], eval_file=calib, ood_file=str(ood),
                calib_samples=8, eval_samples=6, seq_len=32, group_size=64, sweep_ranks=[4, 8], batch_size=4)
    return RunConfig(**(args | kw))


@pytest.fixture(scope="module")
def ood_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ood") / "ood.txt"
    path.write_text(OOD)
    return path


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, ood_file: Path, tmp_path_factory):
    cfg = _cfg(tiny_model_dir, tmp_path_factory.mktemp("acc") / "out", ood_file)
    run(cfg, progress=False)
    return cfg, json.loads((cfg.out / "report.json").read_text())


def _check_text(text: dict, labels: set[str], windows: int) -> None:
    assert set(text["perplexity"]) == set(text["kl"]) == labels
    assert text["windows"] == windows
    assert text["kl"]["fp16"] == pytest.approx(0.0, abs=1e-9)
    for label in labels - {"fp16"}:
        assert text["kl"][label] > 0, label
    for label in labels - {"fp16", "compressed"}:
        vs = text["vs_baseline"][label]
        for key in ("nll", "kl"):
            assert vs[key]["low"] <= vs[key]["diff"] <= vs[key]["high"], (label, key)
            assert vs[key]["level"] == 0.95
        rec = text["kl_recovered"][label]
        assert rec["low"] <= rec["share"] <= rec["high"]
        assert rec["share"] == pytest.approx(1 - text["kl"][label] / text["kl"]["compressed"])
    for metric in ("kl", "perplexity"):
        line = text["ranking"][metric]
        assert set(line.replace(" ~ ", " < ").split(" < ")) == labels, line
    assert len(text["per_window"]["compressed"]["kl"]) == windows


def test_report_has_kl_and_intervals_on_both_texts(full_run):
    cfg, report = full_run
    acc = report["accuracy"]
    assert list(acc) == ["heldout", "ood"]
    assert acc["heldout"]["domain"] == "in domain" and acc["ood"]["domain"] == "out of domain"
    assert acc["ood"]["file"] == cfg.ood_file
    _check_text(acc["heldout"], LABELS, 6)
    _check_text(acc["ood"], LABELS, acc["ood"]["windows"])
    assert acc["ood"]["windows"] >= 1
    # the two texts are different text: different scores
    assert acc["ood"]["perplexity"]["fp16"] != pytest.approx(acc["heldout"]["perplexity"]["fp16"], rel=1e-3)
    assert report["perplexity"] == acc["heldout"]["perplexity"] and report["kl"] == acc["heldout"]["kl"]
    # The sweep's --rank point is the main evaluation's scores on the sweep's windows.
    assert report["sweep_reference"]["windows"] == 6
    assert report["sweep"]["eora"]["8"]["kl"] == pytest.approx(acc["heldout"]["kl"]["compressed+eora"], rel=1e-12)
    assert set(report["sweep"]["svd"]) == {"4", "8"}
    table = report["table"]
    assert "KL" in table and "in domain" in table and "out of domain" in table and "ranked by kl" in table


def test_streamed_kl_equals_in_memory_kl(tiny_model_dir: Path, ood_file: Path, tmp_path: Path):
    mem = run(_cfg(tiny_model_dir, tmp_path / "mem", ood_file, compare=False, sweep_ranks=[]), progress=False).report
    cfg = _cfg(tiny_model_dir, tmp_path / "stream", ood_file, compare=False, sweep_ranks=[], stream=True)
    streamed = run(cfg, progress=False).report
    assert list(streamed["accuracy"]) == ["heldout", "ood"]
    for name in ("heldout", "ood"):
        a, b = mem["accuracy"][name], streamed["accuracy"][name]
        assert a["windows"] == b["windows"]
        assert set(b["kl"]) == {"fp16", "compressed", "compressed+eora"}
        for label in b["kl"]:
            assert b["kl"][label] == pytest.approx(a["kl"][label], rel=1e-6, abs=1e-12), (name, label)
            assert b["perplexity"][label] == pytest.approx(a["perplexity"][label], rel=1e-9), (name, label)
        assert b["ranking"] == a["ranking"]
    assert "out of domain" in streamed["table"]


def _scores(per_window_kl: torch.Tensor, per_window_nll: torch.Tensor) -> Scores:
    return Scores(per_window_nll.double(), per_window_kl.double(), 10)


def test_summary_marks_a_tie_inside_the_noise():
    torch.manual_seed(0)
    n = 200
    hard = torch.rand(n) * 50 + 20  # windows differ a lot in difficulty; the models share it
    kl_c = torch.rand(n) + 1.0

    def noise(scale: float) -> torch.Tensor:  # exactly zero mean: "no effect" is then no effect
        z = scale * torch.randn(n)
        return z - z.mean()

    scores = {
        "fp16": _scores(torch.zeros(n), hard),
        "compressed": _scores(kl_c, hard + 0.5),
        # a real gain: KL down by ~40% on every window
        "compressed+eora": _scores(0.6 * kl_c + noise(0.1), hard + 0.3 + noise(0.05)),
        # no gain: the same KL and NLL plus noise centred on zero
        "compressed+svd": _scores(kl_c + noise(0.05), hard + 0.5 + noise(0.05)),
    }
    text = {"file": "t.txt", "domain": "in domain", **text_report(scores)}
    assert text["ranking"]["kl"] in ("fp16 < compressed+eora < compressed ~ compressed+svd",
                                     "fp16 < compressed+eora < compressed+svd ~ compressed")
    assert not text["vs_baseline"]["compressed+svd"]["kl"]["significant"]
    assert text["vs_baseline"]["compressed+eora"]["kl"]["significant"]
    rec = text["kl_recovered"]["compressed+eora"]
    assert rec["low"] < 0.4 < rec["high"] and rec["high"] - rec["low"] < 0.1
    table = format_accuracy({"heldout": text}, {"fp16": 2_000_000, "compressed": 500_000})
    svd_row = next(line for line in table.splitlines() if line.startswith("compressed+svd"))
    eora_row = next(line for line in table.splitlines() if line.startswith("compressed+eora"))
    assert svd_row.count("] ~") == 2 and "] ~" not in eora_row  # perplexity change and KL recovered
    assert " ~ " in table.split("ranked by kl:")[1].splitlines()[0]


def test_summary_without_evaluation_lists_sizes():
    report = {"accuracy": {}, "perplexity": {}, "config": {"method": "eora"},
              "sizes": {"fp16_linear_bytes": 10, "compressed_linear_bytes": 3, "factor_bytes": 1}}
    table = summary_table(report)
    assert "compressed+eora" in table and "not evaluated" in table


def test_missing_ood_file_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path, capsys):
    from eora_export.cli import main

    code = main(["--model", str(tiny_model_dir), "--calib", str(tiny_model_dir / "calib.txt"), "--eval-file",
                 str(tiny_model_dir / "calib.txt"), "--ood-file", str(tmp_path / "missing.txt"), "--seq-len", "32",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.count("\n") == 0
    assert "out-of-domain text (--ood-file)" in err and "missing.txt not found" in err


def test_accuracy_table_tool_renders_a_report(full_run):
    """tools/accuracy_table.py (the README table's generator) renders any run's report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_table", Path(__file__).parents[1] / "tools" / "accuracy_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _, report = full_run
    methods = tool.methods_of(report)
    assert methods == ("compressed+svd", "compressed+eora")
    lines = tool.rows("int4", report)
    assert len(lines) == 2 and lines[0].startswith("| INT4 RTN g128 (default) | in (6) |") and "| out (" in lines[1]
    assert all(line.count("|") == tool.header(methods).splitlines()[0].count("|") for line in lines)
