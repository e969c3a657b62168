"""The README's two set-up commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"TEST_COMMAND='(.*)'", ci).group(1)
    blocks = _bash_blocks(readme)
    assert blocks[1] == command, "README's second command must be the one .ci/run runs"
    assert blocks[0].startswith("pip install torch==2.13.0 ") and "eora-export --model demo" in blocks[0]
