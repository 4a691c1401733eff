"""Quality against parameters removed: original, layer drop, vanilla merge, permute merge,
the regmean and refit merges, each before and after the same recovery fine-tune. Writes a markdown table, JSON and a PNG.

    .venv/bin/python tools/compare_quality.py --model SmolLM2-135M-Instruct --windows 16-18 --steps 30
    .venv/bin/python tools/compare_quality.py --model all-MiniLM-L6-v2 --windows 2-3,1-3 --steps 30

Causal LMs are scored by perplexity on the BBC news test split (sliding window 512, stride
256); sentence encoders by mean cosine of their embeddings to the original's on test articles.
Calibration uses the BBC calibration split, fine-tuning the same split, model selection the
validation split. A dropped-layer row removes the window's last j layers, j chosen so its
parameter reduction is closest to the merge's (ties: more removed)."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from ffmerge_onnx import Window, adapter_for, drop_layers, merge
from ffmerge_onnx.builtin import bbc_articles, write_calibration_text
from ffmerge_onnx.data import load_calibration
from ffmerge_onnx.evaluate import TorchRunner, cosine_fidelity, mean_pooled, perplexity, text_ids
from ffmerge_onnx.finetune import recover
from ffmerge_onnx.merge import ff_param_count, parse_windows
from ffmerge_onnx.modeling import load_model, load_preprocessor


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class Scorer:
    def __init__(self, original, tokenizer, eval_tokens: int, docs: int):
        self.task = adapter_for(original).task
        self.tokenizer = tokenizer
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")]
        if self.task == "causal-lm":
            self.ids = text_ids(tokenizer, texts, eval_tokens)
            self.name, self.higher = "perplexity", False
        else:
            self.docs = texts[:: max(1, len(texts) // docs)][:docs]
            self.reference = mean_pooled(TorchRunner(original), tokenizer, self.docs, progress=False)
            self.name, self.higher = "embedding cosine to original", True

    def __call__(self, model) -> float:
        if self.task == "causal-lm":
            return perplexity(TorchRunner(model), self.ids, window=512, stride=256, progress=False).perplexity
        return cosine_fidelity(mean_pooled(TorchRunner(model), self.tokenizer, self.docs, progress=False), self.reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--windows", default="16-18", help="comma-separated windows A-B (inclusive)")
    ap.add_argument("--methods", default="regmean,refit", help="merge methods beyond average (comma-separated)")
    ap.add_argument("--steps", type=int, default=0, help="recovery fine-tune steps (0: none)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--finetune-original", action="store_true",
                    help="fine-tune the original too (fair when the fine-tune data is new to it)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--calibration-tokens", type=int, default=10_000)
    ap.add_argument("--finetune-tokens", type=int, default=40_000)
    ap.add_argument("--eval-tokens", type=int, default=4_000)
    ap.add_argument("--eval-docs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("models/results"))
    a = ap.parse_args()
    torch.manual_seed(0)
    original = load_model(a.model)
    tok = load_preprocessor(a.model)
    adapter = adapter_for(original)
    stack = adapter.stack_names()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="ffmerge-compare-"))
    cal_path = write_calibration_text(tmp, "calibration")
    cal = load_calibration(cal_path, model=original, tokenizer=tok, budget=a.calibration_tokens)
    train = list(load_calibration(cal_path, model=original, tokenizer=tok, budget=a.finetune_tokens,
                                  batch_size=a.batch_size, seq_len=256))
    val = list(load_calibration(write_calibration_text(tmp, "validation"), model=original, tokenizer=tok,
                                budget=4_000, batch_size=4, seq_len=256))
    score = Scorer(original, tok, a.eval_tokens, a.eval_docs)
    total = unique_params(original)
    ff = ff_param_count(original, stack)
    layer = sum(p.numel() for p in adapter.layers(original, stack)[0].parameters())
    rows = []

    def run(name, window, make):
        t = time.time()
        model = make()
        removed = 1 - unique_params(model) / total
        before = score(model)
        after = None
        if a.steps and (name != "original" or a.finetune_original):
            recover(model, original, train, val, steps=a.steps, lr=a.lr, eval_every=max(1, a.steps // 3), progress=False)
            after = score(model)
        rows.append({"window": window, "method": name, "removed": removed, "before": before, "after": after,
                     "seconds": time.time() - t})
        print(f"{window:>7} {name:<12} removed {removed:6.2%}  {score.name} {before:.4f}"
              + (f" -> {after:.4f} after {a.steps} steps" if after is not None else ""), flush=True)
        del model

    run("original", "-", lambda: copy.deepcopy(original))
    for w in parse_windows(a.windows, stack) if a.windows else []:
        k = w.size
        j = max(1, min(k, round((k - 1) * ff / layer + 0.01)))
        label = f"{w.start}-{w.end}"
        windows = [Window(s, w.start, w.end) for s in adapter.stack_names()]
        run("vanilla", label, lambda: merge(copy.deepcopy(original), windows, align="none", progress=False))
        run("permute", label, lambda: merge(copy.deepcopy(original), windows, calibration=cal, progress=False))
        for method in a.methods.split(","):
            run(method, label, lambda: merge(copy.deepcopy(original), windows, calibration=cal, method=method,
                                             progress=False))
        run(f"drop {j}", label, lambda: drop_layers(copy.deepcopy(original), stack, list(range(w.end - j + 1, w.end + 1))))
    write(rows, a, score)


def write(rows, a, score) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(a.model).stem.replace(".", "_")
    (out / f"{stem}.json").write_text(json.dumps({"model": a.model, "metric": score.name, "steps": a.steps,
                                                  "rows": rows}, indent=2))
    after = " | after fine-tune" if a.steps else ""
    lines = [f"| window | method | params removed | {score.name}{after} |",
             "|---|---|---|---|" + ("---|" if a.steps else "")]
    for r in rows:
        lines.append(f"| {r['window']} | {r['method']} | {r['removed']:.2%} | {r['before']:.4f}"
                     + ((f" | {r['after']:.4f}" if r["after"] is not None else " | -") if a.steps else "") + " |")
    (out / f"{stem}.md").write_text(f"{a.model}, {score.name} (BBC news test split); fine-tune steps {a.steps}\n\n"
                                    + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"].split()[0] for r in rows}):
        pts = [r for r in rows if r["method"].split()[0] == method]
        ax.plot([100 * r["removed"] for r in pts], [r["before"] for r in pts], "o", label=f"{method}")
        if a.steps:
            ax.plot([100 * r["removed"] for r in pts if r["after"] is not None],
                    [r["after"] for r in pts if r["after"] is not None], "x", label=f"{method} + fine-tune")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(score.name)
    if score.name == "perplexity":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(a.model)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
