"""The quality goal of `convert --max-loss P`: the exported model and the original scored on held-out
evaluation data with the task's metric (perplexity, accuracy, embedding cosine to the original, BLEU),
the relative loss against P, and what would help when it is missed.

Relative loss: for perplexity merged / original - 1 (higher is worse); for the others 1 - merged / original
(the original's embedding cosine to itself is 1). A sentence encoder on the built-in data is judged by the
accuracy of a BBC topic probe (logistic regression on its embeddings, fitted on every other of PROBE_DOCS x 2
evenly spaced test articles, tested on the rest), with the embedding cosine to the original reported beside
it. The evaluation data is only read here, after the merge: nothing that chooses what to merge sees it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError, ValidationFailed
from .evaluate import evaluate

LOWER_IS_BETTER = {"perplexity"}
PROBE_DOCS = 400  # built-in BBC test articles the topic probe is fitted on, and as many it is tested on
PROBE_METRIC = "BBC topic-probe accuracy"
ON_MISS = {"nothing": "write nothing, exit 1", "best": "write the model anyway, marked as missing the goal; exit 1"}
NO_METRIC = ("audio-feature-extraction", "speech-seq2seq")
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
    if task in NO_METRIC:
        raise InputError(
            f"--max-loss: no quality metric for {task} models yet. Convert without --max-loss: windows "
            "and methods are still chosen on validation data (cosine to the original's outputs)."
        )
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
    from ..onnx.build import INFO

    log("quality: scoring the ONNX model, the merged PyTorch model and the original on the evaluation data")
    if data is None and json.loads((Path(folder) / INFO).read_text()).get("task") == "feature-extraction":
        return topic_probe(folder, reference, source)
    onnx = evaluate(str(folder), data=data, reference=source, progress=False)
    merged = evaluate(str(reference), data=data, reference=source, progress=False)
    if onnx["metric"].startswith("embedding cosine"):
        original = 1.0  # the original's embeddings against themselves
    else:
        original = evaluate(source, data=data, progress=False)["value"]
    return {"metric": onnx["metric"], "original": original, "merged_pytorch": merged["value"],
            "merged_onnx": onnx["value"], "data": str(data) if data else "built-in test split"}  # fmt: skip


def probe_articles() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """(texts, topics) to fit the probe on and to test it on: every other of 2 x PROBE_DOCS evenly spaced
    BBC test articles (the split is sorted by topic)."""
    import numpy as np

    from ..families.builtin import bbc_topics

    texts, topics = bbc_topics("test")
    picked = np.linspace(0, len(texts) - 1, min(2 * PROBE_DOCS, len(texts))).round().astype(int)
    fit, test = picked[0::2], picked[1::2]
    return ([texts[i] for i in fit], [topics[i] for i in fit]), ([texts[i] for i in test], [topics[i] for i in test])


def topic_probe(folder: Path, reference: Path, source: str) -> dict:
    """An encoder's quality on the built-in data: topic-probe accuracy of each model's embeddings, and the
    embedding cosine of the ONNX model's to the original's on the same articles."""
    from .evaluate import open_target
    from .metrics import cosine_fidelity, mean_pooled, probe_accuracy

    (fit_texts, fit_topics), (test_texts, test_topics) = probe_articles()
    scores, embedded = {}, {}
    for key, spec in (("merged_onnx", folder), ("merged_pytorch", reference), ("original", source)):
        target = open_target(str(spec))
        fit = mean_pooled(target.run, target.tokenizer, fit_texts, max_length=128, progress=False)
        test = mean_pooled(target.run, target.tokenizer, test_texts, max_length=128, progress=False)
        scores[key] = probe_accuracy(fit, fit_topics, test, test_topics)
        embedded[key] = test
    return {"metric": PROBE_METRIC, **scores,
            "embedding_cosine": cosine_fidelity(embedded["merged_onnx"], embedded["original"]),
            "data": f"built-in BBC test split ({len(fit_texts)} articles fit the probe, {len(test_texts)} test it)"}  # fmt: skip


def removed_fraction(result) -> float:
    """Parameters the merge removed, over the original's."""
    adapter, model = result.adapter, result.model
    removed = 0
    for w in result.manifest.windows:
        layer = adapter.layers(model, w.stack)[w.start]
        removed += (len(w.layers) - 1) * sum(p.numel() for p in adapter.ff_params(layer).values())
    kept = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return removed / (kept + removed)


def judge(quality: dict, max_loss: float, recovered: bool, methods_tried: bool = False) -> dict:
    """The verdict on a scored model: loss, goal, and what would help when it is missed."""
    loss = relative_loss(quality["metric"], quality["original"], quality["merged_onnx"])
    ok = loss <= max_loss
    out = {**quality, "relative_loss": loss, "max_loss": max_loss, "ok": ok}
    if not ok:
        helps = ["more recovery time (--recovery-minutes)" if recovered else "a recovery fine-tune (--recovery-minutes M)",
                 "a smaller --reduction (fewer layers merged)"]  # fmt: skip
        if not methods_tried:
            helps.append("--method auto (every merge method tried on validation data)")
        out["advice"] = (
            f"loss {loss:.2%} exceeds the goal {max_loss:.2%} by {loss - max_loss:.2%} points; "
            f"{', '.join(helps[:-1])} or {helps[-1]} may help"
        )
    return out


def recovery_summary(finetune: dict) -> dict:
    """The recovery as the report shows it: settings and time, without the step-by-step history."""
    if not finetune:
        return {}
    history = finetune.get("history") or [{}]
    keep = ("steps_run", "lr", "schedule", "objective", "train", "score", "best_step", "best_score")
    out = {k: finetune[k] for k in keep if k in finetune}
    out["minutes"] = round(history[-1].get("seconds", 0.0) / 60, 2)
    if finetune.get("budget_s"):
        out["budget_minutes"] = finetune["budget_s"] / 60
    return out


def recovery_text(r: dict) -> str:
    if not r:
        return "none"
    budget = f" of a {r['budget_minutes']:g}-minute budget" if r.get("budget_minutes") else ""
    return (
        f"{r.get('steps_run')} steps in {r.get('minutes', 0):.1f} min{budget}, objective {r.get('objective')}, "
        f"lr {r.get('lr'):g} ({r.get('schedule')}), training {r.get('train')}; best {r.get('score')} on validation "
        f"{r.get('best_score', float('nan')):.4f} at step {r.get('best_step')}"
    )


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
        f"Evaluation data: {quality['data']}. Windows (method): {', '.join(quality.get('windows', [])) or 'none'}.",
        f"Recovery: {recovery_text(quality.get('recovery') or {})}.",
    ]
    if "embedding_cosine" in quality:
        lines.append(f"Embedding cosine of the ONNX model to the original on the probe's test articles: "
                     f"{quality['embedding_cosine']:.4f}.")  # fmt: skip
    if not quality["ok"]:
        lines.append(f"Missed: {quality['advice']}.")
    return lines
