#!/usr/bin/env bash
# Run the whole suite against pyproject.toml's lower bounds (constraints-lowest.txt), in a new
# virtual environment, so that every lower bound we declare is one we tested.
#   bash tools/test_lowest.sh [python]      (default python3; about 10 min on 2 cores + downloads)
# torch 2.11 comes from PyPI as its CUDA build (multi-GB download); it runs the CPU suite as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/eora-lowest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
TORCH=$(grep -E '^torch==' constraints-lowest.txt)
pip install -c constraints-lowest.txt "$TORCH" -e ".[test]"
python tools/freeze_constraints.py --diff
python -m pytest -q
