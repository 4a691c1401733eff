"""Benchmark: merged exports at each precision against the original at the same precision.

Merges one window (method --method, built-in calibration), exports it as `convert` does at every
--precisions value (validated; side by side with the original exported and run at the same precision
under onnxruntime defaults), and scores each ONNX folder: BBC test perplexity for causal LMs,
embedding cosine to the fp32 merged ONNX model over BBC test articles for encoders. Prints one table;
writes the JSON.

    .venv/bin/python tools/benchmark_precision.py --model all-MiniLM-L6-v2 --layers 2-3 --precisions fp32,fp16,int8

bf16 rows give sizes and quality only: onnxruntime's CPU provider has no bf16 products, so their outputs
are scored through bf16.emulate and their memory and latency need the CUDA provider.
    .venv/bin/python tools/benchmark_precision.py --model SmolLM2-135M-Instruct --layers 11-21 --method sequential \\
        --precisions fp32,int4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.errors import ValidationFailed
from ffmerge_onnx.families.builtin import bbc_articles
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.pipeline import ExportOptions, Loaded, calibration_data, export
from ffmerge_onnx.quality.evaluate import evaluate


def _f(x) -> str:
    """A ratio, or "-" where none was measured (bf16: the CPU provider cannot run it)."""
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--layers", default="2-3")
    ap.add_argument("--method", default="regmean")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--docs", type=int, default=100, help="encoders: BBC test articles for the cosine")
    ap.add_argument("--tokens", type=int, default=4_000, help="causal LMs: BBC test tokens for perplexity")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or Path(f"models/results/benchmark/precision-{a.model}-{a.layers}.json")
    report = {"model": a.model, "layers": a.layers, "method": a.method, "onnxruntime": ort.__version__, "rows": {}}
    model = load_model(a.model)
    pre = load_preprocessor(a.model)
    cal = calibration_data(Loaded(a.model, model, pre), None, 10_000, log=lambda s: None)
    start, end = map(int, a.layers.split("-"))
    stack = adapter_for(model).stack_names()[-1]
    result = merge(model, [Window(stack, start, end)], calibration=cal, method=a.method, source=a.model,
                   progress=False)  # fmt: skip
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")][: a.docs]
    with tempfile.TemporaryDirectory(prefix="ffmerge-bench-") as tmp:
        for name in a.precisions.split(","):
            folder = Path(tmp) / name
            print(f"{a.model} {a.layers}: {name}", file=sys.stderr, flush=True)
            options = ExportOptions(precision=name, runs=a.runs)
            try:
                validated = export(result, folder, options, preprocessor=pre, log=lambda s: None)
            except ValidationFailed as e:  # nothing written: the figures stay, the quality cannot be scored
                validated = e.report
            reference = str(Path(tmp) / "fp32") if name != "fp32" and (Path(tmp) / "fp32").exists() else None
            if not folder.exists():
                quality = {"metric": "not scored (validation failed)", "value": float("nan")}
            elif result.adapter.task == "causal-lm":
                quality = evaluate(str(folder), max_tokens=a.tokens, progress=False)
            else:
                quality = evaluate(str(folder), texts=texts, reference=reference or a.model, progress=False)
            (row,) = [r for k, r in validated["side_by_side"]["rows"].items() if k.endswith("prefill")]
            figures = row["figures"]
            report["rows"][name] = {
                "ok": validated["ok"],
                "checks": {c["name"]: c["status"] for c in validated["checks"]},
                "check_details": {c["name"]: c["detail"] for c in validated["checks"] if c["name"].startswith("text")},
                "quality": {"metric": quality["metric"], "value": quality["value"], "against": reference or a.model},
                "merged_file_bytes": figures["merged"]["file_bytes"],
                "unmerged_file_bytes": figures["unmerged_defaults"]["file_bytes"],
                "merged_away_bytes": row["merged_away_bytes"],
                "weight_saving_over_away": row["weight_saving_over_away"],
                "recipe_saving_over_away": row["recipe_saving_over_away"],
                "peak_ratio": row["peak_ratio"],
                "latency_ratio": row["latency_ratio"],
                "merged_latency_ms": figures["merged"]["latency_ms"],
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
    fp32_file = report["rows"].get("fp32", {}).get("unmerged_file_bytes")
    print(f"\n{a.model}, {a.method} merge of {a.layers}; onnxruntime {report['onnxruntime']}; against the original at "
          "the same precision, onnxruntime defaults, prefill 4 x 128\n")  # fmt: skip
    print("| precision | merged file MB | unmerged file MB | merged / unmerged fp32 file | weight saving / away "
          "| recipe RSS saving / away | peak ratio | latency ratio | quality | checks |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in report["rows"].items():
        q = r["quality"]
        print(f"| {name} | {r['merged_file_bytes'] / 2**20:.2f} | {r['unmerged_file_bytes'] / 2**20:.2f} | "
              f"{r['merged_file_bytes'] / fp32_file if fp32_file else float('nan'):.3f} | "
              f"{_f(r['weight_saving_over_away'])} | {_f(r['recipe_saving_over_away'])} | "
              f"{_f(r['peak_ratio'])} | {_f(r['latency_ratio'])} | {q['metric']} {q['value']:.4f} | "
              f"{'pass' if r['ok'] else 'FAIL'} |")  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
