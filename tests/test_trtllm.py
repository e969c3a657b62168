"""``--format trtllm``: ModelOpt checkpoints that decode to W_c exactly, and the EoRA factors as a
PEFT LoRA adapter in the layout TensorRT-LLM and peft read (shared run: see test_deploy.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_deploy import GROUP, RANK, cli_args, debris, error_lines, shared_run, stand_in

from eora_export.cli import main
from eora_export.compensate.apply import swapped
from eora_export.deploy.trtllm import (
    HF_TO_TRTLLM_LORA,
    check_trtllm_config,
    decode_unified_checkpoint,
    dequantize_packed_rows,
    lora_factors,
    write_trtllm,
)
from eora_export.eora_linear import EoraLinear
from eora_export.errors import BadInput, UsageError
from eora_export.hf_compat import rope_settings
from eora_export.quant import QuantizedMatrix, quantize

# TensorRT-LLM checkpoint names of a Llama layer's fused GEMMs, in concatenation order.
TRTLLM_GEMMS = {"attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "attention.dense": ["self_attn.o_proj"], "mlp.fc": ["mlp.gate_proj"], "mlp.gate": ["mlp.up_proj"],
                "mlp.proj": ["mlp.down_proj"]}


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """``eora-export --format trtllm`` through the CLI, with the shared run as its computation."""
    _, result = shared_run(tiny_model_dir)
    out = tmp_path_factory.mktemp("trtllm") / "llm"
    mp = pytest.MonkeyPatch()
    mp.setattr("eora_export.engine.run", stand_in(result))
    mp.setenv("TQDM_DISABLE", "1")
    try:
        code = main(cli_args(tiny_model_dir, out, "--format", "trtllm"))
    finally:
        mp.undo()
    assert code == 0
    return out, result


def _modules(result) -> dict[str, EoraLinear]:
    return {n: r.module for n, r in result.modules.items()}


def test_layout(exported):
    out, _ = exported
    for name in ("README.md", "checkpoint/config.json", "checkpoint/hf_quant_config.json", "checkpoint/model.safetensors",
                 "checkpoint/tokenizer.json", "trtllm_checkpoint/config.json", "trtllm_checkpoint/rank0.safetensors",
                 "lora/adapter_config.json", "lora/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert (out.parent / "llm.eora" / "report.json").is_file(), "report and eora artifacts go beside"
    assert debris(out.parent) == []
    for f in out.rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & 0o077 != 0, f"{f} kept a private mkstemp mode"


def test_unified_checkpoint_decodes_to_our_weights(exported):
    out, result = exported
    q = json.loads((out / "checkpoint" / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "W4A16_AWQ" and q["group_size"] == GROUP and not q["has_zero_point"]
    assert "lm_head" in q["exclude_modules"]
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    decoded = decode_unified_checkpoint(out / "checkpoint")
    modules = _modules(result)
    assert set(decoded) == set(modules)
    for name, mod in modules.items():
        assert torch.equal(decoded[name], mod.weight), name
    # The scales are ours, bit for bit, and the codes too.
    sd = load_file(str(out / "checkpoint" / "model.safetensors"))
    for name, mod in modules.items():
        assert torch.equal(sd[f"{name}.weight_scale"].half(), mod.weight_q.scale), name
        assert sd[f"{name}.weight"].shape == (mod.out_features // 2, mod.in_features) and sd[f"{name}.weight"].dtype == torch.uint8


def test_unified_checkpoint_has_identity_awq_smoothing(exported, tiny_model_dir):
    out, _ = exported
    sd = load_file(str(out / "checkpoint" / "model.safetensors"))
    pre = {k: v for k, v in sd.items() if k.endswith(".pre_quant_scale")}
    # TensorRT-LLM's W4A16 loader reads pre_quant_scale for the layers with their own input.
    assert {k.rsplit(".", 2)[-2] for k in pre} == {"o_proj", "down_proj"}
    assert all(bool((v == 1).all()) for v in pre.values())
    # The ones folded into q/k/v and gate/up went into the layer norms, which stay the original weights.
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    for k, v in sd.items():
        if "norm" in k or "embed" in k or k == "lm_head.weight":
            assert torch.equal(v, original[k].to(v.dtype)), k


def test_trtllm_checkpoint_decodes_to_our_weights(exported):
    out, result = exported
    config = json.loads((out / "trtllm_checkpoint" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ" and config["quantization"]["group_size"] == GROUP
    assert config["architecture"] == "LlamaForCausalLM" and config["mapping"]["world_size"] == 1
    modules = _modules(result)
    with safe_open(str(out / "trtllm_checkpoint" / "rank0.safetensors"), "pt") as f:
        for i in range(config["num_hidden_layers"]):
            for gemm, parts in TRTLLM_GEMMS.items():
                key = f"transformer.layers.{i}.{gemm}"
                got = dequantize_packed_rows(f.get_tensor(f"{key}.weight"), f.get_tensor(f"{key}.weights_scaling_factor"), GROUP)
                want = torch.cat([modules[f"model.layers.{i}.{p}"].weight for p in parts])
                assert torch.equal(got, want), key


def test_lora_adapter_layout(exported):
    out, result = exported
    cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == RANK
    assert not cfg["rank_pattern"] and not cfg["use_rslora"]
    assert sorted(cfg["target_modules"]) == sorted(HF_TO_TRTLLM_LORA)
    sd = load_file(str(out / "lora" / "adapter_model.safetensors"))
    modules = _modules(result)
    assert len(sd) == 2 * len(modules)
    for name, mod in modules.items():
        a, b = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (RANK, mod.in_features) and b.shape == (mod.out_features, RANK)
        assert a.dtype == b.dtype == torch.float16
        assert torch.equal(a, mod.a) and torch.equal(b, mod.b)
    # TensorRT-LLM matches every key with this pattern (tensorrt_llm/lora_manager.py, HF_LORA_PATTERN).
    import re

    pattern = re.compile(r"(.*)\.(\d+)\.(\w+)\.(\w+|\w+\.\w+|(\w+)\.(\d+)\.(\w+))\."
                         r"(?:lora_(?:(A|B)\.weight|(magnitude)_vector)|weight_(m_wdecomp).weight)")
    for key in sd:
        m = pattern.match(key)
        assert m and m.group(4) in HF_TO_TRTLLM_LORA and m.group(8) in "AB", key
    readme = (out / "README.md").read_text()
    targets = " ".join(HF_TO_TRTLLM_LORA.values())
    assert f"--lora_target_modules {targets}" in readme and f"max_lora_rank={RANK}" in readme
    assert f"export OUT={out.resolve()}" in readme and "--checkpoint_dir $OUT/trtllm_checkpoint" in readme
    assert 'LLM(model=f"{OUT}/checkpoint"' in readme and 'LoRARequest("eora", 1, f"{OUT}/lora")' in readme


def test_peft_loads_the_adapter_on_the_exported_base(exported, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    out, result = exported
    config = AutoConfig.from_pretrained(out / "checkpoint")
    del config.quantization_config  # (not = None: transformers 4.x serialises a None config and fails)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(str(out / "checkpoint" / "model.safetensors"))
    state = {k: v for k, v in state.items() if not (k.endswith(".weight_scale") or k.endswith(".pre_quant_scale"))}
    state.update({f"{k}.weight": v for k, v in decode_unified_checkpoint(out / "checkpoint").items()})
    missing, unexpected = base.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    model = PeftModel.from_pretrained(base.eval(), out / "lora")
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), swapped(result.model, _modules(result)):
        want = result.model(ids).logits
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_clamped_ranks_are_zero_padded():
    torch.manual_seed(0)

    def layer(out_f: int, in_f: int, r: int) -> EoraLinear:
        w = quantize(torch.randn(out_f, in_f), 4, 32)
        a = QuantizedMatrix(torch.randn(r, in_f).half(), None, 16, 0)
        b = QuantizedMatrix(torch.randn(out_f, r).half(), None, 16, 0)
        return EoraLinear(w, a, b)

    modules = {"l.0.q_proj": layer(64, 64, 8), "l.0.k_proj": layer(16, 64, 4), "l.0.v_proj": layer(16, 64, 4)}
    factors = lora_factors(modules)
    assert {f.rank for f in factors.values()} == {8}
    k = factors["l.0.k_proj"]
    assert k.a.shape == (8, 64) and k.b.shape == (16, 8)
    assert torch.equal(k.b.float() @ k.a.float(), modules["l.0.k_proj"].residual_weight())
    assert not k.a[4:].any() and not k.b[:, 4:].any()
    same = {"l.0.q_proj": modules["l.0.q_proj"]}
    assert lora_factors(same)["l.0.q_proj"] is same["l.0.q_proj"], "equal ranks are written as they are"


@pytest.mark.parametrize(("changes", "words"), [({"bits": 3}, "INT3"), ({"group_size": 32}, "64 or 128")])
def test_unsupported_settings_are_refused(changes, words):
    cfg = SimpleNamespace(bits=4, quant="rtn", group_size=128)
    for k, v in changes.items():
        setattr(cfg, k, v)
    with pytest.raises(UsageError, match=words):
        check_trtllm_config(cfg)


def test_three_bit_run_is_refused_by_the_cli(tiny_model_dir, monkeypatch, capsys, tmp_path):
    _, result = shared_run(tiny_model_dir)
    monkeypatch.setattr("eora_export.engine.run", stand_in(result))
    code = main(cli_args(tiny_model_dir, tmp_path / "llm", "--format", "trtllm", "--bits", "3"))
    assert code == UsageError.exit_code
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "INT3" in lines[0] and not (tmp_path / "llm").exists()


def test_split_fused_group_is_refused(tiny_model_dir):
    cfg, result = shared_run(tiny_model_dir)
    partial = SimpleNamespace(**{**vars(result), "modules": {n: r for n, r in result.modules.items() if not n.endswith("k_proj")}})
    with pytest.raises(UsageError, match="q_proj/k_proj/v_proj"):
        write_trtllm(cfg, partial, Path("/nonexistent/never-written"))


def test_failed_export_leaves_previous_output(tiny_model_dir, monkeypatch, tmp_path):
    cfg, result = shared_run(tiny_model_dir)
    out = tmp_path / "llm"
    out.mkdir()
    (out / "README.md").write_text("previous")

    def broken(mtq, mte, result, modules, group_size, dest):
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("eora_export.deploy.trtllm._export_unified", broken)
    with pytest.raises(OSError, match="No space"):
        write_trtllm(cfg, result, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"] and (out / "README.md").read_text() == "previous"
    assert debris(tmp_path) == []


def test_fp16_sparse_base_exports_unquantized(tiny_model_dir, tmp_path):
    """--quant none --sparsity ...: the checkpoint is plain FP16 (with the 2:4 zeros), no quantization config."""
    from eora_export.deploy.trtllm import _export_unified, _modelopt
    from eora_export.models import load_model

    _, result = shared_run(tiny_model_dir)
    name = "model.layers.0.mlp.down_proj"
    model, _ = load_model(result.model_path, torch.float16)
    w = model.get_submodule(name).weight.detach().clone()
    w.view(-1, 4)[:, :2] = 0
    mod = EoraLinear(QuantizedMatrix(w, None, 16, 0), sparse24=True)
    fake = SimpleNamespace(model_path=result.model_path, tokenizer=result.tokenizer)
    _export_unified(*_modelopt(), fake, {name: mod}, 0, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "hf_quant_config.json").exists()
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert torch.equal(sd[f"{name}.weight"], w)


# --------------------------------------------------------------------------- files older consumers read

# Tokenizer classes that transformers 4.45.2 resolves by name (transformers/models/auto/tokenization_auto.py:
# TOKENIZER_MAPPING_NAMES and tokenizer_class_from_name's PreTrainedTokenizerFast case), the oldest
# transformers we support; TensorRT-LLM 1.2 pins 4.57.1. Only the Llama-family ones matter here.
TRANSFORMERS_4_45_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast",
                                       "CodeLlamaTokenizer", "CodeLlamaTokenizerFast", "GPT2TokenizerFast"}


def _check_tokenizer_for_transformers_4(folder: Path) -> None:
    """What transformers 4.45 … 4.57 need of tokenizer_config.json to load the folder with AutoTokenizer."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] in TRANSFORMERS_4_45_TOKENIZER_CLASSES, (folder, cfg["tokenizer_class"])
    assert (folder / "tokenizer.json").is_file(), "the fast classes read tokenizer.json"
    # 4.57's PreTrainedTokenizerBase.__init__ calls extra_special_tokens.keys(): a dict or nothing.
    assert isinstance(cfg.get("extra_special_tokens", {}), dict), cfg["extra_special_tokens"]


