"""What every command shares: the parser class (one-line usage errors), argparse options generated
from the settings dataclasses (:mod:`eora_export.config`), and the output kind from ``--out``.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..config import COMPENSATION, COMPRESSION, DATA, EXPORT, STREAMING, DeployConfig
from ..errors import UsageError

# Option groups in the order --help lists them.
GROUPS = (COMPRESSION, COMPENSATION, DATA, EXPORT, STREAMING)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, usage exit code
        raise UsageError(f"{message} (see eora-export --help)")


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _help(meta: dict, default: Any, flag_only: bool) -> str:
    text = meta["help"]
    shown = meta["default_help"] if meta["default_help"] is not None else (None if flag_only or default is None else default)
    return text if shown is None else f"{text} (default: {shown})"


def _group(parser: argparse.ArgumentParser, title: str | None):
    if title is None:
        return parser
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def _without_none(tp: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass ``cls`` whose metadata has ``cli`` true (dest = field name).

    bool fields are switches (``store_false`` when the default is True, e.g. ``--no-compare``);
    ``list[str]`` fields repeat (``append``); ``X | None`` converts with X (or the field's ``parse``).
    """
    hints = typing.get_type_hints(cls)
    for title in GROUPS:
        if any(f.metadata.get("group") == title and f.metadata.get("cli") and f.name not in skip for f in fields(cls)):
            _group(parser, title)
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli") or f.name in skip:
            continue
        default = _default(f)
        tp = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "default": default}
        if tp is bool:
            kw["action"] = "store_false" if default else "store_true"
        else:
            base = _without_none(tp)
            if typing.get_origin(base) is list and meta["parse"] is None:
                kw["action"] = "append"
            else:
                if meta["parse"] is not None or base is not str:
                    kw["type"] = meta["parse"] or base
            if meta["choices"] is not None:
                kw["choices"] = list(meta["choices"])
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        kw["help"] = _help(meta, default, flag_only=tp is bool or kw.get("action") == "append")
        _group(parser, meta["group"]).add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kw)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """The dataclass ``cls`` from parsed options (fields the parser lacks keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli") and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def add_deploy_options(parser: argparse.ArgumentParser, *, verify: bool = False, format: bool = False) -> None:
    """The deployable outputs' flags (:class:`DeployConfig`); ``--format`` and ``--verify`` only where asked."""
    skip = tuple(name for name, keep in (("format", format), ("verify", verify)) if not keep)
    add_options(parser, DeployConfig, skip=skip)


def output_format(fmt: str | None, out: Path) -> str:
    """The output kind: --format, else from --out's suffix; a graph kind needs a graph file name."""
    fmt = fmt or {".onnx": "onnx", ".plan": "plan", ".engine": "plan"}.get(out.suffix, "dir")
    if fmt in ("onnx", "plan") and out.suffix not in (".onnx", ".plan", ".engine"):
        raise UsageError(f"--format {fmt} needs --out ending in .{fmt}, got {out}")
    return fmt
