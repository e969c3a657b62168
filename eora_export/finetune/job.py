"""``eora-export finetune`` as steps: load and check → train from an init → re-quantize →
evaluate → (compare inits) → report. Writing is folders.write_finetuned.

Perplexities are held-out, on the same windows for every model:
  fp16                   the original model (--model)
  compressed             W_c alone
  start                  W_c + the initial factors (for the eora init: the input adapter)
  trained                W_c + trained factors stored in fp16
  trained_requantized    W_c + trained factors re-quantized to --lowrank-bits (what is written)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor, nn

from .. import __version__
from ..calibration import token_windows
from ..compensate.apply import swapped
from ..eora_linear import EoraLinear
from ..errors import BadInput, MissingInput, UsageError
from ..evaluate import mean_nll, perplexity
from ..models import load_model, resolve_model
from ..report import format_table
from ..validate import read_text_file
from .folders import AdapterFolder, BaseFolder, check_reference, load_adapter, load_base, start_modules
from .train import INITS, TrainConfig, initial_factors, requantize, split_windows, train_factors, trainable_modules

log = logging.getLogger("eora_export")

TRAIN_NLL_WINDOWS = 16  # fixed training windows scored before and after (the per-step losses are noisy)


@dataclass
class FinetuneConfig:
    adapter: Path
    data: Path
    model: str = "demo"
    base: Path | None = None  # default: base/ beside the adapter folder
    eval_data: Path | None = None  # default: hold out --heldout-fraction of --data
    heldout_fraction: float = 0.1
    eval_samples: int = 64
    seq_len: int = 256
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0
    init: str = "eora"
    lowrank_bits: int | None = None  # None: what the input adapter used
    lowrank_group_size: int = 0
    compare_inits: bool = False

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, weight_decay=self.weight_decay, seed=self.seed)

    def validate(self) -> None:
        self.train_config().validate()
        if self.init not in INITS:
            raise UsageError(f"--init must be one of {', '.join(INITS)}, got {self.init}")
        if self.lowrank_bits is not None and self.lowrank_bits not in (4, 8, 16):
            raise UsageError(f"--lowrank-bits must be 4, 8 or 16, got {self.lowrank_bits}")
        if not 0 < self.heldout_fraction < 1:
            raise UsageError(f"--heldout-fraction must lie strictly between 0 and 1, got {self.heldout_fraction}")
        if self.eval_samples <= 0 or self.seq_len < 2:
            raise UsageError("--eval-samples must be positive and --seq-len at least 2")
        if self.lowrank_group_size < 0:
            raise UsageError(f"--lowrank-group-size must be 0 (auto) or positive, got {self.lowrank_group_size}")


@dataclass
class Session:
    """Everything loaded and checked once, shared by every init of a comparison."""

    cfg: FinetuneConfig
    adapter: AdapterFolder
    base: BaseFolder
    model_path: Path  # the FP16 model
    model: nn.Module  # the compressed base (plain Linears holding W_c), frozen
    tokenizer: object
    start: dict[str, EoraLinear]  # W_c + the input adapter, exactly as written
    reference: dict[str, Tensor] | None  # FP16 W per layer (float32); only for the svd init
    train: Tensor  # [n_train, seq]
    held: Tensor  # [n_held, seq]
    lowrank_bits: int
    ppl: dict[str, float]  # fp16, compressed
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class InitRun:
    """One training run: its losses, perplexities and the modules to write."""

    init: str
    losses: list[float]
    ppl: dict[str, float]  # start, trained, trained_requantized
    train_nll: dict[str, float]  # before, after (on TRAIN_NLL_WINDOWS fixed training windows)
    modules: dict[str, EoraLinear]  # re-quantized
    seconds: float
    ppl_at: dict[int, float] = field(default_factory=dict)  # step -> held-out perplexity, re-quantized factors


def data_windows(cfg: FinetuneConfig, tokenizer) -> tuple[Tensor, Tensor]:
    """(train ``[n, seq]``, held-out ``[k, seq]``): the held-out part is --eval-data, or the tail of --data."""
    windows = token_windows(tokenizer, read_text_file(cfg.data, "--data"), cfg.seq_len)
    if windows.shape[0] == 0:
        raise BadInput(f"--data {cfg.data} is shorter than one {cfg.seq_len}-token window; give more text or lower --seq-len")
    if cfg.eval_data is None:
        train, held = split_windows(windows, cfg.heldout_fraction)
    else:
        train = windows
        held = token_windows(tokenizer, read_text_file(cfg.eval_data, "--eval-data"), cfg.seq_len, cfg.eval_samples)
        if held.shape[0] == 0:
            raise BadInput(f"--eval-data {cfg.eval_data} is shorter than one {cfg.seq_len}-token window; give more text or lower --seq-len")
    return train, held[: cfg.eval_samples]


def _input_bits(adapter: AdapterFolder, start: dict[str, EoraLinear]) -> int:
    """What the input adapter was stored at: eora_adapter.json, else the base's codes, else fp16."""
    bits = adapter.meta.get("lowrank_bits")
    if bits in (4, 8, 16):
        return int(bits)
    return max((m.lowrank_bits for m in start.values() if m.rank), default=16)


