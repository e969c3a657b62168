"""A Triton model repository for the exported LLM: config.pbtxt + version folder.

TensorRT engines use platform ``tensorrt_plan`` (the plugin library goes to tritonserver
with ``--backend-config=tensorrt,plugins=...``); the unfused ONNX pattern model runs on
the ``onnxruntime_onnx`` platform as is (no custom op needed).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PLATFORMS = {".plan": ("tensorrt_plan", "model.plan"), ".onnx": ("onnxruntime_onnx", "model.onnx")}


@dataclass(frozen=True)
class TritonModel:
    name: str
    vocab_size: int
    max_batch_size: int = 8
    input_name: str = "input_ids"
    output_name: str = "logits"


def config_pbtxt(model: TritonModel, platform: str, notes: tuple[str, ...] = ()) -> str:
    """Text protobuf of Triton's ModelConfig. Batch is Triton's implicit first dim; the
    sequence length is dynamic (-1). ``notes`` become ``#`` comment lines at the top."""
    header = "".join(f"# {line}\n" for line in notes)
    return header + f"""name: "{model.name}"
platform: "{platform}"
max_batch_size: {model.max_batch_size}
input [
  {{
    name: "{model.input_name}"
    data_type: TYPE_INT64
    dims: [ -1 ]
  }}
]
output [
  {{
    name: "{model.output_name}"
    data_type: TYPE_FP16
    dims: [ -1, {model.vocab_size} ]
  }}
]
dynamic_batching {{ }}
instance_group [
  {{
    count: 1
    kind: KIND_GPU
  }}
]
"""


def write_model_dir(model_file: Path, model_dir: Path, model: TritonModel, external_data: list[Path] = (),
                    notes: tuple[str, ...] = ()) -> Path:
    """Fill one model folder: ``model_dir/config.pbtxt`` and ``model_dir/1/<model file>``."""
    platform, target = PLATFORMS[model_file.suffix]
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_file, version / target)
    for extra in external_data:
        shutil.copy2(extra, version / extra.name)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(model, platform, notes))
    return model_dir


def write_repository(model_file: Path, repo_dir: Path, model: TritonModel, external_data: list[Path] = ()) -> Path:
    """Lay out ``repo_dir/<name>/config.pbtxt`` and ``repo_dir/<name>/1/<model file>``."""
    return write_model_dir(model_file, repo_dir / model.name, model, external_data)


def plan_notes(tensorrt_version: str) -> tuple[str, ...]:
    """config.pbtxt comments of a tensorrt_plan model: a plan runs only under the TensorRT that built it."""
    return (f"model.plan was built with TensorRT {tensorrt_version}: serve it with a Triton image of that same TensorRT version",
            "(a plan does not load under another TensorRT); rebuild it with eora-export on the serving image otherwise.")


def serve_command(repo_dir: Path, plugin_lib: Path | None) -> str:
    """The tritonserver line, with absolute paths: Triton's TensorRT backend dlopens each ``plugins=``
    entry (``;``-separated) as given, so a bare name would be looked up on the library path only."""
    plugins = f" --backend-config=tensorrt,plugins={os.path.abspath(plugin_lib)}" if plugin_lib else ""
    return f"tritonserver --model-repository {os.path.abspath(repo_dir)}{plugins}"
