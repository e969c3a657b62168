"""Hugging Face files that load in the consumers' own transformers (4.45 through 5.x).

TensorRT-LLM pins an older transformers (1.2-era: 4.57.1) than the one eora-export runs with, and
transformers 5 writes two things 4.x reads differently:

- ``tokenizer_config.json`` names ``tokenizer_class: "TokenizersBackend"``, a class 4.x does not
  have (``ValueError: Tokenizer class TokenizersBackend does not exist``), and lists
  ``extra_special_tokens`` where 4.57 expects a dict (``'list' object has no attribute 'keys'``).
- ``config.json`` carries RoPE as ``rope_parameters`` only; 4.x reads ``rope_theta`` /
  ``rope_scaling`` and silently falls back to θ = 10000 without scaling.

:func:`save_tokenizer` and :func:`add_legacy_rope_keys` write files both generations read the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers 5 base classes with no 4.x counterpart of that name.
V5_ONLY_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "SentencePieceBackend", "PythonBackend"})
# Keys transformers 5 stores that are loading arguments, not tokenizer settings.
_LOADING_KEYS = ("is_local", "local_files_only")
DEFAULT_ROPE_THETA = 10000.0


def portable_tokenizer_config(cfg: dict[str, Any], has_tokenizer_json: bool) -> dict[str, Any]:
    """``tokenizer_config.json`` contents that transformers 4.45 … 5.x load alike."""
    out = {k: v for k, v in cfg.items() if k not in _LOADING_KEYS}
    if out.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
        if not has_tokenizer_json:
            raise ValueError(f"tokenizer_class {out['tokenizer_class']} without tokenizer.json has no transformers 4.x class")
        # The generic fast tokenizer reads tokenizer.json alone, in every version since 4.0.
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        # 4.x's name for a plain list of extra special tokens; 4.57 wants a {name: token} dict here.
        del out["extra_special_tokens"]
        known = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = known + [t for t in extra if t not in known]
    return out


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.save_pretrained(out_dir)`` with a tokenizer_config.json that 4.45 … 5.x load."""
    tokenizer.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    fixed = portable_tokenizer_config(cfg, (Path(out_dir) / "tokenizer.json").is_file())
    if fixed != cfg:
        path.write_text(json.dumps(fixed, indent=2, ensure_ascii=False) + "\n")


def rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(θ, scaling) of a transformers config of any version; scaling is None for plain RoPE.

    transformers 5 keeps both in ``rope_parameters`` (θ inside it); 4.x has ``rope_theta`` and
    ``rope_scaling`` (with ``type`` as the older spelling of ``rope_type``). The scaling dict is
    returned without θ, in 4.x's ``rope_scaling`` form, which TensorRT-LLM reads as well.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form (not Llama)
        params = params["full_attention"]
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = getattr(config, "rope_theta", None)
        scaling = dict(getattr(config, "rope_scaling", None) or {})
    kind = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    theta = float(theta if theta is not None else DEFAULT_ROPE_THETA)
    if kind == "default":
        return theta, None
    return theta, {**scaling, "rope_type": kind}


def add_legacy_rope_keys(config_json: Path, config: Any) -> None:
    """Write ``rope_theta`` (and ``rope_scaling`` when RoPE is scaled) beside ``rope_parameters``.

    transformers 5 reads either form (``rope_parameters`` first); 4.x reads only these keys.
    """
    theta, scaling = rope_settings(config)
    data = json.loads(config_json.read_text())
    data["rope_theta"] = theta
    data["rope_scaling"] = scaling
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