def prepare(cfg: FinetuneConfig) -> Session:
    """Load the adapter, the base and the FP16 model, check that they belong together, cut the data.

    Every check runs before the first evaluation, so a mismatch fails in seconds.
    """
    cfg.validate()
    t0 = time.perf_counter()
    adapter = load_adapter(cfg.adapter)
    base = load_base(cfg.base if cfg.base is not None else adapter.path.parent / "base")
    model_path = resolve_model(cfg.model)
    if not cfg.data.exists():
        raise MissingInput(f"--data {cfg.data} not found; give a plain-text or JSONL ('text' field) file")

    model, _ = load_model(base.path)
    for p in model.parameters():
        p.requires_grad_(False)
    linears = {n: _linear(model, n) for n in base.layers}
    absent = [n for n, m in linears.items() if m is None]
    if absent:
        raise BadInput(f"{base.path}/quantization.json lists {absent[0]}, which its checkpoint has no Linear for; re-export the base")
    start = start_modules(base, adapter, {n: m.bias for n, m in linears.items()})

    fp_model, tokenizer = load_model(model_path)
    fp_linears = {n: _linear(fp_model, n) for n in base.layers}
    reference = {n: m.weight.detach() for n, m in fp_linears.items() if m is not None}
    check_reference(base, reference, cfg.model)
    if model.config.vocab_size < len(tokenizer):
        raise BadInput(f"the tokenizer of --model {cfg.model} has {len(tokenizer)} tokens, the base only {model.config.vocab_size}; "
                       "pass the model the base was compressed from")
    train, held = data_windows(cfg, tokenizer)
    ppl = {"fp16": perplexity(fp_model, held, 8, "perplexity fp16")}
    need_reference = cfg.init == "svd" or cfg.compare_inits
    reference = {n: w.clone() for n, w in reference.items()} if need_reference else None
    del fp_model

    ppl["compressed"] = perplexity(model, held, 8, "perplexity compressed")
    bits = cfg.lowrank_bits or _input_bits(adapter, start)
    return Session(cfg, adapter, base, model_path, model, tokenizer, start, reference, train, held, bits, ppl,
                   {"load_s": time.perf_counter() - t0})


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return mod if isinstance(mod, nn.Linear) else None


def _ppl(model: nn.Module, modules: dict[str, nn.Module], held: Tensor, desc: str) -> float:
    with swapped(model, modules):
        return perplexity(model, held, 8, desc)


