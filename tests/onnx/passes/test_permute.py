"""PermuteGather (mode gather): a layer that keeps its own neuron order reads Gather(shared, order)."""

import numpy as np
import onnx_ir as ir
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import (
    FoldWeightTransposes,
    LayerOrder,
    PermuteGather,
    PostconditionError,
    PreconditionError,
)
from ffmerge_onnx.runtime import FOLDING_OFF

D, D_FF = 4, 6


def test_layer_reads_its_own_order_through_gather_and_computes_its_own_ff():
    model, ff = tg.shared_pair()
    perm = np.random.default_rng(3).permutation(D_FF)  # layer 1's neuron j sits at perm[j]... in the shared tensor
    order = LayerOrder("ffmerge.decoder.w0_1.order1", np.argsort(perm), ["layers.1.mlp.fc1", "layers.1.mlp.fc2"])
    p = PermuteGather(tg.ff_targets(ff), [order])
    result = p(model)
    assert result.modified and p.counts == {"gathers": 3}  # w_in, b_in, w_out; b_out lives in model space
    # the same function as a graph where layer 1 stores the shared FF in its own order
    expected = tg.parse(tg.ff_stack([ff, tg.permuted(ff, np.argsort(perm))]))
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    np.testing.assert_allclose(tg.run(result.model, x, FOLDING_OFF), tg.run(expected, x), rtol=1e-5, atol=1e-5)
    assert sum(op == "Gather" for op in tg.ops(result.model)) == 3


def test_requires_the_shared_tensors_under_their_stable_names():
    ff = tg.random_ff(D, D_FF, 0)
    model = FoldWeightTransposes()(tg.parse(tg.ff_stack([ff, ff]), tg.layer_scopes(2))).model  # no ShareMerged
    order = LayerOrder("o1", np.arange(D_FF)[::-1].copy(), ["layers.1.mlp.fc1"])
    with pytest.raises(PreconditionError, match="ShareMerged first"):
        PermuteGather(tg.ff_targets(ff), [order])(model)


def test_ensures_fails_when_a_permuted_layer_reads_the_shared_tensor_directly():
    class Idle(PermuteGather):
        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    model, ff = tg.shared_pair()
    order = LayerOrder("o1", np.arange(D_FF)[::-1].copy(), ["layers.1.mlp.fc1", "layers.1.mlp.fc2"])
    with pytest.raises(PostconditionError, match="reads ffmerge.decoder.w0_1"):
        Idle(tg.ff_targets(ff), [order])(model)
