"""Benchmark: a GPT-2-small-shaped model (random weights), windows merged, exported three ways.

- merged/fold and merged/gather: ffmerge-onnx's pipeline with the written session settings;
- unmerged: the same weights untied (k equal copies), same pipeline, same prepacking setting;
- paper's practice: k copies exported with torch.onnx's default optimizer and simplified
  with onnxslim's defaults, loaded with onnxruntime's defaults.
Prints file bytes, RSS after the first run and latency, and the ratios the project targets.

    .venv/bin/python tools/benchmark_sharing.py [--layers 4-7] [--runs 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxslim
import torch
import transformers as T

from ffmerge_onnx import Window, merge
from ffmerge_onnx.onnx.build import BuildOptions, build, untied_copy
from ffmerge_onnx.onnx.export import dynamic_shapes, parts_for
from ffmerge_onnx.onnx.memprobe import measure
from ffmerge_onnx.onnx.runtime import session_settings
from ffmerge_onnx.onnx.validate import unique_param_bytes


def paper_practice(model, folder: Path) -> Path:
    part = parts_for(model)[0]
    with torch.no_grad():  # the exporter's defaults, optimizer included
        prog = torch.onnx.export(
            part.module,
            part.args(part.example),
            dynamo=True,
            opset_version=18,
            input_names=list(part.example),
            output_names=part.outputs,
            dynamic_shapes=dynamic_shapes(part),
        )
    folder.mkdir(parents=True, exist_ok=True)
    prog.save(str(folder / "raw.onnx"))
    onnxslim.slim(str(folder / "raw.onnx"), str(folder / "model.onnx"))
    return folder / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="4-7")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    torch.manual_seed(0)
    config = T.GPT2Config(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, architectures=["GPT2LMHeadModel"]
    )
    model = T.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # trained models have non-zero biases; fresh GPT-2 biases are all zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    start, end = map(int, a.layers.split("-"))
    result = merge(model, [Window("decoder", start, end)], align="none", progress=False)
    away = result.merged_away_bytes()
    print(
        f"GPT-2-small shape, window {start}-{end} (k={end - start + 1}); parameters {unique_param_bytes(model):,} B; "
        f"merged away {away:,} B"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = np.random.default_rng(0).integers(0, 50257, (1, a.seq))
        np.savez(tmp / "feeds.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        rows = {}
        for name, mdl, opts in (
            ("merged/fold", result, BuildOptions(mode="fold")),
            ("merged/gather", result, BuildOptions(mode="gather")),
            ("unmerged", untied_copy(result), BuildOptions(share=False)),
        ):
            build(mdl, tmp / name.replace("/", "_"), opts)
            entries = (
                session_settings(opts.mode)["session_config_entries"]
                if opts.share
                else session_settings("fold")["session_config_entries"]
            )
            path = tmp / name.replace("/", "_") / "model.onnx"
            rows[name] = (path.stat().st_size, measure(path, tmp / "feeds.npz", entries, a.runs))
        path = paper_practice(untied_copy(result).model, tmp / "paper")
        rows["paper practice (defaults)"] = (path.stat().st_size, measure(path, tmp / "feeds.npz", {}, a.runs))
        base_size, base = rows["unmerged"]
        print(
            f"\n{'export':28} {'file MB':>9} {'RSS MB':>8} {'ms':>8} {'file saving/away':>17} {'RSS saving/away':>16} {'latency ratio':>14}"
        )
        for name, (size, r) in rows.items():
            print(
                f"{name:28} {size / 2**20:9.1f} {r['first_run_bytes'] / 2**20:8.1f} {r['latency_ms']:8.2f} "
                f"{(base_size - size) / away:17.4f} {(base['first_run_bytes'] - r['first_run_bytes']) / away:16.3f} "
                f"{r['latency_ms'] / base['latency_ms']:14.3f}"
            )
        print(
            f"\nfile / unique parameter bytes (merged/fold): {rows['merged/fold'][0] / unique_param_bytes(model):.4f}"
        )
        print(
            "targets: file saving/away >= 0.99, RSS saving/away >= 0.90, fold latency ratio <= 1.05, file/params <= 1.01"
        )


if __name__ == "__main__":
    main()
