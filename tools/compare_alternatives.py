"""Merging against the alternatives a user would pick instead, at comparable parameters removed, before
recovery: linear replacement of the best block of n layers (least squares on the calibration residual
stream, tools/alternatives.py), dropping the best n adjacent layers, dropping the n layers of least block
influence (ShortGPT), plain merges, the automatic choice of `convert --reduction F` (--auto F: windows and
method chosen on the validation split, quality/plan.py), and the `delta` merge (shared FF plus per-layer
low-rank corrections) at several budgets and both initialisations; with --skip, each merge also with a
per-layer d x d skip correction fitted to its residual-stream drift (a probe, tools/alternatives.py); with --steps, each
also after the same recovery fine-tune (everything trained, including the linear map). Same benchmarks
as tools/compare_quality.py (test data only for scoring; positions chosen on the validation split).
Writes alternatives.md / .json to --out.

    .venv/bin/python tools/compare_alternatives.py --model all-MiniLM-L6-v2 --blocks 1 --windows 1-3 \\
        --methods regmean --budgets 0.1,0.2,0.3 --out models/results/alternatives-minilm
    .venv/bin/python tools/compare_alternatives.py --model SmolLM2-135M-Instruct --blocks 2 --windows 15-18 \\
        --budgets 0.15 --out models/results/alternatives-smollm2-5
    .venv/bin/python tools/compare_alternatives.py --model all-MiniLM-L6-v2 --blocks 1 --windows 1-3 --methods regmean \
        --budgets 0.3 --inits fit --steps 20 --lr 1e-4 --finetune-tokens 20000 --out models/results/alternatives-minilm-recovery
"""

from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_quality, alternatives (tools/, not shipped)

from alternatives import best_replacement, fit_map, influence_drop, replace_block, skip_corrections
from compare_quality import bench_for

