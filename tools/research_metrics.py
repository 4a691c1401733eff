"""Research metrics used by tools/compare_quality.py and its tests (not shipped in the package):
Spearman correlation with human similarity ratings (the Lee corpus protocol) and a logistic-regression
probe on frozen embeddings (needs scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch


def similarity_spearman(embeddings: torch.Tensor, human: np.ndarray) -> float:
    """Spearman correlation between the embeddings' pairwise cosines and human similarity
    ratings, over the pairs above the diagonal (the Lee corpus protocol)."""
    from scipy.stats import spearmanr

    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sims = (e @ e.T).numpy()
    upper = np.triu_indices(len(human), 1)
    return float(spearmanr(sims[upper], np.asarray(human)[upper]).statistic)


def probe_accuracy(train: torch.Tensor, train_labels, test: torch.Tensor, test_labels) -> float:
    """Accuracy of a logistic-regression probe fitted on frozen, standardized embeddings (L2, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=0))
    probe.fit(train.double().numpy(), list(train_labels))
    return float(probe.score(test.double().numpy(), list(test_labels)))
