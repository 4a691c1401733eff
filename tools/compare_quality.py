"""Quality against parameters removed: original, layer drop, vanilla merge, permute merge and the
regmean / refit / sequential merges, each before and after the same recovery fine-tune. Writes a
markdown table, JSON and a PNG per model to --out.

    .venv/bin/python tools/compare_quality.py --model SmolLM2-135M-Instruct --windows 16-18,17-27
    .venv/bin/python tools/compare_quality.py --model all-MiniLM-L6-v2 --windows 2-3,1-3 --steps 20
    .venv/bin/python tools/compare_quality.py --model vit-fashion-mnist --windows 2-3,2-4 --steps 200 \
        --objective kl --lr 3e-5 --onnx permute
    .venv/bin/python tools/compare_quality.py --render models/results/vit-fashion-mnist.json

What each reference model is scored on (test data is never used to merge, select or fine-tune):
- causal LMs: perplexity on the BBC news test split (sliding window 512, stride 256) and on
  Shakespeare (As You Like It; `--shakespeare-tokens`);
- sentence encoders: Spearman correlation with the Lee corpus's human similarity ratings, accuracy
  of a logistic-regression probe on BBC topics (the probe is evaluation machinery: fitted on the
  scored model's embeddings of `--probe-docs` evenly spaced test-split articles, tested on as
  many others), and embedding cosine to the original on `--eval-docs` test articles;
- image classifiers: top-1 accuracy on the 10,000 Fashion-MNIST test images.
Calibration uses the BBC calibration split (Fashion-MNIST train images 0-1,999 for images),
fine-tuning the same split (train images with labels for images), model selection the
validation split (train images 50,000-51,999). A dropped-layer row removes j adjacent layers, j
chosen so its parameter reduction is closest to the merge's (ties: more removed), at the position
that scores best on the validation split. With --onnx METHODS those rows are also exported
(`convert`'s pipeline) and scored through onnxruntime."""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # refdata, research_metrics (tools/, not shipped)

from refdata import bbc_topics, lee_corpus, shakespeare_texts
from research_metrics import probe_accuracy, similarity_spearman

from ffmerge_onnx import MergeResult, Window, adapter_for, drop_layers, merge, task_of
from ffmerge_onnx.families.builtin import FASHION_MNIST_SPLITS, bbc_articles, fashion_mnist, write_calibration_text
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.merging import Calibration, ff_param_count, load_calibration, parse_windows
from ffmerge_onnx.quality.finetune import recover
from ffmerge_onnx.quality.metrics import (
    cosine_fidelity,
    mean_pooled,
    perplexity,
    pixel_accuracy,
    pixel_values,
    text_ids,
)
from ffmerge_onnx.quality.runners import TorchRunner, runner
from ffmerge_onnx.quality.search import best_drop, default_score


class Bench:
    """A reference model's metrics (the first is the headline; `higher` says which way is better)
    and the data it is merged, fine-tuned and selected with."""

    metric_names: list[str]
    higher: bool
    cal: Calibration
    train: list[dict]
    val: list[dict]

    def metrics(self, run) -> dict[str, float]:
        raise NotImplementedError


class LMBench(Bench):
    def __init__(self, original, tok, a, tmp: Path):
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")]
        self.ids = {"perplexity (BBC test)": text_ids(tok, texts, a.eval_tokens)}
        if a.shakespeare_tokens:
            self.ids["perplexity (Shakespeare)"] = text_ids(
                tok, shakespeare_texts(["as_you_like_it"]), a.shakespeare_tokens
            )
        self.metric_names, self.higher = list(self.ids), False
        _text_data(self, original, tok, a, tmp)

    def metrics(self, run):
        return {
            k: perplexity(run, ids, window=512, stride=256, progress=False).perplexity for k, ids in self.ids.items()
        }