def test_exported_tokenizers_load_in_transformers_4_45_to_5(exported, tiny_model_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out, _ = exported
    text = "The quick brown fox jumps over the lazy dog."
    want = AutoTokenizer.from_pretrained(tiny_model_dir)(text)["input_ids"]
    for folder in (out / "checkpoint", out.parent / "llm.eora" / "base"):
        _check_tokenizer_for_transformers_4(folder)
        # ... and the installed transformers reads it as before, by the class it names too.
        assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == want, folder
        assert PreTrainedTokenizerFast.from_pretrained(folder)(text)["input_ids"] == want, folder


def test_portable_tokenizer_config_rules():
    from eora_export.hf_compat import portable_tokenizer_config

    v5 = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "extra_special_tokens": ["<|eot|>", "<x>"],
          "additional_special_tokens": ["<x>"], "is_local": True, "local_files_only": False, "bos_token": "<s>"}
    got = portable_tokenizer_config(v5, has_tokenizer_json=True)
    assert got == {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers", "bos_token": "<s>",
                   "additional_special_tokens": ["<x>", "<|eot|>"]}
    named = {"tokenizer_class": "LlamaTokenizerFast", "extra_special_tokens": {"image_token": "<img>"}}
    assert portable_tokenizer_config(named, has_tokenizer_json=True) == named, "4.x names and dict forms stay"
    with pytest.raises(ValueError, match=r"without tokenizer\.json"):
        portable_tokenizer_config(v5, has_tokenizer_json=False)


