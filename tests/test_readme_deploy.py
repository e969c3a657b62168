"""The README's deployment recipes are the lines eora-export prints and writes: the Polygraphy replay,
the tritonserver line and the TensorRT-LLM recipes are rebuilt here with the functions that make them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from eora_export.cli import build_parser
from eora_export.deploy.triton import serve_command
from eora_export.deploy.trtllm import HF_TO_TRTLLM_LORA, trtllm_readme
from eora_export.deploy.verify import polygraphy_command
from eora_export.models import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
# The example locations the README uses for an absolute path.
PLUGIN = "/opt/eora-export/build/trt_plugins/libeora_plugin.so"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    level = title.split(" ", 1)[0]
    end = re.search(rf"\n#{{2,{len(level)}}} ", text[start + len(title) + 2:])
    return text[start: start + len(title) + 2 + end.start()] if end else text[start:]


def _blocks(section: str, lang: str) -> list[str]:
    return [b.strip("\n") for b in re.findall(rf"```{lang}\n(.*?)```", section, re.S)]


def _one_line(block: str) -> str:
    """A shell command written over several lines with trailing backslashes, as one line."""
    return " ".join(block.replace("\\\n", " ").split())


def test_polygraphy_replay_is_the_printed_command():
    (block,) = _blocks(_section("### Verification"), "bash")
    want = polygraphy_command("/work/demo.onnx", PLUGIN, inputs_json="/work/demo.eora/verify/inputs.json",
                              baseline_outputs="/work/demo.eora/verify/baseline_outputs.json", seq_len=256)
    assert _one_line(block) == want


def test_triton_line_is_the_printed_command():
    (block,) = _blocks(_section("### Triton"), "bash")
    assert block == serve_command(Path("/srv/triton/repo"), Path(PLUGIN))


def _demo_recipe(out: Path) -> str:
    """trtllm/README.md of ``eora-export --model demo --out trtllm --format trtllm`` (default flags)."""
    defaults = build_parser().parse_args([])
    max_pos = json.loads((DEMO_DIR / "config.json").read_text())["max_position_embeddings"]
    return trtllm_readme(out, quant=defaults.quant, bits=defaults.bits, group_size=defaults.group_size,
                         sparsity=defaults.sparsity, lowrank_bits=defaults.lowrank_bits, rank=defaults.rank,
                         trt_targets=" ".join(HF_TO_TRTLLM_LORA.values()), max_seq_len=max_pos)


def test_tensorrt_llm_recipes_are_the_written_ones(tmp_path):
    section = _section("### TensorRT-LLM (and vLLM / GPTQModel)")
    recipe = _demo_recipe(tmp_path / "trtllm")
    (python,) = _blocks(section, "python")
    export, build = _blocks(section, "bash")
    assert python in recipe and build in recipe
    # The LLM API leads; the engine build is the second path.
    assert section.index("```python") < section.index("trtllm-build --checkpoint_dir")
    assert recipe.index("## LLM API") < recipe.index("trtllm-build --checkpoint_dir")
    # The README's `export OUT=...` sets the same folder as the written README's absolute one.
    (written,) = [line for line in recipe.splitlines() if line.startswith("export OUT=")]
    outs = [subprocess.run(["bash", "-c", f"{line}; printf %s \"$OUT\""], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout for line in (export, written)]
    assert outs[0] == outs[1] == str(tmp_path / "trtllm")
    assert "--max_seq_len 1024" in build, "the demo's max_position_embeddings"
    assert "unconfirmed upstream" in section and "unconfirmed upstream" in recipe
