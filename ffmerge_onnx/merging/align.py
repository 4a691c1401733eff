"""Neuron alignment by activation correlation (paper §3.2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANCHORS = {  # the layer of a window the others are aligned to
    "first": "the window's first layer (paper default)",
    "middle": "the window's middle layer",
    "last": "the window's last layer",
}
ALIGNERS = {
    "correlation": "match neurons by activation correlation (linear assignment; the paper)",
    "none": "no permutation (the paper's vanilla merge)",
}


@dataclass(frozen=True)
class Match:
    """perm[p] is the layer's neuron placed at position p, matched to anchor neuron p."""

    perm: np.ndarray
    score: float  # mean correlation of matched pairs


def anchor_layer(layers: list[int], anchor: str) -> int:
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {list(ANCHORS)}, not {anchor!r}")
    return {"first": layers[0], "middle": layers[(len(layers) - 1) // 2], "last": layers[-1]}[anchor]


def match(corr: np.ndarray) -> Match:
    """corr[a, j]: correlation of anchor neuron a with the layer's neuron j.

    Solves the linear assignment that maximises the total matched correlation.
    """
    from scipy.optimize import linear_sum_assignment  # imported here: `import ffmerge_onnx` stays light

    rows, cols = linear_sum_assignment(corr, maximize=True)
    perm = np.empty(corr.shape[0], dtype=np.int64)
    perm[rows] = cols
    return Match(perm, float(corr[rows, cols].mean()))


def identity(d: int, corr: np.ndarray | None = None) -> Match:
    perm = np.arange(d, dtype=np.int64)
    score = float(np.diag(corr).mean()) if corr is not None else float("nan")
    return Match(perm, score)
