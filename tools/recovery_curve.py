"""Perplexity against recovery time: a merged causal LM and the layer-drop baseline, each given
the same budget of distillation training on this machine.

    .venv/bin/python tools/recovery_curve.py --model SmolLM2-135M-Instruct --window 9-19 \\
        --method sequential --minutes 30

The merge uses `--method` on the window; the baseline drops `--drop` adjacent layers (default
k-1) at the position that scores best on the validation split. Both train with `--objective`
(`kl`: the original's next-token distributions; `kl+layers`: also every layer's output against
the original's matching layer, past the gap for the dropped model) on unlabeled text (the BBC calibration
split, then Shakespeare's plays other than As You Like It, up to `--finetune-tokens`) for
`--minutes` of training time (evaluation not counted); the merged model trains only what the
merge changed (`--train-merged`), the dropped model everything. Validation perplexity is taken
every `--eval-every` steps; test perplexity (BBC test split, window 512, stride 256) before and
after. Writes recovery.json, recovery.md and recovery.png to `--out`; `--runs merged --append`
adds a run (for example `--train-merged all` or another `--objective`) to the runs already in
`--out`."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # refdata (tools/, not shipped)

from refdata import shakespeare_texts

from ffmerge_onnx import Window, adapter_for, drop_layers, merge, task_of
from ffmerge_onnx.families.builtin import bbc_articles, write_calibration_text
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.merging import load_calibration, parse_windows
from ffmerge_onnx.quality.finetune import SCHEDULES, finetune
from ffmerge_onnx.quality.metrics import batch_perplexity, perplexity, text_ids
from ffmerge_onnx.quality.runners import TorchRunner
from ffmerge_onnx.quality.search import best_drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--window", default="9-19")
    ap.add_argument("--method", default="sequential")
    ap.add_argument("--drop", type=int, default=None, help="layers the baseline drops (default k-1)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training time per model")
    ap.add_argument("--objective", default="kl", choices=["kl", "kl+layers", "lm"])
    ap.add_argument("--train-merged", default="merged+norms", choices=["merged", "merged+norms", "all"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--schedule",
        default="constant",
        choices=SCHEDULES,
        help="learning rate after warmup: constant, or falling linearly to zero at the end of --minutes",
    )
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--calibration-tokens", type=int, default=10_000)
    ap.add_argument("--finetune-tokens", type=int, default=400_000)
    ap.add_argument("--eval-tokens", type=int, default=4_000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", default="both", choices=["both", "merged", "drop"])
    ap.add_argument("--append", action="store_true", help="keep the other runs already in --out")
    ap.add_argument("--out", type=Path, default=Path("models/results/recovery"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    old = None
    if a.append and (a.out / "recovery.json").exists():  # checked before hours of training, not after
        old = json.loads((a.out / "recovery.json").read_text())
        old.setdefault("schedule", "constant")  # reports before --schedule
        settings = {
            "model": a.model,
            "window": list(map(int, a.window.split("-"))),
            "lr": a.lr,
            "schedule": a.schedule,
            "minutes": a.minutes,
            "batch": [a.batch_size, a.seq_len],
        }
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"--append: {a.out / 'recovery.json'} was made with other settings.")
    torch.manual_seed(0)
    original = load_model(a.model).eval()
    tok = load_preprocessor(a.model)
    if task_of(original) != "causal-lm":
        raise SystemExit("recovery_curve.py measures perplexity: give a causal LM.")
    stack = adapter_for(original).stack_names()[-1]
    (w,) = parse_windows(a.window, stack)
    drop = a.drop if a.drop is not None else w.size - 1
    tmp = Path(tempfile.mkdtemp(prefix="ffmerge-recovery-"))
    cal_path = write_calibration_text(tmp, "calibration")
    cal = load_calibration(cal_path, model=original, tokenizer=tok, budget=a.calibration_tokens)
    train_path = tmp / "recovery.txt"
    plays = [
        p.read_text(encoding="utf-8", errors="replace")
        for p in shakespeare_texts()
        if not p.name.startswith("as_you_like_it")
    ]
    train_path.write_text("\n\n".join([cal_path.read_text()] + plays))
    train = list(
        load_calibration(
            train_path,
            model=original,
            tokenizer=tok,
            budget=a.finetune_tokens,
            batch_size=a.batch_size,
            seq_len=a.seq_len,
        )
    )
    val = list(
        load_calibration(
            write_calibration_text(tmp, "validation"),
            model=original,
            tokenizer=tok,
            budget=4_000,
            batch_size=4,
            seq_len=256,
        )
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")]
    test_ids = text_ids(tok, texts, a.eval_tokens)

    def val_ppl(m):
        return batch_perplexity(m, val)

    def test_ppl(m):
        return perplexity(TorchRunner(m), test_ids, window=512, stride=256, progress=False).perplexity

    total = original.num_parameters()
    print(f"original: test perplexity {test_ppl(original):.4f}, validation {val_ppl(original):.4f}", flush=True)
    jobs = []
    if a.runs in ("both", "merged"):
        t = time.time()
        result = merge(
            copy.deepcopy(original), [Window(stack, w.start, w.end)], calibration=cal, method=a.method, progress=False
        )
        jobs.append((f"{a.method} merge {w.start}-{w.end}", result, a.train_merged, time.time() - t))
    where = None
    if a.runs in ("both", "drop"):
        t = time.time()
        where = best_drop(original, stack, drop, val_ppl, higher_is_better=False, progress=False)
        a_, b_ = where["best"]
        result = drop_layers(copy.deepcopy(original), stack, list(range(a_, b_ + 1)))
        jobs.append((f"drop {drop} ({a_}-{b_})", result, "all", time.time() - t))
    del result  # jobs holds the only reference, so each model is freed after its run
    runs = []
    while jobs:
        name, result, train_what, setup_s = jobs.pop(0)
        model = result.model
        dropped = {i for layers in result.manifest.dropped.values() for i in layers}
        before = test_ppl(model)
        print(
            f"{name}: removed {1 - model.num_parameters() / total:.2%}, test perplexity {before:.4f}; "
            f"training {a.minutes} min",
            flush=True,
        )
        result = finetune(
            model,
            train,
            val_ppl,
            higher_is_better=False,
            steps=10**9,
            lr=a.lr,
            eval_every=a.eval_every,
            objective=a.objective,
            original=original,
            train=train_what,
            shared=result.shared_parameters(),
            dropped=dropped,
            budget_s=60 * a.minutes,
            schedule=a.schedule,
            progress=False,
        )
        after = test_ppl(model)
        print(
            f"  -> {result.history[-1]['step']:.0f} steps, best step {result.best_step}, test perplexity {after:.4f}",
            flush=True,
        )
        runs.append(
            {
                "name": name,
                "removed": 1 - model.num_parameters() / total,
                "train": train_what,
                "objective": a.objective,
                "setup_seconds": setup_s,
                "test_before": before,
                "test_after": after,
                "best_step": result.best_step,
                "history": result.history,
            }
        )
        del model, result
    if old:
        for r in old["runs"]:
            r.setdefault("objective", old.get("objective"))  # reports before per-run objectives
        new_keys = {_key(r) for r in runs}
        runs = [r for r in old["runs"] if _key(r) not in new_keys] + runs
        where = where or old.get("drop_search")
    report = {
        "model": a.model,
        "window": [w.start, w.end],
        "method": a.method,
        "lr": a.lr,
        "schedule": a.schedule,
        "minutes": a.minutes,
        "batch": [a.batch_size, a.seq_len],
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "original_test": test_ppl(original),
        "original_validation": val_ppl(original),
        "drop_search": where,
        "runs": runs,
    }
    write(report, a.out)


def _key(run: dict) -> tuple:
    return run["name"], run["train"], run["objective"]


def write(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(report, indent=2))
    lines = [
        (
            f"{report['model']}: {report['minutes']:g} min of recovery each "
            f"({report['threads']} threads, lr {report['lr']} {report['schedule']}, "
            f"batch {report['batch'][0]}x{report['batch'][1]}); perplexity on the BBC test split (window 512, stride 256)"
        ),
        "",
        "| model | params removed | objective | trains | steps | before | after |",
        "|---|---|---|---|---|---|---|",
        f"| original | 0.00% | - | - | - | {report['original_test']:.2f} | - |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['name']} | {r['removed']:.2%} | {r['objective']} | {r['train']} | {r['history'][-1]['step']:.0f} | "
            f"{r['test_before']:.2f} | {r['test_after']:.2f} |"
        )
    (out / "recovery.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in report["runs"]:
        h = r["history"]
        ax.plot(
            [x["seconds"] / 60 for x in h],
            [x["score"] for x in h],
            "o-",
            ms=3,
            label=f"{r['name']} ({r['objective']}, trains {r['train']})",
        )
    ax.axhline(report["original_validation"], color="gray", ls="--", label="original")
    ax.set_xlabel("recovery training time (min)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{report['model']}: recovery on {report['threads']} CPU threads")
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=120)
    print((out / "recovery.md").read_text())


if __name__ == "__main__":
    main()
