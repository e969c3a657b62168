"""The pipeline end to end on a tiny random Llama, and its outputs."""

import json

import pytest
import torch

from eora_export.cli import main
from eora_export.compensate.apply import swapped
from eora_export.config import RunConfig
from eora_export.engine import run


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = RunConfig(
        model=str(tiny_model_dir), out=out, rank=8, calib=[str(tiny_model_dir / "calib.txt")],
        eval_file=str(tiny_model_dir / "calib.txt"), calib_samples=16, eval_samples=4, seq_len=64,
        sweep_ranks=[4, 8], group_size=64,
    )
    return cfg, run(cfg, progress=False)


def test_outputs_are_complete(tiny_run):
    cfg, _ = tiny_run
    out = cfg.out
    for name in ("report.json", "per_layer_error.png", "ppl_vs_rank.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "base/model.safetensors", "base/config.json",
                 "base/quantization.safetensors", "base/quantization.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["perplexity"]) == {"fp16", "compressed", "compressed+svd", "compressed+eora"}
    assert report["calibration"]["linears"] == 14 and report["calibration"]["shared_grams"] == 8
    assert set(report["sweep"]["eora"]) == {"4", "8"}
    for layer in report["layers"]:
        # EoRA is optimal in the activation-weighted norm before factor quantization; after
        # 4-bit factors it must still beat SVD and the uncompensated error.
        assert layer["relative_error"]["eora"] < 1.0
        assert layer["relative_error"]["eora"] <= layer["relative_error"]["svd"] * 1.02
    assert not list(out.parent.glob(".out.*")), "temporary folders left behind"


def test_adapter_reloads_with_peft_and_reproduces_logits(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, result = tiny_run
    ids = torch.randint(0, result.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    modules = {n: r.module for n, r in result.modules.items()}
    with torch.no_grad(), swapped(result.model, modules):
        expect = result.model(ids).logits
    base = AutoModelForCausalLM.from_pretrained(cfg.out / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, cfg.out / "adapter")
    with torch.no_grad():
        got = peft_model(ids).logits
    assert torch.allclose(got, expect, atol=2e-4, rtol=1e-4), (got - expect).abs().max()
    # And the adapter matters: without it the logits differ.
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(ids).logits
    assert (plain - expect).abs().max() > 1e-3


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    assert main(["--rank", "0", "--out", str(tmp_path / "o")]) == 2
    assert main(["--lowrank-bits", "5", "--out", str(tmp_path / "o")]) == 2
    assert main(["--bogus"]) == 2
    assert not (tmp_path / "o").exists()


def test_lsi_methods_run_through_the_pipeline(tiny_model_dir, tmp_path):
    """--method lsi+eora: LSI-trained weights, EoRA on top; LSI alone is reported without factors."""
    cfg = RunConfig(
        model=str(tiny_model_dir), out=tmp_path / "out", method="lsi+eora", rank=8, bits=3, calib=[str(tiny_model_dir / "calib.txt")],
        eval_file=str(tiny_model_dir / "calib.txt"), calib_samples=8, eval_samples=2, seq_len=32, sweep_ranks=[], group_size=64,
        lsi_epochs=1, compare=False,
    )
    result = run(cfg, progress=False)
    report = json.loads((cfg.out / "report.json").read_text())
    assert {"compressed", "compressed+lsi", "compressed+lsi+eora"} <= set(report["perplexity"])
    sizes = report["sizes"]
    assert sizes["factor_bytes_by_method"]["lsi"] == 0 and sizes["factor_bytes_by_method"]["lsi+eora"] == sizes["factor_bytes"] > 0
    rows = {line.split()[0]: line.split() for line in report["table"].splitlines()[2:] if line.startswith("compressed")}
    assert rows["compressed+lsi"][-1] == rows["compressed"][-1] != rows["compressed+lsi+eora"][-1]
    assert all(r.rank == 8 for r in result.modules.values())
    # The shipped weights are LSI's, not the plain quantizer's: some codes moved.
    plain = result.by_method["none"]
    assert any(not torch.equal(r.module.weight_q.q, plain[n].module.weight_q.q) for n, r in result.modules.items())
    assert (cfg.out / "adapter" / "adapter_model.safetensors").is_file()


def _small_cfg(tiny_model_dir, out, **kw) -> RunConfig:
    return RunConfig(**{
        "model": str(tiny_model_dir), "out": out, "rank": 8, "calib": [str(tiny_model_dir / "calib.txt")],
        "eval_file": str(tiny_model_dir / "calib.txt"), "calib_samples": 8, "eval_samples": 2, "seq_len": 32,
        "sweep_ranks": [], "group_size": 64, "compare": False, **kw,
    })


def test_error_feedback_method_runs_through_the_pipeline(tiny_model_dir, tmp_path):
    """--method eora-fb: every layer gets its rank and lowers its own feedback objective."""
    result = run(_small_cfg(tiny_model_dir, tmp_path / "out", method="eora-fb", ood_file="none"), progress=False)
    assert "compressed+eora-fb" in result.report["perplexity"]
    assert all(r.rank == 8 and r.error_after < r.error_before for r in result.modules.values())
    assert result.report["sizes"]["factor_bytes_by_method"]["eora-fb"] > 0
    # Through the engine's block host too, o_proj and down_proj absorb the residual stream's error:
    # block 0 up to its MLP sees no stream error yet (fits unchanged); its down_proj and every later
    # o/down absorb one (fits differ).
    from dataclasses import replace

    from eora_export.compensate.feedback import feedback_block
    from eora_export.methods import METHODS

    method = METHODS["eora-fb"]
    METHODS["eora-fb"] = replace(method, compensate=lambda i, c, r: feedback_block(i, c, r, residual=False))
    try:
        plain = run(_small_cfg(tiny_model_dir, tmp_path / "plain", method="eora-fb", ood_file="none"), progress=False)
    finally:
        METHODS["eora-fb"] = method
    for name, r in result.modules.items():
        same = torch.equal(r.module.residual_weight(), plain.modules[name].module.residual_weight())
        if name.startswith("model.layers.0.") and not name.endswith("down_proj"):
            assert same, name
        elif name.endswith(("o_proj", "down_proj")):
            assert not same, name


def test_rank_budget_spreads_ranks_within_the_bytes_of_uniform_rank(tiny_model_dir, tmp_path):
    cfg = _small_cfg(tiny_model_dir, tmp_path / "out", rank_budget="8", val_samples=4, ood_file="none")
    result = run(cfg, progress=False)
    sizes = result.report["sizes"]["factor_bytes_by_method"]
    uniform = run(_small_cfg(tiny_model_dir, tmp_path / "u", ood_file="none"), progress=False)
    assert 0 < sizes["eora"] <= uniform.report["sizes"]["factor_bytes_by_method"]["eora"]
    ranks = {r.rank for r in result.modules.values()}
    assert all(r % 8 == 0 for r in ranks)
    # Every layer with factors lowers its own error (rank 0 where validation showed no gain: never worse).
    assert all(r.error_after < r.error_before for r in result.modules.values() if r.rank)
    # Error feedback at the allocated ranks: the same ranks, the same bytes.
    fb = run(_small_cfg(tiny_model_dir, tmp_path / "fb", method="eora-fb", rank_budget="8", val_samples=4,
                            ood_file="none"), progress=False)
    assert {n: r.rank for n, r in fb.modules.items()} == {n: r.rank for n, r in result.modules.items()}
    assert fb.report["sizes"]["factor_bytes_by_method"]["eora-fb"] == sizes["eora"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--rank-budget", "lots"], "--rank-budget 'lots'"),
    (["--rank-budget", "32", "--method", "svd"], "use it with --method eora or eora-fb"),
    (["--rank-budget", "32", "--val-samples", "0"], "--val-samples must be positive"),
])
def test_rank_budget_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    assert main([*flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_method_worse_than_no_compensation_is_flagged(tiny_model_dir, tmp_path, caplog):
    """The never-worse rule on the validation split, with a method registered for this test only
    (a new method is its own code plus one registration): factors that add noise make the model
    worse than compressed alone, and the run says so in one warning and in the report."""
    from dataclasses import replace

    from eora_export.compensate.apply import LayerResult
    from eora_export.compensate.layerwise import layerwise
    from eora_export.methods import METHODS, Method, register

    svd = layerwise("svd")

    def noisy(inputs, comp, ranks):
        out = svd(inputs, replace(comp, lowrank_bits=16), ranks)
        gen = torch.Generator().manual_seed(0)
        for res in out.values():
            res.module.b_q.q.add_(torch.randn(res.module.b_q.q.shape, generator=gen).to(res.module.b_q.q.dtype) * 50)
        return {n: LayerResult(r.module, r.rank, r.error_before, r.error_after) for n, r in out.items()}

    register(Method("noisy-test", "factors plus noise (test only)", noisy))
    try:
        cfg = _small_cfg(tiny_model_dir, tmp_path / "out", method="noisy-test", ood_file="none", val_samples=4)
        with caplog.at_level("WARNING", logger="eora_export"):
            report = run(cfg, progress=False).report
    finally:
        METHODS.pop("noisy-test")
    val = report["validation"]
    assert val["windows"] == 4 and val["worse_than_uncompensated"]
    assert val["kl"]["compressed+noisy-test"] > val["kl"]["compressed"]
    warnings = [r.getMessage() for r in caplog.records if "worse than no compensation" in r.getMessage()]
    assert len(warnings) == 1 and "--method noisy-test" in warnings[0]
    assert warnings[0].endswith("try a higher --rank or --method eora-fb-alt")
    # and a method that helps is not flagged
    good = run(_small_cfg(tiny_model_dir, tmp_path / "good", ood_file="none", val_samples=4), progress=False).report
    assert not good["validation"]["worse_than_uncompensated"]


@pytest.mark.parametrize("sparsity", ["magnitude", "sparsegpt"])
def test_alternating_eora_is_never_behind_eora_and_keeps_2_4(tiny_model_dir, tmp_path, sparsity):
    """--method eora-alt: per layer the best of plain EoRA and the rounds that re-compress W − BA,
    so its fitted error is never above EoRA's; the re-compressed weights stay 2:4 and differ."""
    from eora_export.compress.sparse24 import is_24

    cfg = _small_cfg(tiny_model_dir, tmp_path / "out", method="eora-alt", sparsity=sparsity, compare=True, ood_file="none")
    result = run(cfg, progress=False)
    rows = result.report["layers"]
    assert all(r["error_after"]["eora-alt"] <= r["error_after"]["eora"] * (1 + 1e-9) for r in rows)
    assert sum(r["error_after"]["eora-alt"] < 0.99 * r["error_after"]["eora"] for r in rows) >= len(rows) // 2
    alt, plain = result.by_method["eora-alt"], result.by_method["none"]
    assert all(is_24(r.module.weight_q.q) for r in alt.values())
    assert any(not torch.equal(r.module.weight_q.q, plain[n].module.weight_q.q) for n, r in alt.items())


def test_factor_rounding_in_the_fitted_metric_is_never_worse_and_recorded(tiny_model_dir, tmp_path):
    """--lowrank-quant gptq (default) vs rtn: the same factor format, per layer EoRA's fitted error
    never above rtn's and below it on most layers; the setting is recorded with the adapter."""
    runs = {q: run(_small_cfg(tiny_model_dir, tmp_path / q, lowrank_quant=q, ood_file="none", compare=True), progress=False)
            for q in ("gptq", "rtn")}
    gq, rtn = (runs[q].by_method["eora"] for q in ("gptq", "rtn"))
    assert all(gq[n].error_after <= rtn[n].error_after * (1 + 1e-9) for n in gq)
    assert sum(gq[n].error_after < 0.999 * rtn[n].error_after for n in gq) > len(gq) // 2
    for n in gq:
        assert (gq[n].module.a_q.bits, gq[n].module.a_q.group_size) == (rtn[n].module.a_q.bits, rtn[n].module.a_q.group_size)
    for q in runs:
        assert json.loads((tmp_path / q / "adapter" / "eora_adapter.json").read_text())["lowrank_quant"] == q
    # The SVD baseline is activation-blind either way.
    svd = {q: runs[q].by_method["svd"] for q in runs}
    assert all(torch.equal(svd["gptq"][n].module.a_q.q, svd["rtn"][n].module.a_q.q) for n in svd["gptq"])


@pytest.mark.parametrize("flags", [{"quant": "awq"}, {"quant": "none", "sparsity": "magnitude"}], ids=["awq", "2:4-fp16"])
def test_feedback_alternation_runs_with_every_compressor(tiny_model_dir, tmp_path, flags):
    """--method eora-fb-alt re-compresses with the run's own compressor (AWQ's folded weights; 2:4
    alone): every layer lowers its feedback objective and 2:4 layers stay 2:4."""
    from eora_export.compress.sparse24 import is_24

    result = run(_small_cfg(tiny_model_dir, tmp_path / "out", method="eora-fb-alt", ood_file="none", **flags), progress=False)
    assert "compressed+eora-fb-alt" in result.report["perplexity"]
    assert all(r.rank == 8 and r.error_after < r.error_before for r in result.modules.values())
    if flags.get("sparsity") == "magnitude":
        assert all(is_24(r.module.weight_q.dequantize()) for r in result.modules.values())