class EncoderBench(Bench):
    def __init__(self, original, tok, a, tmp: Path):
        self.tok = tok
        self.lee_docs, self.lee_human = lee_corpus()
        test_texts, test_labels = bbc_topics("test")  # sorted by topic: take evenly spaced articles
        n = len(test_texts)
        probe = np.linspace(0, n - 1, min(2 * a.probe_docs, n)).round().astype(int)
        cos = np.linspace(1, n - 2, min(a.eval_docs, n - 2)).round().astype(int)
        # the probe (evaluation machinery, not the model) is fitted on every other one, tested on the rest
        self.probe_train = ([test_texts[i] for i in probe[0::2]], [test_labels[i] for i in probe[0::2]])
        self.probe_test = ([test_texts[i] for i in probe[1::2]], [test_labels[i] for i in probe[1::2]])
        self.cos_docs = [test_texts[i] for i in cos]
        self.reference = self._embed(TorchRunner(original), self.cos_docs)
        self.metric_names = ["Lee Spearman", "BBC probe accuracy", "cosine to original"]
        self.higher = True
        _text_data(self, original, tok, a, tmp)

    def _embed(self, run, texts):
        return mean_pooled(run, self.tok, list(texts), max_length=128, progress=False)

    def metrics(self, run):
        return {
            "Lee Spearman": similarity_spearman(self._embed(run, self.lee_docs), self.lee_human),
            "BBC probe accuracy": probe_accuracy(
                self._embed(run, self.probe_train[0]),
                self.probe_train[1],
                self._embed(run, self.probe_test[0]),
                self.probe_test[1],
            ),
            "cosine to original": cosine_fidelity(self._embed(run, self.cos_docs), self.reference),
        }


