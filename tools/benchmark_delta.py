"""Benchmark: `--method delta` against the plain merge at the same window, as ONNX models.

Both are merged from the same model and calibration (the plain merge with delta's base method), exported
the way `convert` does (fold, onnxslim), and measured in fresh processes, alternating, with 1 intra-op
thread: prefill latency, steady RSS after malloc_trim, and the file against the unique parameters.
Prints the ratios against the issue's targets (latency <= 1.05x; file = shared FF + corrections within
1 %); writes the JSON.

    .venv/bin/python tools/benchmark_delta.py --model all-MiniLM-L6-v2 --layers 1-3 --budget 0.3
    .venv/bin/python tools/benchmark_delta.py --model SmolLM2-135M-Instruct --layers 15-19 --budget 0.35
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.onnx.build import BuildOptions, build
from ffmerge_onnx.onnx.export import parts_for
from ffmerge_onnx.onnx.files import sharing
from ffmerge_onnx.onnx.memprobe import measure
from ffmerge_onnx.onnx.validate import feeds_for, unique_param_bytes
from ffmerge_onnx.pipeline import Loaded, calibration_data


def variant(spec: str, layers: str, method: str, params: dict, folder: Path) -> dict:
    model = load_model(spec)
    loaded = Loaded(spec, model, load_preprocessor(spec))
    cal = calibration_data(loaded, None, 10_000, log=lambda s: None)
    start, end = map(int, layers.split("-"))
    stack = adapter_for(model).stack_names()[-1]
    result = merge(model, [Window(stack, start, end)], calibration=cal, method=method, params=params,
                   source=spec, progress=False)  # fmt: skip
    built = build(result, folder, BuildOptions())
    (part,) = parts_for(model, False)
    files = [f for f in built.files if f.startswith(part.filename)]
    stats = sharing(folder / part.filename, files)
    feeds = feeds_for(model, part, 4, min(128, adapter_for(model).max_positions(model.config) or 128))
    np.savez(folder / "feeds.npz", **{k: v.numpy() for k, v in feeds.items()})
    return {"path": folder / part.filename, "feeds": folder / "feeds.npz", "file_bytes": stats["file_bytes"],
            "unique_param_bytes": unique_param_bytes(result.model), "params": result.model.num_parameters(),
            "deltas": result.manifest.windows[0].deltas}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--layers", default="1-3")
    ap.add_argument("--base", default="regmean")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two variants")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    report = {"model": a.model, "layers": a.layers, "base": a.base, "budget": a.budget,
              "onnxruntime": ort.__version__, "variants": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ffmerge-bench-") as tmp:
        params = {"rank": -1, "budget": a.budget, "base": a.base}
        variants = {
            "plain": variant(a.model, a.layers, a.base, {}, Path(tmp) / "plain"),
            "delta": variant(a.model, a.layers, "delta", params, Path(tmp) / "delta"),
        }
        figures = {name: [] for name in variants}
        for i in range(a.rounds):
            for name, v in variants.items():
                print(f"round {i + 1}/{a.rounds}: {name}", file=sys.stderr, flush=True)
                figures[name].append(measure(v["path"], v["feeds"], {}, a.runs, repeats=1))
    for name, v in variants.items():
        runs = figures[name]
        report["variants"][name] = {
            "latency_ms": statistics.median(r["latency_ms"] for r in runs),
            "steady_trimmed": statistics.median(r["steady_trimmed"] for r in runs),
            "peak": statistics.median(r["peak"] for r in runs),
            "file_bytes": v["file_bytes"],
            "file_over_unique_params": v["file_bytes"] / v["unique_param_bytes"],
            "params": v["params"],
            "deltas": v["deltas"],
        }
    p, d = report["variants"]["plain"], report["variants"]["delta"]
    report["latency_ratio"] = d["latency_ms"] / p["latency_ms"]
    out = a.out or Path(f"models/results/benchmark/delta-{a.model}-{a.layers}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{a.model} {a.layers}, delta budget {a.budget} (ranks {d['deltas']}) against plain {a.base}:")
    for name, r in report["variants"].items():
        print(f"  {name}: {r['latency_ms']:.1f} ms, steady trimmed {r['steady_trimmed'] / 2**20:.1f} MB, "
              f"peak {r['peak'] / 2**20:.1f} MB, file / unique params {r['file_over_unique_params']:.4f}")  # fmt: skip
    ok = report["latency_ratio"] <= 1.05
    print(
        f"  latency delta / plain {report['latency_ratio']:.3f} (target <= 1.05: {'met' if ok else 'missed'}); "
        f"steady RSS +{(d['steady_trimmed'] - p['steady_trimmed']) / 2**20:.1f} MB; wrote {out}"
    )


if __name__ == "__main__":
    main()
