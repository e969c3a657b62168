"""How much of the 4-bit factor rounding loss ``--lowrank-quant gptq`` removes, per Linear of the demo.

For one compression setting (as tools/recovery_experiments.py, same cache), EoRA factors of
rank --rank are stored three ways: 16-bit, rounded to nearest (``rtn``) and rounded in the
fitted activation metric (``gptq``). Printed: each layer's fitted error tr(E G Eᵀ) relative to
the uncompensated one, and the summed share of the rtn-vs-16-bit gap that gptq closes.

    OMP_NUM_THREADS=1 python tools/factor_quant_error.py --setting sparsegpt --rank 32
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from recovery_experiments import SETTINGS

from eora_export.calibration import CalibSource, calibration_windows, collect_grams
from eora_export.compensate.apply import CompensationConfig, compensate_layers
from eora_export.compress import compress_model
from eora_export.models import DEMO_DIR, load_model, target_linears


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=SETTINGS, required=True)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4, help="factor bits")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/recovery_cache"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model(DEMO_DIR)
    calib = calibration_windows(tok, [CalibSource(DEMO_DIR / "calib.txt")], args.calib_samples, 256)
    linears = target_linears(model)
    grams = collect_grams(model, linears, calib, 8, False)
    cache = args.cache / f"{args.setting}.pt"
    if cache.exists():
        compressed = torch.load(cache, weights_only=False)
    else:
        c_model = copy.deepcopy(model)
        compressed = compress_model(c_model, target_linears(c_model), grams, SETTINGS[args.setting], calib)
    runs = {
        "16-bit": CompensationConfig(rank=args.rank, lowrank_bits=16),
        "rtn": CompensationConfig(rank=args.rank, lowrank_bits=args.bits, lowrank_quant="rtn"),
        "gptq": CompensationConfig(rank=args.rank, lowrank_bits=args.bits, lowrank_quant="gptq"),
    }
    res = {k: compensate_layers(compressed, grams, cfg, progress=False) for k, cfg in runs.items()}
    totals = dict.fromkeys(runs, 0.0)
    before = 0.0
    print(f"{'layer':28} " + " ".join(f"{k:>8}" for k in runs))
    for n in compressed:
        b = res["rtn"][n].error_before
        before += b
        for k in runs:
            totals[k] += res[k][n].error_after
        print(f"{n.replace('model.layers.', ''):28} " + " ".join(f"{res[k][n].error_after / b:8.4f}" for k in runs))
    print(f"{'all (relative)':28} " + " ".join(f"{totals[k] / before:8.4f}" for k in runs))
    gap = totals["rtn"] - totals["16-bit"]
    print(f"share of the rtn rounding loss removed by gptq: {100 * (totals['rtn'] - totals['gptq']) / gap:.1f}%")


if __name__ == "__main__":
    main()
