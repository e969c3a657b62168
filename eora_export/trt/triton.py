"""A Triton model repository for the exported LLM: config.pbtxt + version folder.

TensorRT engines use platform ``tensorrt_plan`` (the plugin library goes to tritonserver
with ``--backend-config=tensorrt,plugins=...``); the unfused ONNX pattern model runs on
the ``onnxruntime_onnx`` platform as is (no custom op needed).
"""

from __future__ import annotations

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


def config_pbtxt(model: TritonModel, platform: str) -> str:
    """Text protobuf of Triton's ModelConfig. Batch is Triton's implicit first dim; the
    sequence length is dynamic (-1)."""
    return f"""name: "{model.name}"
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


def write_model_dir(model_file: Path, model_dir: Path, model: TritonModel, external_data: list[Path] = ()) -> Path:
    """Fill one model folder: ``model_dir/config.pbtxt`` and ``model_dir/1/<model file>``."""
    platform, target = PLATFORMS[model_file.suffix]
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_file, version / target)
    for extra in external_data:
        shutil.copy2(extra, version / extra.name)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(model, platform))
    return model_dir


def write_repository(model_file: Path, repo_dir: Path, model: TritonModel, external_data: list[Path] = ()) -> Path:
    """Lay out ``repo_dir/<name>/config.pbtxt`` and ``repo_dir/<name>/1/<model file>``."""
    return write_model_dir(model_file, repo_dir / model.name, model, external_data)


def serve_command(repo_dir: Path, plugin_lib: Path | None) -> str:
    plugins = f" --backend-config=tensorrt,plugins={plugin_lib}" if plugin_lib else ""
    return f"tritonserver --model-repository {repo_dir}{plugins}"