def train_from(session: Session, init: str, progress: bool = True, eval_at: tuple[int, ...] = ()) -> InitRun:
    """Train the factors from ``init`` with the session's settings; evaluate before and after.

    eval_at: steps after which the held-out perplexity of the re-quantized factors is also
    measured (a learning curve on held-out text; costs one evaluation each).
    """
    t0 = time.perf_counter()
    cfg, model = session.cfg, session.model
    factors = initial_factors(init, session.start, session.reference, cfg.seed)
    layers = trainable_modules(session.start, factors)
    probe = session.train[:TRAIN_NLL_WINDOWS]
    ppl_at: dict[int, float] = {}

    def on_step(step: int, _loss: float) -> None:
        if step in eval_at:
            now = requantize(session.start, layers, session.lowrank_bits, cfg.lowrank_group_size)
            ppl_at[step] = _ppl(model, now, session.held, f"perplexity at step {step}")

    with swapped(model, layers):
        start_ppl = perplexity(model, session.held, 8, f"perplexity start ({init})")
        nll_before = mean_nll(model, probe, 8, "train nll")
        losses = train_factors(model, layers, session.train, cfg.train_config(), progress, on_step if eval_at else None)
        nll_after = mean_nll(model, probe, 8, "train nll") if cfg.steps else nll_before
    fp16 = requantize(session.start, layers, 16)
    final = requantize(session.start, layers, session.lowrank_bits, cfg.lowrank_group_size)
    ppl = {
        "start": start_ppl,
        "trained": _ppl(model, fp16, session.held, "perplexity trained (fp16 factors)"),
        "trained_requantized": _ppl(model, final, session.held, f"perplexity trained ({session.lowrank_bits}-bit factors)"),
    }
    return InitRun(init, losses, ppl, {"before": nll_before, "after": nll_after}, final, time.perf_counter() - t0, ppl_at)


def compare_inits(session: Session, runs: dict[str, InitRun], progress: bool = True) -> dict[str, InitRun]:
    """``runs`` completed with a run from every init in INITS (same steps, lr, seed, batches)."""
    out = dict(runs)
    for init in INITS:
        if init not in out:
            out[init] = train_from(session, init, progress)
    return {init: out[init] for init in INITS}


def _loss_summary(losses: list[float]) -> dict:
    if not losses:
        return {"steps": 0, "curve": []}
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "first": losses[0], "last": losses[-1],
            "first_mean": sum(losses[:k]) / k, "last_mean": sum(losses[-k:]) / k, "window": k, "curve": losses}


def comparison_table(rows: dict[str, InitRun], bits: int) -> str:
    """Text table: held-out perplexity per init before and after training, and the loss change."""
    head = f"{'init':<6} {'start ppl':>10} {'trained ppl':>12} {f'{bits}-bit ppl':>11} {'train loss':>18}"
    lines = [head, "-" * len(head)]
    for init, r in rows.items():
        loss = _loss_summary(r.losses)
        change = f"{loss['first_mean']:.3f} -> {loss['last_mean']:.3f}" if r.losses else "-"
        lines.append(f"{init:<6} {r.ppl['start']:10.3f} {r.ppl['trained']:12.3f} {r.ppl['trained_requantized']:11.3f} {change:>18}")
    return "\n".join(lines)


def _bytes(modules: dict[str, EoraLinear]) -> dict[str, int]:
    weights = sum(m.weight_q.storage_bytes() for m in modules.values())
    return {"compressed_linear_bytes": weights, "factor_bytes": sum(m.storage_bytes() for m in modules.values()) - weights
            - sum(m.bias.numel() * 2 for m in modules.values() if m.bias is not None)}


