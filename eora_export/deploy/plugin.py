"""The EoraLinear plugin library from Python: find it, build it, load it, call its kernel.

``libeora_plugin.so`` holds both the TensorRT plugin and a plain C entry point of its CUDA kernel
(``eoraLinearForward``). Loading it needs no TensorRT (see trt_plugins/eora_linear/README.md), so
the tests and benchmarks call the very kernel an engine runs on torch CUDA tensors through ctypes::

    lib = load_plugin()                       # finds (or is told) the .so
    tensors, attrs = plugin_inputs(layer)     # an eora_export.eora_linear.EoraLinear, in plugin layout
    y = eora_linear_cuda(x, tensors, attrs)   # x: float16 CUDA [..., in_features]

Where the library is looked for, in order: ``$EORA_PLUGIN_LIB``, the build folder
(``$EORA_PLUGIN_BUILD_DIR``, default ``build/trt_plugins/`` in the repository), then
``eora_export/deploy/lib/`` (a package-local copy). :func:`build_plugin` runs the CMake build into
the build folder.

Registration with TensorRT: the library registers ``EoraLinear`` itself in whichever order it and
TensorRT are loaded (trt_plugins/eora_linear/README.md, "Loading"); :func:`load_plugin` also asks it
to register when ``tensorrt`` is already imported.

One module above 500 lines on purpose: finding, building, loading and calling the library share
its paths, its handle and :class:`PluginError`; split, each part would import the others' internals.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LIB_NAME = "libeora_plugin.so"
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO_ROOT / "trt_plugins"
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "trt_plugins"
PACKAGE_LIB = Path(__file__).resolve().parent / "lib" / LIB_NAME

PARAMS_VERSION = 3  # EORA_PARAMS_VERSION in eoraLinearKernel.h
PATHS = {0: "auto", 1: "gemv", 2: "tensor_core", 3: "simple", 4: "skinny", 5: "cutlass"}


class PluginError(RuntimeError):
    """The plugin library is missing, cannot be built or loaded, or a call into it failed."""


class EoraLinearParams(ctypes.Structure):
    """Mirror of ``EoraLinearParams`` (eoraLinearKernel.h); checked against the library's size."""

    _fields_ = [
        ("version", ctypes.c_int32),
        ("structSize", ctypes.c_int32),
        ("M", ctypes.c_int64),
        ("inFeatures", ctypes.c_int32),
        ("outFeatures", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("weightBits", ctypes.c_int32),
        ("groupSize", ctypes.c_int32),
        ("lowrankBits", ctypes.c_int32),
        ("lowrankGroupSize", ctypes.c_int32),
        ("sparse24", ctypes.c_int32),
        ("hasBias", ctypes.c_int32),
        ("algo", ctypes.c_int32),
        ("gemvMaxM", ctypes.c_int32),
        ("noSplitK", ctypes.c_int32),
        ("x", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("wScale", ctypes.c_void_p),
        ("a", ctypes.c_void_p),
        ("aScale", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("bScale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("sparse", ctypes.c_void_p),
        ("packed", ctypes.c_void_p),
        ("cutlass", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspaceBytes", ctypes.c_size_t),
        ("semaphores", ctypes.c_void_p),
    ]


# --------------------------------------------------------------------------- find / build


def find_library() -> Path | None:
    """The first existing library among ``$EORA_PLUGIN_LIB``, the repo build folder, the package copy."""
    env = os.environ.get("EORA_PLUGIN_LIB")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise PluginError(f"EORA_PLUGIN_LIB={env} does not name a file; unset it or point it at {LIB_NAME}")
        return path
    for candidate in (default_build_dir() / LIB_NAME, PACKAGE_LIB):
        if candidate.is_file():
            return candidate
    return None


def default_build_dir() -> Path:
    """Where :func:`build_plugin` builds by default: ``$EORA_PLUGIN_BUILD_DIR``, else ``build/trt_plugins``."""
    env = os.environ.get("EORA_PLUGIN_BUILD_DIR")
    return Path(env).expanduser() if env else DEFAULT_BUILD_DIR


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


# TensorRT's public headers ship beside this repository in our workplace (shared/third_party) and
# with TensorRT installations (Debian packages put them in the multiarch include folder).
_HEADER_CANDIDATES = (
    REPO_ROOT.parent / "shared" / "third_party" / "tensorrt-11.1" / "include",
    Path("/usr/include/x86_64-linux-gnu"),
    Path("/usr/include/aarch64-linux-gnu"),
    Path("/usr/local/tensorrt/include"),
)


def find_tensorrt_include(explicit: str | Path | None = None) -> Path:
    """The folder holding NvInferRuntime.h: ``explicit``, ``$TENSORRT_INCLUDE_DIR``, else the usual places."""
    given = explicit or os.environ.get("TENSORRT_INCLUDE_DIR")
    candidates = [Path(given)] if given else list(_HEADER_CANDIDATES)
    for folder in candidates:
        if (folder / "NvInferRuntime.h").is_file():
            return folder
    where = str(candidates[0]) if given else ", ".join(str(c) for c in candidates)
    raise PluginError(f"TensorRT headers (NvInferRuntime.h) not found in {where}; set $TENSORRT_INCLUDE_DIR to the folder "
                      "holding NvInfer.h (TensorRT 10+ public headers; no TensorRT library is needed to build)")


def build_plugin(
    build_dir: str | Path | None = None,
    *,
    jobs: int = 2,
    cuda_archs: str | None = None,
    tensorrt_include: str | Path | None = None,
    targets: tuple[str, ...] = (),
) -> Path:
    """Configure and build trt_plugins with CMake; returns the path of the built library.

    cuda_archs: e.g. ``"90a"`` to build one architecture only (default "80;90a").
    targets: CMake targets to build (default: all, i.e. the library and the CPU test programs).
    tensorrt_include: TensorRT's header folder (default: :func:`find_tensorrt_include`).
    Raises :class:`PluginError` with a one-line reason when cmake, nvcc or the TensorRT headers are
    missing, or the build fails.
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginError("cmake not found on PATH: install cmake >= 3.24 to build the EoraLinear plugin")
    nvcc = _find_nvcc()
    if nvcc is None:
        raise PluginError("nvcc not found (PATH, $CUDACXX, /usr/local/cuda/bin): install the CUDA toolkit")
    headers = find_tensorrt_include(tensorrt_include)
    out = Path(build_dir) if build_dir is not None else default_build_dir()
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(out), f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DTensorRT_INCLUDE_DIR={headers}",
                 f"-DPython3_EXECUTABLE={sys.executable}"]
    cutlass_dir = _cutlass_source_dir()
    if cutlass_dir is not None:  # the opt-in CUTLASS path (sm_90a) is built when nvidia-cutlass is installed here
        configure.append(f"-DEORA_CUTLASS_DIR={cutlass_dir}")
    if cuda_archs:
        configure.append(f"-DEORA_CUDA_ARCHS={cuda_archs}")
    build = [cmake, "--build", str(out), "-j", str(jobs)]
    for t in targets:
        build += ["--target", t]
    for cmd in (configure, build):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise PluginError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    lib = out / LIB_NAME
    if not lib.is_file():
        raise PluginError(f"the build finished but {lib} is missing")
    return lib


def _cutlass_source_dir() -> Path | None:
    """cutlass_library/source of the pip package nvidia-cutlass (CUTLASS's headers), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    src = Path(spec.origin).parent / "source"
    return src if (src / "include" / "cutlass" / "cutlass.h").is_file() else None


# --------------------------------------------------------------------------- load

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def load_plugin(path: str | Path | None = None) -> ctypes.CDLL:
    """Load the library with ctypes (cached per path) and declare its C signatures.

    Works without TensorRT installed. If ``tensorrt`` is already imported, the creator is registered
    with its registry now; if it is imported later, the library registers it right after that import.
    """
    lib_path = Path(path) if path is not None else find_library()
    if lib_path is None:
        raise PluginError(
            f"{LIB_NAME} not found: build it with eora_export.deploy.plugin.build_plugin() "
            f"(or cmake -S trt_plugins -B build/trt_plugins) or set EORA_PLUGIN_LIB"
        )
    key = str(lib_path.resolve())
    with _lock:
        if key in _loaded:
            return _loaded[key]
        try:
            lib = ctypes.CDLL(key)
        except OSError as e:
            raise PluginError(f"cannot load {key}: {e}") from e
        try:
            _declare(lib)
        except AttributeError as e:
            raise PluginError(f"{key} lacks an entry point this module needs ({e}): rebuild the library") from e
        size = lib.eoraLinearParamsSize()
        if size != ctypes.sizeof(EoraLinearParams):
            raise PluginError(
                f"{key} has EoraLinearParams of {size} bytes, this module expects "
                f"{ctypes.sizeof(EoraLinearParams)}: rebuild the library"
            )
        _loaded[key] = lib
    if "tensorrt" in sys.modules:
        lib.eoraRegisterPlugins()  # idempotent; covers a TensorRT loaded in a way the library could not see
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.POINTER(EoraLinearParams)
    lib.eoraLinearParamsInit.argtypes = [p]
    lib.eoraLinearParamsInit.restype = None
    lib.eoraLinearParamsSize.argtypes = []
    lib.eoraLinearParamsSize.restype = ctypes.c_int32
    lib.eoraLinearSemaphoreCount.argtypes = []
    lib.eoraLinearSemaphoreCount.restype = ctypes.c_int32
    lib.eoraLinearWorkspaceSize.argtypes = [p]
    lib.eoraLinearWorkspaceSize.restype = ctypes.c_size_t
    lib.eoraLinearWorkspaceSizeMax.argtypes = [p, ctypes.c_int64]
    lib.eoraLinearWorkspaceSizeMax.restype = ctypes.c_size_t
    lib.eoraLinearSelectPath.argtypes = [p]
    lib.eoraLinearSelectPath.restype = ctypes.c_int32
    lib.eoraLinearForward.argtypes = [p, ctypes.c_void_p]
    lib.eoraLinearForward.restype = ctypes.c_int32
    lib.eoraSparse24Bytes.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.eoraSparse24Bytes.restype = ctypes.c_size_t
    lib.eoraSparse24Compact.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p,
                                        ctypes.c_void_p]
    lib.eoraSparse24Compact.restype = ctypes.c_int32
    lib.eoraLinearPackedBytes.argtypes = [p]
    lib.eoraLinearPackedBytes.restype = ctypes.c_size_t
    lib.eoraLinearPack.argtypes = [p, ctypes.c_void_p, ctypes.c_void_p]
    lib.eoraLinearPack.restype = ctypes.c_int32
    lib.eoraLinearCutlassBytes.argtypes = [p]
    lib.eoraLinearCutlassBytes.restype = ctypes.c_size_t
    lib.eoraLinearCutlassPack.argtypes = [p, ctypes.c_void_p, ctypes.c_void_p]
    lib.eoraLinearCutlassPack.restype = ctypes.c_int32
    lib.eoraLastError.argtypes = []
    lib.eoraLastError.restype = ctypes.c_char_p
    lib.eoraRegisterPlugins.argtypes = []
    lib.eoraRegisterPlugins.restype = ctypes.c_int32
    lib.eoraPluginLastError.argtypes = []
    lib.eoraPluginLastError.restype = ctypes.c_char_p
    lib.eoraPluginWeightsChanged.argtypes = []
    lib.eoraPluginWeightsChanged.restype = None


def last_error(lib: ctypes.CDLL | None = None) -> str:
    lib = lib or load_plugin()
    return (lib.eoraLastError() or b"").decode(errors="replace")


# --------------------------------------------------------------------------- tensors in plugin layout


def plugin_inputs(layer: Any, device: Any = "cuda") -> tuple[dict[str, Any], dict[str, Any]]:
    """The constant inputs of an :class:`eora_export.eora_linear.EoraLinear` in the plugin's layout.

    Returns ``(tensors, attrs)``: tensors by spec role (``w``, ``w_scale``, ``a``, ...; absent roles
    left out) as torch tensors on ``device`` — INT4 codes packed two per byte along N in an int8
    container, INT8 codes as int8, the rest float16 — and the validated spec attributes. The
    layout is the fused ONNX node's (``eora_export.onnx.pattern.LinearWeights``; the CPU tests compare
    the two), built here with torch alone so a GPU machine without ``onnx`` can run the kernel tests.
    """
    import torch

    from ..onnx import spec
    from ..quant import pack_int4

    wq, aq, bq = layer.weight_q, layer.a_q, layer.b_q
    attrs = spec.layer_attrs(layer)

    def codes(m: Any) -> tuple[Any, Any]:
        """[K, N] layout (the torch [rows, cols] transposed): packed / int8 / fp16 codes, fp16 scales."""
        if m.bits == 16:
            return m.q.detach().T.to(torch.float16), None
        q = m.q.detach().T.to(torch.int8)
        q = pack_int4(q).view(torch.int8) if m.bits <= 4 else q
        return q, m.scale.detach().T.to(torch.float16)

    tensors: dict[str, Any] = {}
    tensors["w"], tensors["w_scale"] = codes(wq)
    if layer.rank:
        tensors["a"], tensors["a_scale"] = codes(aq)
        tensors["b"], tensors["b_scale"] = codes(bq)
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().to(torch.float16)
    return {r: t.contiguous().to(device) for r, t in tensors.items() if t is not None}, attrs


# --------------------------------------------------------------------------- calling the kernel

_scratch_lock = threading.Lock()
_workspaces: dict[Any, Any] = {}
_semaphores: dict[Any, Any] = {}


def _params(lib: ctypes.CDLL, attrs: Mapping[str, Any], m: int, algo: int, gemv_max_m: int) -> EoraLinearParams:
    p = EoraLinearParams()
    lib.eoraLinearParamsInit(ctypes.byref(p))
    p.M = m
    p.inFeatures = int(attrs["in_features"])
    p.outFeatures = int(attrs["out_features"])
    p.rank = int(attrs.get("rank", 0))
    p.weightBits = int(attrs.get("weight_bits", 4))
    p.groupSize = int(attrs.get("group_size", 0))
    p.lowrankBits = int(attrs.get("lowrank_bits", 16))
    p.lowrankGroupSize = int(attrs.get("lowrank_group_size", 0))
    p.sparse24 = int(attrs.get("sparse24", 0))
    p.hasBias = int(attrs.get("has_bias", 0))
    p.algo = algo
    p.gemvMaxM = gemv_max_m
    return p


def _workspace(device: Any, nbytes: int) -> Any:
    """A cached uint8 scratch buffer of at least nbytes on device (grown, never shrunk)."""
    import torch

    with _scratch_lock:
        buf = _workspaces.get(device)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
            _workspaces[device] = buf
        return buf


def _semaphore_buffer(lib: ctypes.CDLL, device: Any) -> Any:
    """Split-K counters: zeroed once, left zeroed by every call (so one per device is enough on one stream)."""
    import torch

    with _scratch_lock:
        sem = _semaphores.get(device)
        if sem is None:
            sem = torch.zeros(lib.eoraLinearSemaphoreCount(), dtype=torch.int32, device=device)
            _semaphores[device] = sem
        return sem


def select_path(attrs: Mapping[str, Any], m: int, algo: int = 0, gemv_max_m: int = 0, packed: bool = True,
                cutlass: bool = True) -> str:
    """Which kernel path a call with M rows takes: "skinny", "gemv", "tensor_core", "simple" or "cutlass".

    packed / cutlass: whether the packed copies / the CUTLASS copy are supplied, as :func:`eora_linear_cuda`
    does where the shape (and, for CUTLASS, the build) allows.
    """
    lib = load_plugin()
    p = _params(lib, attrs, m, algo, gemv_max_m)
    p.packed = ctypes.c_void_p(256 if packed else None)  # planning only: never dereferenced
    p.cutlass = ctypes.c_void_p(256 if cutlass else None)
    path = lib.eoraLinearSelectPath(ctypes.byref(p))
    if path < 0:
        raise PluginError(last_error(lib))
    return PATHS[path]


def prepare_sparse24(w: Any, attrs: Mapping[str, Any]) -> Any:
    """The compacted 2:4 form of the packed INT4 weight (uint8 CUDA tensor) for ``sparse=``.

    Compute it once per weight and pass it to every :func:`eora_linear_cuda` call; a weight that is not
    2:4 after all is flagged inside the buffer and the kernel falls back to the dense weight.
    """
    import torch

    lib = load_plugin()
    k, n = int(attrs["in_features"]), int(attrs["out_features"])
    nbytes = lib.eoraSparse24Bytes(k, n)
    if nbytes == 0:
        raise PluginError(f"2:4 compaction needs in_features % 4 == 0 and out_features % 8 == 0 (got {k}, {n})")
    out = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
    stream = torch.cuda.current_stream(w.device).cuda_stream
    if lib.eoraSparse24Compact(ctypes.c_void_p(w.data_ptr()), k, n, ctypes.c_void_p(out.data_ptr()),
                               ctypes.c_void_p(stream)) != 0:
        raise PluginError(last_error(lib))
    return out


def packed_bytes(attrs: Mapping[str, Any]) -> int:
    """Bytes of the packed copies the skinny path (M <= 16) reads; 0 where the shape has no packed layout."""
    lib = load_plugin()
    return int(lib.eoraLinearPackedBytes(ctypes.byref(_params(lib, attrs, 1, 0, 0))))


def prepare_packed(tensors: Mapping[str, Any], attrs: Mapping[str, Any]) -> Any:
    """The packed copies of w, a, b and their scales (uint8 CUDA tensor) for ``packed=``: build once per weight."""
    import torch

    lib = load_plugin()
    p = _params(lib, attrs, 1, 0, 0)
    nbytes = lib.eoraLinearPackedBytes(ctypes.byref(p))
    if nbytes == 0:
        raise PluginError("these attributes have no packed layout (INT4 weight; N, K and group multiples of 64; "
                          "INT4 factors with rank and group multiples of 64)")
    w = tensors["w"]
    for role, field in (("w", "w"), ("w_scale", "wScale"), ("a", "a"), ("a_scale", "aScale"), ("b", "b"),
                        ("b_scale", "bScale")):
        t = tensors.get(role)
        setattr(p, field, ctypes.c_void_p(t.contiguous().data_ptr() if t is not None else None))
    out = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
    stream = torch.cuda.current_stream(w.device).cuda_stream
    if lib.eoraLinearPack(ctypes.byref(p), ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream)) != 0:
        raise PluginError(last_error(lib))
    return out


def cutlass_bytes(attrs: Mapping[str, Any]) -> int:
    """Bytes of the CUTLASS path's copy; 0 when the library was built without CUTLASS or the shape has none."""
    lib = load_plugin()
    return int(lib.eoraLinearCutlassBytes(ctypes.byref(_params(lib, attrs, 1, 0, 0))))


def prepare_cutlass(tensors: Mapping[str, Any], attrs: Mapping[str, Any]) -> Any:
    """The CUTLASS path's copy ([w ; b] K-major + scales at one group size), uint8 CUDA tensor, for ``cutlass=``."""
    import torch

    lib = load_plugin()
    p = _params(lib, attrs, 1, 0, 0)
    nbytes = lib.eoraLinearCutlassBytes(ctypes.byref(p))
    if nbytes == 0:
        raise PluginError("no CUTLASS path here: the library was built without CUTLASS (sm_90a + nvidia-cutlass) or "
                          "the shape is not the skinny path's")
    w = tensors["w"]
    for role, field in (("w", "w"), ("w_scale", "wScale"), ("b", "b"), ("b_scale", "bScale")):
        t = tensors.get(role)
        setattr(p, field, ctypes.c_void_p(t.contiguous().data_ptr() if t is not None else None))
    out = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
    stream = torch.cuda.current_stream(w.device).cuda_stream
    if lib.eoraLinearCutlassPack(ctypes.byref(p), ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream)) != 0:
        raise PluginError(last_error(lib))
    return out


def eora_linear_cuda(
    x: Any,
    tensors: Mapping[str, Any],
    attrs: Mapping[str, Any],
    *,
    sparse: Any = None,
    packed: Any = None,
    cutlass: Any = None,
    algo: int | str = 0,
    gemv_max_m: int = 0,
    out: Any = None,
) -> Any:
    """y = x W + fp16(x A) B + bias on the GPU with the plugin's kernel.

    x: float16 CUDA tensor ``[..., in_features]``; tensors: by role as from :func:`plugin_inputs`;
    attrs: the spec attributes. sparse: the buffer from :func:`prepare_sparse24` (computed here when
    sparse24=1 and not given). packed: the buffer from :func:`prepare_packed` (computed here for
    M <= 16 where the shape has a packed layout and none is given; pass "none" to withhold it).
    cutlass: the buffer from :func:`prepare_cutlass` for algo 5/"cutlass" (opt-in; built here if not given).
    algo: 0/"auto", 1/"gemv", 2/"tensor_core", 3/"simple", 4/"skinny", 5/"cutlass". Runs on the current
    stream; returns float16 ``[..., out_features]``.
    """
    import torch

    lib = load_plugin()
    if isinstance(algo, str):
        names = {v: k for k, v in PATHS.items()}
        if algo not in names:
            raise ValueError(f"algo={algo!r}; use one of {sorted(names)}")
        algo = names[algo]
    if not (x.is_cuda and x.dtype == torch.float16):
        raise ValueError(f"x must be a float16 CUDA tensor, got {x.dtype} on {x.device}")
    k, n = int(attrs["in_features"]), int(attrs["out_features"])
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]}, in_features is {k}")
    x = x.contiguous()
    m = x.numel() // k
    p = _params(lib, attrs, m, int(algo), gemv_max_m)
    keep = [x]  # references that must outlive the launch

    def ptr(t: Any, role: str) -> ctypes.c_void_p:
        if t is None:
            return ctypes.c_void_p(None)
        if not t.is_cuda or t.device != x.device:
            raise ValueError(f"{role} must be on {x.device}, got {t.device}")
        t = t.contiguous()
        keep.append(t)
        return ctypes.c_void_p(t.data_ptr())

    p.x = ptr(x, "x")
    for role, field in (("w", "w"), ("w_scale", "wScale"), ("a", "a"), ("a_scale", "aScale"), ("b", "b"),
                        ("b_scale", "bScale"), ("bias", "bias")):
        setattr(p, field, ptr(tensors.get(role), role))
    if p.sparse24 and p.weightBits < 16 and sparse is None and k % 4 == 0 and n % 8 == 0:
        sparse = prepare_sparse24(tensors["w"], attrs)
    p.sparse = ptr(sparse, "sparse")
    if isinstance(packed, str) and packed == "none":
        packed = None
    elif packed is None and m <= 16 and lib.eoraLinearPackedBytes(ctypes.byref(p)) > 0:
        packed = prepare_packed(tensors, attrs)
    p.packed = ptr(packed, "packed")
    if algo == 5 and cutlass is None and lib.eoraLinearCutlassBytes(ctypes.byref(p)) > 0:
        cutlass = prepare_cutlass(tensors, attrs)
    p.cutlass = ptr(cutlass, "cutlass")
    y = out if out is not None else torch.empty(*x.shape[:-1], n, dtype=torch.float16, device=x.device)
    if y.shape != (*x.shape[:-1], n) or y.dtype != torch.float16 or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous float16 tensor of shape {(*x.shape[:-1], n)}")
    p.y = ctypes.c_void_p(y.data_ptr())
    nbytes = lib.eoraLinearWorkspaceSize(ctypes.byref(p))
    ws = _workspace(x.device, nbytes)
    p.workspace = ctypes.c_void_p(ws.data_ptr())
    p.workspaceBytes = ws.numel()
    p.semaphores = ctypes.c_void_p(_semaphore_buffer(lib, x.device).data_ptr())
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = lib.eoraLinearForward(ctypes.byref(p), ctypes.c_void_p(stream))
    if rc != 0:
        raise PluginError(last_error(lib))
    return y
