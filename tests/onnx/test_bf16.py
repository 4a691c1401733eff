"""bf16 (bf16.py): weight products in bf16 with every merged tensor stored once in bf16, a graph whose types check,
a CPU emulation that computes what the bf16 graph computes, and a clear refusal to run it on CPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import tiny_models as tm
from onnx.reference import ReferenceEvaluator

from ffmerge_onnx import Window, merge
from ffmerge_onnx.cli import main
from ffmerge_onnx.errors import InputError
from ffmerge_onnx.onnx.bf16 import emulate, is_bf16
from ffmerge_onnx.onnx.files import sharing
from ffmerge_onnx.onnx.validate_graph import validate_graph
from ffmerge_onnx.pipeline import ExportOptions, export
from ffmerge_onnx.runtime import session

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one unit in the last place, relative to the value


def _export(tmp_path, model_type: str, mode: str = "fold"):
    model = tm.build(model_type)
    result = merge(model, [Window("decoder", 1, 3)], calibration=tm.calibration(model), progress=False)
    report = export(result, tmp_path / "out", ExportOptions(precision="bf16", mode=mode, compare=False),
                    log=lambda s: None)  # fmt: skip
    return result, report


def test_bf16_stores_each_merged_tensor_once_and_types_check(tmp_path):
    result, report = _export(tmp_path, "llama")
    assert report["ok"] and report["precision"] == "bf16"
    path = tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)  # every product's operands agree in type
    graph = onnx.load(str(path)).graph
    dtype = {t.name: t.data_type for t in graph.initializer}
    shared = [n for w in result.manifest.windows for n in w.shared.values()]
    for s in shared:  # one bf16 tensor per merged weight, under its stable name
        held = [n for n in dtype if n.startswith(s)]
        assert len(held) == 1 and dtype[held[0]] == onnx.TensorProto.BFLOAT16, held
    norms = [n for n in dtype if n.endswith("norm.weight")]
    assert norms and all(dtype[n] == onnx.TensorProto.FLOAT for n in norms)  # autocast's split: norms stay fp32
    bf16 = {n for n, t in dtype.items() if t == onnx.TensorProto.BFLOAT16}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in dtype]
    assert weighted and all(n.input[1] in bf16 for n in weighted)  # every weight a product reads
    tied = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in dtype]  # the tied LM head's
    assert all(dtype[n.input[0]] == onnx.TensorProto.BFLOAT16 for n in tied)  # one bf16 table, no W.T copy
    assert not [n for n in dtype if n.endswith(".T") and n.removesuffix(".T") in dtype]
    assert sharing(path)["duplicated_tensors"] == 0 and is_bf16(path)
    # products of two activations (attention, rotary angles from positions) stay fp32: bf16 rounds positions > 256
    typed = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(typed.value_info) + list(typed.input)}
    weights = set(dtype) | {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in dtype}
    activations = [n for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    assert len(activations) >= 2 * result.model.config.num_hidden_layers  # attention scores and values
    assert all(types[i] == onnx.TensorProto.FLOAT for n in activations for i in n.input)
    (outputs,) = [c for c in report["checks"] if c["name"] == "outputs[cpu]"]
    assert outputs["detail"]["emulated"] and all(r["ok"] for r in outputs["detail"]["rows"])
    assert min(r["cosine"] for r in outputs["detail"]["rows"]) >= 0.99  # the gate (measured: above 0.9998)


@pytest.mark.parametrize(
    "model_type, mode", [("gpt2", "fold"), pytest.param("llama", "gather", marks=pytest.mark.slow)]
)
def test_the_cpu_emulation_computes_what_the_bf16_graph_computes(tmp_path, model_type, mode):
    """onnx's reference evaluator runs the bf16 graph as written (bf16 products); onnxruntime runs the emulation.
    GPT-2's Conv1D FFs are Gemms before the step: they reach bf16 as MatMul + Add."""
    import onnxruntime as ort

    _export(tmp_path, model_type, mode)
    path = tmp_path / "out" / "model.onnx"
    emulate(path, tmp_path / "emulated.onnx")
    assert not is_bf16(tmp_path / "emulated.onnx")
    ids = np.random.default_rng(0).integers(3, tm.VOCAB, (2, 9)).astype(np.int64)
    graph = onnx.load(str(path))
    names = [i.name for i in graph.graph.input]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(9), ids.shape).copy()}  # fmt: skip
    feeds = {k: v for k, v in feeds.items() if k in names}
    (ref,) = ReferenceEvaluator(graph).run(["logits"], feeds)
    (got,) = ort.InferenceSession(str(tmp_path / "emulated.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds
    )
    scale = float(np.abs(ref).max())
    assert np.abs(ref.astype(np.float32) - got).max() <= BF16_ULP * scale  # within one bf16 step (measured: equal)


def test_a_bf16_folder_is_refused_on_cpu_with_what_to_do(tmp_path):
    _export(tmp_path, "gpt2")
    with pytest.raises(InputError, match="CUDA provider only"):
        session(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "onnx_export.json").read_text())
    assert info["precision"] == "bf16"
    report = validate_graph(tmp_path / "out" / "model.onnx", measure_memory=False)  # a CI job's check
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["ok"] and "--providers cuda" in checks["load[cpu]"]["detail"]["fix"]
    assert checks["sharing"]["status"] == "pass"


@pytest.mark.slow
def test_quantize_to_bf16_reports_sizes_and_skips_runtime_figures(tmp_path):
    """quantize --precision bf16 on a convert folder: the size gate against the original at bf16 holds, memory
    and latency say why they were not measured, and validate passes the folder again."""
    tm.converted(tmp_path, "gpt2", "1-2")
    assert main(["quantize", str(tmp_path / "out"), "-o", str(tmp_path / "q"), "--precision", "bf16"]) == 0
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["size_vs_unmerged"]["status"] == "pass" and checks["sharing"]["status"] == "pass"
    (row,) = checks["size_vs_unmerged"]["detail"]["rows"].values()
    assert 0.99 <= row["weight_saving_over_away"] <= 1.01, row
    for name in ("memory_vs_unmerged", "latency_vs_unmerged"):
        assert checks[name]["status"] == "skipped" and "CUDA" in checks[name]["detail"]["reason"]
    assert main(["validate", str(tmp_path / "q"), "--no-compare"]) == 0


def test_untyped_and_sequence_values_keep_their_types(tmp_path):
    """A product whose activation operand carries no type info is still cast to bf16 (one type T per product),
    and sequence values (wavlm's SplitToSequence) are left as they are: both graphs load and match."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from ffmerge_onnx.onnx.bf16 import to_bf16

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0, keepdims=1),
        helper.make_node("SequenceAt", ["seq", "zero"], ["first"]),
        helper.make_node("Relu", ["first"], ["h"]),  # no value_info: h is untyped
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 3])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0), "zero")])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "fp32.onnx"))
    ir.save(to_bf16(ir.load(tmp_path / "fp32.onnx")), tmp_path / "bf16.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "bf16.onnx")), full_check=True)
    assert is_bf16(tmp_path / "bf16.onnx")
    emulate(tmp_path / "bf16.onnx", tmp_path / "emulated.onnx")
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (got,) = ort.InferenceSession(str(tmp_path / "emulated.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    assert np.allclose(got, np.maximum(x[:1], 0) @ w, rtol=2 * BF16_ULP, atol=1e-6)
