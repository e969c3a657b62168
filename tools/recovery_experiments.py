"""How much of the compressed demo's KL each compensation method gives back (issue 18, part 2).

For one compression setting: compress once (cached), then compensate with each method and
score every model on the same held-out windows: mean per-token KL(FP ‖ model), perplexity,
share of the compressed model's KL removed, in domain (the demo's held-out split) and out
of domain (--ood FILE), plus factor bytes. The validation split (calibration text after the
fitting windows) is scored too: it is what rank allocation and the never-worse rule may use.

    OMP_NUM_THREADS=1 python tools/recovery_experiments.py --setting sparsegpt --rank 32 \
        --methods none,svd,eora,eora-fb --ood /tmp/ood.txt
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from eora_export.calibration import CalibSource, calibration_windows, collect_grams, read_texts, token_windows, validation_windows
from eora_export.compensate.alternating import FB_ALT_DAMP, ROUNDS, feedback_alternate_fit
from eora_export.compensate.apply import LOWRANK_QUANTS, CompensationConfig, LayerResult, compensate_layers, factor_module, swapped
from eora_export.compensate.feedback import DEFAULT_DAMP, feedback_compensate_model, feedback_error, feedback_factors
from eora_export.compensate.ranks import budget_bytes, budget_compensate
from eora_export.compress import CompressConfig, compress_model
from eora_export.defaults import LOWRANK_QUANT
from eora_export.evaluate import model_logits, recovered_share, score
from eora_export.models import DEMO_DIR, load_model, target_linears

SETTINGS = {
    "rtn": CompressConfig(quant="rtn"),
    "sparsegpt": CompressConfig(quant="rtn", sparsity="sparsegpt"),
    "sparsegpt-gptq": CompressConfig(quant="gptq", sparsity="sparsegpt"),
    "magnitude": CompressConfig(quant="rtn", sparsity="magnitude"),
    "gptq3": CompressConfig(quant="gptq", bits=3),
}


def factor_bytes(results: dict[str, LayerResult]) -> int:
    """Bytes of the low-rank factors over all compensated Linears."""
    return sum(r.module.storage_bytes() - r.module.weight_q.storage_bytes() for r in results.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=SETTINGS, required=True)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lowrank-bits", type=int, default=4)
    ap.add_argument("--lowrank-quant", choices=LOWRANK_QUANTS, default=LOWRANK_QUANT, help="factor rounding (as the CLI)")
    ap.add_argument("--methods", default="none,svd,eora,eora-fb")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--val-samples", type=int, default=32, help="calibration windows beside the fitting ones (never fitted on)")
    ap.add_argument("--eval-samples", type=int, default=10_000, help="held-out windows (default: all)")
    ap.add_argument("--ood", type=Path, default=None, help="out-of-domain text file")
    ap.add_argument("--ood-samples", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/recovery_cache"))
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    print("command:", "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), flush=True)

    fp_model, tok = load_model(DEMO_DIR)
    sources = [CalibSource(DEMO_DIR / "calib.txt")]
    calib = calibration_windows(tok, sources, args.calib_samples, args.seq_len)  # the CLI's windows
    val = validation_windows(tok, sources, args.calib_samples, args.val_samples, args.seq_len)
    held = token_windows(tok, read_texts(DEMO_DIR / "heldout.txt"), args.seq_len, args.eval_samples)
    evals = {"val": val, "in": held}
    if args.ood:
        evals["ood"] = token_windows(tok, read_texts(args.ood), args.seq_len, args.ood_samples)
    print({k: tuple(v.shape) for k, v in evals.items()}, flush=True)

    linears = target_linears(fp_model)
    grams = collect_grams(fp_model, linears, calib, 8, False)
    c_model = copy.deepcopy(fp_model)
    c_linears = target_linears(c_model)
    cache = args.cache / f"{args.setting}.pt"
    t = time.perf_counter()
    if cache.exists():
        compressed = torch.load(cache, weights_only=False)
    else:
        compressed = compress_model(c_model, c_linears, grams, SETTINGS[args.setting], calib)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(compressed, cache)
    print(f"compress {time.perf_counter() - t:.1f}s ({next(iter(compressed.values())).method})", flush=True)
    biases = {n: m.bias for n, m in c_linears.items()}
    # The FP model's log-probabilities, once (float16 keeps ~1 GB for all windows): every
    # method is then one forward per batch instead of two.
    ref = {k: [torch.log_softmax(fp_model(w[i : i + args.batch_size]).logits.float(), -1).half()
               for i in range(0, w.shape[0], args.batch_size)] for k, w in evals.items()}

    @torch.no_grad()
    def evaluate(modules: dict) -> dict:
        out = {}
        with swapped(c_model, modules):
            for k, w in evals.items():
                batches = iter(ref[k])
                out[k] = score(model_logits(c_model), w, lambda _ids, b=batches: next(b).float(), args.batch_size, progress=False)
        return out

    cfg = CompensationConfig(rank=args.rank, lowrank_bits=args.lowrank_bits, lowrank_quant=args.lowrank_quant)
    rows = {}
    for method in args.methods.split(","):
        t = time.perf_counter()
        spec, _, damp = method.partition("~")
        damp = float(damp) if damp else (FB_ALT_DAMP if "-alt" in spec else DEFAULT_DAMP)  # the CLI's defaults
        if spec == "eora" and "~" in method:
            # Plain EoRA in the ridge metric G + δI (between EoRA, δ = 0, and SVD, δ → ∞).
            res = damped_eora(compressed, grams, cfg, biases, damp)
        elif method in ("none", "svd", "eora"):
            res = compensate_layers(compressed, grams, CompensationConfig(**{**cfg.__dict__, "method": method}), biases, False)
        elif method.startswith("eora-fb"):
            # eora-fb[-nores][-alt][-block|-budget][#rounds][@shrink][~damp]; -budget: ranks allocated as
            # eora-budget, then the walk; -nores: o/down do not absorb the residual stream's error (the CLI does).
            residual = "-nores" not in spec
            spec, _, shrink = spec.partition("@")
            spec, _, rounds = spec.partition("#")
            unit = "block" if spec.endswith("-block") else "input"
            ranks = None
            if spec.endswith("-budget"):
                budget = budget_bytes({n: tuple(c.weight.shape) for n, c in compressed.items()}, cfg, "rank", cfg.rank)
                _, ranks = budget_compensate(compressed, grams, collect_grams(fp_model, linears, val, 8, False), cfg,
                                             budget, biases)
            # -alt[#rounds]: the compressor's codes re-fitted in turn with the factors (--method eora-fb-alt).
            fit = feedback_alternate_fit(setting_run(args.setting), int(rounds or ROUNDS)) if "-alt" in spec else None
            res = feedback_compensate_model(c_model, compressed, grams.owner, calib, cfg, biases, 8, unit,
                                            float(shrink or 0), damp, ranks, fit, residual)
        elif spec.startswith("eora-budget"):
            # eora-budget[-rel]: the bytes of uniform --rank EoRA, spread by validation gain per byte.
            res = run_budget(compressed, grams, collect_grams(fp_model, linears, val, 8, False), cfg, biases,
                             relative=spec.endswith("-rel"), damp=damp if "~" in method else 0.0)
        else:
            raise SystemExit(f"unknown method {method}")
        fit_s = time.perf_counter() - t
        modules = {n: r.module for n, r in res.items()}
        rows[method] = (evaluate(modules), factor_bytes(res), fit_s)
        report_row(method, rows)


def setting_run(setting: str) -> SimpleNamespace:
    """What the re-compressing methods read of a run (its compressor) for one SETTINGS entry."""
    c = SETTINGS[setting]
    return SimpleNamespace(quant=c.quant, sparsity=c.sparsity, compress_config=lambda: c)


def damped_eora(compressed, grams, cfg, biases, damp: float) -> dict:
    """EoRA on the FP Gram in the metric G + δI (feedback_factors with X_c = X_fp)."""
    out = {}
    for n, cl in compressed.items():
        g = grams.gram(n)
        w, w_c = cl.reference.double(), cl.weight.dequantize().double()
        b, a, t = feedback_factors(w, w_c, g, g, g, min(cfg.rank, *w.shape), damp=damp)
        module = factor_module(cl, b, a, cfg, biases.get(n))
        out[n] = LayerResult(module, module.rank, t.before, feedback_error(t, module.b.double(), module.a.double()))
    return out


def run_budget(compressed, grams, val_grams, cfg, biases, relative: bool, damp: float = 0.0) -> dict:
    """Ranks from eora_export.compensate.ranks at the byte budget of uniform cfg.rank."""
    budget = budget_bytes({n: tuple(c.weight.shape) for n, c in compressed.items()}, cfg, "rank", cfg.rank)
    res, chosen = budget_compensate(compressed, grams, val_grams, cfg, budget, biases, relative, damp)
    print("ranks:", {n.replace("model.layers.", "").replace("_proj", ""): r for n, r in chosen.items()}, flush=True)
    return res


def report_row(method: str, rows: dict) -> None:
    base = rows.get("none")
    scores, factor_bytes, fit_s = rows[method]
    parts = [f"{method:>16}"]
    for k, s in scores.items():
        share = recovered_share(base[0][k].mean_kl, s.mean_kl) if base else math.nan
        parts.append(f"{k}: KL {s.mean_kl:.5f} ppl {s.perplexity:7.3f} rec {100 * share:5.1f}%")
    parts.append(f"factors {factor_bytes / 1024:.0f} KiB fit {fit_s:.1f}s")
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
