"""The model-type table in docs/model_types.md: every tiny model of tests/tiny_models.py (the reviewed
families, the types whose adapter is inferred, the refused ones) merged (window 1-2 of every stack),
exported, shared, simplified and validated with fold and gather permutations, and with the KV cache
for decoders. Prints the table and writes it.

    .venv/bin/python tools/model_types.py [--types olmo,t5] [--precision bf16] [--out docs/model_types.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tiny_models as tm

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.errors import FFMergeError, ValidationFailed
from ffmerge_onnx.families.adapter import registered
from ffmerge_onnx.pipeline import ExportOptions, export


def variants(task: str, precision: str = "fp32") -> list[tuple[str, ExportOptions]]:
    out = [("fold", ExportOptions(precision=precision, compare=False)),
           ("gather", ExportOptions(precision=precision, mode="gather", compare=False))]  # fmt: skip
    if task in ("causal-lm", "seq2seq-lm", "speech-seq2seq"):
        out.append(("fold + KV cache", ExportOptions(precision=precision, kv_cache=True, compare=False)))
    return out


def run(model_type: str, precision: str = "fp32") -> dict:
    model = tm.build(model_type)
    row = {"type": model.config.model_type, "name": model_type, "class": type(model).__name__}
    try:
        adapter = adapter_for(model)
    except FFMergeError as e:
        return {**row, "adapter": "refused", "status": {"refused": str(e).split(" Write the structure")[0]}}
    row.update(adapter="reviewed" if registered(model.config.model_type) else "inferred", task=adapter.task_of(model),
               stacks=",".join(adapter.stack_names()), gated="fused" if adapter.fused else adapter.gated)  # fmt: skip
    result = merge(model, [Window(s, 1, 2) for s in adapter.stack_names()], calibration=tm.calibration(model),
                   progress=False)  # fmt: skip
    row["status"] = {}
    for name, options in variants(row["task"], precision):
        with tempfile.TemporaryDirectory(prefix="ffmerge-types-") as tmp:
            try:
                report = export(result, Path(tmp) / "out", options, log=lambda s: None)
                row["status"][name] = "pass" if report["ok"] else "fail"
            except ValidationFailed as e:
                failed = [c["name"] for c in e.report["checks"] if c["status"] == "fail"]
                row["status"][name] = f"fail: {', '.join(failed)}"
            except FFMergeError as e:
                row["status"][name] = f"{type(e).__name__}: {str(e)[:160]}"
            except Exception as e:  # noqa: BLE001 - a crash is a row of the table, not the end of it
                row["status"][name] = f"crash {type(e).__name__}: {str(e)[:160]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=None, help="comma-separated names in tests/tiny_models.py (default: all)")
    ap.add_argument("--precision", default="fp32", help="every variant at this precision (precision.py)")
    ap.add_argument(
        "--out", type=Path, default=None, help="default docs/model_types.md (fp32), else with the precision"
    )
    a = ap.parse_args()
    if a.out is None:
        a.out = ROOT / "docs" / ("model_types.md" if a.precision == "fp32" else f"model_types_{a.precision}.md")
    names = a.types.split(",") if a.types else [*tm.TINY, *tm.INFERRED, *tm.REFUSED]
    rows = []
    for name in names:
        start = time.time()
        rows.append(run(name, a.precision))
        print(f"{name}: {rows[-1]['status']} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    at = "" if a.precision == "fp32" else f" at {a.precision}"
    lines = [
        f"# Model types taken through merge -> ONNX -> validate{at}",
        "",
        (
            "Written by `tools/model_types.py` (tiny random models from their transformers config classes, "
            "`tests/tiny_models.py`; window 1-2 of every stack; outputs against PyTorch, zero duplicated tensors). "
            "`reviewed`: a JSON adapter in `ffmerge_onnx/families/`; `inferred`: no JSON, the structure is read off "
            "the loaded model (`ffmerge-onnx inspect MODEL`). The same runs are tests: "
            "`tests/families/test_infer.py`, `tests/merging/test_merge.py`, `tests/onnx/test_build.py`."
        ),
        "",
        "| model type | class | adapter | task | stacks | gated FF | fold | gather | fold + KV cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    refused = []
    for r in rows:
        if r["adapter"] == "refused":
            refused.append(f"| {r['type']} | {r['class']} | {r['status']['refused']} |")
            continue
        s = r["status"]
        lines.append(f"| {r['type']} | {r['class']} | {r['adapter']} | {r['task']} | {r['stacks']} | "
                     f"{r['gated'] if r['gated'] == 'fused' else 'yes' if r['gated'] else 'no'} | {s.get('fold', '-')} | {s.get('gather', '-')} | "
                     f"{s.get('fold + KV cache', '-')} |")  # fmt: skip
    passing = {r["type"] for r in rows if r["adapter"] != "refused" and r["status"].get("fold") == "pass"}
    lines += ["", f"{len(passing)} model types pass with fold permutations{at}.", ""]
    lines += ["## Refused, with the reason the CLI gives before any work", "", "| model type | class | reason |",
              "|---|---|---|", *refused, ""]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    a.out.write_text(text)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
