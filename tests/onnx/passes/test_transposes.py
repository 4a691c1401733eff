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
    folded = result.model.graph.initializers["l0_w_in.T"].const_value
    assert isinstance(folded, ir.LazyTensor) and not folded.cache  # computed when read, never held
    np.testing.assert_array_equal(folded.numpy(), ff["w_in"].T)
    np.testing.assert_array_equal(tg.run(result.model, x), before)


def test_a_weight_also_read_directly_keeps_one_copy_and_its_transpose():
    """A tied embedding that lm_head reads transposed stays once in the file; its Transpose is left for
    onnxruntime to fold at load (one transposed buffer, packed once)."""
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
    p = FoldWeightTransposes()
    result = p(tg.parse(text))
    assert list(result.model.graph.initializers) == ["w"] and p.counts == {"tied_transposes_left": 1}
    assert tg.ops(result.model) == ["Gather", "Transpose", "MatMul"] and not result.modified


def test_a_graph_without_transposes_is_left_alone():
    model = tg.parse(tg.ff_stack([tg.random_ff(4, 6, seed=0)]))
    FoldWeightTransposes()(model)
    result = FoldWeightTransposes()(model)
    assert not result.modified


def test_ensures_fails_when_a_transpose_of_a_weight_is_left():  # (one read only through the Transpose)
    class Idle(FoldWeightTransposes):
        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    model = tg.parse(tg.ff_stack([tg.random_ff(4, 6, seed=0)]))
    with pytest.raises(PostconditionError, match="still read initializers"):
        Idle()(copy.deepcopy(model))