class ImageBench(Bench):
    def __init__(self, original, processor, a, tmp: Path):
        test_images, self.test_labels = fashion_mnist("test")
        self.test_pixels = pixel_values(processor, test_images)
        images, labels = fashion_mnist("train")
        pixels = pixel_values(processor, images[:52_000])
        lo, hi = FASHION_MNIST_SPLITS["calibration"]
        per_image = (original.config.image_size // original.config.patch_size) ** 2 + 1
        n_cal = min(hi - lo, -(-a.calibration_tokens // per_image))
        self.cal = Calibration(
            [{"pixel_values": pixels[i : i + 64]} for i in range(lo, lo + n_cal, 64)],
            n_cal * per_image,
            {"kind": "images", "source": "Fashion-MNIST train", "images": n_cal},
        )
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(50_000, generator=g)[: a.finetune_images]
        self.train = [
            {"pixel_values": pixels[order[i : i + 64]], "labels": torch.from_numpy(labels[order[i : i + 64].numpy()])}
            for i in range(0, len(order), 64)
        ]
        vlo, vhi = FASHION_MNIST_SPLITS["validation"]
        self.val = [
            {"pixel_values": pixels[i : i + 500], "labels": torch.from_numpy(labels[i : i + 500])}
            for i in range(vlo, vhi, 500)
        ]
        self.metric_names, self.higher = ["accuracy (Fashion-MNIST test)"], True

    def metrics(self, run):
        return {
            "accuracy (Fashion-MNIST test)": pixel_accuracy(run, self.test_pixels, self.test_labels, progress=False)
        }


def _text_data(bench: Bench, original, tok, a, tmp: Path) -> None:
    cal_path = write_calibration_text(tmp, "calibration")
    bench.cal = load_calibration(cal_path, model=original, tokenizer=tok, budget=a.calibration_tokens)
    bench.train = list(
        load_calibration(
            cal_path, model=original, tokenizer=tok, budget=a.finetune_tokens, batch_size=a.batch_size, seq_len=256
        )
    )
    bench.val = list(
        load_calibration(
            write_calibration_text(tmp, "validation"),
            model=original,
            tokenizer=tok,
            budget=4_000,
            batch_size=4,
            seq_len=256,
        )
    )


def bench_for(original, pre, a, tmp: Path) -> Bench:
    task = task_of(original)
    if task == "causal-lm":
        return LMBench(original, pre, a, tmp)
    if task == "feature-extraction":
        return EncoderBench(original, pre, a, tmp)
    if task == "image-classification":
        return ImageBench(original, pre, a, tmp)
    raise SystemExit(f"No reference benchmark for task {task}.")


def onnx_metrics(result: MergeResult, bench: Bench, pre, tmp: Path) -> dict[str, float]:
    """Export like `convert` (fold, onnxslim, validated) and score through onnxruntime."""
    from ffmerge_onnx.pipeline import ExportOptions, export

    out = Path(tempfile.mkdtemp(dir=tmp)) / "onnx"
    export(result, out, ExportOptions(keep_reference=False, compare=False), preprocessor=pre, log=lambda *_: None)
    return bench.metrics(runner(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--windows", default="16-18", help="comma-separated windows A-B (inclusive)")
    ap.add_argument(
        "--methods", default="regmean,refit,sequential", help="merge methods beyond average (comma-separated)"
    )
    ap.add_argument("--steps", type=int, default=0, help="recovery fine-tune steps (0: none)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--objective", default=None, help="fine-tune objective (default: the task's; see finetune.py)")
    ap.add_argument(
        "--train", default="all", help="what the fine-tune trains: all (the only choice for a dropped model)"
    )
    ap.add_argument(
        "--finetune-original",
        action="store_true",
        help="fine-tune the original too (fair when the fine-tune data is new to it)",
    )
    ap.add_argument(
        "--onnx",
        default="",
        help="comma-separated methods whose rows are also exported and scored "
        "through onnxruntime (e.g. permute,sequential)",
    )
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--calibration-tokens", type=int, default=10_000)
    ap.add_argument("--finetune-tokens", type=int, default=40_000)
    ap.add_argument("--finetune-images", type=int, default=50_000)
    ap.add_argument("--eval-tokens", type=int, default=4_000)
    ap.add_argument("--shakespeare-tokens", type=int, default=4_000)
    ap.add_argument("--eval-docs", type=int, default=200)
    ap.add_argument("--probe-docs", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("models/results"))
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the table and PNG of this JSON report")
    a = ap.parse_args()
    if a.render:
        render(json.loads(a.render.read_text()), a.render.with_suffix(""))
        print(a.render.with_suffix(".md").read_text())
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    original = load_model(a.model).eval()
    pre = load_preprocessor(a.model)
    adapter = adapter_for(original)
    stack = adapter.stack_names()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="ffmerge-compare-"))
    atexit.register(shutil.rmtree, tmp, True)  # the benchmark's data and exports go when the run ends
    bench = bench_for(original, pre, a, tmp)
    val_score, val_higher, _ = default_score(original, bench.val)
    total = original.num_parameters()
    ff = ff_param_count(original, stack)
    layer = sum(p.numel() for p in adapter.layers(original, stack)[0].parameters())
    rows, drops = [], {}

    def run(name, window, make):
        t = time.time()
        result = make()
        result = result if isinstance(result, MergeResult) else MergeResult.unchanged(result, a.model)
        model = result.model
        row = {
            "window": window,
            "method": name,
            "removed": 1 - model.num_parameters() / total,
            "before": bench.metrics(TorchRunner(model)),
            "after": None,
        }
        merged = name in a.onnx.split(",")
        if merged:
            row["onnx_before"] = onnx_metrics(result, bench, pre, tmp)
        if a.steps and (name != "original" or a.finetune_original):
            recover(
                result,
                original,
                bench.train,
                bench.val,
                steps=a.steps,
                lr=a.lr,
                objective=a.objective,
                train=a.train,
                eval_every=max(1, a.steps // 4),
                progress=False,
            )
            row["after"] = bench.metrics(TorchRunner(model))
            if merged:
                row["onnx_after"] = onnx_metrics(result, bench, pre, tmp)
        row["seconds"] = time.time() - t
        rows.append(row)
        text = "  ".join(
            f"{k} {v:.4f}" + (f" -> {row['after'][k]:.4f}" if row["after"] else "") for k, v in row["before"].items()
        )
        print(f"{window:>7} {name:<18} removed {row['removed']:6.2%}  {text}", flush=True)
        write(rows, a, bench, done=False)
        del model, result

    run("original", "-", lambda: copy.deepcopy(original))
    for w in parse_windows(a.windows, stack) if a.windows else []:
        k = w.size
        j = max(1, min(k, round((k - 1) * ff / layer + 0.01)))
        label = f"{w.start}-{w.end}"
        windows = [Window(s, w.start, w.end) for s in adapter.stack_names()]
        # each `make` runs at once, inside run(): binding the loop variables by default argument is only for clarity
        run("vanilla", label, lambda ws=windows: merge(copy.deepcopy(original), ws, align="none", progress=False))
        run(
            "permute",
            label,
            lambda ws=windows: merge(copy.deepcopy(original), ws, calibration=bench.cal, progress=False),
        )
        for method in [m for m in a.methods.split(",") if m]:
            run(
                method,
                label,
                lambda ws=windows, m=method: merge(
                    copy.deepcopy(original), ws, calibration=bench.cal, method=m, progress=False
                ),
            )
        if j not in drops:
            drops[j] = best_drop(original, stack, j, val_score, higher_is_better=val_higher, progress=False)["best"]
        lo, hi = drops[j]
        run(
            f"drop {j} ({lo}-{hi})",
            label,
            lambda r=range(lo, hi + 1): drop_layers(copy.deepcopy(original), stack, list(r)),
        )
    write(rows, a, bench, done=True)


def write(rows, a, bench: Bench, done: bool) -> None:
    """The JSON, table and PNG so far (rewritten after every row, so a stopped run keeps its rows)."""
    report = {
        "model": a.model,
        "metrics": bench.metric_names,
        "higher": bench.higher,
        "steps": a.steps,
        "lr": a.lr,
        "complete": done,
        "args": {k: str(v) for k, v in vars(a).items()},
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    stem = Path(a.model).stem.replace(".", "_")
    (a.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    render(report, a.out / stem)
    if done:
        print((a.out / f"{stem}.md").read_text())


def render(report: dict, stem: Path) -> None:
    """`stem`.md and `stem`.png from a report: one cell per metric, "before → after" when fine-tuned,
    and the same through onnxruntime for the rows exported with --onnx."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, rows, steps = report["metrics"], report["rows"], report["steps"]
    onnx = any("onnx_before" in r for r in rows)
    cols = metrics + ([f"ONNX {m}" for m in metrics] if onnx else [])
    lines = ["| window | method | params removed | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]

    def cells(before, after):
        if not before:
            return ["-"] * len(metrics)
        return [f"{before[m]:.4f}" + (f" → {after[m]:.4f}" if after else "") for m in metrics]

    for r in rows:
        c = cells(r["before"], r["after"]) + (cells(r.get("onnx_before"), r.get("onnx_after")) if onnx else [])
        lines.append(f"| {r['window']} | {r['method']} | {r['removed']:.2%} | " + " | ".join(c) + " |")
    head = (
        f"{report['model']}; "
        + (
            f"before → after {steps} recovery steps (lr {report.get('lr', report.get('args', {}).get('lr'))})"
            if steps
            else "no recovery"
        )
        + ("" if report.get("complete", True) else "; run not finished")
    )
    stem.with_suffix(".md").write_text(head + "\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, method in enumerate(sorted({r["method"].split()[0] for r in rows})):
        pts = [r for r in rows if r["method"].split()[0] == method]
        color = f"C{i}"
        ax.plot(
            [100 * r["removed"] for r in pts], [r["before"][metrics[0]] for r in pts], "o", color=color, label=method
        )
        tuned = [r for r in pts if r["after"]]
        if tuned:
            ax.plot(
                [100 * r["removed"] for r in tuned],
                [r["after"][metrics[0]] for r in tuned],
                "x",
                color=color,
                label=f"{method} + recovery",
            )
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(metrics[0])
    if not report.get("higher", True):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(report["model"])
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
