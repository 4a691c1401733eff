"""Recovery settings side by side: one merge, then the same time budget of recovery per setting.

    .venv/bin/python tools/compare_recovery.py --model SmolLM2-135M-Instruct --layers 17-20 --method refit \\
        --minutes 5 --arms 8:all,2:all,2:from-merge

An arm is `ROWS:TRAIN`: rows per step (0: the data's batches, 8 x 256 tokens for text) and what
trains (`--finetune-train`). Every arm starts from the same merged weights and trains on the same
built-in recovery data (50,000 BBC calibration-split tokens) with `convert`'s defaults otherwise
(objective of the task, lr 5e-5, best state by validation). Scores: validation perplexity over
time, and test perplexity (BBC test split, 20,000 tokens in rows of 256, as calibration batches) of
the original, the merge and every arm. Writes recovery.json and recovery.md to `--out`."""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ffmerge_onnx.pipeline import MergeOptions, calibration_data, load, merge_and_recover
from ffmerge_onnx.quality.finetune import recover
from ffmerge_onnx.quality.metrics import batch_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--layers", default="17-20")
    ap.add_argument("--method", default="refit")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per arm (evaluation not counted)")
    ap.add_argument("--arms", default="8:all,2:all,2:from-merge")
    ap.add_argument("--test-tokens", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=Path("models/results/recovery-settings"))
    a = ap.parse_args()
    arms = [(int(r), t) for r, t in (arm.split(":") for arm in a.arms.split(","))]

    loaded = load(a.model)
    original = copy.deepcopy(loaded.model)
    tick = time.perf_counter()
    merged = merge_and_recover(loaded, MergeOptions(layers=a.layers, method=a.method))
    merge_s = time.perf_counter() - tick
    batches = list(calibration_data(loaded, None, 50_000))
    val = list(calibration_data(loaded, None, 8_000, split="validation"))
    held_out = list(calibration_data(loaded, None, a.test_tokens, split="test"))

    def test(model) -> float:
        return batch_perplexity(model, held_out)

    start = {k: v.clone() for k, v in merged.model.state_dict().items()}
    rows = [
        {"arm": "original", "test": test(original)},
        {"arm": f"merged {a.layers} {a.method}", "test": test(merged.model)},
    ]
    for n, train in arms:
        merged.model.load_state_dict(start)
        out = recover(merged, original, batches, val, steps=1_000_000, budget_s=a.minutes * 60, train=train, rows=n)
        rows.append({
            "arm": f"{n or 'data'} rows, train {train}",
            "steps": out.history[-1]["step"],
            "best_step": out.best_step,
            "validation": [(h["step"], round(h["seconds"]), round(h["score"], 3)) for h in out.history],
            "test": test(merged.model),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    record = {"model": a.model, "layers": a.layers, "method": a.method, "minutes": a.minutes, "merge_s": merge_s}
    (a.out / "recovery.json").write_text(json.dumps({**record, "rows": rows}, indent=2))
    base = rows[0]["test"]
    lines = [
        f"{a.model}, {a.layers} {a.method}, {a.minutes:g} min of recovery per arm (test: BBC test split, rows of 256 tokens)",
        "",
        "| arm | steps | validation (step: perplexity) | test perplexity | vs original |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        curve = ", ".join(f"{s}: {v}" for s, _, v in r.get("validation", []))
        lines.append(f"| {r['arm']} | {r.get('steps', '-')} | {curve or '-'} | {r['test']:.2f} | "
                     f"{r['test'] / base - 1:+.1%} |")  # fmt: skip
    (a.out / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
