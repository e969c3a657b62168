"""CPU twins of the prepared GPU check (tools/gpu_check.py) and of bench_kernels' own target checks.

On a machine without a GPU the check must run its preflight and stop at the first GPU call with one
clear line; the target arithmetic, HBM peak lookup, graph-fallback detection and JUnit/Markdown
outputs are pure functions tested here on synthetic rows. The real run happens on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench_kernels")
gpu_check = _load("gpu_check")


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the check would run for real")
def test_dry_run_stops_at_the_first_gpu_call_with_one_line(tmp_path):
    try:
        from eora_export.deploy import plugin as tp

        tp.find_tensorrt_include()
    except Exception as e:  # any reason the headers are not here
        pytest.skip(f"TensorRT headers not found ({e}): the preflight would stop earlier")
    proc = _run(["--out", str(tmp_path / "out")])
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == gpu_check.EXIT_NO_GPU, proc.stdout + proc.stderr
    assert lines[0].startswith("gpu_check: preflight: ok"), lines
    assert lines[-1] == ("gpu_check: dry run complete up to the first GPU call: no CUDA device here "
                         "(torch.cuda.is_available() is False); run this on the GPU machine")
    assert not proc.stderr.strip(), proc.stderr


def test_dry_run_flag_and_missing_headers(tmp_path):
    proc = _run(["--dry-run", "--out", str(tmp_path / "a")])
    if "TensorRT headers" in proc.stdout:
        pytest.skip("TensorRT headers not found on this machine")
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].endswith("(--dry-run)"), proc.stdout
    proc = _run(["--out", str(tmp_path / "b")], env={"TENSORRT_INCLUDE_DIR": str(tmp_path / "none")})
    assert proc.returncode == gpu_check.EXIT_STEP_FAILED
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED in preflight (missing: TensorRT headers"), last
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    assert doc["steps"][0]["step"] == "preflight" and doc["steps"][0]["status"] == "failed"


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                                       ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H100 NVL", 3900.0),
                                       ("NVIDIA GH200 480GB", 4000.0), ("NVIDIA A100-SXM4-80GB", 2039.0),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_hbm_peak_from_the_device_name(name, peak):
    assert bench.hbm_peak_gbps(name) == peak


def _row(m: int, us: dict[str, float], k: int = 4096, n: int = 4096) -> dict:
    nbytes = 9_000_000
    return {"K": k, "N": n, "M": m, "rank": 128, "path": "gemv",
            **{meth: {"us": v, "gbps": nbytes / (v * 1e-6) / 1e9, "cuda_graph": True} for meth, v in us.items()}}


def _good(m: int) -> dict[str, float]:
    return {"cublas_fp16": 12.0, "int4": 3.0, "unfused": 9.0, "fused": 3.2, "sparse24": 2.9}


def test_targets_all_pass_on_good_rows():
    rows = [_row(m, _good(m)) for m in (1, 9, 64, 256)]
    targets = bench.check_targets(rows, peak_gbps=3350.0)
    names = {t["name"] for t in targets}
    assert len(names) == 6 and len(targets) == 6
    assert all(t["pass"] for t in targets), targets


def test_targets_report_each_miss_with_its_number_and_m():
    rows = [_row(1, {**_good(1), "fused": 4.0, "sparse24": 4.5}),  # 1.33x INT4, slower 2:4, 3x cuBLAS
            _row(9, {**_good(9), "cublas_fp16": 3.0}),               # fused slower than cuBLAS at M=9
            _row(256, {**_good(256), "unfused": 3.1})]                # fused slower than unfused at 256
    t = {x["name"]: x for x in bench.check_targets(rows, peak_gbps=4800.0)}
    ratio = t["fused rank-r / INT4 alone, worst M in 1..256"]
    assert not ratio["pass"] and ratio["measured"] == pytest.approx(4.0 / 3.0, abs=1e-3) and ratio["worst_M"] == 1
    assert not t["M=1 2:4+INT4 / INT4 (both fused rank-r)"]["pass"]
    assert not t["fused / cuBLAS FP16, worst M in 9..64"]["pass"] and t["fused / cuBLAS FP16, worst M in 9..64"]["worst_M"] == 9
    assert not t["fused / unfused chain, worst M in 1..256"]["pass"]
    share = t["M=1 fused share of HBM peak (%)"]
    assert share["measured"] == pytest.approx(100 * 9_000_000 / 4e-6 / 1e9 / 4800.0, abs=1e-2) and not share["pass"]
    assert t["M=1 speed-up of fused over cuBLAS FP16"]["pass"]  # 12 / 4 = 3.0 exactly meets the goal


def test_graph_fallbacks_are_found():
    rows = [_row(1, _good(1))]
    assert bench.graph_fallbacks(rows) == []
    rows[0]["fused"]["cuda_graph"] = False
    assert bench.graph_fallbacks(rows) == ["4096x4096 M=1 fused"]


def test_junit_counts_and_markdown(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert gpu_check.junit_counts(junit) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}
    doc = {"date": "d", "device": "NVIDIA H200", "arch": "90a", "peak_gbps": 4800.0, "torch": "2.11", "cuda": "13.0",
           "steps": [{"step": "build", "status": "ok", "seconds": 1.0, "detail": "x"}],
           "targets": bench.check_targets([_row(1, _good(1))], 4800.0)}
    md = gpu_check.results_markdown(doc)
    assert "| build | ok | 1.0 | x |" in md and "| M=1 speed-up of fused over cuBLAS FP16 | 4096x4096 | 3.75 | >= 3.0 | pass (M=1) |" in md


# --------------------------------------------------------------------------- tools/kernel_proxies.py

proxies = _load("kernel_proxies")

_SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   LDG.E.128.CONSTANT R8, desc[UR6][R88.64] ;
        /*0120*/                   LDG.E.128.CONSTANT R12, desc[UR6][R88.64+0x200] ;
        /*0130*/              @!P0 LDG.E.128.CONSTANT R20, desc[UR6][R90.64] ;
        /*0140*/                   LOP3.LUT R2, R8, 0xf000f, R5, 0xea, !PT ;
        /*0150*/                   HADD2 R2, R2, -1032, -1032 ;
        /*0160*/                   HMMA.16816.F32 R24, R2, R8, R24 ;
        /*0170*/                   HMMA.16816.F32 R28, R2, R8, R28 ;
        /*0180*/              @!P1 BRA 0x110 ;
        /*0190*/                   EXIT ;
"""


