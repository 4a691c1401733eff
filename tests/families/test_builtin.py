"""Built-in data readers with known answers, and the committed ViT reference model."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ffmerge_onnx.errors import InputError
from ffmerge_onnx.families import builtin
from ffmerge_onnx.families.builtin import builtin_models
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.quality.metrics import image_accuracy
from ffmerge_onnx.quality.runners import TorchRunner


def write_idx(path, array: np.ndarray, cut: int = 0):
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(head + body[: len(body) - cut])


def test_idx_reader_round_trips_and_refuses_truncated_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(builtin.read_idx(tmp_path / "a.gz"), images)
    write_idx(tmp_path / "b.gz", images, cut=5)
    with pytest.raises(InputError, match="truncated"):
        builtin.read_idx(tmp_path / "b.gz")


def test_fashion_mnist_folder_from_the_environment(tmp_path, monkeypatch):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 9], np.uint8))
    monkeypatch.setenv("FFMERGE_FASHION_MNIST", str(tmp_path))
    images, labels = builtin.fashion_mnist("test")
    assert images.shape == (3, 28, 28) and labels.tolist() == [1, 2, 9] and labels.dtype == np.int64
    with pytest.raises(InputError, match="train or test"):
        builtin.fashion_mnist("val")


VIT = builtin_models().get("vit-fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(VIT is None, reason="models/vit-fashion-mnist is not in this checkout")
def test_vit_reference_model_reaches_its_recorded_accuracy():
    recipe = json.loads((Path(VIT) / "recipe.json").read_text())
    images, labels = builtin.fashion_mnist("test")
    model = load_model("vit-fashion-mnist")
    acc = image_accuracy(TorchRunner(model), load_preprocessor("vit-fashion-mnist"), images, labels, progress=False)
    assert acc == pytest.approx(recipe["test_accuracy_cpu_float32"], abs=2e-4)  # float32 CPU vs the recorded run
    assert acc > 0.9
