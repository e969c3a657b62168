"""CPU tests of the EoraLinear TensorRT plugin (trt_plugins/): no GPU, no libnvinfer.

Two C++ programs do the checking, driven from here:

- ``eoraLinearCommonTest.cpp`` compiles ``eoraLinearCommon.h`` with g++ alone and checks its INT4
  unpacking, scale indexing, 2:4 compaction, input order, attribute validation and launch planning
  against fixtures written from ``eora_export.quant`` and ``eora_export.onnx.spec``;
- ``eoraPluginHarness.cpp`` is compiled against TensorRT's headers and linked with
  ``libeora_plugin.so``; it plays TensorRT's build/runtime calls (getCreators, createPlugin,
  getOutputShapes with its own IExprBuilder, supportsFormatCombination, configurePlugin,
  getWorkspaceSize, serialize + re-create, clone, attachToContext) and bad attributes.

The library build (nvcc, two architectures) goes to ``build/trt_plugins`` so later runs are
incremental; set EORA_TEST_CUDA_ARCHS (e.g. "80") to build fewer architectures.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import itertools
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eora_export.deploy import plugin as tp
from eora_export.onnx import spec
from eora_export.quant import dequantize, pack_int4, quantize

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "trt_plugins" / "eora_linear"
TEST_DIR = REPO / "trt_plugins" / "tests"
ATTR_ORDER = ("in_features", "out_features", "rank", "weight_bits", "group_size", "lowrank_bits",
              "lowrank_group_size", "sparse24", "has_bias")


# --------------------------------------------------------------------------- builds


@pytest.fixture(scope="session")
def common_test_bin(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("g++ not found: the eoraLinearCommon.h unit test needs a C++17 host compiler")
    out = tmp_path_factory.mktemp("common") / "eora_common_test"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{PLUGIN_DIR}",
           str(TEST_DIR / "eoraLinearCommonTest.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def plugin_build() -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found: building libeora_plugin.so needs cmake >= 3.24")
    if tp._find_nvcc() is None:
        pytest.skip("nvcc not found: building libeora_plugin.so needs the CUDA toolkit")
    try:
        tp.find_tensorrt_include()
    except tp.PluginError as e:
        pytest.skip(f"{e}: building libeora_plugin.so needs them")
    lib = tp.build_plugin(cuda_archs=os.environ.get("EORA_TEST_CUDA_ARCHS") or None)
    return lib.parent


def run_common(binary: Path, tmp_path: Path, text: str) -> str:
    fixture = tmp_path / "fixture.txt"
    fixture.write_text(text)
    proc = subprocess.run([str(binary), str(fixture)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    m = re.search(r"common: (\d+) passed, (\d+) failed", out)
    assert m is not None, out[-3000:]
    assert proc.returncode == 0 and int(m.group(2)) == 0, out[-3000:]
    return out


def ints(t: torch.Tensor) -> str:
    return " ".join(str(int(v)) for v in t.flatten().tolist())


def half_bits(t: torch.Tensor) -> str:
    return ints(t.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF)


def attr_line(a: dict) -> str:
    return " ".join(str(int(a[k])) for k in ATTR_ORDER)


# --------------------------------------------------------------------------- eoraLinearCommon.h


def test_int4_unpack_matches_pack_int4(common_test_bin, tmp_path):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (6, 48), generator=g, dtype=torch.int8)
    codes[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every code at least once
    packed = pack_int4(codes)
    out = run_common(common_test_bin, tmp_path, f"int4 6 48\n{ints(codes)}\n{ints(packed)}\n")
    assert int(re.search(r"common: (\d+) passed", out).group(1)) >= 6 * 48 * 2


def test_int8_magic_decode_covers_every_code(common_test_bin, tmp_path):
    codes = torch.arange(-128, 128, dtype=torch.int32)
    run_common(common_test_bin, tmp_path, f"int8 256\n{ints(codes)}\n")


@pytest.mark.parametrize("bits,group", [(4, 16), (3, 32), (8, 8), (4, 2)])
def test_scale_index_reproduces_quant_dequantize(common_test_bin, tmp_path, bits, group):
    """fp16(q * scale[k // group, n]) in the [K, N] layout equals quant.dequantize, bit for bit."""
    g = torch.Generator().manual_seed(bits * 100 + group)
    out_f, in_f = 24, 64
    w = torch.randn(out_f, in_f, generator=g) * torch.logspace(-6, 1, out_f).unsqueeze(1)  # tiny scales too
    qm = quantize(w, bits, group)
    codes = qm.q.T.contiguous()           # plugin layout [K, N]
    scales = qm.scale.T.contiguous()      # [K / group, N]
    expect = dequantize(qm.q, qm.scale, group).T.contiguous()
    text = f"dequant {in_f} {out_f} {group}\n{ints(codes)}\n{half_bits(scales)}\n{half_bits(expect)}\n"
    run_common(common_test_bin, tmp_path, text)


def _make_24(k: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8)
    codes[codes == 0] = 3
    for grp in range(k // 4):
        for col in range(n):
            keep = torch.randperm(4, generator=g)[: int(torch.randint(0, 3, (1,), generator=g))]
            mask = torch.ones(4, dtype=torch.bool)
            mask[keep] = False
            codes[4 * grp: 4 * grp + 4, col][mask] = 0
    return codes


def _expected_compaction(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept codes [K/2, N] and index nibbles [K/4, N], computed independently of the C++ helper."""
    k, n = codes.shape
    vals = torch.zeros(k // 2, n, dtype=torch.int8)
    meta = torch.zeros(k // 4, n, dtype=torch.int8)
    for grp in range(k // 4):
        for col in range(n):
            q = codes[4 * grp: 4 * grp + 4, col].tolist()
            kept = [i for i in range(4) if q[i] != 0]
            kept += [i for i in range(4) if q[i] == 0][: 2 - len(kept)]
            i0, i1 = sorted(kept)
            vals[2 * grp, col], vals[2 * grp + 1, col] = q[i0], q[i1]
            nib = i0 | (i1 << 2)
            meta[grp, col] = nib - 16 if nib > 7 else nib  # as a signed nibble, for pack_int4
    return vals, meta


def test_sparse24_compaction_matches_python(common_test_bin, tmp_path):
    k, n = 32, 24
    codes = _make_24(k, n, 7)
    vals, meta = _expected_compaction(codes)
    text = f"sparse {k} {n}\n{ints(pack_int4(codes))}\n1\n{ints(pack_int4(vals))}\n{ints(pack_int4(meta))}\n"
    run_common(common_test_bin, tmp_path, text)


def test_sparse24_flags_a_dense_group(common_test_bin, tmp_path):
    k, n = 8, 8
    codes = _make_24(k, n, 3)
    codes[4:8, 5] = torch.tensor([1, 2, 3, 0], dtype=torch.int8)  # 3 non-zeros: not 2:4
    zeros = " ".join(["0"] * (k // 2 * n // 2 + k // 4 * n // 2))
    run_common(common_test_bin, tmp_path, f"sparse {k} {n}\n{ints(pack_int4(codes))}\n0\n{zeros}\n")


def _attr_grid() -> list[dict]:
    grid = []
    for rank, wb, lb, bias in itertools.product((0, 16), (3, 4, 16), (4, 8, 16), (0, 1)):
        grid.append({"in_features": 64, "out_features": 32, "rank": rank, "weight_bits": wb,
                     "group_size": 0 if wb == 16 else 16, "lowrank_bits": lb,
                     "lowrank_group_size": 0 if (rank == 0 or lb == 16) else 8, "sparse24": 0, "has_bias": bias})
    return grid


def test_input_index_matches_spec_input_names(common_test_bin, tmp_path):
    grid = _attr_grid()
    lines = [f"index {len(grid)}"]
    for a in grid:
        names = spec.input_names(a)
        idx = [names.index(r) if r in names else -1 for r in spec.ALL_INPUTS]
        lines.append(f"{attr_line(a)} {len(names)} {' '.join(map(str, idx))}")
    run_common(common_test_bin, tmp_path, "\n".join(lines) + "\n")


def test_validate_attrs_agrees_with_spec_validate(common_test_bin, tmp_path):
    rnd = random.Random(11)
    cases = list(_attr_grid())
    choices = {
        "in_features": (0, 64, 96, 100), "out_features": (0, 31, 32, 48), "rank": (-1, 0, 3, 8, 16),
        "weight_bits": (2, 3, 4, 8, 16), "group_size": (-2, 0, 3, 16, 32, 64), "lowrank_bits": (2, 4, 8, 16),
        "lowrank_group_size": (0, 3, 4, 8, 16), "sparse24": (0, 1, 2), "has_bias": (0, 1, 2),
    }
    for _ in range(400):
        cases.append({k: rnd.choice(v) for k, v in choices.items()})
    lines = [f"validate {len(cases)}"]
    n_valid = 0
    for a in cases:
        try:
            spec.validate_attrs(a)
            ok = 1
        except ValueError:
            ok = 0
        n_valid += ok
        lines.append(f"{attr_line(a)} {ok}")
    assert 20 < n_valid < len(cases) - 50  # both outcomes well represented
    run_common(common_test_bin, tmp_path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("bits,k,n,group", [(4, 64, 64, 64), (3, 128, 128, 32), (4, 192, 192, 16)])
def test_packed_layout_matches_quant(common_test_bin, tmp_path, bits, k, n, group):
    """The skinny path's packed INT4 layout: from pack_int4's bytes, every code decodes back and dequantizes to
    quant.dequantize's fp16 value bit for bit, through the kernel's own decoding arithmetic (host compiled)."""
    g = torch.Generator().manual_seed(k + n + bits)
    w = torch.randn(n, k, generator=g) * torch.logspace(-5, 1, n).unsqueeze(1)
    qm = quantize(w, bits, group)
    codes = qm.q.T.contiguous()
    scales = qm.scale.T.contiguous()
    expect = dequantize(qm.q, qm.scale, group).T.contiguous()
    text = (f"packed {k} {n} {group}\n{ints(codes)}\n{ints(pack_int4(codes))}\n{half_bits(scales)}\n"
            f"{half_bits(expect)}\n")
    out = run_common(common_test_bin, tmp_path, text)
    assert int(re.search(r"common: (\d+) passed", out).group(1)) >= 4


def _llama_attrs(k: int, n: int, r: int, **over) -> dict:
    return {"in_features": k, "out_features": n, "rank": r, "weight_bits": 4, "group_size": 128,
            "lowrank_bits": 4 if r else 16, "lowrank_group_size": 64 if r else 0, "sparse24": 0, "has_bias": 0, **over}


def test_workspace_max_equals_a_brute_force_scan(common_test_bin, tmp_path):
    """The size reported to TensorRT is the largest need over *every* M of the profile (issue 14: the v1 scan
    stopped at M = 8192 and under-reported e.g. K=4096 N=11008 r=128 maxM=40000 by 2.9 MB at M=33664)."""
    cases = [(_llama_attrs(4096, 11008, 128), 40000, 8), (_llama_attrs(4096, 11008, 128), 40000, 16),
             (_llama_attrs(11008, 4096, 128), 36000, 8), (_llama_attrs(4096, 4096, 0), 34000, 8),
             (_llama_attrs(4096, 4096, 64), 9000, 16), (_llama_attrs(256, 384, 16), 50000, 8),
             (_llama_attrs(64, 40, 8, group_size=16, lowrank_group_size=8), 3000, 8), (_llama_attrs(4096, 128, 128), 1, 8)]
    lines = [f"{attr_line(a)} {max_m} {gmax}" for a, max_m, gmax in cases]
    run_common(common_test_bin, tmp_path, f"wsmax {len(lines)}\n" + "\n".join(lines) + "\n")


def test_split_k_counter_protocol(common_test_bin, tmp_path):
    """Counters zeroed once are re-armed by every launch; a stale one breaks the protocol (so zero it in order)."""
    cases = [(2, 1, 5, 1), (3, 7, 4, 2), (32, 8, 3, 3), (5, 512, 2, 4)]
    lines = [" ".join(map(str, c)) for c in cases]
    run_common(common_test_bin, tmp_path, f"splitk {len(lines)}\n" + "\n".join(lines) + "\n")


def test_launch_plan_invariants(common_test_bin, tmp_path):
    shapes = [(4096, 4096, 128), (4096, 11008, 128), (11008, 4096, 128), (4096, 4096, 0), (256, 384, 16),
              (64, 40, 8), (66, 64, 16)]
    ms = (1, 2, 3, 8, 9, 16, 33, 64, 65, 128, 256, 1000)
    lines = []
    for k, n, r in shapes:
        a = {"in_features": k, "out_features": n, "rank": r, "weight_bits": 4, "group_size": 2 if k == 66 else 64,
             "lowrank_bits": 4 if r else 16, "lowrank_group_size": (16 if r % 16 == 0 else 8) if r else 0,
             "sparse24": 0, "has_bias": 1}
        lines += [f"{attr_line(a)} {m}" for m in ms]
    run_common(common_test_bin, tmp_path, f"plan {len(lines)}\n" + "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the library and the plugin


def test_library_loads_without_tensorrt(plugin_build):
    """A fresh interpreter with no TensorRT dlopens the .so and sees the C and plugin entry points."""
    lib = plugin_build / tp.LIB_NAME
    code = (
        "import ctypes, sys\n"
        f"lib = ctypes.CDLL({str(lib)!r})\n"
        "names = ['getCreators', 'setLoggerFinder', 'eoraLinearForward', 'eoraLinearWorkspaceSize',"
        " 'eoraSparse24Compact', 'eoraRegisterPlugins']\n"
        "missing = [n for n in names if not hasattr(lib, n)]\n"
        "lib.eoraRegisterPlugins.restype = ctypes.c_int\n"
        "print('missing', missing, 'registered', lib.eoraRegisterPlugins(),"
        " 'tensorrt' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # No TensorRT runtime in the process: nothing to register with, and nothing was pulled in.
    assert proc.stdout.strip() == "missing [] registered 0 False", proc.stdout
    nm = shutil.which("nm")
    if nm is not None:
        undefined = subprocess.run([nm, "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
        assert "getPluginRegistry" not in undefined and "nvinfer" not in undefined.lower()
        defined = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        exported = {line.split()[-1] for line in defined.splitlines() if " T " in line}
        assert {"getCreators", "setLoggerFinder", "eoraLinearForward"} <= exported
        assert not any("eora4" in s or "tcKernel" in s for s in exported)  # internals stay hidden


def test_plugin_harness(plugin_build):
    harness = plugin_build / "eora_plugin_harness"
    assert harness.is_file(), f"{harness} was not built"
    proc = subprocess.run([str(harness)], capture_output=True, text=True, timeout=120)
    out = proc.stdout
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails) + "\n" + proc.stderr[-2000:]
    m = re.search(r"harness: (\d+) passed, (\d+) failed", out)
    assert m and int(m.group(2)) == 0 and proc.returncode == 0, out[-3000:]
    assert int(m.group(1)) >= 80, out  # four attribute sets walked plus the refusals

    # The creator's fields are the spec's attributes, in the spec's order and types.
    fields = [line.split() for line in out.splitlines() if line.startswith("FIELD ")]
    types = spec.attribute_types()
    assert [f[1] for f in fields] == list(types)
    kinds = {"int": "5", "string": "6"}  # PluginFieldType::kINT32, kCHAR
    assert all(f[2] == kinds[types[f[1]]] for f in fields), fields
    for what in ("getOutputShapes [batch,16,in] -> [batch,16,out]", "refuses an unknown field",
                 "refuses plugin_version 2", "re-create from serialized fields",
                 "runtime errors go to the context's error recorder"):
        assert f"ok {what}" in out, what
    # Issue 14 part 1, checked through recording fakes of the plugin's device calls.
    for what in ("getWorkspaceSize covers every M up to the profile max (K=4096 N=11008 r=128 maxM=40000)",
                 "planning inputs serialized (gemv_max_m from the build-time env, max_rows, workspace_bytes)",
                 "split-K counters zeroed on the enqueue stream, before the launch",
                 "the launch plans with the serialized gemv_max_m (not the run-time env)",
                 "the launch is told the workspace TensorRT allocated, not what it needs",
                 "a call needing more workspace than the engine has is refused before any launch",
                 "counters zeroed inside a capture are zeroed again at the next eager launch",
                 "2:4 weight compacted once, on the enqueue stream, and used",
                 "onShapeChange (new tensor addresses or profile) recompacts at the same address",
                 "a refit and a new weight address both recompact",
                 "a compaction captured into a graph is not trusted by later eager launches",
                 "packed copies built once, on the enqueue stream, for the M <= 16 path",
                 "an engine without a recorded workspace runs without split-K, t alone in the workspace"):
        assert f"ok {what}" in out, what


def test_ctypes_entry_points_without_gpu(plugin_build):
    """Path choice, workspace and argument errors need no GPU: check them through the Python wrapper."""
    lib = tp.load_plugin(plugin_build / tp.LIB_NAME)
    assert lib.eoraLinearParamsSize() == ctypes.sizeof(tp.EoraLinearParams)
    attrs = {"in_features": 4096, "out_features": 4096, "rank": 128, "weight_bits": 4, "group_size": 128,
             "lowrank_bits": 4, "lowrank_group_size": 64, "sparse24": 0, "has_bias": 0}
    assert [tp.select_path(attrs, m) for m in (1, 8, 16, 17, 256)] == ["skinny"] * 3 + ["tensor_core"] * 2
    assert [tp.select_path(attrs, m, packed=False) for m in (1, 16, 17)] == ["gemv", "gemv", "tensor_core"]
    assert tp.select_path(attrs, 12, gemv_max_m=8) == "tensor_core"
    assert tp.select_path({**attrs, "lowrank_group_size": 32}, 4) == "gemv"  # no packed layout: group % 64
    assert tp.packed_bytes(attrs) >= (4096 * 4096 + 2 * 4096 * 128) // 2
    assert tp.packed_bytes({**attrs, "out_features": 4064}) == 0
    # The opt-in CUTLASS path: never chosen by auto; forced, it needs the copy (and a build with CUTLASS).
    assert tp.select_path(attrs, 64, algo=5, cutlass=False) == "tensor_core"
    built = tp.cutlass_bytes(attrs) > 0
    assert tp.select_path(attrs, 64, algo=5) == ("cutlass" if built else "tensor_core")
    assert tp.select_path(attrs, 64) == "tensor_core"
    if built:
        assert tp.cutlass_bytes(attrs) >= 4096 * (4096 + 128) // 2
    elif importlib.util.find_spec("cutlass_library") is not None and "90a" in (os.environ.get("EORA_TEST_CUDA_ARCHS") or "90a"):
        pytest.fail("nvidia-cutlass is installed and sm_90a is built, yet the library has no CUTLASS path")
    assert tp.cutlass_bytes({**attrs, "lowrank_group_size": 32}) == 0
    assert tp.select_path(attrs, 4, algo=3) == "simple"
    assert tp.select_path({**attrs, "out_features": 4098}, 1) == "simple"  # not a multiple of 8
    p = tp._params(lib, attrs, 64, 0, 0)
    ws = lib.eoraLinearWorkspaceSize(ctypes.byref(p))
    assert ws >= 64 * 128 * 2  # at least t = x.A in fp16
    assert lib.eoraLinearWorkspaceSizeMax(ctypes.byref(p), 256) >= ws
    # M = 0 is a no-op that touches no device.
    p.M = 0
    assert lib.eoraLinearForward(ctypes.byref(p), None) == 0
    # Invalid attributes and missing pointers come back as an error code with a reason.
    bad = tp._params(lib, {**attrs, "group_size": 100}, 4, 0, 0)
    assert lib.eoraLinearForward(ctypes.byref(bad), None) == 1
    assert "group_size" in tp.last_error(lib)
    nulls = tp._params(lib, attrs, 4, 0, 0)
    assert lib.eoraLinearForward(ctypes.byref(nulls), None) == 1
    assert "non-NULL" in tp.last_error(lib)
    assert lib.eoraSparse24Bytes(4096, 4096) > 4096 * 4096 * 3 // 8
    assert lib.eoraSparse24Bytes(4094, 4096) == 0


def test_gemv_crossover_ignores_the_runtime_environment(plugin_build):
    """EORA_GEMV_MAX_M at run time must not change the plan an engine was sized for (issue 14)."""
    code = (
        "from eora_export.deploy import plugin as tp\n"
        f"tp.load_plugin({str(plugin_build / tp.LIB_NAME)!r})\n"
        "a = {'in_features': 4096, 'out_features': 4096, 'rank': 128, 'weight_bits': 4, 'group_size': 128,"
        " 'lowrank_bits': 4, 'lowrank_group_size': 64, 'sparse24': 0, 'has_bias': 0}\n"
        "print(tp.select_path(a, 40), tp.select_path(a, 40, gemv_max_m=64))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EORA_GEMV_MAX_M": "64"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["tensor_core", "gemv"], proc.stdout


@pytest.mark.parametrize("k,n,r,group,lgroup", [(128, 64, 64, 128, 64), (192, 128, 0, 64, 0), (64, 64, 128, 64, 128)])
def test_cutlass_layout_matches_quant(common_test_bin, tmp_path, k, n, r, group, lgroup):
    """The CUTLASS path's copy: [W ; B] as one K-major INT4 matrix (pack_int4 of the transposed extended K) and
    one scale matrix at gcd(group, lowrank group), from the spec-layout bytes, through the kernel's functions."""
    g = torch.Generator().manual_seed(k + n + r)
    w = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8)
    b = torch.randint(-8, 8, (r, n), generator=g, dtype=torch.int8)
    ws = (torch.rand(k // group, n, generator=g) + 0.01).half()
    bs = (torch.rand(r // lgroup, n, generator=g) + 0.01).half() if r else torch.zeros(0, n).half()
    gg = math.gcd(group, lgroup) if r else group
    ext = torch.cat([w, b])                       # [K + r, N]
    want_codes = pack_int4(ext.T.contiguous())    # K-major: [N, (K + r) / 2]
    rows = torch.arange(0, k + r, gg)
    want_scales = torch.stack([ws[i // group] if i < k else bs[(i - k) // lgroup] for i in rows.tolist()])
    text = (f"cutlass {k} {n} {r} {group} {lgroup}\n{ints(pack_int4(w))}\n{ints(pack_int4(b)) if r else ''}\n"
            f"{half_bits(ws)}\n{half_bits(bs) if r else ''}\n{ints(want_codes)}\n{half_bits(want_scales)}\n")
    run_common(common_test_bin, tmp_path, text)


def test_build_plugin_names_a_missing_tool(monkeypatch):
    monkeypatch.setattr(tp.shutil, "which", lambda name: None)
    with pytest.raises(tp.PluginError, match="cmake not found"):
        tp.build_plugin()
    monkeypatch.setattr(tp.shutil, "which", lambda name: "/usr/bin/cmake" if name == "cmake" else None)
    monkeypatch.setattr(tp, "_find_nvcc", lambda: None)
    with pytest.raises(tp.PluginError, match="nvcc not found"):
        tp.build_plugin()


def test_find_library_honours_env(monkeypatch, tmp_path):
    fake = tmp_path / "libeora_plugin.so"
    fake.write_bytes(b"")
    monkeypatch.setenv("EORA_PLUGIN_LIB", str(fake))
    assert tp.find_library() == fake
    monkeypatch.setenv("EORA_PLUGIN_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(tp.PluginError, match="EORA_PLUGIN_LIB"):
        tp.find_library()


def test_plugin_config_yaml_matches_spec():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: cannot read EoraLinear_PluginConfig.yaml")
    cfg = yaml.safe_load((PLUGIN_DIR / "EoraLinear_PluginConfig.yaml").read_text())
    s = spec.load_spec()
    assert cfg["name"] == s["plugin_name"] and cfg["namespace"] == s["plugin_namespace"]
    v = cfg["versions"][s["plugin_version"]]
    assert v["inputs"] == [i["name"] for i in s["inputs"]] == list(spec.ALL_INPUTS)
    assert v["outputs"] == [o["name"] for o in s["outputs"]]
    assert v["attributes"] == spec.attribute_names()
    kinds = {"int": "int32", "string": "char"}
    assert v["attribute_types"] == {k: kinds[t] for k, t in spec.attribute_types().items()}
    for a in s["attributes"]:
        if "values" in a:
            assert v["attribute_options"][a["name"]] == a["values"], a["name"]
        if "value" in a:
            assert v["attribute_options"][a["name"]] == [a["value"]], a["name"]
    optional = {i["name"] for i in s["inputs"] if "optional" in i}
    assert set(v["optional_inputs"]) == optional


@pytest.mark.parametrize("wbits,lbits,rank", [(4, 4, 8), (3, 8, 8), (16, 16, 4), (4, 16, 0)])
def test_plugin_inputs_have_the_spec_layout(wbits, lbits, rank):
    """The tensors handed to the kernel are the fused node's constants: shapes, dtypes and packed codes."""
    from eora_export.eora_linear import EoraLinear

    g = torch.Generator().manual_seed(wbits + lbits + rank)
    k, n = 32, 16
    wq = quantize(torch.randn(n, k, generator=g), wbits, 0 if wbits == 16 else 8)
    a = b = None
    if rank:
        lg = 0 if lbits == 16 else 4
        a = quantize(torch.randn(rank, k, generator=g), lbits, lg)
        b = quantize(torch.randn(n, rank, generator=g), lbits, lg)
    layer = EoraLinear(wq, a, b, torch.randn(n, generator=g))
    tensors, attrs = tp.plugin_inputs(layer, "cpu")
    layouts = spec.input_layouts(attrs)
    assert list(tensors) == [r for r in spec.input_names(attrs) if r != "x"] == list(layouts)
    dtypes = {"int8": torch.int8, "float16": torch.float16}
    for role, t in tensors.items():
        assert (str(t.dtype), tuple(t.shape)) == (str(dtypes[layouts[role][0]]), layouts[role][1]), role
    if wbits < 16:
        from eora_export.quant import unpack_int4

        assert torch.equal(unpack_int4(tensors["w"].view(torch.uint8)), wq.q.T)  # packed along N
        assert torch.equal(tensors["w_scale"], wq.scale.T)
    if rank and lbits == 8:
        assert torch.equal(tensors["b"], b.q.T)
    # Byte for byte what the fused ONNX node holds (plugin_inputs is built with torch alone, without onnx).
    import numpy as np

    from eora_export.onnx.initializers import pack_int4_np
    from eora_export.onnx.pattern import LinearWeights

    lw = LinearWeights.from_module(layer)
    assert lw.attrs == attrs
    for role, t in tensors.items():
        bits = {"w": attrs["weight_bits"], "a": attrs["lowrank_bits"], "b": attrs["lowrank_bits"]}.get(role, 16)
        arr = getattr(lw, role)
        arr = pack_int4_np(arr).view(np.int8) if bits <= 4 else arr.astype(np.int8 if bits == 8 else np.float16)
        assert np.array_equal(t.numpy().view(np.uint8), np.ascontiguousarray(arr).view(np.uint8)), role


def test_bench_kernels_fails_in_one_line_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU message is not shown")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], proc.stderr


# --------------------------------------------------------------------------- registration without TensorRT


@pytest.fixture(scope="session")
def fake_nvinfer(tmp_path_factory) -> Path:
    """A stand-in libnvinfer.so.11 whose plugin registry records registrations (trt_plugins/tests/fakeNvinfer.cpp)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("g++ not found: the fake libnvinfer needs a C++17 host compiler")
    try:
        trt_inc = tp.find_tensorrt_include()
    except tp.PluginError as e:
        pytest.skip(f"{e}: the fake libnvinfer is compiled against them")
    nvcc = tp._find_nvcc()
    roots = [Path(nvcc).resolve().parents[1]] if nvcc else []
    roots += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")), *sorted(Path("/usr/local").glob("cuda-*"))]
    cuda_inc = next((r / "include" for r in roots if (r / "include" / "cuda_runtime_api.h").is_file()), None)
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found: cannot build the fake libnvinfer")
    out = tmp_path_factory.mktemp("fake_trt") / "libnvinfer.so.11"
    cmd = [cxx, "-std=c++17", "-shared", "-fPIC", "-O1", "-Wno-deprecated-declarations", f"-I{trt_inc}",
           f"-I{cuda_inc}", "-Wl,-soname,libnvinfer.so.11", str(TEST_DIR / "fakeNvinfer.cpp"), "-o", str(out), "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _registration_run(fake: Path, lib: Path, body: str, env: dict | None = None) -> str:
    code = (
        "import ctypes\n"
        f"fake = ctypes.CDLL({str(fake)!r})\n"  # RTLD_LOCAL, as `import tensorrt` loads libnvinfer
        "fake.fakeRegistrations.restype = ctypes.c_char_p\n"
        "fake.fakeLoadLibrary.argtypes = [ctypes.c_char_p]\n"
        f"LIB = {str(lib)!r}\n" + body + "\nprint('REG', fake.fakeRegistrations().decode().split())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_loading_after_tensorrt_registers_the_creator(plugin_build, fake_nvinfer):
    """LD_PRELOAD / Polygraphy --plugins / Triton: a plain dlopen after libnvinfer registers statically."""
    out = _registration_run(fake_nvinfer, plugin_build / tp.LIB_NAME, "ctypes.CDLL(LIB)")
    assert "REG ['eora::EoraLinear/1@static']" in out, out


def test_tensorrt_load_library_registers_once(plugin_build, fake_nvinfer):
    """IPluginRegistry::loadLibrary (trtexec --dynamicPlugins): getCreators only, no duplicate registration."""
    out = _registration_run(fake_nvinfer, plugin_build / tp.LIB_NAME, "print('N', fake.fakeLoadLibrary(LIB.encode()))")
    assert "N 1" in out and "REG ['eora::EoraLinear/1@library']" in out, out


def test_auto_registration_can_be_turned_off(plugin_build, fake_nvinfer):
    body = ("lib = ctypes.CDLL(LIB)\n"
            "print('BEFORE', fake.fakeRegistrations().decode().split())\n"
            "print('CALL', lib.eoraRegisterPlugins(), lib.eoraRegisterPlugins())")
    out = _registration_run(fake_nvinfer, plugin_build / tp.LIB_NAME, body, {"EORA_PLUGIN_AUTO_REGISTER": "0"})
    assert "BEFORE []" in out and "CALL 1 1" in out and "REG ['eora::EoraLinear/1@static']" in out, out


# --------------------------------------------------------------------------- registration in each consumer's order

# A stand-in for the `tensorrt` Python package, shaped like the pip one: it loads "libnvinfer" by full path
# with ctypes (RTLD_LOCAL, from a folder that is not on the library path), and exposes the plugin registry's
# load_library. EVENTS records the order of loads.
_STAND_IN_TENSORRT = '''
import ctypes, os
EVENTS = ["tensorrt: libnvinfer loaded"]
_lib = ctypes.CDLL(os.environ["EORA_FAKE_NVINFER"])
_lib.fakeRegistrations.restype = ctypes.c_char_p
_lib.fakeLoadLibrary.argtypes = [ctypes.c_char_p]
_lib.fakeFindCreator.argtypes = [ctypes.c_char_p]


class _Registry:
    def load_library(self, path):
        EVENTS.append("tensorrt: load_library")
        return _lib.fakeLoadLibrary(str(path).encode())


def get_plugin_registry():
    return _Registry()


def registrations():
    return _lib.fakeRegistrations().decode().split()


def parser_finds(name="EoraLinear"):
    return _lib.fakeFindCreator(name.encode()) == 1
'''


def _consumer_run(tmp_path: Path, fake: Path, body: str) -> list:
    """Run body in a fresh interpreter with the stand-in `tensorrt` importable; it prints one repr'd list."""
    pkg = tmp_path / "site" / "tensorrt"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(_STAND_IN_TENSORRT)
    env = {**os.environ, "EORA_FAKE_NVINFER": str(fake), "PYTHONPATH": str(tmp_path / "site")}
    env.pop("EORA_PLUGIN_AUTO_REGISTER", None)
    proc = subprocess.run([sys.executable, "-c", "import ast, ctypes, os, sys\n" + body], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_polygraphy_order_plugin_before_import_tensorrt(plugin_build, fake_nvinfer, tmp_path):
    """polygraphy run --trt --plugins LIB: ctypes.CDLL(LIB) while resolving the model, `import tensorrt` later,
    then the ONNX parser looks the op up (issue 19.1). Failed with the v1 library: nothing registered."""
    body = (f"ctypes.CDLL({str(plugin_build / tp.LIB_NAME)!r})\n"
            "events = ['CDLL plugin']\n"
            "import tensorrt as trt\n"
            "events += trt.EVENTS + ['parser finds EoraLinear: %s' % trt.parser_finds()]\n"
            "print(repr([events, trt.registrations()]))\n")
    events, regs = _consumer_run(tmp_path, fake_nvinfer, body)
    assert events == ["CDLL plugin", "tensorrt: libnvinfer loaded", "parser finds EoraLinear: True"], events
    assert regs == ["eora::EoraLinear/1@static"], regs


def test_polygraphy_order_then_load_library_registers_once(plugin_build, fake_nvinfer, tmp_path):
    """The same library also handed to the registry afterwards: getCreators must not make a duplicate."""
    lib = str(plugin_build / tp.LIB_NAME)
    body = (f"ctypes.CDLL({lib!r})\n"
            "import tensorrt as trt\n"
            f"trt.get_plugin_registry().load_library({lib!r})\n"
            "print(repr([trt.EVENTS, trt.registrations(), trt.parser_finds()]))\n")
    events, regs, found = _consumer_run(tmp_path, fake_nvinfer, body)
    assert events == ["tensorrt: libnvinfer loaded", "tensorrt: load_library"] and found, events
    assert regs == ["eora::EoraLinear/1@static"], regs


def test_trtexec_dynamic_plugins_order(plugin_build, fake_nvinfer, tmp_path):
    """trtexec --dynamicPlugins: libnvinfer linked (global scope), the registry's loadLibrary loads the plugin."""
    body = (f"fake = ctypes.CDLL({str(fake_nvinfer)!r}, mode=os.RTLD_NOW | os.RTLD_GLOBAL)\n"
            "fake.fakeRegistrations.restype = ctypes.c_char_p\n"
            "fake.fakeLoadLibrary.argtypes = [ctypes.c_char_p]\n"
            f"n = fake.fakeLoadLibrary({str(plugin_build / tp.LIB_NAME)!r}.encode())\n"
            "print(repr([n, fake.fakeRegistrations().decode().split(), 'tensorrt' in sys.modules]))\n")
    n, regs, imported = _consumer_run(tmp_path, fake_nvinfer, body)
    assert n == 1 and regs == ["eora::EoraLinear/1@library"] and not imported, (n, regs)


def test_triton_order_dlopen_after_libnvinfer(plugin_build, fake_nvinfer, tmp_path):
    """Triton's tensorrt backend: libnvinfer linked into the server, then dlopen(LIB, RTLD_NOW | RTLD_LOCAL)."""
    body = (f"fake = ctypes.CDLL({str(fake_nvinfer)!r}, mode=os.RTLD_NOW | os.RTLD_GLOBAL)\n"
            "fake.fakeRegistrations.restype = ctypes.c_char_p\n"
            f"ctypes.CDLL({str(plugin_build / tp.LIB_NAME)!r}, mode=os.RTLD_NOW | os.RTLD_LOCAL)\n"
            "print(repr(fake.fakeRegistrations().decode().split()))\n")
    assert _consumer_run(tmp_path, fake_nvinfer, body) == ["eora::EoraLinear/1@static"]


@pytest.mark.parametrize("how", ["load_library", "ctypes", "load_plugin"])
def test_python_api_order_import_tensorrt_first(plugin_build, fake_nvinfer, tmp_path, how):
    """The TensorRT Python API: `import tensorrt`, then the library by the registry, ctypes, or our loader."""
    lib = str(plugin_build / tp.LIB_NAME)
    load = {"load_library": f"trt.get_plugin_registry().load_library({lib!r})",
            "ctypes": f"ctypes.CDLL({lib!r})",
            "load_plugin": f"from eora_export.deploy import plugin as tp\ntp.load_plugin({lib!r})"}[how]
    body = f"import tensorrt as trt\n{load}\nprint(repr([trt.registrations(), trt.parser_finds()]))\n"
    regs, found = _consumer_run(tmp_path, fake_nvinfer, body)
    assert found and regs == [f"eora::EoraLinear/1@{'library' if how == 'load_library' else 'static'}"], regs


def test_python_without_tensorrt_is_unaffected(plugin_build, tmp_path):
    """Loaded where no TensorRT exists: the import hook stays out of the way (import fails as it would)."""
    body = (f"ctypes.CDLL({str(plugin_build / tp.LIB_NAME)!r})\n"
            "try:\n    import tensorrt_missing_module\nexcept ImportError as e:\n    err = type(e).__name__\n"
            "hooks = [type(f).__name__ for f in sys.meta_path if 'Eora' in type(f).__name__]\n"
            "print(repr([err, hooks]))\n")
    err, hooks = _consumer_run(tmp_path, tmp_path / "unused.so", body)
    assert err == "ModuleNotFoundError" and hooks == ["EoraRegisterAfterTensorRT"], (err, hooks)
