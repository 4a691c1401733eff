#!/usr/bin/env bash
# Load our --kv-cache exports with optimum's ORTModel classes, in optimum-onnx's own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .optenv/bin/python ]; then
  python3 -m venv .optenv
  .optenv/bin/python -m pip install -q --upgrade pip
  .optenv/bin/python -m pip install -q torch==2.13.0 "optimum-onnx==0.1.0" onnxruntime
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
HF_HUB_OFFLINE=1 .venv/bin/python tools/optimum_compat.py prepare "$work"
HF_HUB_OFFLINE=1 .optenv/bin/python tools/optimum_compat.py check "$work"
