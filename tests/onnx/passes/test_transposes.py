"""FoldWeightTransposes: weights read through Transpose become one transposed initializer, never one per reader."""

import copy

import numpy as np
import onnx_ir as ir
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import FoldWeightTransposes, PostconditionError


def test_a_weight_read_by_two_layers_through_transposes_is_folded_once():
    ff = tg.random_ff(4, 6, seed=0)
    model = tg.parse(tg.ff_stack([ff, ff]))
    # the paper's practice written as one tied weight: both layers read l0's tensors
    for node in model.graph:
        for i, v in enumerate(node.inputs):
            if v is not None and v.name.startswith("l1_"):
                node.replace_input_with(i, model.graph.initializers["l0_" + v.name[3:]])
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    before = tg.run(model, x)
    p = FoldWeightTransposes()
    result = p(model)
    assert result.modified and "Transpose" not in tg.ops(result.model)
    assert p.counts == {"initializers_added": 2, "transposes_folded": 4}
    assert {"l0_w_in.T", "l0_w_out.T"} <= set(result.model.graph.initializers)
    assert "l0_w_in" not in result.model.graph.initializers  # read only transposed: no untransposed copy left
    np.testing.assert_array_equal(tg.run(result.model, x), before)


def test_a_weight_also_read_directly_keeps_one_copy_through_gemm():
    """A tied embedding that lm_head reads transposed: MatMul(x, W^T) becomes Gemm(transB=1), W stays once."""
    w = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
tied (int64[N] ids, float[B, N, 4] x) => (float[N, 4] e, float[B, N, 5] logits)
<{tg.tensor("w", w)}>
{{
  e = Gather(w, ids)
  t = Transpose(w)
  logits = MatMul(x, t)
}}
"""
    model = tg.parse(text)
    proto = ir.serde.serialize_model(model)
    import onnxruntime as ort

    feeds = {"ids": np.array([0, 3]), "x": np.random.default_rng(2).standard_normal((2, 2, 4)).astype(np.float32)}
    before = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    result = FoldWeightTransposes()(model)
    weights = [n for n, v in result.model.graph.initializers.items() if v.const_value.size >= w.size]
    assert weights == ["w"]  # (only shape constants beside it)
    assert "Gemm" in tg.ops(result.model) and "Transpose" not in tg.ops(result.model)
    after = ort.InferenceSession(ir.serde.serialize_model(result.model).SerializeToString()).run(None, feeds)
    assert [o.name for o in result.model.graph.outputs] == ["e", "logits"]
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_graph_without_transposes_is_left_alone():
    model = tg.parse(tg.ff_stack([tg.random_ff(4, 6, seed=0)]))
    FoldWeightTransposes()(model)
    result = FoldWeightTransposes()(model)
    assert not result.modified


def test_ensures_fails_when_a_transpose_of_a_weight_is_left():
    class Idle(FoldWeightTransposes):
        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    model = tg.parse(tg.ff_stack([tg.random_ff(4, 6, seed=0)]))
    with pytest.raises(PostconditionError, match="still read initializers"):
        Idle()(copy.deepcopy(model))
