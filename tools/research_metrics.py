"""Research metrics used by tools/compare_quality.py and its tests (not shipped in the package):
Spearman correlation with human similarity ratings (the Lee corpus protocol). The topic probe on frozen
embeddings is the package's (the encoders' quality goal uses it)."""

from __future__ import annotations

import numpy as np
import torch

from ffmerge_onnx.quality.metrics import probe_accuracy

__all__ = ["probe_accuracy", "similarity_spearman"]


def similarity_spearman(embeddings: torch.Tensor, human: np.ndarray) -> float:
    """Spearman correlation between the embeddings' pairwise cosines and human similarity
    ratings, over the pairs above the diagonal (the Lee corpus protocol)."""
    from scipy.stats import spearmanr

    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sims = (e @ e.T).numpy()
    upper = np.triu_indices(len(human), 1)
    return float(spearmanr(sims[upper], np.asarray(human)[upper]).statistic)
