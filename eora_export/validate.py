"""Up-front input checks (GitHub issue #9): fail in seconds, not after minutes of work.

:func:`preflight` runs after ``--model`` is resolved and before the model is loaded.
Cheap checks first, reading tensor data last; each failure is one line naming what is
wrong and what to do, raised as the :mod:`errors` class of its exit code:

==============  ==========================================================  ==============
step            what                                                        error (exit)
==============  ==========================================================  ==============
options         RunConfig.validate: every rule on the flags alone           UsageError (2)
config          config.json a JSON object, Llama/Mistral, sizes, not        BadInput (4)
                already quantized
weights         weight files and shards present; safetensors headers        MissingInput (3),
                intact (a truncated download is caught here)                BadInput (4)
layers          every decoder layer holds q/k/v/o/gate/up/down ``[out,      BadInput (4)
                in]`` weights matching config.json; --only/--skip patterns  UsageError (2)
                each match a Linear and leave at least one
shapes          --group-size divides every selected in_features; 2:4        UsageError (2)
                needs in % 4; factor groups and odd ranks (the rank is
                clamped per layer first, as compensation does)
calibration     --calib / --eval-file exist, are text (not binary, not      MissingInput (3),
                empty, valid JSONL) and hold one --seq-len window           BadInput (4)
tokenizer       files present and loadable (only to count tokens)           MissingInput (3),
                                                                            BadInput (4)
output          --out is a folder we may replace (absent, empty, or an      UsageError (2)
                earlier eora-export output; not the model), its parent is
                writable, and its disk has room for the outputs
values          NaN/Inf in any floating tensor of a safetensors checkpoint  BadInput (4)
                (the tensor is named; streamed runs check each block's
                Linears as it loads instead of reading 27 GB twice)
==============  ==========================================================  ==============

Rank larger than a layer is not an error: compensation clamps it per layer and the
report lists the clamped layers (``rank_clamped``).

Its ~520 lines stay one module on purpose: the checks are one table (above), run in the order a run
reads its inputs; split over files, that order would no longer be readable in one place.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, MissingInput, UsageError
from .models import DEMO_DIR, SUPPORTED_ARCHITECTURES, read_config, selected
from .safetensors_io import read_header

log = logging.getLogger("eora_export")

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Per-layer tensors a Llama/Mistral decoder layer may hold besides the Linear weights.
_LAYER_EXTRAS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.rotary_emb.inv_freq")
# Tensor names of checkpoints that are already quantized (GPTQ, AWQ, bitsandbytes, FP8, ModelOpt).
_QUANTIZED_MARKERS = ("qweight", "qzeros", "g_idx", "weight_scale", "weight_scale_inv", "SCB", "weight_format", "absmax", "quant_map")
_ST_FLOATS = ("F64", "F32", "F16", "BF16")
_SCAN_CHUNK = 1 << 24  # elements per isfinite() pass, to bound the temporary bool tensor
_GRAPH_FORMATS = ("onnx", "plan", "triton", "trtllm")


@dataclass
class Checkpoint:
    """What preflight learned about the weights without loading them.

    tensors: name -> (file, safetensors dtype, shape) for safetensors checkpoints; empty for
    PyTorch ``.bin`` checkpoints (their shapes come from config.json, their values are not scanned).
    """

    path: Path
    kind: str  # "safetensors" | "bin"
    tensors: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)
    bytes_on_disk: int = 0

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(name)
        return entry[2] if entry else None


@dataclass
class Plan:
    """The checked facts a run will use: selected Linears with their ``(out, in)`` shapes."""

    config: dict
    checkpoint: Checkpoint
    linears: dict[str, tuple[int, int]]
    estimated_output_bytes: int = 0


def preflight(cfg, model_path: Path, *, fmt: str | None = None, deploy_out: Path | None = None, scan_values: bool = True,
              texts: bool = True) -> Plan:
    """Raise a one-line EoraError for input that would fail later in the run.

    cfg: a :class:`config.RunConfig`. fmt / deploy_out: the output kind and the deployable
    path (``--out X.onnx``, a Triton repository), read from ``cfg.format`` / ``cfg.deploy_out``
    when those attributes exist; otherwise a ``.eora`` artifacts folder means a graph format.
    texts=False: the caller gives token windows itself (no tokenizer or text files to check).
    """
    model_path = Path(model_path)
    fmt = fmt or getattr(cfg, "format", None) or ("onnx" if Path(cfg.out).name.endswith(".eora") else "dir")
    deploy_out = deploy_out or getattr(cfg, "deploy_out", None)
    cfg.validate()  # the rules on the options alone (config.RunConfig.validate)
    config = check_config(model_path)
    ckpt = check_weights(model_path)
    linears = check_layers(config, ckpt, cfg.only, cfg.skip)
    check_shapes(cfg, linears)
    if texts:
        check_calibration(cfg, model_path)
    out_bytes = estimate_output_bytes(cfg, config, ckpt, linears, fmt)
    check_output(cfg, model_path, out_bytes, deploy_out, fmt)
    if scan_values:
        scan_weights(ckpt)
    return Plan(config, ckpt, linears, out_bytes)


# --------------------------------------------------------------------------- config.json


def _positive_int(config: dict, key: str, where: Path, default: object = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInput(f"{where}: '{key}' must be a positive integer, got {value!r}; re-download the model or fix config.json")
    return value


def check_config(model_path: Path) -> dict:
    """config.json: a JSON object of a supported architecture with sane sizes."""
    where = model_path / "config.json"
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInput(f"{where} not found; point --model at a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInput(f"{where} is not readable JSON ({_short(e)}); re-download the model") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{where} holds a JSON {type(raw).__name__}, not an object; re-download the model")
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise BadInput(f"{where}: 'architectures' must be a list of names, got {archs!r}")
    read_config(model_path)  # unsupported architecture -> BadInput naming the supported ones
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise BadInput(
            f"{model_path} is already quantized ({method}); eora-export needs the full-precision "
            f"{' or '.join(SUPPORTED_ARCHITECTURES)} checkpoint"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _positive_int(raw, key, where)
    heads = raw["num_attention_heads"]
    kv = _positive_int(raw, "num_key_value_heads", where, heads) if raw.get("num_key_value_heads") is not None else heads
    if heads % kv:
        raise BadInput(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if raw.get("head_dim") is not None:
        _positive_int(raw, "head_dim", where)
    elif raw["hidden_size"] % heads:
        raise BadInput(f"{where}: hidden_size={raw['hidden_size']} is not a multiple of num_attention_heads={heads}")
    return raw


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- weight files


def check_weights(model_path: Path) -> Checkpoint:
    """The weight files transformers will load, present and (for safetensors) intact."""
    index = model_path / "model.safetensors.index.json"
    single = model_path / "model.safetensors"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as e:
            raise BadInput(f"{index} is not a valid safetensors index ({_short(e)}); re-download the model") from None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise BadInput(f"{index}: 'weight_map' must map tensor names to file names; re-download the model")
        for shard in sorted(set(wmap.values())):
            if Path(shard).name != shard:
                raise BadInput(f"{index} points outside the model folder ({shard!r}); re-download the model")
        missing = sorted(s for s in set(wmap.values()) if not (model_path / s).is_file())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingInput(f"shard {missing[0]}{more} listed in {index.name} is missing from {model_path}; re-download the model")
        files = sorted(set(wmap.values()))
    elif single.is_file():
        files, wmap = [single.name], None
    elif any(model_path.glob("pytorch_model*.bin")):
        size = sum(p.stat().st_size for p in model_path.glob("pytorch_model*.bin"))
        return Checkpoint(model_path, "bin", bytes_on_disk=size)
    else:
        raise MissingInput(f"no weight files (model.safetensors or its index) in {model_path}; download the full model")
    ckpt = Checkpoint(model_path, "safetensors")
    for shard in files:
        file = model_path / shard
        ckpt.bytes_on_disk += file.stat().st_size
        for name, entry in read_header(file).items():
            dtype, shape = entry.dtype, entry.shape
            if wmap is None or wmap.get(name) == shard:
                ckpt.tensors[name] = (shard, dtype, shape)
    if wmap is not None:
        absent = [n for n in wmap if n not in ckpt.tensors]
        if absent:
            raise BadInput(f"{absent[0]} is listed in {index.name} but missing from {wmap[absent[0]]}; re-download the model")
    return ckpt


# --------------------------------------------------------------------------- layers


def expected_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of every decoder Linear a Llama/Mistral config implies, by module name."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    per = {
        "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }
    return {f"model.layers.{i}.{k}": v for i in range(config["num_hidden_layers"]) for k, v in per.items()}


def check_layers(config: dict, ckpt: Checkpoint, only: list[str], skip: list[str]) -> dict[str, tuple[int, int]]:
    """Selected decoder Linears ``name -> (out, in)``; BadInput for unsupported or mismatched layers."""
    expected = expected_shapes(config)
    if ckpt.kind == "safetensors":
        _check_layer_tensors(config, ckpt, expected)
    return select(expected, only, skip)


def _check_layer_tensors(config: dict, ckpt: Checkpoint, expected: dict[str, tuple[int, int]]) -> None:
    names = ckpt.tensors
    quantized = sorted(n for n in names if n.rsplit(".", 1)[-1] in _QUANTIZED_MARKERS)
    if quantized:
        raise BadInput(
            f"{ckpt.path} is already quantized ({quantized[0]}); eora-export needs the full-precision checkpoint"
        )
    missing = [m for m in expected if f"{m}.weight" not in names]
    if missing:
        layers = tuple(sorted({m.rsplit(".", 2)[0] + "." for m in missing}))  # "model.layers.3."
        extra = [n.rsplit(".", 1)[0] for n in names
                 if n.startswith(layers) and n.rsplit(".", 1)[0] not in expected and not n.endswith(_LAYER_EXTRAS)]
        extra = sorted(dict.fromkeys(extra))
        found = f"; it has unsupported layers {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}" if extra else ""
        raise BadInput(
            f"unsupported layers in {ckpt.path}: {missing[0]}.weight is missing ({len(missing)} Linear weights in all){found}; "
            "eora-export needs separate q/k/v/o/gate/up/down Linears in every decoder layer"
        )
    for name, (out_f, in_f) in expected.items():
        got = ckpt.shape(f"{name}.weight")
        if got != (out_f, in_f):
            raise BadInput(
                f"{name}.weight is {list(got)} but config.json implies [{out_f}, {in_f}]; the config and the weights "
                "do not match, re-download the model"
            )
    emb = ckpt.shape("model.embed_tokens.weight")
    if emb is not None and emb != (config["vocab_size"], config["hidden_size"]):
        raise BadInput(
            f"model.embed_tokens.weight is {list(emb)} but config.json has vocab_size={config['vocab_size']}, "
            f"hidden_size={config['hidden_size']}; the config and the weights do not match, re-download the model"
        )


def select(linears: dict[str, tuple[int, int]], only: list[str], skip: list[str]) -> dict[str, tuple[int, int]]:
    """Apply --only / --skip (fnmatch on qualified names); every pattern must match something."""
    example = next(iter(linears), "model.layers.0.self_attn.q_proj")
    for flag, patterns in (("--only", only), ("--skip", skip)):
        for p in patterns:
            if not any(fnmatch.fnmatch(n, p) for n in linears):
                raise UsageError(
                    f"{flag} {p!r} matches no Linear; names look like {example} (e.g. {flag} '*.mlp.*' or '*.layers.0.*')"
                )
    chosen = {n: s for n, s in linears.items() if selected(n, only, skip)}
    if not chosen:
        raise UsageError("no Linear layers selected for compression: --only/--skip leave none; loosen the patterns")
    return chosen


# --------------------------------------------------------------------------- shapes vs flags


def _divisor_hint(widths: list[int]) -> int:
    g = math.gcd(*widths)
    for cand in (128, 64, 32, 16, 8, 4, 2):
        if g % cand == 0:
            return cand
    return 1


def check_shapes(cfg, linears: dict[str, tuple[int, int]]) -> None:
    """Group sizes, 2:4 and factor layouts against every selected Linear."""
    from .compensate.apply import layer_rank, lowrank_group

    widths = sorted({i for _, i in linears.values()})
    if cfg.quant != "none":
        for name, (_, in_f) in linears.items():
            if in_f % cfg.group_size:
                raise UsageError(
                    f"--group-size {cfg.group_size} does not divide in_features={in_f} of {name}; "
                    f"choose one that divides every width ({', '.join(map(str, widths))}), e.g. --group-size {_divisor_hint(widths)}"
                )
    if cfg.sparsity != "none":
        for name, (_, in_f) in linears.items():
            if in_f % 4:
                raise UsageError(f"2:4 sparsity needs in_features divisible by 4; {name} has {in_f}; use --sparsity none or --skip it")
    if cfg.method == "none" or cfg.lowrank_bits == 16:
        return
    ranks = [("--rank", cfg.rank)] + [("--sweep-ranks", r) for r in (cfg.sweep_ranks or []) if r != cfg.rank]
    for flag, r in ranks:
        for name, (out_f, in_f) in linears.items():
            lr = layer_rank(r, out_f, in_f)
            try:
                lowrank_group(lr, in_f, cfg.lowrank_group_size)
            except UsageError as e:
                where = f" ({name} clamps it to {lr})" if lr != r else ""
                raise UsageError(f"{flag} {r}{where}: {e}") from None


# --------------------------------------------------------------------------- calibration


def read_text_file(path: Path, what: str) -> list[str]:
    """Documents of a text/JSONL file; a missing path or a folder is a one-line error naming ``what`` (the flag)."""
    from .calibration import read_texts

    if not path.exists():
        raise MissingInput(f"{what} {path} not found; pass an existing text or JSONL file")
    if not path.is_file():
        raise BadInput(f"{what} {path} is not a file; pass a text or JSONL file")
    return read_texts(path)


def _enough_tokens(tokenizer, texts: list[str], seq_len: int) -> int:
    """Tokens counted (documents joined with EOS, as token_windows does) until ``seq_len`` is reached."""
    eos = 1 if tokenizer.eos_token_id is not None else 0
    total = 0
    limit = seq_len * 64  # characters; a token is never this long, so a longer prefix cannot be short
    for doc in texts:
        n = len(tokenizer(doc[:limit], add_special_tokens=False)["input_ids"])
        if n < seq_len and len(doc) > limit:
            n = len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        total += n + eos
        if total >= seq_len:
            break
    return total


def _load_tokenizer(model_path: Path):
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((model_path / n).is_file() for n in names):
        raise MissingInput(f"no tokenizer in {model_path} (tokenizer.json or tokenizer.model); copy the model's tokenizer files there")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer
        raise BadInput(f"the tokenizer in {model_path} does not load ({type(e).__name__}: {_short(e)}); re-download the model") from None


def check_calibration(cfg, model_path: Path) -> None:
    """Calibration and held-out text: present, text, and at least one --seq-len window each."""
    from .calibration import CalibSource

    sources = [("calibration file", CalibSource.parse(s).path) for s in cfg.calib]
    if not sources:
        sources = [("calibration file", DEMO_DIR / "calib.txt")]
    sources.append(("held-out text (--eval-file)", Path(cfg.eval_file) if cfg.eval_file else DEMO_DIR / "heldout.txt"))
    if getattr(cfg, "ood_file", None) and cfg.ood_file != "none":
        sources.append(("out-of-domain text (--ood-file)", Path(cfg.ood_file)))
    texts = [(what, path, read_text_file(path, what)) for what, path in sources]
    # Cheap bound first: a token covers at least one byte of text, plus one EOS per document.
    for what, path, docs in texts:
        if sum(len(d.encode("utf-8")) + 1 for d in docs) < cfg.seq_len:
            raise BadInput(_short_text(what, path, cfg.seq_len))
    tokenizer = _load_tokenizer(model_path)
    for what, path, docs in texts:
        try:
            n = _enough_tokens(tokenizer, docs, cfg.seq_len)
        except Exception as e:  # e.g. lone surrogates from a JSONL file: tokenizers raise TypeError
            raise BadInput(f"{what} {path} cannot be tokenized ({type(e).__name__}: {_short(e)}); give plain UTF-8 text") from None
        if n < cfg.seq_len:
            raise BadInput(_short_text(what, path, cfg.seq_len))


def _short_text(what: str, path: Path, seq_len: int) -> str:
    return f"{what} {path} is shorter than one {seq_len}-token sequence; give more text or lower --seq-len"


# --------------------------------------------------------------------------- output


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def estimate_output_bytes(cfg, config: dict, ckpt: Checkpoint, linears: dict[str, tuple[int, int]], fmt: str) -> int:
    """Rough size of everything a run writes (base/, adapter/, and the graphs for graph formats)."""
    if ckpt.tensors:
        params = sum(math.prod(s) for _, _, s in ckpt.tensors.values())
    else:  # config.json says "dtype" since transformers 4.56, "torch_dtype" before
        params = ckpt.bytes_on_disk // (4 if str(config.get("dtype", config.get("torch_dtype", ""))) == "float32" else 2)
    lin = sum(o * i for o, i in linears.values())
    if cfg.quant == "none":
        qbytes = lin * 2
    else:
        qbytes = lin // 2 + lin // max(cfg.group_size, 1) * 2
    ranks = 0 if cfg.method == "none" else sum(min(cfg.rank, o, i) * (o + i) for o, i in linears.values())
    total = params * 2 + qbytes + ranks * 2  # base/model.safetensors (fp16), base/quantization, adapter (fp16)
    if fmt in _GRAPH_FORMATS:
        graph = (params - lin) * 2 + qbytes + ranks * max(cfg.lowrank_bits, 4) // 8
        total += 2 * graph + params * 2  # fused + pattern graphs, FP16 baseline graph
        if fmt != "onnx":
            total += graph  # the engine, the repository copy, or the TensorRT-LLM checkpoint
    return int(total * 1.05) + (8 << 20)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_writable_parent(target: Path) -> None:
    base = _existing_ancestor(target.resolve().parent)
    if not base.is_dir():
        raise UsageError(f"--out {target}: {base} is a file, not a folder; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {base} (permission denied or read-only); choose an --out folder you can write")


def check_output_location(out: Path) -> None:
    """--out names a folder that can be created or replaced: not '.', not a file, in a writable place.

    The part of :func:`check_output` that needs no model; runs first, before anything is loaded.
    """
    if out.resolve().name in ("", ".", ".."):
        raise UsageError(f"--out {out} names no folder; give a new folder name, e.g. --out eora-out")
    _check_writable_parent(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder path (or remove the file)")


def check_output(cfg, model_path: Path, need_bytes: int = 0, deploy_out: Path | None = None, fmt: str = "dir") -> None:
    """--out must be a folder we may replace whole, in a writable place with room for the outputs."""
    out = Path(cfg.out)
    full = out.resolve()
    check_output_location(out)
    if deploy_out is not None:
        _check_writable_parent(Path(deploy_out))
    if out.exists():
        if any(out.iterdir()) and not (out / "report.json").is_file():
            raise UsageError(
                f"--out {out} is a folder with other content; eora-export replaces --out as a whole, so give a new "
                "or empty folder (or an earlier eora-export output)"
            )
    model = Path(model_path).resolve()
    if model == full or full in model.parents:
        raise UsageError(f"--out {out} would replace the model folder {model_path}; choose another --out")
    if deploy_out is not None and Path(deploy_out).is_dir():
        repo = Path(deploy_out)
        if fmt in ("onnx", "plan"):
            raise UsageError(f"--out {repo} is an existing folder; give a file path ending in .{fmt}")
        if any(repo.iterdir()) and not any((d / "config.pbtxt").is_file() for d in repo.iterdir() if d.is_dir()):
            raise UsageError(f"--out {repo} is a folder with other content; give a new or empty folder for the {fmt} output")
    if need_bytes:
        base = _existing_ancestor(full.parent)
        try:
            free = shutil.disk_usage(base).free
        except OSError:
            return
        if free < need_bytes:
            raise UsageError(
                f"not enough disk space in {base}: the outputs need about {_gb(need_bytes)}, {_gb(free)} is free; "
                "free some space or choose an --out on another disk"
            )


# --------------------------------------------------------------------------- values


def scan_weights(ckpt: Checkpoint) -> None:
    """BadInput naming the first floating tensor that holds NaN or Inf (safetensors only)."""
    if ckpt.kind != "safetensors":
        return
    import torch
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, (file, dtype, _shape) in ckpt.tensors.items():
        if dtype in _ST_FLOATS:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(ckpt.path / file), framework="pt") as f:
                for name in names:
                    flat = f.get_tensor(name).reshape(-1)
                    for i in range(0, flat.numel(), _SCAN_CHUNK):
                        chunk = flat[i : i + _SCAN_CHUNK]
                        # A float32 sum is NaN/Inf if any element is (twice as fast as isfinite().all());
                        # a finite tensor whose sum overflows is confirmed element-wise.
                        if not torch.isfinite(chunk.sum(dtype=torch.float32)) and not torch.isfinite(chunk).all():
                            bad = int((~torch.isfinite(flat)).sum())
                            layer = name[: -len(".weight")] if name.endswith(".weight") else name
                            raise BadInput(
                                f"{layer} holds {bad} NaN/Inf value(s) in {name} ({file}); the checkpoint is corrupt: "
                                "re-download or re-export it"
                            )
                    del flat
        except BadInput:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise BadInput(f"cannot read {ckpt.path / file} ({type(e).__name__}: {_short(e)}); re-download the model") from None