def test_proxies_parse_the_hot_loop():
    body = proxies.innermost_hot_loop(proxies.parse_sass(_SASS), "HMMA")
    assert [a for a, _, _ in body] == list(range(0x110, 0x190, 0x10))
    m = proxies.loop_metrics(body, rows_per_col=1, how="hmma")
    assert m["loop_instructions"] == 8 and m["weights_per_thread_per_iteration"] == 16
    assert m["instructions_per_int4_weight"] == 0.5
    assert m["w_bytes_loaded_per_iteration"] == 32  # the lone scale load (R90) is not a weight load


def test_proxies_resource_usage_and_occupancy():
    text = ("ptxas info    : Compiling entry function '_Z3fooILi1EEv' for 'sm_90a'\n"
            "ptxas info    : Function properties for _Z3fooILi1EEv\n"
            "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 95 registers, used 1 barriers, 8196 bytes smem, 400 bytes cmem[0]\n")
    assert proxies.parse_resource_usage(text) == {
        "_Z3fooILi1EEv": {"registers": 95, "spill_stores": 8, "spill_loads": 4, "smem": 8196}}
    assert proxies.occupancy(95, 8196, 128) == 5  # 96 regs x 128 threads: 5 blocks in 64 K registers
    assert proxies.occupancy(128, 16388, 128) == 4


def test_kernel_proxies_on_the_real_build():
    """Compiles the kernels for sm_90a (about a minute on 2 cores) and checks the M = 1 goal: <= 2 SASS
    instructions per INT4 weight in the skinny inner loop, no spills."""
    missing = [t for t in ("nvcc", "cuobjdump", "nvdisasm") if proxies.find_tool(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    doc = proxies.measure("sm_90a")
    k = {x["kernel"]: x for x in doc["kernels"]}
    sk = k["skinny M<=8 (mma.sync, packed INT4)"]
    assert sk["instructions_per_int4_weight"] <= proxies.GOAL_INSTR_PER_WEIGHT, sk
    assert sk["spill_stores"] == sk["spill_loads"] == 0 and sk["w_bytes_in_flight_per_thread"] >= 64, sk
    assert k["skinny M<=16 (mma.sync, packed INT4)"]["spill_stores"] == 0
    # The v1 GEMV loop is the baseline the skinny path replaces: several times the instructions per weight.
    assert k["v1 GEMV M=1 (fp32 FFMA, INT4)"]["instructions_per_int4_weight"] > 3 * sk["instructions_per_int4_weight"]
