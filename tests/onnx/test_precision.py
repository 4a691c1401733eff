"""Precision steps (fp16, int8, int8-dynamic, int4): every merged tensor stays stored once, outputs pass the
precision's gate, and a step that duplicates a merged tensor fails its postcondition."""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import onnx
import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import Window, merge
from ffmerge_onnx.cli import main
from ffmerge_onnx.errors import EXIT_VALIDATION
from ffmerge_onnx.onnx import precision as precision_module
from ffmerge_onnx.onnx.files import sharing
from ffmerge_onnx.onnx.passes.base import PostconditionError
from ffmerge_onnx.onnx.precision import PRECISIONS, PrecisionOptions, ToPrecision
from ffmerge_onnx.pipeline import ExportOptions, export


def merged(model_type="llama", start=1, end=3):
    model = tm.build(model_type)
    return merge(model, [Window("decoder" if model_type != "bert" else "encoder", start, end)],
                 calibration=tm.calibration(model), progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "name, mode",
    [
        pytest.param("fp16", "fold", marks=pytest.mark.slow),
        pytest.param("int8", "fold", marks=pytest.mark.slow),  # every precision in the full suite
        pytest.param("int8-dynamic", "fold", marks=pytest.mark.slow),
        pytest.param("int4", "fold", marks=pytest.mark.slow),
        pytest.param("int4", "gather", marks=pytest.mark.slow),  # Gemm(transA) output projections
    ],
)
def test_each_precision_keeps_every_merged_tensor_once_and_passes_its_gate(name, mode, tmp_path):
    result = merged()
    shared = [n for w in result.manifest.windows for n in w.shared.values()]
    options = ExportOptions(precision=name, mode=mode, compare=False)
    report = export(result, tmp_path / "out", options, log=lambda s: None)
    assert report["ok"] and report["precision"] == name
    info = json.loads((tmp_path / "out" / "onnx_export.json").read_text())
    assert info["precision"] == name and info["passes"]["model.onnx"]["ToPrecision"]["merged_tensors"] == len(shared)
    stats = sharing(tmp_path / "out" / "model.onnx")
    assert stats["duplicated_tensors"] == 0
    inits = [t.name for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer]
    for s in shared:  # one weight per merged tensor, in the precision's form
        held = [n for n in inits if n.startswith(s)]
        weight = {"fp16": [s + ".T"], "int8": [s + ".T_Q8"], "int8-dynamic": [s + ".T_quantized"],
                  "int4": [s + ".T_Q4"]}[name]  # fmt: skip
        assert [n for n in held if n in weight] == weight, held
        assert s + ".T" not in held or name == "fp16", held  # no fp32 copy left beside the quantized one
    checks = {c["name"]: c for c in report["checks"]}
    rows = checks["outputs[cpu]"]["detail"]["rows"]
    assert rows and all(r["ok"] for r in rows)
    if name == "fp16":
        assert max(r["max_rel"] for r in rows) < 1e-2
    else:
        assert min(r["cosine"] for r in rows) >= PRECISIONS[name].accept(np.ones((1, 2)), np.ones((1, 2)))["tolerance"]
    assert checks["sharing"]["status"] == "pass"


