"""CPU-measurable proxies of the EoraLinear kernels' speed, read from the compiled code (issue 14, part 3).

No GPU is needed: the kernels are compiled for one architecture (default sm_90a) to a cubin, ptxas reports
registers, spills and shared memory per kernel (--resource-usage), and the SASS from cuobjdump gives, for the
M = 1 inner loop,

  * instructions per INT4 weight: every instruction of the loop body (including predicated ones and the
    once-per-group scale reload) divided by the weights one thread consumes per iteration (goal <= 2);
  * bytes of W in flight per thread (the 16-byte weight loads issued per iteration, of which one batch is
    outstanding while the other is multiplied) and per SM (times the threads resident by registers / smem);

for the skinny path (M <= 16, mma.sync) and, for comparison, the v1 GEMV's INT4 inner loop. Real speed still
needs a GPU: tools/gpu_check.py measures it.

    python tools/kernel_proxies.py                 # table on stdout
    python tools/kernel_proxies.py --json proxies.json --check   # exit 1 if a goal is missed

Needs nvcc and cuobjdump + nvdisasm (CUDA toolkit, or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KERNEL_SRC = REPO / "trt_plugins" / "eora_linear" / "eoraLinearKernel.cu"
GOAL_INSTR_PER_WEIGHT = 2.0
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024

# (label, mangled-name fragment, threads per block, rows of x per MMA column block, how weights are counted)
KERNELS = (
    ("skinny M<=8 (mma.sync, packed INT4)", "skinnyKernelILi1EE", 128, 1, "hmma"),
    ("skinny M<=16 (mma.sync, packed INT4)", "skinnyKernelILi2EE", 128, 2, "hmma"),
    ("v1 GEMV M=1 (fp32 FFMA, INT4)", "gemvKernelILi1ELi0ELi4EE", 256, 1, "ffma"),
)


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, in the toolkit, or from the nvidia-cuda-* pip wheels (nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path("/usr/local/cuda/bin") / name]
    for site in map(Path, sys.path):
        candidates += sorted((site / "nvidia").glob(f"cu*/bin/{name}")) if (site / "nvidia").is_dir() else []
    return next((str(c) for c in candidates if c.is_file()), None)


def compile_cubin(arch: str, out: Path) -> str:
    """Compile the kernels to a cubin; returns ptxas's --resource-usage report."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise SystemExit("kernel_proxies: nvcc not found (install the CUDA toolkit)")
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-cubin", "--resource-usage", "--expt-relaxed-constexpr",
           f"-I{KERNEL_SRC.parent}", "-o", str(out), str(KERNEL_SRC)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kernel_proxies: nvcc failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, spill stores/loads (bytes), shared memory (bytes)."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            current = m.group(1)
            usage.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0})
            continue
        if current is None:
            continue
        if (s := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            usage[current]["spill_stores"] = int(s.group(1))
            usage[current]["spill_loads"] = int(s.group(2))
        if (r := re.search(r"Used (\d+) registers", line)):
            usage[current]["registers"] = int(r.group(1))
            if (sm := re.search(r"(\d+) bytes smem", line)):
                usage[current]["smem"] = int(sm.group(1))
    return usage


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction of one function's SASS."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _INSTR.finditer(text)]


def innermost_hot_loop(instrs: list[tuple[int, str, str]], marker: str) -> list[tuple[int, str, str]]:
    """The loop body (target .. backward branch) holding the most `marker` instructions (HMMA or FFMA)."""
    best: list[tuple[int, str, str]] = []
    best_count = -1
    for addr, op, args in instrs:
        if not op.startswith("BRA"):
            continue
        m = re.match(r"`?\(?\.?L?_?x?_?\d*\)?\s*(0x[0-9a-f]+)", args) or re.search(r"(0x[0-9a-f]+)", args)
        if m is None:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [i for i in instrs if target <= i[0] <= addr]
        count = sum(1 for i in body if i[1].startswith(marker))
        if count > best_count:
            best, best_count = body, count
    return best


def loop_metrics(body: list[tuple[int, str, str]], rows_per_col: int, how: str) -> dict[str, Any]:
    ops = Counter(op.split(".")[0] for _, op, _ in body)
    if how == "hmma":
        # One HMMA consumes one 32-bit word (8 INT4 weights) of each thread's A fragment; M <= 16 issues two
        # HMMA (two B operands) per word.
        weights = ops["HMMA"] * 8 // rows_per_col
    else:
        weights = ops["FFMA"] // rows_per_col  # v1 GEMV at M=1: one fp32 FMA per weight
    # Weight loads come in runs from one base register (lanes' 16 B at +0, +0x200, +0x400, +0x600: one k16 step
    # each); the scale reload is a lone 16-byte load from its own base.
    offsets: dict[str, list[str]] = {}
    for _, op, args in body:
        m = re.search(r"\[(R\d+)\.64([^\]]*)\]", args)
        if op.startswith("LDG.E.128.CONSTANT") and m:
            offsets.setdefault(m.group(1), []).append(m.group(2))
    w_loads = sum(len(o) for o in offsets.values() if len(set(o)) >= 2)
    return {"loop_instructions": len(body), "weights_per_thread_per_iteration": weights,
            "instructions_per_int4_weight": round(len(body) / weights, 3) if weights else None,
            "w_bytes_loaded_per_iteration": 16 * w_loads if how == "hmma" else None,
            "opcodes": dict(ops.most_common(12))}


def occupancy(registers: int, smem: int, threads: int) -> int:
    """Blocks per SM (Hopper limits): registers are allocated per warp in units of 256."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * (threads // 32))
    by_smem = SMEM_PER_SM // max(smem, 1)
    return max(0, min(by_regs, by_smem, MAX_THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM))


def measure(arch: str) -> dict[str, Any]:
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None or find_tool("nvdisasm") is None:
        raise SystemExit("kernel_proxies: cuobjdump/nvdisasm not found "
                         "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        usage = parse_resource_usage(compile_cubin(arch, cubin))
        compile_s = time.monotonic() - t0
        env_path = str(Path(find_tool("nvdisasm")).parent)
        results = []
        for label, fragment, threads, rows, how in KERNELS:
            name = next((n for n in usage if fragment in n), None)
            if name is None:
                results.append({"kernel": label, "error": f"no kernel matching {fragment}"})
                continue
            proc = subprocess.run([cuobjdump, "-sass", "-fun", name, str(cubin)], capture_output=True, text=True,
                                  env={"PATH": env_path + ":" + str(Path(cuobjdump).parent) + ":/usr/bin:/bin"})
            body = innermost_hot_loop(parse_sass(proc.stdout), "HMMA" if how == "hmma" else "FFMA")
            u = usage[name]
            blocks = occupancy(u["registers"], u["smem"], threads)
            m = loop_metrics(body, rows, how)
            # An iteration issues two batches; while one is multiplied the next one's loads are outstanding, so
            # at least half of an iteration's weight bytes are in flight per thread at any time.
            in_flight = m["w_bytes_loaded_per_iteration"] // 2 if m["w_bytes_loaded_per_iteration"] else None
            results.append({"kernel": label, "mangled": name, **u, "threads_per_block": threads,
                            "blocks_per_sm": blocks, **m, "w_bytes_in_flight_per_thread": in_flight,
                            "w_bytes_in_flight_per_sm": in_flight * threads * blocks if in_flight else None})
    return {"arch": arch, "compile_seconds": round(compile_s, 1), "goal_instructions_per_weight": GOAL_INSTR_PER_WEIGHT,
            "kernels": results}


def table(doc: dict[str, Any]) -> str:
    lines = [f"Kernel proxies, {doc['arch']} (compile {doc['compile_seconds']} s):", "",
             "| kernel | regs | spills (B) | smem (B) | blocks/SM | loop instr | weights/thread/iter | instr per INT4 weight"
             " | W bytes in flight / thread | / SM |", "|---|---|---|---|---|---|---|---|---|---|"]
    # Little's law for comparison: H200 4.8 TB/s x ~700 ns DRAM latency / 132 SMs ~ 25 KB per SM.
    for k in doc["kernels"]:
        if "error" in k:
            lines.append(f"| {k['kernel']} | {k['error']} |")
            continue
        spills = k["spill_stores"] + k["spill_loads"]
        per_thread = k["w_bytes_in_flight_per_thread"]
        lines.append(f"| {k['kernel']} | {k['registers']} | {spills} | {k['smem']} | {k['blocks_per_sm']} | "
                     f"{k['loop_instructions']} | {k['weights_per_thread_per_iteration']} | "
                     f"{k['instructions_per_int4_weight']} | {per_thread if per_thread else '-'} | "
                     f"{k['w_bytes_in_flight_per_sm'] or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a", help="nvcc -arch (default sm_90a)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--check", action="store_true", help="exit 1 if the skinny M<=8 loop needs more than 2 "
                   "instructions per INT4 weight or any skinny kernel spills")
    args = p.parse_args(argv)
    doc = measure(args.arch)
    print(table(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    if args.check:
        skinny = [k for k in doc["kernels"] if k["kernel"].startswith("skinny") and "error" not in k]
        ok = bool(skinny) and skinny[0]["instructions_per_int4_weight"] <= GOAL_INSTR_PER_WEIGHT
        ok = ok and all(k["spill_stores"] + k["spill_loads"] == 0 for k in skinny)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