def build_report(session: Session, run: InitRun, comparison: dict[str, InitRun] | None) -> dict:
    cfg = session.cfg
    fp16_bytes = sum(m.out_features * m.in_features * 2 for m in session.start.values())
    before, after = _bytes(session.start), _bytes(run.modules)
    ppl = {**session.ppl, **run.ppl}
    rows = [("fp16", ppl["fp16"], fp16_bytes), ("compressed", ppl["compressed"], before["compressed_linear_bytes"]),
            (f"+ start factors ({run.init})", ppl["start"], sum(before.values())),
            ("+ trained factors (fp16)", ppl["trained"], after["compressed_linear_bytes"] + sum(
                m.rank * (m.in_features + m.out_features) * 2 for m in run.modules.values())),
            (f"+ trained, {session.lowrank_bits}-bit", ppl["trained_requantized"], sum(after.values()))]
    loss = _loss_summary(run.losses)
    table = (f"fine-tuned the factors from the {run.init} init: {cfg.steps} steps, lr {cfg.lr:g}, batch {cfg.batch_size} "
             f"x {cfg.seq_len} tokens, seed {cfg.seed}\n" + format_table(rows) + "\n(held-out perplexity; size: decoder Linears only)")
    if run.losses:
        table += (f"\ntraining loss {loss['first_mean']:.3f} -> {loss['last_mean']:.3f} (mean of the first/last {loss['window']} steps); "
                  f"on {min(TRAIN_NLL_WINDOWS, session.train.shape[0])} fixed training windows "
                  f"{run.train_nll['before']:.3f} -> {run.train_nll['after']:.3f}")
    report = {
        "eora_export_version": __version__,
        "command": "finetune",
        "model": cfg.model,
        "model_path": str(session.model_path),
        "adapter": str(session.adapter.path),
        "base": str(session.base.path),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()} | {"lowrank_bits": session.lowrank_bits},
        "data": {"train_windows": int(session.train.shape[0]), "train_tokens": int(session.train.numel()),
                 "heldout_windows": int(session.held.shape[0]), "heldout_tokens": int(session.held.numel()),
                 "heldout_from": str(cfg.eval_data) if cfg.eval_data else f"last {cfg.heldout_fraction:g} of --data"},
        "perplexity": ppl,
        "requantization": {"lowrank_bits": session.lowrank_bits, "ppl_fp16_factors": ppl["trained"],
                           "ppl_requantized": ppl["trained_requantized"], "cost": ppl["trained_requantized"] - ppl["trained"]},
        "loss": loss | {"train_nll_before": run.train_nll["before"], "train_nll_after": run.train_nll["after"],
                        "train_nll_windows": min(TRAIN_NLL_WINDOWS, int(session.train.shape[0]))},
        "sizes": {"fp16_linear_bytes": fp16_bytes, **after, "factor_bytes_before": before["factor_bytes"]},
        "timings": {**session.timings, "train_s": run.seconds},
    }
    if comparison:
        report["compare_inits"] = {
            "steps": cfg.steps, "lr": cfg.lr, "seed": cfg.seed, "lowrank_bits": session.lowrank_bits,
            "rows": {init: {"ppl_start": r.ppl["start"], "ppl_trained": r.ppl["trained"],
                            "ppl_trained_requantized": r.ppl["trained_requantized"],
                            "train_loss": _loss_summary(r.losses), "train_nll": r.train_nll, "seconds": r.seconds}
                     for init, r in comparison.items()},
        }
        report["compare_inits"]["table"] = comparison_table(comparison, session.lowrank_bits)
        table += "\n\nsame steps, lr, seed and batches from each init (held-out perplexity):\n" + report["compare_inits"]["table"]
    report["table"] = table
    return report


def output_meta(session: Session, run: InitRun) -> dict:
    """eora_adapter.json / quantization.json settings of the fine-tuned output."""
    cfg, a_meta, b_meta = session.cfg, session.adapter.meta, session.base.meta
    meta = {k: a_meta.get(k, b_meta.get(k)) for k in ("method", "rank", "quant", "bits", "group_size", "sparsity")}
    if run.init != "eora" or meta["method"] is None:
        meta["method"] = run.init if run.init != "eora" else "lora"
    meta["rank"] = max((m.rank for m in run.modules.values()), default=0)
    meta["lowrank_bits"] = session.lowrank_bits
    meta["eora_export_version"] = __version__
    meta["finetune"] = {"init": run.init, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                        "weight_decay": cfg.weight_decay, "seed": cfg.seed, "data": str(cfg.data), "from_adapter": str(session.adapter.path)}
    return meta
