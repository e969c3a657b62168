"""Settings of a run, defined once: every field with its default, help and limits; the CLI is generated from them.

Each field's ``metadata`` (written with :func:`cli`) says how the command line shows it:
``help``, ``flag`` (default ``--field-name``), ``choices``, ``group``, ``metavar``, ``parse`` (a
converter for non-scalar types), ``default_help`` (what the default means when the value alone
does not say it) and ``cli=False`` for fields the command derives itself.
:func:`eora_export.cli.parser.add_options` turns a dataclass into argparse options and
:func:`eora_export.cli.parser.from_args` back into the dataclass.

Rules that involve one setting or a pair of them live in :meth:`RunConfig.validate`; rules
that need the model or files (shapes, disk, text length) live in :mod:`validate`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import defaults
from .compensate.apply import LOWRANK_QUANTS, CompensationConfig
from .compensate.ranks import parse_budget
from .compress import CompressConfig, quant_choices, sparsity_choices
from .errors import UsageError
from .methods import get_method, method_names

STREAM_INPUTS = ("fp", "compressed")
ACT_DTYPES = ("auto", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
LOWRANK_BITS = (4, 8, 16)
WEIGHT_BITS = (4, 3)
FORMATS = ("dir", "onnx", "plan", "triton", "trtllm")


def int_list(text: str) -> list[int]:
    """``--sweep-ranks 4,8,16``; '' gives an empty list."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def cli(*, help: str, flag: str | None = None, choices: Sequence | None = None, group: str | None = None,
        metavar: str | None = None, parse: Callable[[str], Any] | None = None, default_help: str | None = None,
        cli: bool = True) -> dict[str, Any]:
    """A field's command-line description, for ``dataclasses.field(metadata=cli(...))`` (see the module docstring)."""
    return {"help": help, "flag": flag, "choices": choices, "group": group, "metavar": metavar, "parse": parse,
            "default_help": default_help, "cli": cli}


COMPRESSION = "compression"
COMPENSATION = "compensation"
DATA = "calibration and evaluation"
STREAMING = "large models (block-by-block streaming)"
EXPORT = "export (ONNX / TensorRT / Triton)"


