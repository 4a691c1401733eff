"""Window search (paper §3.4): which k adjacent FF sublayers to merge.

`full` merges every window position and scores it on validation data; `aligned` ranks the
positions by their neuron-alignment score (mean matched correlation to the anchor, one
calibration pass) and scores only the best `top`. Encoder-decoder models use the same indices
on both sides."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from ..errors import InputError, WindowError
from ..families import adapter_for, task_of
from ..merging import Calibration, Window, drop_layers, merge
from ..merging import calibration as calibrate
from ..merging.align import Match, anchor_layer, match
from ..progress import track
from .metrics import batch_accuracy, batch_perplexity, cosine_fidelity
from .runners import TorchRunner

SEARCH_MODES = {
    "full": "merge and score every window position (paper §3.4)",
    "aligned": "rank positions by neuron alignment (one calibration pass), score only the best --top",
}


@dataclass
class Candidate:
    start: int
    end: int
    align_score: float
    score: float | None = None


def pair_matches(
    model: nn.Module, calibration: Calibration, stack: str, pairs: set[tuple[int, int]], progress: bool = True
) -> dict[tuple[int, int], Match]:
    """For each (anchor, layer) pair: the layer's FF neurons matched to the anchor's by activation correlation
    (one calibration pass, or more when the statistics exceed the memory budget)."""
    adapter = adapter_for(model)
    pairs = sorted(pairs)
    keys = [(f"{stack}.{c}.pre", f"{stack}.{i}.pre") for c, i in pairs]
    moments = calibrate.collect(model, adapter, calibration, keys, progress=progress)
    return {pair: match(calibrate.find(moments, kc, ki).correlation(kc, ki)) for pair, (kc, ki) in zip(pairs, keys)}


def window_pairs(start: int, end: int, anchor: str) -> list[tuple[int, int]]:
    """The (anchor, layer) pairs a window aligns."""
    c = anchor_layer(list(range(start, end + 1)), anchor)
    return [(c, i) for i in range(start, end + 1) if i != c]


def alignment_scores(
    model: nn.Module, calibration: Calibration, stack: str, k: int, anchor: str = "first", progress: bool = True
) -> dict[tuple[int, int], float]:
    """Mean matched correlation of each window's layers to its anchor (1.0: permuted copies)."""
    n = adapter_for(model).num_layers(model, stack)
    windows = [(a, a + k - 1) for a in range(n - k + 1)]
    found = pair_matches(model, calibration, stack, {p for a, b in windows for p in window_pairs(a, b, anchor)},
                         progress)  # fmt: skip
    return {(a, b): sum(found[p].score for p in window_pairs(a, b, anchor)) / (b - a) for a, b in windows}


def search(
    model: nn.Module,
    k: int,
    calibration: Calibration,
    score: Callable[[nn.Module], float],
    *,
    higher_is_better: bool,
    stacks: list[str] | None = None,
    mode: str = "full",
    top: int = 3,
    anchor: str = "first",
    align: str = "correlation",
    method: str = "average",
    params: dict | None = None,
    progress: bool = True,
) -> dict:
    """Score candidate windows of k layers (merged with `method` and its `params`); returns the rows and the
    best window. `model` is not changed."""
    if mode not in SEARCH_MODES:
        raise InputError(f"--mode is one of {', '.join(SEARCH_MODES)}; got {mode!r}.")
    adapter = adapter_for(model)
    stacks = stacks or adapter.stack_names()
    n = min(adapter.num_layers(model, s) for s in stacks)
    if k < 2:
        raise WindowError(f"--merge-count must be 2 or more (a merge joins at least 2 layers); got {k}.")
    if k > n:
        raise WindowError(f"--merge-count {k} is more layers than the model has per stack ({n}); give 2 to {n}.")
    ranking = alignment_scores(model, calibration, stacks[-1], k, anchor, progress)
    rows = [Candidate(a, b, ranking[(a, b)]) for a, b in sorted(ranking)]
    chosen = rows if mode == "full" else sorted(rows, key=lambda c: -c.align_score)[:top]
    for c in track(chosen, f"scoring {len(chosen)} windows of {k}", enabled=progress):
        trial = copy.deepcopy(model)
        merge(
            trial,
            [Window(s, c.start, c.end) for s in stacks],
            anchor=anchor,
            align=align,
            calibration=calibration,
            method=method,
            params=params,
            progress=False,
        )
        c.score = float(score(trial))
        del trial
    scored = [c for c in rows if c.score is not None and math.isfinite(c.score)]
    best = (max if higher_is_better else min)(scored, key=lambda c: c.score)
    by_align = max(rows, key=lambda c: c.align_score)
    return {
        "k": k,
        "stacks": stacks,
        "mode": mode,
        "higher_is_better": higher_is_better,
        "rows": [asdict(c) for c in rows],
        "best": [best.start, best.end],
        "best_by_alignment": [by_align.start, by_align.end],
    }