from ffmerge_onnx import MergeResult, Window, adapter_for, drop_layers, merge
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.merging import parse_windows
from ffmerge_onnx.quality import plan
from ffmerge_onnx.quality.finetune import recover
from ffmerge_onnx.quality.runners import TorchRunner
from ffmerge_onnx.quality.search import best_drop, default_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--blocks", default="1", help="comma-separated n: replace / drop the best n adjacent layers")
    ap.add_argument(
        "--windows",
        default="1-3",
        help="merge windows A-B, one row each (comma-separated); A-B+C-D: several windows merged in one row",
    )
    ap.add_argument("--methods", default="regmean", help="plain merge methods to include")
    ap.add_argument("--auto", default="", help="comma-separated F: the plan `convert --reduction F` picks")
    ap.add_argument("--plan", type=Path, default=None, help="a convert report.json: its recorded plan, applied")
    ap.add_argument("--budgets", default="0.1,0.2,0.3", help="delta budgets (fraction of the merged-away FF)")
    ap.add_argument("--inits", default="fit,svd")
    ap.add_argument("--delta-base", default="regmean")
    ap.add_argument("--delta-projections", default="all")
    ap.add_argument("--delta-rounds", type=int, default=0, help="refits on the drifted inputs (0: none)")
    ap.add_argument("--delta-shared-rounds", type=int, default=10, help="joint refits of the shared FF (0: none)")
    ap.add_argument("--delta-ranks", default="pooled", help="equal: rank r per layer; pooled: k r over the window")
    ap.add_argument(
        "--delta-weighting",
        default="output",
        help="none, or output: input-projection errors weighted by how much each hidden unit moves the FF output",
    )
    ap.add_argument("--skip", action="store_true", help="also each merge plus per-layer skip corrections")
    ap.add_argument("--calibration-tokens", type=int, default=10_000)
    ap.add_argument("--eval-tokens", type=int, default=4_000)
    ap.add_argument("--shakespeare-tokens", type=int, default=0)
    ap.add_argument("--eval-docs", type=int, default=100)
    ap.add_argument("--probe-docs", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=0, help="recovery fine-tune steps after each row (0: none)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--objective", default=None, help="fine-tune objective (default: the task's)")
    ap.add_argument("--finetune-tokens", type=int, default=4_000)
    ap.add_argument("--out", type=Path, default=Path("models/results/alternatives"))
    a = ap.parse_args()
    # what compare_quality's benchmarks read from their arguments
    a.batch_size, a.finetune_images = 2, 1_000
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    original = load_model(a.model).eval()
    pre = load_preprocessor(a.model)
    adapter = adapter_for(original)
    stack = adapter.stack_names()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="ffmerge-alt-"))
    atexit.register(shutil.rmtree, tmp, True)  # the benchmark's data files go when the run ends
    bench = bench_for(original, pre, a, tmp)
    val_score, higher, _ = default_score(original, bench.val)
    total = original.num_parameters()
    rows = []

    def row(name: str, where: str, made, seconds: float, **extra) -> None:
        result = made if isinstance(made, MergeResult) else MergeResult.unchanged(made, a.model)
        model = result.model
        r = {"method": name, "where": where, "removed": 1 - model.num_parameters() / total,
             "metrics": bench.metrics(TorchRunner(model)), "after": None, "seconds": seconds, **extra}  # fmt: skip
        if a.steps and name != "original":
            recover(result, original, bench.train, bench.val, steps=a.steps, lr=a.lr, objective=a.objective,
                    train="all", eval_every=max(1, a.steps // 4), progress=False)  # fmt: skip
            r["after"] = bench.metrics(TorchRunner(model))
        rows.append(r)
        text = "  ".join(f"{k} {v:.4f}" + (f" -> {r['after'][k]:.4f}" if r["after"] else "")
                         for k, v in r["metrics"].items())  # fmt: skip
        print(f"{name:<32} {where:>7} removed {r['removed']:6.2%}  {text}", flush=True)
        write(a, bench, rows)

    def planned_row(name: str, chosen, started: float) -> None:
        merged = plan.apply(copy.deepcopy(original), chosen, bench.cal)
        where = ", ".join(f"{x}-{y} {m}" for (x, y), m in zip(chosen.windows, chosen.methods))
        row(name, where, merged, time.time() - started, plan=chosen.to_dict())

    def merged_rows(name: str, where: str, merged: MergeResult, started: float, layers: list[int], **extra) -> None:
        skipped = dataclasses.replace(merged, model=copy.deepcopy(merged.model)) if a.skip else None
        row(name, where, merged, time.time() - started, **extra)
        if skipped is not None:
            t = time.time()
            left = skip_corrections(skipped.model, original, stack, layers, bench.cal)
            row(f"{name} + skip", where, skipped, time.time() - started, unexplained=left, skip_seconds=time.time() - t,
                **extra)  # fmt: skip

    row("original", "-", original, 0.0)
    for reduction in [float(x) for x in a.auto.split(",") if x]:
        t = time.time()
        chosen = plan.choose(original, bench.cal, list(bench.val), stacks=adapter.stack_names(), reduction=reduction,
                             progress=False, log=lambda _: None)  # fmt: skip
        planned_row(f"auto, --reduction {reduction:g}", chosen, t)
    if a.plan:
        t = time.time()
        chosen = plan.Plan.from_dict(json.loads(a.plan.read_text())["plan"])
        planned_row(f"auto (plan of {a.plan.parent.name})", chosen, t)
    for n in [int(x) for x in a.blocks.split(",") if x]:
        t = time.time()
        found = best_replacement(original, stack, n, bench.cal, val_score, higher_is_better=higher)
        lo, hi = found["best"]
        model = replace_block(copy.deepcopy(original), stack, lo, hi, fit_map(found["inputs"], lo, hi))
        row(f"linear replacement of {n}", f"{lo}-{hi}", model, time.time() - t)
        del found, model
        t = time.time()
        lo, hi = best_drop(original, stack, n, val_score, higher_is_better=higher, progress=False)["best"]
        row(f"drop {n}", f"{lo}-{hi}", drop_layers(copy.deepcopy(original), stack, list(range(lo, hi + 1))),
            time.time() - t)  # fmt: skip
        t = time.time()
        found = influence_drop(original, stack, n, bench.cal)
        row(f"drop {n} by block influence (ShortGPT)", ",".join(map(str, found["dropped"])), found["model"],
            time.time() - t, influence=found["influence"])  # fmt: skip
        del found
    for spec in [x for x in a.windows.split(",") if x]:  # one row per spec; "A-B+C-D": several windows in one row
        parsed = parse_windows(spec.replace("+", ","), stack)
        windows = [Window(s, w.start, w.end) for w in parsed for s in adapter.stack_names()]
        where = spec
        layers = [i for w in parsed for i in range(w.start, w.end + 1)]
        for method in [m for m in a.methods.split(",") if m]:
            t = time.time()
            merged = merge(copy.deepcopy(original), windows, calibration=bench.cal, method=method, progress=False)
            merged_rows(method, where, merged, t, layers)
        for budget in [float(b) for b in a.budgets.split(",") if b]:
            for init in a.inits.split(","):
                t = time.time()
                params = {"budget": budget, "init": init, "base": a.delta_base, "projections": a.delta_projections,
                          "rounds": a.delta_rounds, "shared_rounds": a.delta_shared_rounds, "ranks": a.delta_ranks,
                          "weighting": a.delta_weighting}  # fmt: skip
                merged = merge(copy.deepcopy(original), windows, calibration=bench.cal, method="delta",
                               params=params, progress=False)  # fmt: skip
                rank = merged.manifest.windows[0].deltas
                merged_rows(f"delta {init}, budget {budget:g}", where, merged, t, layers, rank=rank)
    write(a, bench, rows)


def write(a, bench, rows) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"model": a.model, "metrics": bench.metric_names, "higher": bench.higher,
              "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}  # fmt: skip
    (a.out / "alternatives.json").write_text(json.dumps(report, indent=2))
    names = bench.metric_names
    when = f"before → after {a.steps} recovery steps (lr {a.lr:g})" if a.steps else "before recovery"
    lines = [f"# {a.model}: alternatives at comparable parameters removed, {when}", "",
             "| method | layers | params removed | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for r in rows:
        cells = [f"{r['metrics'][k]:.4f}" + (f" → {r['after'][k]:.4f}" if r.get("after") else "") for k in names]
        lines.append(f"| {r['method']} | {r['where']} | {r['removed']:.2%} | " + " | ".join(cells) + " |")
    (a.out / "alternatives.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