@pytest.mark.slow
def test_a_precision_step_that_duplicates_a_merged_tensor_fails(tmp_path, monkeypatch):
    """If a converter wrote one copy of a merged weight per reader, ToPrecision's postcondition catches it."""
    result = merged()
    real = precision_module._int8_dynamic

    def duplicating(src, dst, options, external):
        files = real(src, dst, options, external)
        m = onnx.load(str(dst))
        t = next(t for t in m.graph.initializer if t.name.endswith("fc_in.weight.T_quantized"))
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = "per_reader_copy"
        m.graph.initializer.append(copy)
        user = next(n for n in m.graph.node if t.name in n.input)
        user.input[list(user.input).index(t.name)] = "per_reader_copy"
        onnx.save(m, str(dst))
        return files

    monkeypatch.setitem(PRECISIONS, "int8-dynamic", PRECISIONS["int8"].__class__("int8-dynamic", "", duplicating, ""))
    with pytest.raises(PostconditionError, match="copies of others"):
        export(result, tmp_path / "out", ExportOptions(precision="int8-dynamic", compare=False), log=lambda s: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # quick subset under 3 minutes
def test_a_step_that_renames_the_merged_tensors_fails(tmp_path):
    result = merged("gpt2")
    export(result, tmp_path / "fp32", ExportOptions(compare=False), log=lambda s: None)
    m = onnx.load(str(tmp_path / "fp32" / "model.onnx"))
    for i, t in enumerate(m.graph.initializer):
        if t.name.startswith("ffmerge."):
            old, t.name = t.name, f"anonymous_{i}"
            for n in m.graph.node:
                n.input[:] = [t.name if i == old else i for i in n.input]
    onnx.save(m, str(tmp_path / "renamed.onnx"))
    shared = [n for w in result.manifest.windows for n in w.shared.values()]
    with pytest.raises(PostconditionError, match="gone"):
        ToPrecision(PrecisionOptions("fp16"), shared).ensures(tmp_path / "renamed.onnx", ["renamed.onnx"])


@pytest.mark.slow
def test_int4_keeps_a_long_windows_merged_tensors_in_8_bits(tmp_path):
    """A tensor merged from 4 layers repeats its rounding in all 4: 8 bits for it, 4 for the rest; the size gate
    counts what the merge removes at int4 (the unmerged window's int4 bytes less the 8-bit shared tensors)."""
    model = tm.build("llama")
    model.save_pretrained(tmp_path / "llama")  # the original, for the side-by-side baseline
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "cal.pt")
    assert main(["convert", str(tmp_path / "llama"), "-o", str(tmp_path / "out"), "--layers", "0-3", "--method",
                 "average", "--calibration", str(tmp_path / "cal.pt"), "--calibration-tokens", "200",
                 "--precision", "int4"]) == 0  # fmt: skip
    inits = [t.name for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer]
    shared = [n.removesuffix(".T_Q8") for n in inits if n.startswith("ffmerge.") and n.endswith(".T_Q8")]
    assert len(shared) == 3 and not any(n.startswith("ffmerge.") and n.endswith("_Q4") for n in inits)
    assert any(n.endswith("_Q4") for n in inits)  # the other layers' weights
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    (row,) = checks["size_vs_unmerged"]["detail"]["rows"].values()
    assert checks["size_vs_unmerged"]["status"] == "pass" and 0.95 <= row["weight_saving_over_away"] <= 1.01, row


@pytest.mark.slow
def test_quantize_command_and_validate_on_a_convert_folder(tmp_path):
    """quantize: int4 from a convert folder's reference, measured against the original at int4."""
    tm.converted(tmp_path, "gpt2", "1-2")
    assert main(["quantize", str(tmp_path / "out"), "-o", str(tmp_path / "q"), "--precision", "int4"]) == 0
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["precision"] == "int4" and report["side_by_side"]["precision"] == "int4"
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["size_vs_unmerged"] == "pass" and checks["sharing"] == "pass"
    assert main(["validate", str(tmp_path / "q"), "--no-compare"]) == 0
    # the quantized file's merged weights moved: the fp32 gate would not pass it, the int4 one does
    info = json.loads((tmp_path / "q" / "onnx_export.json").read_text())
    info["precision"] = "fp32"
    (tmp_path / "q" / "onnx_export.json").write_text(json.dumps(info))
    assert main(["validate", str(tmp_path / "q"), "--no-compare"]) == EXIT_VALIDATION


@pytest.mark.slow
def test_text_quality_check_scores_real_text_against_the_fp32_reference(tmp_path, monkeypatch):
    """Below fp32, validate scores the BBC test split on the folder and on its fp32 reference and
    gates the perplexity rise by the precision's allowance."""
    from ffmerge_onnx.quality.evaluate import evaluate

    validate_module = importlib.import_module("ffmerge_onnx.quality.textcheck")

    result = merged()
    out = tmp_path / "out"
    report = export(result, out, ExportOptions(precision="int8", compare=False), preprocessor=tm.word_tokenizer(),
                    log=lambda s: None)  # fmt: skip
    (check,) = [c for c in report["checks"] if c["name"].startswith("text_quality")]
    d = check["detail"]
    assert check["status"] == "pass" and d["metric"] == "perplexity" and d["tokens"] == validate_module.TEXT_TOKENS
    ref = evaluate(str(out / "reference"), max_tokens=d["tokens"], window=d["window"], progress=False)["value"]
    assert d["reference"] == pytest.approx(ref, rel=1e-9) and d["rise"] == pytest.approx(d["value"] / ref - 1)
    assert abs(d["rise"]) < PRECISIONS["int8"].perplexity_rise
    strict = dataclasses.replace(PRECISIONS["int8"], perplexity_rise=d["rise"] - 1e-6)  # just below what it got
    monkeypatch.setitem(PRECISIONS, "int8", strict)
    again = validate_module.check_text_quality(out, out / "reference", result.model, "causal-lm", "int8")
    assert again.status == "fail" and again.detail["value"] == pytest.approx(d["value"])
