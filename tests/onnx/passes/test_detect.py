"""DetectShared (`share`, no manifest): equal and permuted copies of a tensor become one."""

import numpy as np
import onnx_ir as ir
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import DetectShared, FoldWeightTransposes, PostconditionError, PreconditionError

D, D_FF = 4, 6


def test_exact_and_permuted_copies_are_shared_and_the_function_is_unchanged():
    ff = tg.random_ff(D, D_FF, 0)
    perm = np.random.default_rng(4).permutation(D_FF)
    model = tg.parse(tg.ff_stack([ff, ff, tg.permuted(ff, perm)]))
    model = FoldWeightTransposes()(model).model
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    before = tg.run(model, x)
    p = DetectShared(min_elements=D)  # the fixture's tensors are tiny; real weights use the 1024 default
    result = p(model)
    # layer 1: 4 exact copies; layer 2: w_in, b_in, w_out permuted, b_out exact
    assert p.counts == {"duplicates_shared": 5, "permuted_shared": 3}
    assert len(result.model.graph.initializers) == 4 + 1  # one FF + the layer's order, once for its three tensors
    np.testing.assert_array_equal(tg.run(result.model, x), before)


def test_small_constants_are_not_weights():
    ff = tg.random_ff(D, D_FF, 0)
    model = FoldWeightTransposes()(tg.parse(tg.ff_stack([ff, ff]))).model
    assert not DetectShared()(model).modified  # every tensor here is under 1024 elements


def test_requires_folded_transposes():
    ff = tg.random_ff(D, D_FF, 0)
    with pytest.raises(PreconditionError, match="FoldWeightTransposes first"):
        DetectShared(min_elements=D)(tg.parse(tg.ff_stack([ff, ff])))


def test_ensures_fails_when_a_copy_is_left():
    class Idle(DetectShared):
        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    ff = tg.random_ff(D, D_FF, 0)
    model = FoldWeightTransposes()(tg.parse(tg.ff_stack([ff, ff]))).model
    with pytest.raises(PostconditionError, match="still duplicated"):
        Idle(min_elements=D)(model)
