"""Settings of a run, defined once: every field with its default; the CLI is generated from them.

Rules that involve one setting or a pair of them live in :meth:`RunConfig.validate`; rules
that need the model or files (shapes, disk, text length) live in :mod:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .compensate.apply import CompensationConfig
from .compensate.ranks import parse_budget
from .compress import CompressConfig
from .errors import UsageError

METHOD_CHOICES = ("eora", "svd", "none", "lsi", "lsi+eora", "eora-fb")
STREAM_INPUTS = ("fp", "compressed")
ACT_DTYPES = ("auto", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    model: str = "demo"
    out: Path = Path("eora-out")
    method: str = "eora"
    rank: int = 16
    lowrank_bits: int = 4
    lowrank_group_size: int = 0
    quant: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sparsity: str = "none"
    calib: list[str] = field(default_factory=list)
    calib_samples: int = 128
    seq_len: int = 256
    eval_file: str | None = None
    eval_samples: int | None = None  # None: every held-out window for the demo, DEFAULT_EVAL_SAMPLES otherwise
    ood_file: str | None = None  # out-of-domain text; None: the demo's shipped one for the demo, none otherwise; "none": none
    sweep_ranks: list[int] | None = None  # None: a default sweep around --rank
    compare: bool = True  # also evaluate SVD and no compensation beside --method
    lsi_epochs: int = 5
    lsi_lr: float = 1e-3
    fast: bool = False
    rank_budget: str | None = None  # --rank-budget: average rank ("32") or factor bytes ("1.5MB"), spread by validation gain
    val_samples: int = 32  # calibration windows after the fitting ones, for --rank-budget (never fitted on)
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    batch_size: int = 8
    seed: int = 0
    format: str = "dir"  # the deployable kind, for preflight's disk and path checks
    deploy_out: Path | None = None  # --out when it is not the artifacts folder
    # Where blocks come from and what is kept between them (engine/): --stream changes only these.
    stream: bool = False  # blocks from memory-mapped safetensors (automatic above 1B parameters), resumable
    resume: bool = False  # continue an interrupted streamed run from its last finished block
    work_dir: Path | None = None  # per-block work folder; None: <out>.stream-work
    device: str = "auto"  # where the block math runs: auto | cpu | cuda
    stream_inputs: str = "fp"  # calibration inputs of block i+1: FP outputs, or the compressed blocks' ("compressed")
    act_dtype: str = "auto"  # hidden states between blocks: auto (float32 when they fit ACT_FP32_LIMIT_BYTES) | float16 | float32

    def compress_config(self) -> CompressConfig:
        return CompressConfig(quant=self.quant, bits=self.bits, group_size=self.group_size, sparsity=self.sparsity)

    def compensation(self, method: str, rank: int | None = None) -> CompensationConfig:
        return CompensationConfig(
            method=method, rank=self.rank if rank is None else rank, lowrank_bits=self.lowrank_bits,
            lowrank_group_size=self.lowrank_group_size, fast=self.fast,
        )

    def validate(self) -> None:
        if self.method not in METHOD_CHOICES:
            raise UsageError(f"unknown --method {self.method}; use one of {', '.join(METHOD_CHOICES)}")
        if self.method.startswith("lsi") and self.sparsity != "none":
            raise UsageError("--method lsi trains quantized weights and does not keep a 2:4 mask; use --sparsity none")
        if self.method.startswith("lsi") and self.quant == "none":
            raise UsageError("--method lsi needs a weight quantizer (--quant rtn, gptq or awq) to start from")
        if self.method != "none" and self.rank <= 0:
            raise UsageError(f"--rank must be a positive integer, got {self.rank}")
        if self.lowrank_bits not in (4, 8, 16):
            raise UsageError(f"--lowrank-bits must be 4, 8 or 16, got {self.lowrank_bits}")
        if self.bits not in (3, 4):
            raise UsageError(f"--bits must be 3 or 4, got {self.bits}")
        if self.quant == "none" and self.sparsity == "none":
            raise UsageError("nothing to compress: --quant none needs --sparsity sparsegpt or magnitude")
        if self.calib_samples <= 0 or self.seq_len < 2 or (self.eval_samples is not None and self.eval_samples <= 0):
            raise UsageError("--calib-samples and --eval-samples must be positive and --seq-len at least 2")
        if self.rank_budget is not None:
            parse_budget(self.rank_budget)
            if self.method not in ("eora", "eora-fb"):
                raise UsageError(f"--rank-budget allocates EoRA ranks; use it with --method eora or eora-fb, not {self.method}")
            if self.val_samples <= 0:
                raise UsageError("--rank-budget needs validation windows: --val-samples must be positive")
        if self.stream_inputs not in STREAM_INPUTS:
            raise UsageError(f"unknown --stream-inputs '{self.stream_inputs}'; use {' or '.join(STREAM_INPUTS)}")
        if self.act_dtype not in ACT_DTYPES:
            raise UsageError(f"unknown --stream-act-dtype '{self.act_dtype}'; use one of {', '.join(ACT_DTYPES)}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown --device '{self.device}'; use one of {', '.join(DEVICES)}")