def best_drop(
    model: nn.Module,
    stack: str,
    count: int,
    score: Callable[[nn.Module], float],
    *,
    higher_is_better: bool,
    progress: bool = True,
) -> dict:
    """The layer-drop baseline at its best: every run of `count` adjacent layers of `stack` is
    dropped in turn and scored; returns the rows and the best run. `model` is not changed."""
    n = adapter_for(model).num_layers(model, stack)
    if not 1 <= count < n:
        raise WindowError(f"Cannot drop {count} of the {n} layers of the {stack}.")
    rows = []
    for a in track(range(n - count + 1), f"scoring {n - count + 1} drops of {count}", enabled=progress):
        trial = drop_layers(copy.deepcopy(model), stack, list(range(a, a + count))).model
        rows.append({"start": a, "end": a + count - 1, "score": float(score(trial))})
        del trial
    scored = [r for r in rows if math.isfinite(r["score"])]
    best = (max if higher_is_better else min)(scored, key=lambda r: r["score"])
    return {"count": count, "stack": stack, "rows": rows, "best": [best["start"], best["end"]]}


# -- scores ------------------------------------------------------------------------------
def fidelity(original: nn.Module, batches) -> Callable[[nn.Module], float]:
    """Mean cosine between a model's main output and the original's, per token (or per sample)."""

    def main_out(model, b):
        x = TorchRunner(model)({k: v for k, v in b.items()})
        if x.dim() == 3 and "attention_mask" in b and x.shape[1] == b["attention_mask"].shape[1]:
            return x[b["attention_mask"].bool()]
        return x.flatten(1)

    refs = [main_out(original, b) for b in batches]

    def score(model):
        return sum(cosine_fidelity(main_out(model, b), r) for b, r in zip(batches, refs)) / len(refs)

    return score


def default_score(original: nn.Module, batches) -> tuple[Callable[[nn.Module], float], bool, str]:
    """(score, higher_is_better, name) for the model's task."""
    batches = list(batches)
    if task_of(original) == "causal-lm":
        return (lambda m: batch_perplexity(m, batches)), False, "perplexity"
    if batches and "labels" in batches[0]:
        return (lambda m: batch_accuracy(m, batches)), True, "accuracy"
    return fidelity(original, batches), True, "cosine to original"


def write(result: dict, folder) -> None:
    """search.json and search.png (score and alignment per window start)."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    (folder / "search.json").write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    starts = [r["start"] for r in rows]
    ax.plot(starts, [r["align_score"] for r in rows], "o-", color="tab:blue", label="alignment (mean matched corr.)")
    ax.set_xlabel(f"window start (k={result['k']})")
    ax.set_ylabel("alignment", color="tab:blue")
    scored = [r for r in rows if r["score"] is not None]
    if scored:
        ax2 = ax.twinx()
        ax2.plot([r["start"] for r in scored], [r["score"] for r in scored], "s--", color="tab:red")
        ax2.set_ylabel(result.get("score_name", "score"), color="tab:red")
    ax.set_title(f"window search: best {result['best'][0]}-{result['best'][1]}")
    fig.tight_layout()
    fig.savefig(folder / "search.png", dpi=120)
    plt.close(fig)
