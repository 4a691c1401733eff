"""Benchmark: merged exports against what users run today, side by side, with the issue's targets.

For each model: merge a window, export it the way `convert` does (fold and gather; and fold with
prepacking off, the old setting), and measure every variant with `validate`'s side-by-side
machinery: the merged folder with its written settings, the original model exported the same way
and run with onnxruntime defaults (the baseline), and the paper's practice (k equal copies, default
export and simplification, defaults). Prefill is batch 4 x 128; with --kv-cache also one-token
decode steps after a past of 128. Prints the tables and the target ratios; writes the JSON.

    .venv/bin/python tools/benchmark_sharing.py --model gpt2-small-random --layers 2-7
    .venv/bin/python tools/benchmark_sharing.py --model SmolLM2-135M-Instruct --layers 11-21 --kv-cache
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ffmerge_onnx import MergeResult, Window, merge
from ffmerge_onnx.errors import ValidationFailed
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.merging import Calibration
from ffmerge_onnx.onnx import compare
from ffmerge_onnx.onnx.memprobe import measure
from ffmerge_onnx.onnx.validate import feeds_for, side_by_side_lines
from ffmerge_onnx.pipeline import ExportOptions, Loaded, calibration_data, export
from ffmerge_onnx.runtime import PREPACKING_OFF

TARGETS = {"steady saving / merged-away": 0.97, "latency merged / unmerged": 1.03, "peak merged / unmerged": 1.0}


def gpt2_small_random(folder: Path) -> str:
    """GPT-2-small's shape (12 x 768, d_ff 3072) with random weights and non-zero biases, saved as the original."""
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                          architectures=["GPT2LMHeadModel"])  # fmt: skip
    model = T.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # trained models have non-zero biases; fresh GPT-2 biases are all zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return str(folder)


def merged(spec: str, layers: str, random: bool) -> MergeResult:
    """The window merged with correlation alignment (so mode gather has real permutations to carry)."""
    model = load_model(spec)
    start, end = map(int, layers.split("-"))
    if random:  # random weights: align on random token ids (the point is non-trivial permutations)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (16, 128), generator=g)
        cal = Calibration([{"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, 128, dtype=torch.long)}
                           for i in range(0, 16, 4)], 2048, {"kind": "random token ids"})  # fmt: skip
    else:
        cal = calibration_data(Loaded(spec, model, load_preprocessor(spec)), None, 10_000, log=lambda s: None)
    return merge(model, [Window("decoder", start, end)], calibration=cal, source=spec, progress=False)


def no_prepack_row(folder: Path, result: MergeResult, kv_cache: bool, runs: int) -> dict:
    """The merged fold export with session.disable_prepacking=1 (the setting earlier versions shipped)."""
    from ffmerge_onnx.onnx.export import parts_for

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts_for(result.model, kv_cache):
            for shape, (batch, seq, past) in compare.shapes(result.model, part).items():
                feeds = feeds_for(result.model, part, batch, seq, past)
                np.savez(Path(tmp) / "feeds.npz", **{k: v.numpy() for k, v in feeds.items()})
                n = runs if shape == "prefill" else max(runs, 50)
                rows[f"{part.filename} {shape}"] = measure(folder / part.filename, Path(tmp) / "feeds.npz",
                                                           PREPACKING_OFF, n)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--layers", default="2-7")
    ap.add_argument("--kv-cache", action="store_true")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--modes", default="fold,gather")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: benchmark-<model>.json)")
    a = ap.parse_args()
    out_json = a.out or Path(f"benchmark-{a.model}.json")
    report = {"model": a.model, "layers": a.layers, "kv_cache": a.kv_cache, "onnxruntime": ort.__version__,
              "torch": torch.__version__, "machine": platform.machine(), "cpus": len(__import__("os").sched_getaffinity(0)),
              "modes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ffmerge-bench-") as tmp:
        tmp = Path(tmp)
        random = a.model == "gpt2-small-random"
        spec = gpt2_small_random(tmp / "original") if random else a.model
        for mode in a.modes.split(","):
            result = merged(spec, a.layers, random)
            folder = tmp / f"out-{mode}"
            print(f"{a.model} {a.layers}, mode {mode}: exporting and measuring", file=sys.stderr, flush=True)
            options = ExportOptions(mode=mode, kv_cache=a.kv_cache, keep_reference=False, runs=a.runs)
            try:
                validated = export(result, folder, options, log=lambda s: print("  " + s, file=sys.stderr, flush=True))
            except ValidationFailed as e:  # keep the figures: a missed target is a result too
                validated = e.report  # fmt: skip
            entry = {"side_by_side": validated["side_by_side"], "ok": validated["ok"]}
            if mode == "fold":
                entry["no_prepack"] = no_prepack_row(folder, result, a.kv_cache, a.runs)
            report["modes"][mode] = entry
            out_json.write_text(json.dumps(report, indent=2))  # after each mode: a stopped run keeps its rows
            del result
    out_json.write_text(json.dumps(report, indent=2))
    print_report(report)


def print_report(report: dict) -> None:
    print(f"\n{report['model']}, window {report['layers']}; onnxruntime {report['onnxruntime']}, "
          f"{report['cpus']} CPUs, 1 intra-op thread per session")  # fmt: skip
    for mode, entry in report["modes"].items():
        print(f"\n### mode {mode}\n")
        print("\n".join(side_by_side_lines(entry["side_by_side"])))
        for key, r in entry.get("no_prepack", {}).items():
            print(f"\nfold with session.disable_prepacking=1, {key}: peak {r['peak'] / 2**20:.1f} MB, steady "
                  f"{r['steady'] / 2**20:.1f} MB, trimmed {r['steady_trimmed'] / 2**20:.1f} MB, "
                  f"{r['latency_ms']:.2f} ms")  # fmt: skip
        print("\ntargets:")
        for key, r in entry["side_by_side"]["rows"].items():
            lat_ok = r["latency_ratio"] <= TARGETS["latency merged / unmerged"] + (0.02 if mode == "gather" else 0)
            print(f"  {key}: steady saving / away trimmed {r['trimmed_saving_over_away']:.3f}, recipe "
                  f"{r['recipe_saving_over_away']:.3f} (target >= 0.97: "
                  f"{'met' if min(r['trimmed_saving_over_away'], r['recipe_saving_over_away']) >= 0.97 else 'missed'}); "
                  f"latency ratio {r['latency_ratio']:.3f} ({'met' if lat_ok else 'missed'}); "
                  f"peak ratio {r['peak_ratio']:.3f} ({'met' if r['peak_ratio'] <= 1.0 else 'missed'})")  # fmt: skip


if __name__ == "__main__":
    main()