# RoPE of Meta-Llama-3.1-8B's config.json (θ 500000, llama3 scaling), as the Hub has it (transformers 4 keys).
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# TensorRT-LLM's RotaryScalingType names (tensorrt_llm/functional.py); RotaryScalingType.from_string
# raises on anything else, "default" included.
TRTLLM_ROTARY_SCALING_TYPES = {"none", "linear", "dynamic", "longrope", "llama3", "yarn", "mrope"}


def _llama3_model_dir(src: Path, dest: Path, form: str) -> Path:
    """The tiny model with a Llama-3.1 RoPE, its config.json written by transformers 4 ("hub") or 5."""
    import shutil

    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["max_position_embeddings"] = 16384
    if form == "hub":
        config.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING))
    else:
        config["rope_parameters"] = {**LLAMA3_ROPE_SCALING, "rope_theta": 500000.0}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("form", ["hub", "transformers5"])
def test_llama3_rope_reaches_both_checkpoints(tiny_model_dir, tmp_path, form):
    from transformers import AutoConfig

    from eora_export.deploy.trtllm import _export_trtllm, _export_unified, _modelopt

    model_dir = _llama3_model_dir(tiny_model_dir, tmp_path / "llama3", form)
    source = SimpleNamespace(model_path=model_dir, tokenizer=None)
    assert _export_trtllm(*_modelopt(), source, {}, 0, tmp_path / "trtllm_checkpoint") is None
    _export_unified(*_modelopt(), source, {}, 0, tmp_path / "checkpoint")
    # trtllm-build's input: what TensorRT-LLM's LLaMAConfig.from_hugging_face would have made of the Hub config.
    trt = json.loads((tmp_path / "trtllm_checkpoint" / "config.json").read_text())
    assert trt["rotary_base"] == 500000.0 and trt["rotary_scaling"] == LLAMA3_ROPE_SCALING
    assert trt["rotary_scaling"]["rope_type"] in TRTLLM_ROTARY_SCALING_TYPES and trt["max_position_embeddings"] == 16384
    # The LLM API's input, read by TensorRT-LLM's transformers 4.57 (rope_theta / rope_scaling; 4.45's
    # _validate_llama3_parameters needs these keys) and by transformers 5 (rope_parameters first).
    hf = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"] == LLAMA3_ROPE_SCALING
    assert set(hf["rope_scaling"]) >= {"rope_type", "factor", "original_max_position_embeddings", "low_freq_factor",
                                       "high_freq_factor"}
    # read back by the installed transformers, whichever form it keeps (4.x rope_scaling, 5.x rope_parameters)
    assert rope_settings(AutoConfig.from_pretrained(tmp_path / "checkpoint")) == (500000.0, LLAMA3_ROPE_SCALING)


