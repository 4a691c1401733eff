"""The quality goal of `convert --max-loss P`: the exported model and the original scored on held-out
evaluation data with the task's metric (perplexity, accuracy, embedding cosine to the original, BLEU),
the relative loss against P, and what would help when it is missed.

Relative loss: for perplexity merged / original - 1 (higher is worse); for the others 1 - merged / original
(the original's embedding cosine to itself is 1). The evaluation data is only read here, after the merge:
nothing that chooses what to merge sees it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError, ValidationFailed
from .evaluate import evaluate

LOWER_IS_BETTER = {"perplexity"}
EVAL_DOCS = 200  # built-in BBC test articles scored for an encoder's embedding cosine (of 1,825)
NEEDS_DATA = {"seq2seq-lm": "a TSV file of source<TAB>reference lines", "text-classification": "a TSV file of "
              "text<TAB>label lines"}  # fmt: skip


class QualityGoalMissed(ValidationFailed):
    """The exported model loses more quality than --max-loss allows."""


def check_goal_inputs(task: str, max_loss: float | None, data: Path | None) -> None:
    """Before any work: a goal in range, and evaluation data where the task has no built-in set."""
    if max_loss is None:
        return
    if not 0 <= max_loss < 1:
        raise InputError(f"--max-loss is a fraction of the original's quality in [0, 1), e.g. 0.02; got {max_loss}.")
    if data is None and task in NEEDS_DATA:
        raise InputError(f"--max-loss on a {task} model needs --eval-data: {NEEDS_DATA[task]}.")
    if data is not None and not Path(data).exists():
        raise InputError(f"--eval-data {data} does not exist.")


def relative_loss(metric: str, original: float, merged: float) -> float:
    if metric in LOWER_IS_BETTER:
        return merged / original - 1
    return 1 - merged / original if original else float("inf")


def score(folder: Path, reference: Path, source: str, data: Path | None, *, log=print) -> dict:
    """The task's metric on the ONNX folder, the merged PyTorch reference and the original."""
    from ..families.builtin import bbc_articles
    from ..onnx.build import INFO

    log("quality: scoring the ONNX model, the merged PyTorch model and the original on the evaluation data")
    texts = None
    if data is None and json.loads((Path(folder) / INFO).read_text()).get("task") == "feature-extraction":
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")[:EVAL_DOCS]]
    onnx = evaluate(str(folder), data=data, texts=texts, reference=source, progress=False)
    merged = evaluate(str(reference), data=data, texts=texts, reference=source, progress=False)
    if onnx["metric"].startswith("embedding cosine"):
        original = 1.0  # the original's embeddings against themselves
    else:
        original = evaluate(source, data=data, progress=False)["value"]
    return {"metric": onnx["metric"], "original": original, "merged_pytorch": merged["value"],
            "merged_onnx": onnx["value"],
            "data": str(data) if data else f"built-in test split{f' (first {EVAL_DOCS} articles)' if texts else ''}"}  # fmt: skip


def removed_fraction(result) -> float:
    """Parameters the merge removed, over the original's."""
    adapter, model = result.adapter, result.model
    removed = 0
    for w in result.manifest.windows:
        layer = adapter.layers(model, w.stack)[w.start]
        removed += (len(w.layers) - 1) * sum(p.numel() for p in adapter.ff_params(layer).values())
    kept = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return removed / (kept + removed)


def judge(quality: dict, max_loss: float, recovery_steps: int) -> dict:
    """The verdict on a scored model: loss, goal, and what would help when it is missed."""
    loss = relative_loss(quality["metric"], quality["original"], quality["merged_onnx"])
    ok = loss <= max_loss
    out = {**quality, "relative_loss": loss, "max_loss": max_loss, "ok": ok}
    if not ok:
        more = "more recovery (--finetune-steps)" if recovery_steps else "a recovery fine-tune (--finetune-steps N)"
        out["advice"] = (
            f"loss {loss:.2%} exceeds the goal {max_loss:.2%} by {loss - max_loss:.2%} points; {more}, a smaller "
            "window (fewer layers merged), or another --method may help"
        )
    return out


def goal_lines(quality: dict) -> list[str]:
    """The report's quality section."""
    lines = [
        "| metric | original | merged (PyTorch) | merged (ONNX) | relative loss | goal | params removed |",
        "|---|---|---|---|---|---|---|",
        (
            f"| {quality['metric']} | {quality['original']:.4f} | {quality['merged_pytorch']:.4f} | "
            f"{quality['merged_onnx']:.4f} | {quality['relative_loss']:.2%} | <= {quality['max_loss']:.2%} "
            f"({'met' if quality['ok'] else 'missed'}) | {quality.get('params_removed_fraction', float('nan')):.2%} |"
        ),
        "",
        (
            f"Evaluation data: {quality['data']}; windows {quality.get('windows', [])}; recovery "
            f"{quality.get('recovery', {}) or 'none'}."
        ),
    ]
    if not quality["ok"]:
        lines.append(f"Missed: {quality['advice']}.")
    return lines
