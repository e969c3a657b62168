"""--fast against the exact optimum and against GPTQModel's EoRA math (issue 18, part 3).

The case: a [out, in] layer with RTN INT4 g128 error, a Gram from N tokens whose spectrum is
log-spaced 1 → 1e-3 with 8 outlier channels ×30, randomly rotated; rank 128 at 4096².
Prints the relative excess error of ``eora_factors(fast=True)`` over the exact optimum and
the wall times of our fast path, our exact path and GPTQModel's steps (eigh of the Gram in
float64, inverse of the root, float32 whitening, full SVD), re-implemented here.

    OMP_NUM_THREADS=2 python tools/bench_eora_fast.py --dim 4096 --tokens 8192 --rank 128
"""

from __future__ import annotations

import argparse
import time

import torch

from eora_export.compensate.eora import eora_factors, gram_root, weighted_error
from eora_export.quant import quantize


def hard_case(dim: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW [dim, dim] float64 = W − RTN4 g128(W), G [dim, dim] float64)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -3, dim, dtype=torch.float64)
    outliers = torch.randperm(dim, generator=g)[:8]
    spectrum[outliers] *= 30
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64)).Q
    x = (torch.randn(tokens, dim, generator=g, dtype=torch.float64) * spectrum) @ rot
    gram = x.T @ x / tokens
    w = torch.randn(dim, dim, generator=g) / dim**0.5
    delta = (w - quantize(w, 4, min(128, dim), clip_search=False).dequantize()).double()
    return delta, gram


def gptqmodel_eora(delta: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQModel's EoRA steps (eora.py): eigh of G, clamp negatives, R = Q √Λ, R⁻¹, SVD of ΔW R."""
    lam, q = torch.linalg.eigh(gram.double())
    if (lam < 0).any():
        lam[lam < 0] = lam[lam > 0].min()  # their fix-up of negative eigenvalues
    root = q @ torch.diag(lam.sqrt())
    root_inv = torch.linalg.inv(root)
    m = delta.float() @ root.float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    b = u[:, :rank] * s[:rank].sqrt()
    a = (s[:rank].sqrt()[:, None] * vh[:rank]) @ root_inv.float()
    return b.double(), a.double()


def timed(fn, *args, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-exact", action="store_true", help="optimum from svdvals only (no factor timing)")
    args = ap.parse_args()
    torch.manual_seed(0)
    delta, gram = hard_case(args.dim, args.tokens)
    print(f"case: {args.dim}² layer, {args.tokens} tokens, rank {args.rank}, threads {torch.get_num_threads()}", flush=True)
    s = torch.linalg.svdvals(gram_root(gram).whiten(delta))
    optimum = float((s[args.rank :] ** 2).sum())
    (bf, af), t_fast = timed(eora_factors, delta, gram, args.rank, True, repeat=args.repeat)
    fast = weighted_error(delta, gram, bf, af)
    print(f"fast:      {t_fast:6.2f} s  excess {(fast - optimum) / optimum:.2e}", flush=True)
    (bg, ag), t_gm = timed(gptqmodel_eora, delta, gram, args.rank)
    gm = weighted_error(delta, gram, bg, ag)
    print(f"gptqmodel: {t_gm:6.2f} s  excess {(gm - optimum) / optimum:.2e}", flush=True)
    if not args.skip_exact:
        (be, ae), t_exact = timed(eora_factors, delta, gram, args.rank, False)
        exact = weighted_error(delta, gram, be, ae)
        print(f"exact:     {t_exact:6.2f} s  excess {(exact - optimum) / optimum:.2e}", flush=True)
    print(f"speed-up of fast over gptqmodel: {t_gm / t_fast:.1f}x", flush=True)


if __name__ == "__main__":
    main()
