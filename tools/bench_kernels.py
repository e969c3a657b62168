"""Benchmark the EoraLinear kernels on Llama-2-7B linear shapes, side by side with cuBLAS.

Columns, for each (K x N) shape and batch M:
  cublas_fp16   torch.matmul(x, W) with an fp16 W (the dense baseline)
  int4          our kernel, INT4 weight alone (rank 0): the floor the residual is paid on top of
  unfused       our rank-0 kernel + two torch matmuls for the factors (how a graph without the
                fused node runs the residual)
  fused         our kernel, INT4 weight + rank-r INT4 factors in one extended-K pass
  fused_cutlass (M > 16, where the library has it) the opt-in CUTLASS path of the fused op, for comparison
  sparse24      our kernel, 2:4-sparse INT4 weight + the same fused factors, as an engine runs it: the v1
                compacted GEMV (0.75x the bytes) only where the skinny path cannot run; otherwise the
                weight is read dense (the skinny loop is memory-bound, the compacted GEMV ALU-bound)

Each column reports microseconds per call, achieved GB/s (bytes the call must read: weights,
scales, factors, activations, output) and the share of the HBM peak (--peak-gbps, by default read
from the device name: H200 4.8 TB/s, H100 SXM 3.35 TB/s; an unknown device needs the flag). Weights are
rotated over enough copies (at least 8) that the working set exceeds the 50 MB L2 several times,
so small matrices are not flattered by cache hits; timing uses CUDA events after a warm-up, around
a CUDA graph of the calls (so Python's launch overhead does not hide the kernels; --no-graph to
time eager launches).

The issue-14 targets (TARGETS below) are checked here, on the measured rows, and written into the
JSON ("targets": name, measured, goal, pass) and printed; --check makes a missed target exit 4, and
--strict-graph makes a CUDA-graph capture that fell back to eager launches exit 3.

    python tools/bench_kernels.py                      # table + bench_kernels.{json,png} in --out
    python tools/bench_kernels.py --ms 1 16 256 --shapes 4096x4096

Needs a CUDA GPU and the plugin library (built on demand with eora_export.deploy.plugin.build_plugin).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K = in_features, N = out_features)
MS = (1, 2, 4, 8, 9, 16, 32, 64, 128, 256)
METHODS = ("cublas_fp16", "int4", "unfused", "fused", "sparse24")
L2_BYTES = 50 * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN shapes")
    p.add_argument("--ms", nargs="+", type=int, default=list(MS), help="batch sizes M")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--group", type=int, default=128, help="weight group size along K")
    p.add_argument("--lowrank-group", type=int, default=64, help="factor group size")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM peak in GB/s for the %%-of-peak column and target (default: from the device name)")
    p.add_argument("--min-copies", type=int, default=8, help="weight copies rotated (more if L2 needs it)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--no-graph", action="store_true", help="time eager launches instead of a CUDA graph")
    p.add_argument("--strict-graph", action="store_true", help="exit 3 if any CUDA-graph capture fell back to eager")
    p.add_argument("--check", action="store_true", help="exit 4 if any target is missed")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the JSON and PNG")
    return p.parse_args(argv)


# HBM peak by device name (GB/s, vendor figures). Order matters: the first substring that matches wins.
HBM_PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIE", 2000.0), ("H100", 3350.0),
                 ("GH200", 4000.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIE", 1935.0), ("A100", 1555.0))


def hbm_peak_gbps(device_name: str) -> float | None:
    """The HBM peak of a device from its name (torch.cuda.get_device_name), or None if unknown."""
    name = device_name.upper()
    if "GH200" in name:
        return 4000.0
    for key, gbps in HBM_PEAK_GBPS:
        if key in name:
            return gbps
    return None


# The issue-14 targets, checked on the rows of one run: (name, goal text, function(rows, peak) -> (measured, pass)).
def _per_shape(rows: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["K"], r["N"]), []).append(r)
    return out


def check_targets(rows: list[dict[str, Any]], peak_gbps: float) -> list[dict[str, Any]]:
    """Every target on every shape: {"name", "shape", "measured", "goal", "pass", "worst_M"}."""
    results: list[dict[str, Any]] = []

    def add(name: str, shape: tuple[int, int], measured: float, goal: str, ok: bool, worst_m: int | None) -> None:
        results.append({"name": name, "shape": f"{shape[0]}x{shape[1]}", "measured": round(measured, 4), "goal": goal,
                        "pass": bool(ok), "worst_M": worst_m})

    for shape, sel in sorted(_per_shape(rows).items()):
        upto256 = [r for r in sel if 1 <= r["M"] <= 256]
        if upto256:
            worst = max(upto256, key=lambda r: r["fused"]["us"] / r["int4"]["us"])
            ratio = worst["fused"]["us"] / worst["int4"]["us"]
            add("fused rank-r / INT4 alone, worst M in 1..256", shape, ratio, "<= 1.10", ratio <= 1.10, worst["M"])
            worst = max(upto256, key=lambda r: r["fused"]["us"] / r["unfused"]["us"])
            ratio = worst["fused"]["us"] / worst["unfused"]["us"]
            add("fused / unfused chain, worst M in 1..256", shape, ratio, "< 1.00", ratio < 1.0, worst["M"])
        one = [r for r in sel if r["M"] == 1]
        if one:
            r = one[0]
            speedup = r["cublas_fp16"]["us"] / r["fused"]["us"]
            add("M=1 speed-up of fused over cuBLAS FP16", shape, speedup, ">= 3.0", speedup >= 3.0, 1)
            pct = 100.0 * r["fused"]["gbps"] / peak_gbps
            add("M=1 fused share of HBM peak (%)", shape, pct, ">= 70", pct >= 70.0, 1)
            ratio = r["sparse24"]["us"] / r["fused"]["us"]
            add("M=1 2:4+INT4 / INT4 (both fused rank-r)", shape, ratio, "< 1.00", ratio < 1.0, 1)
        mid = [r for r in sel if 9 <= r["M"] <= 64]
        if mid:
            worst = max(mid, key=lambda r: r["fused"]["us"] / r["cublas_fp16"]["us"])
            ratio = worst["fused"]["us"] / worst["cublas_fp16"]["us"]
            add("fused / cuBLAS FP16, worst M in 9..64", shape, ratio, "<= 1.00", ratio <= 1.0, worst["M"])
    return results


def graph_fallbacks(rows: list[dict[str, Any]]) -> list[str]:
    """Cells whose CUDA-graph capture fell back to eager launches ("KxN M=m method")."""
    return [f"{r['K']}x{r['N']} M={r['M']} {m}" for r in rows for m in (*METHODS, "fused_cutlass")
            if isinstance(r.get(m), dict) and not r[m].get("cuda_graph", True)]


def print_targets(targets: list[dict[str, Any]]) -> None:
    print(f"{'target':<48} {'shape':>11} {'measured':>10} {'goal':>8}  result")
    for t in targets:
        worst = f" (M={t['worst_M']})" if t["worst_M"] is not None else ""
        print(f"{t['name']:<48} {t['shape']:>11} {t['measured']:>10.3f} {t['goal']:>8}  "
              f"{'pass' if t['pass'] else 'MISS'}{worst}")


def copies_for(bytes_per_copy: int, minimum: int) -> int:
    """Enough copies that one rotation reads at least 4x the L2."""
    return max(minimum, math.ceil(4 * L2_BYTES / max(bytes_per_copy, 1)))


def random_24_codes(torch: Any, k: int, n: int, device: str) -> Any:
    """INT4 codes [K, N] with at most 2 non-zeros in every 4 consecutive k of a column."""
    codes = torch.randint(-8, 8, (k // 4, 4, n), dtype=torch.int8, device=device)
    order = torch.rand(k // 4, 4, n, device=device).argsort(dim=1)
    codes[order >= 2] = 0  # ranks 2 and 3 of a random order: exactly two zeros per group
    return codes.reshape(k, n)


class Case:
    """The tensors of one shape in plugin layout, n_copies times, plus fp16 copies for cuBLAS."""

    def __init__(self, torch: Any, tp: Any, k: int, n: int, args: argparse.Namespace) -> None:
        from eora_export.quant import pack_int4

        dev = "cuda"
        r, g, lg = args.rank, args.group, args.lowrank_group
        self.k, self.n, self.r = k, n, r
        self.attrs0 = {"in_features": k, "out_features": n, "rank": 0, "weight_bits": 4, "group_size": g,
                       "lowrank_bits": 16, "lowrank_group_size": 0, "sparse24": 0, "has_bias": 0}
        self.attrs = {**self.attrs0, "rank": r, "lowrank_bits": 4, "lowrank_group_size": lg}
        self.attrs24 = {**self.attrs, "sparse24": 1}

        def scales(rows: int, cols: int) -> Any:
            return (torch.rand(rows, cols, device=dev) * 0.01 + 1e-3).half()

        def int4(rows: int, cols: int, codes: Any = None) -> Any:
            c = codes if codes is not None else torch.randint(-8, 8, (rows, cols), dtype=torch.int8, device=dev)
            return pack_int4(c).view(torch.int8)

        w_int4 = k * n // 2 + (k // g) * n * 2
        factors = (k * r // 2 + (k // lg) * r * 2) + (r * n // 2 + (r // lg) * n * 2)
        self.bytes = {
            "cublas_fp16": k * n * 2,
            "int4": w_int4,
            "unfused": w_int4 + (k * r + r * n) * 2,
            "fused": w_int4 + factors,
            "sparse24": (k // 2) * (n // 2) + (k // 4) * (n // 2) + (k // g) * n * 2 + factors,
        }
        self.w16 = [torch.randn(k, n, device=dev).half() * 0.02 for _ in range(copies_for(k * n * 2, args.min_copies))]
        self.q = []
        for _ in range(copies_for(w_int4 + factors, args.min_copies)):
            t = {"w": int4(k, n), "w_scale": scales(k // g, n), "a": int4(k, r), "a_scale": scales(k // lg, r),
                 "b": int4(r, n), "b_scale": scales(r // lg, n)}
            t["a16"] = torch.randn(k, r, device=dev).half() * 0.02  # dequantized factors for the unfused path
            t["b16"] = torch.randn(r, n, device=dev).half() * 0.02
            # Packed copies for the M <= 16 path, built once per weight as the plugin does ("none": no such layout).
            t["packed0"] = tp.prepare_packed(t, self.attrs0) if tp.packed_bytes(self.attrs0) else "none"
            t["packed"] = tp.prepare_packed(t, self.attrs) if tp.packed_bytes(self.attrs) else "none"
            if tp.cutlass_bytes(self.attrs):  # the opt-in CUTLASS path, measured beside the default for M > 16
                t["cutlass"] = tp.prepare_cutlass(t, self.attrs)
            self.q.append(t)
        self.sp = []
        for _ in range(copies_for(self.bytes["sparse24"], args.min_copies)):
            t = {"w": int4(k, n, random_24_codes(torch, k, n, dev)), "w_scale": scales(k // g, n),
                 "a": int4(k, r), "a_scale": scales(k // lg, r), "b": int4(r, n), "b_scale": scales(r // lg, n)}
            t["sparse"] = tp.prepare_sparse24(t["w"], self.attrs24)
            t["packed"] = tp.prepare_packed(t, self.attrs24) if tp.packed_bytes(self.attrs24) else "none"
            self.sp.append(t)


def time_calls(torch: Any, fn: Any, n_copies: int, warmup: int, iters: int, graph: bool) -> tuple[float, bool]:
    """Microseconds per call of fn(i), which uses weight copy i % n_copies; and whether a graph was used.

    A call is a few microseconds of GPU time but tens of microseconds of Python (ctypes) on the host, so
    timed eagerly the GPU would idle between launches. With graph=True the iters calls are captured in one
    CUDA graph and replayed, so the events time the kernels back to back, as an engine runs them.
    """
    for i in range(warmup):
        fn(i % n_copies)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(iters):
                    fn(i % n_copies)
            g.replay()  # warm the graph itself
            torch.cuda.synchronize()
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1000.0 / iters, True
        except RuntimeError as e:  # capture unsupported here: fall back to eager timing, and say so
            print(f"bench_kernels: CUDA graph capture failed ({e}); timing eagerly", file=sys.stderr)
            torch.cuda.synchronize()
    start.record()
    for i in range(iters):
        fn(i % n_copies)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters, False


def t_packed(case: Case) -> bool:
    """Whether the 2:4 case runs with packed copies (then M <= 16 reads the dense weight on the skinny path)."""
    return not isinstance(case.sp[0]["packed"], str)


def bench_shape(torch: Any, tp: Any, case: Case, m: int, args: argparse.Namespace) -> dict[str, Any]:
    x = torch.randn(m, case.k, device="cuda").half()
    act = m * case.k * 2 + m * case.n * 2  # x read, y written
    y = torch.empty(m, case.n, device="cuda", dtype=torch.float16)

    def cublas(i: int) -> None:
        torch.matmul(x, case.w16[i], out=y)

    def int4(i: int) -> None:
        tp.eora_linear_cuda(x, case.q[i], case.attrs0, packed=case.q[i]["packed0"], out=y)

    def unfused(i: int) -> None:
        t = case.q[i]
        tp.eora_linear_cuda(x, t, case.attrs0, packed=t["packed0"], out=y)
        y.add_(torch.matmul(torch.matmul(x, t["a16"]), t["b16"]))

    def fused(i: int) -> None:
        tp.eora_linear_cuda(x, case.q[i], case.attrs, packed=case.q[i]["packed"], out=y)

    def sparse(i: int) -> None:
        t = case.sp[i]
        tp.eora_linear_cuda(x, t, case.attrs24, sparse=t["sparse"], packed=t["packed"], out=y)

    fns = {"cublas_fp16": (cublas, len(case.w16)), "int4": (int4, len(case.q)), "unfused": (unfused, len(case.q)),
           "fused": (fused, len(case.q)), "sparse24": (sparse, len(case.sp))}
    row: dict[str, Any] = {"K": case.k, "N": case.n, "M": m, "rank": case.r,
                           "path": tp.select_path(case.attrs, m)}
    if m > 16 and "cutlass" in case.q[0]:
        def fused_cutlass(i: int) -> None:
            tp.eora_linear_cuda(x, case.q[i], case.attrs, cutlass=case.q[i]["cutlass"], algo="cutlass", out=y)

        us, graphed = time_calls(torch, fused_cutlass, len(case.q), args.warmup, args.iters, not args.no_graph)
        gbps = (case.bytes["fused"] + act) / (us * 1e-6) / 1e9
        row["fused_cutlass"] = {"us": us, "bytes": case.bytes["fused"] + act, "gbps": gbps,
                                "pct_peak": 100.0 * gbps / args.peak_gbps, "cuda_graph": graphed}
    for name in METHODS:
        fn, copies = fns[name]
        us, graphed = time_calls(torch, fn, copies, args.warmup, args.iters, not args.no_graph)
        nbytes = case.bytes[name] + act
        if name == "sparse24" and tp.select_path(case.attrs24, m, packed=t_packed(case)) != "gemv":
            nbytes = case.bytes["fused"] + act  # past the GEMV the dense tensor-core path reads dense w
        gbps = nbytes / (us * 1e-6) / 1e9
        row[name] = {"us": us, "bytes": nbytes, "gbps": gbps, "pct_peak": 100.0 * gbps / args.peak_gbps,
                     "cuda_graph": graphed}
    return row


def print_header() -> None:
    print(f"{'K x N':>12} {'M':>5} {'path':>11} " + " ".join(f"{m:>22}" for m in METHODS))
    print(" " * 30 + " ".join(f"{'us    GB/s  %peak':>22}" for _ in METHODS))


def print_row(r: dict[str, Any]) -> None:
    cells = " ".join(f"{r[m]['us']:8.2f} {r[m]['gbps']:6.0f} {r[m]['pct_peak']:5.1f}%" for m in METHODS)
    extra = f"  cutlass {r['fused_cutlass']['us']:8.2f} us" if "fused_cutlass" in r else ""
    print(f"{str(r['K']) + 'x' + str(r['N']):>12} {r['M']:>5} {r['path']:>11} {cells}{extra}", flush=True)


def plot(rows: list[dict[str, Any]], path: Path, peak: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: (s[0], s[1]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes, strict=True):
        sel = [r for r in rows if (r["K"], r["N"]) == (k, n)]
        ms = [r["M"] for r in sel]
        for m in METHODS:
            ax.plot(ms, [r[m]["us"] for r in sel], marker="o", label=m)
        cut = [r for r in sel if "fused_cutlass" in r]
        if cut:
            ax.plot([r["M"] for r in cut], [r["fused_cutlass"]["us"] for r in cut], marker="x", ls="--",
                    label="fused_cutlass (opt-in)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch M")
        ax.set_ylabel("µs per call")
        ax.set_title(f"{k} x {n}, rank {sel[0]['rank']} (peak {peak:.0f} GB/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 1
    from eora_export.deploy import plugin as tp

    device = torch.cuda.get_device_name()
    if args.peak_gbps is None:
        args.peak_gbps = hbm_peak_gbps(device)
        if args.peak_gbps is None:
            print(f"bench_kernels: unknown HBM peak for '{device}'; pass --peak-gbps", file=sys.stderr)
            return 2
    if tp.find_library() is None:
        print("bench_kernels: building the plugin library (first run)...", file=sys.stderr)
        tp.build_plugin()
    tp.load_plugin()
    rows = []
    print_header()
    for spec in args.shapes:
        k, n = (int(v) for v in spec.lower().split("x"))
        case = Case(torch, tp, k, n, args)
        for m in args.ms:
            rows.append(bench_shape(torch, tp, case, m, args))
            print_row(rows[-1])
        del case
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    targets = check_targets(rows, args.peak_gbps)
    fallbacks = graph_fallbacks(rows)
    meta = {"device": device, "peak_gbps": args.peak_gbps, "rank": args.rank, "group": args.group,
            "lowrank_group": args.lowrank_group, "iters": args.iters, "warmup": args.warmup,
            "cuda_graph": not args.no_graph, "graph_fallbacks": fallbacks}
    (args.out / "bench_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1))
    try:
        plot(rows, args.out / "bench_kernels.png", args.peak_gbps)
        wrote = f"{args.out / 'bench_kernels.json'} and {args.out / 'bench_kernels.png'}"
    except ImportError:  # a bare GPU machine may lack matplotlib: the JSON and the table are what count
        wrote = f"{args.out / 'bench_kernels.json'} (matplotlib not installed: no plot)"
    print()
    print_targets(targets)
    print(f"wrote {wrote}")
    if fallbacks and args.strict_graph:
        print(f"bench_kernels: CUDA-graph capture fell back to eager launches for {len(fallbacks)} cells "
              f"(first: {fallbacks[0]}); the timings include Python launch overhead", file=sys.stderr)
        return 3
    if args.check and not all(t["pass"] for t in targets):
        return 4
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
