"""Build a TensorRT engine (.plan) from the fused ONNX with the EoraLinear plugin loaded.

TensorRT 11 networks are strongly typed: the ONNX file's float16 types are the engine's.
Where TensorRT or a GPU is missing, :func:`build_engine` raises ``MissingDependency`` with
the exact command that finishes the build on a machine that has them.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_file
from ..errors import MissingDependency
from .verify import plugin_path


@dataclass(frozen=True)
class ShapeProfile:
    """Optimization profile for ``input_ids`` [batch, seq]: (min, opt, max) per axis."""

    batch: tuple[int, int, int] = (1, 1, 8)
    seq: tuple[int, int, int] = (1, 128, 1024)
    input_name: str = "input_ids"

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        return tuple((b, s) for b, s in zip(self.batch, self.seq, strict=True))  # type: ignore[return-value]

    def validate(self) -> None:
        for axis, (lo, opt, hi) in (("batch", self.batch), ("seq", self.seq)):
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"{axis} profile must satisfy 1 <= min <= opt <= max, got {lo}, {opt}, {hi}")


def missing_tensorrt_reason() -> str | None:
    """Why an engine cannot be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT (the `tensorrt` Python package with libnvinfer) is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (TensorRT builds engines on the GPU they will run on)"
    except ImportError:
        pass
    return None


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def trtexec_command(onnx_path: Path, plan_path: Path, plugin_lib: Path | None, profile: ShapeProfile,
                    timing_cache: Path | None = None) -> str:
    """The trtexec line that builds the same engine on a machine with TensorRT."""
    (b0, s0), (b1, s1), (b2, s2) = profile.shapes()
    name = profile.input_name
    parts = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", "--stronglyTyped",
        f"--minShapes={name}:{b0}x{s0}", f"--optShapes={name}:{b1}x{s1}", f"--maxShapes={name}:{b2}x{s2}",
    ]
    if plugin_lib:
        parts.append(f"--dynamicPlugins={plugin_lib}")
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(p) for p in parts)


def build_engine(onnx_path: Path, plan_path: Path, plugin_lib: Path | None, profile: ShapeProfile = ShapeProfile(),
                 timing_cache: Path | None = None, workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path`` atomically."""
    profile.validate()
    reason = missing_tensorrt_reason()
    if reason:
        # Absolute paths: the line is run elsewhere, and trtexec dlopens a bare plugin name from the library path.
        command = trtexec_command(_absolute(onnx_path), _absolute(plan_path), plugin_path(plugin_lib), profile,
                                  _absolute(timing_cache) if timing_cache else None)
        raise MissingDependency(f"{reason}; the fused ONNX is at {_absolute(onnx_path)}. "
                                f"Finish on a GPU machine with TensorRT: {command}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin_lib:
        builder.get_plugin_registry().load_library(str(plugin_lib))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MissingDependency(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile.input_name, *profile.shapes())
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MissingDependency(f"TensorRT failed to build an engine from {onnx_path}; rerun with --debug for its log")
    with atomic_file(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if timing_cache:
        with atomic_file(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path