def test_plain_rope_is_written_explicitly(exported):
    out, _ = exported
    trt = json.loads((out / "trtllm_checkpoint" / "config.json").read_text())
    # θ written out; no scaling entry (TensorRT-LLM's RotaryScalingType has no "default").
    assert trt["rotary_base"] == 10000.0 and trt["rotary_scaling"] is None
    hf = json.loads((out / "checkpoint" / "config.json").read_text())
    assert hf["rope_theta"] == 10000.0 and hf["rope_scaling"] is None


def test_engine_build_recipe_follows_the_model(exported, tiny_model_dir):
    out, _ = exported
    readme = (out / "README.md").read_text()
    max_pos = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert f"--max_input_len {max_pos // 2} --max_seq_len {max_pos}" in readme
    assert readme.index("## LLM API (PyTorch backend)") < readme.index("## TensorRT engine (trtllm-build")
    assert "LoRA on an INT4 (W4A16 AWQ) base through trtllm-build is unconfirmed upstream" in readme


# --------------------------------------------------------------------------- exactness guards


def test_trtllm_gemm_names_match_the_checkpoint(exported):
    from eora_export.deploy.trtllm import decode_trtllm_checkpoint, trtllm_gemm_weights

    out, result = exported
    decoded, want = decode_trtllm_checkpoint(out / "trtllm_checkpoint"), trtllm_gemm_weights(_modules(result))
    assert set(decoded) == set(want) and len(want) == 5 * result.model.config.num_hidden_layers
    assert all(torch.equal(decoded[k], want[k]) for k in want)