@dataclass
class RunConfig:
    model: str = field(default="demo", metadata=cli(
        help="'demo', a local Hugging Face folder, or an alias such as llama2-7b (looked up in the local HF cache)"))
    out: Path = field(default=Path("eora-out"), metadata=cli(help="output: a folder, X.onnx, or X.plan"))
    method: str = field(default=defaults.METHOD, metadata=cli(group=COMPENSATION, choices=method_names(),
                          help="; ".join(f"{m}: {get_method(m).help}" for m in method_names())))
    rank: int = field(default=defaults.RANK, metadata=cli(group=COMPENSATION,
        help="rank of the low-rank residual; clamped per layer to min(out, in)"))
    lowrank_bits: int = field(default=defaults.LOWRANK_BITS, metadata=cli(group=COMPENSATION, help="storage of the factors: 4, 8 or 16"))
    lowrank_quant: str = field(default=defaults.LOWRANK_QUANT, metadata=cli(group=COMPENSATION, choices=LOWRANK_QUANTS,
        help="how 4/8-bit factors are rounded: gptq (A by GPTQ on the calibration Gram, B refitted to it, then GPTQ; "
             "per layer never worse than rtn) or rtn (round to nearest; the svd baseline always uses it)"))
    lowrank_group_size: int = field(default=defaults.LOWRANK_GROUP_SIZE, metadata=cli(group=COMPENSATION, help="factor quantization group",
                                      default_help="largest of 128..2 dividing rank and width"))
    quant: str = field(default=defaults.QUANT, metadata=cli(group=COMPRESSION, choices=quant_choices(), help="weight quantizer"))
    bits: int = field(default=defaults.BITS, metadata=cli(group=COMPRESSION, help="weight bits: 4 or 3"))
    group_size: int = field(default=defaults.GROUP_SIZE, metadata=cli(group=COMPRESSION, help="quantization group along the input dim"))
    sparsity: str = field(default=defaults.SPARSITY, metadata=cli(group=COMPRESSION, choices=sparsity_choices(), help="2:4 sparsity"))
    calib: list[str] = field(default_factory=list, metadata=cli(group=DATA, metavar="FILE[:WEIGHT]",
                               help="calibration text or JSONL ('text' field); repeat to mix sets with weights",
                               default_help="built-in English text"))
    calib_samples: int = field(default=128, metadata=cli(group=DATA, help="calibration sequences, spread evenly over the calibration text"))
    seq_len: int = field(default=256, metadata=cli(group=DATA, help="tokens per sequence"))
    eval_file: str | None = field(default=None, metadata=cli(group=DATA, help="in-domain held-out text for perplexity and KL to FP16",
                                    default_help="the demo's held-out split"))
    # None: every held-out window for the demo, DEFAULT_EVAL_SAMPLES otherwise
    eval_samples: int | None = field(default=None, metadata=cli(group=DATA,
        help="held-out sequences per text; more trades time for a tighter interval",
                                       default_help="all for the demo, 64 otherwise"))
    # out-of-domain text; None: the demo's shipped one for the demo, none otherwise; "none": none
    ood_file: str | None = field(default=None, metadata=cli(group=DATA,
        help="out-of-domain held-out text, reported beside --eval-file; 'none' for none",
                                   default_help="the demo's shipped one for --model demo, none for other models"))
    sweep_ranks: list[int] | None = field(default=None, metadata=cli(group=DATA, parse=int_list,
                                            help="ranks of the KL- and perplexity-vs-rank plot, on the first 32 held-out windows, "
                                            "e.g. 4,8,16,32; '' for none", default_help="around --rank"))
    compare: bool = field(default=True, metadata=cli(group=DATA, flag="--no-compare", help="evaluate only --method, not SVD beside it"))
    lsi_epochs: int = field(default=5, metadata=cli(group=COMPENSATION, help="LSI epochs per block"))
    lsi_lr: float = field(default=1e-3, metadata=cli(group=COMPENSATION, help="LSI learning rate, in units of the mean singular value"))
    fast: bool = field(default=False, metadata=cli(group=COMPENSATION, help="Cholesky + randomized SVD instead of eigh + full SVD (big models)"))
    # average rank ("32") or factor bytes ("1.5MB"), spread by validation gain
    rank_budget: str | None = field(default=None, metadata=cli(group=COMPENSATION, metavar="RANK|BYTES",
                                      help="EoRA factor budget, an average rank (32) or bytes (1.5MB), spread across layers by "
                                      "measured validation gain per byte; layers that gain nothing get rank 0",
                                      default_help="uniform --rank"))
    val_samples: int = field(default=32, metadata=cli(group=COMPENSATION,
        help="calibration windows beside the fitting ones, never fitted on, held out to allocate --rank-budget"))
    only: list[str] = field(default_factory=list, metadata=cli(group=COMPRESSION, metavar="PATTERN",
                              help="compress only Linears matching this fnmatch pattern (repeatable)"))
    skip: list[str] = field(default_factory=list, metadata=cli(group=COMPRESSION, metavar="PATTERN",
                              help="leave Linears matching this pattern in FP16 (repeatable)"))
    batch_size: int = field(default=8, metadata=cli(group=DATA, help="sequences per forward pass"))
    seed: int = field(default=0, metadata=cli(group=DATA, help="random seed"))
    format: str = field(default="dir", metadata=cli(cli=False, help="the deployable kind, for preflight's disk and path checks"))
    deploy_out: Path | None = field(default=None, metadata=cli(cli=False, help="--out when it is not the artifacts folder"))
    # Where blocks come from and what is kept between them (engine/): --stream changes only these.
    stream: bool = field(default=False, metadata=cli(group=STREAMING, help="process one decoder block at a time from memory-mapped safetensors "
                           "(automatic above 1B parameters)"))
    resume: bool = field(default=False, metadata=cli(group=STREAMING, help="streaming: continue an interrupted run from its last finished block"))
    work_dir: Path | None = field(default=None, metadata=cli(group=STREAMING, help="streaming: per-block work folder",
        default_help="<out>.stream-work"))
    device: str = field(default="auto", metadata=cli(group=STREAMING, choices=DEVICES, help="streaming: where the math runs"))
    stream_inputs: str = field(default="fp", metadata=cli(group=STREAMING, choices=STREAM_INPUTS,
                                 help="streaming: calibrate each block on FP inputs, or on the compressed blocks' outputs (sequential)"))
    # auto: float32 when they fit ACT_FP32_LIMIT_BYTES, else float16
    act_dtype: str = field(default="auto", metadata=cli(group=STREAMING, flag="--stream-act-dtype", choices=ACT_DTYPES,
                             help="streaming: storage of hidden states between blocks (auto: float32 when they fit in memory, else float16)"))

    def compress_config(self) -> CompressConfig:
        return CompressConfig(quant=self.quant, bits=self.bits, group_size=self.group_size, sparsity=self.sparsity)

    def compensation(self, method: str, rank: int | None = None) -> CompensationConfig:
        return CompensationConfig(
            method=method, rank=self.rank if rank is None else rank, lowrank_bits=self.lowrank_bits,
            lowrank_group_size=self.lowrank_group_size, lowrank_quant=self.lowrank_quant, fast=self.fast,
        )

    def validate(self) -> None:
        """Every rule on the options alone; rules that need the model or files are :mod:`validate`'s."""
        method = get_method(self.method)  # one line naming the choices for an unknown method
        method.check(self)
        if self.method != "none" and self.rank <= 0:
            raise UsageError(f"--rank must be a positive integer, got {self.rank}")
        if self.lowrank_bits not in LOWRANK_BITS:
            raise UsageError(f"--lowrank-bits must be 4, 8 or 16, got {self.lowrank_bits}")
        if self.bits not in WEIGHT_BITS:
            raise UsageError(f"--bits must be 3 or 4, got {self.bits}")
        if self.quant == "none" and self.sparsity == "none":
            raise UsageError("nothing to compress: --quant none needs --sparsity sparsegpt or magnitude")
        if self.calib_samples <= 0 or self.seq_len < 2 or (self.eval_samples is not None and self.eval_samples <= 0):
            raise UsageError("--calib-samples and --eval-samples must be positive and --seq-len at least 2")
        if self.rank_budget is not None:
            parse_budget(self.rank_budget)
            if not method.allocates:
                allocating = " or ".join(m for m in method_names() if get_method(m).allocates)
                raise UsageError(f"--rank-budget allocates EoRA ranks; use it with --method {allocating}, not {self.method}")
            if self.val_samples <= 0:
                raise UsageError("--rank-budget needs validation windows: --val-samples must be positive")
        if self.stream_inputs not in STREAM_INPUTS:
            raise UsageError(f"unknown --stream-inputs '{self.stream_inputs}'; use {' or '.join(STREAM_INPUTS)}")
        if self.act_dtype not in ACT_DTYPES:
            raise UsageError(f"unknown --stream-act-dtype '{self.act_dtype}'; use one of {', '.join(ACT_DTYPES)}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown --device '{self.device}'; use one of {', '.join(DEVICES)}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.quant != "none" and self.group_size <= 0:
            raise UsageError(f"--group-size must be positive, got {self.group_size}")
        if self.lowrank_group_size < 0:
            raise UsageError(f"--lowrank-group-size must be 0 (automatic) or positive, got {self.lowrank_group_size}")
        bad = [r for r in (self.sweep_ranks or []) if r <= 0]
        if bad:
            raise UsageError(f"--sweep-ranks must be positive integers, got {bad[0]}")
        self._validate_calib()

    def _validate_calib(self) -> None:
        from .calibration import CalibSource

        for spec in self.calib:
            try:
                src = CalibSource.parse(spec)
            except ValueError:
                raise UsageError(f"--calib {spec}: expected FILE or FILE:WEIGHT") from None
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise UsageError(f"--calib {spec}: the weight must be a positive number, e.g. --calib data.txt:0.7")


@dataclass
class DeployConfig:
    """Settings of the deployable outputs (ONNX graphs, TensorRT plan, Triton, TensorRT-LLM), shared by
    the main command, ``eora-export export`` and ``eora-export finetune``."""

    format: str | None = field(default=None, metadata=cli(choices=FORMATS, help="output kind",
                                 default_help="from --out: .onnx -> onnx, .plan -> plan, else dir"))
    verify: bool = field(default=False, metadata=cli(group=EXPORT,
                           help="with ONNX outputs: compare FP16 baseline, compressed, SVD and EoRA graphs through Polygraphy"))
    kv_cache: bool = field(default=False, metadata=cli(group=EXPORT, help="export graphs with past/present key-value inputs and outputs"))
    plugin_lib: Path | None = field(default=None, metadata=cli(group=EXPORT, help="libeora_plugin.so",
        default_help="$EORA_PLUGIN_LIB or the built one"))
    max_batch: int = field(default=8, metadata=cli(group=EXPORT, help="engine profile: largest batch"))
    max_seq: int = field(default=1024, metadata=cli(group=EXPORT, help="engine profile: longest sequence"))
    opt_seq: int = field(default=128, metadata=cli(group=EXPORT, help="engine profile: sequence length to tune for"))
    timing_cache: Path | None = field(default=None, metadata=cli(group=EXPORT, help="TensorRT timing cache reused between builds",
                                        default_help="beside the plan"))
    triton_name: str = field(default="eora_llm", metadata=cli(group=EXPORT, help="model name in the Triton repository"))
    out: Path | None = field(default=None, metadata=cli(cli=False,
        help="the deployable path (X.onnx, X.plan, a Triton repository, a TensorRT-LLM folder)"))