def test_differing_fused_smoothing_is_refused_in_one_line(tiny_model_dir, monkeypatch, capsys, tmp_path):
    """ModelOpt averages differing q/k/v pre-quant scales and re-quantizes: refused before it can."""
    import eora_export.deploy.trtllm as trtllm

    _, result = shared_run(tiny_model_dir)
    real = trtllm._quantize

    def skewed(mtq, model, modules, group_size):
        model = real(mtq, model, modules, group_size)
        q = model.get_submodule("model.layers.0.self_attn.k_proj").input_quantizer
        q.pre_quant_scale = q.pre_quant_scale * 2
        return model

    monkeypatch.setattr(trtllm, "_quantize", skewed)
    monkeypatch.setattr("eora_export.engine.run", stand_in(result))
    code = main(cli_args(tiny_model_dir, tmp_path / "llm", "--format", "trtllm"))
    assert code == BadInput.exit_code
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "pre-quant scales of q_proj/k_proj/v_proj differ" in lines[0], lines
    assert not (tmp_path / "llm").exists() and debris(tmp_path) == []


def test_a_code_changed_by_the_export_is_refused_in_one_line(tiny_model_dir, monkeypatch, tmp_path):
    """Both checkpoints are decoded after the export; one flipped nibble in trtllm_checkpoint fails the run."""
    from safetensors.torch import save_file

    import eora_export.deploy.trtllm as trtllm

    cfg, result = shared_run(tiny_model_dir)
    mtq, mte = trtllm._modelopt()

    def flipping(model, decoder, **kwargs):
        mte.export_tensorrt_llm_checkpoint(model, decoder, **kwargs)
        path = Path(kwargs["export_dir"]) / "rank0.safetensors"
        sd = load_file(str(path))
        sd["transformer.layers.1.mlp.proj.weight"][0, 0] ^= 0x01
        save_file(sd, str(path))

    fake = SimpleNamespace(export_hf_checkpoint=mte.export_hf_checkpoint, export_tensorrt_llm_checkpoint=flipping)
    monkeypatch.setattr(trtllm, "_modelopt", lambda: (mtq, fake))
    with pytest.raises(BadInput) as e:
        write_trtllm(cfg, result, tmp_path / "llm")
    assert "export_tensorrt_llm_checkpoint changed the INT4 codes (transformer.layers.1.mlp.proj does not decode" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "llm").exists()
