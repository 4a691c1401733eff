"""PermuteGather (mode gather): a permuted layer gets its own neuron order on its hidden activations;
its projections read the shared tensors as they are."""

import numpy as np
import onnx
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

D, D_FF = 4, 6
ORDER = np.random.default_rng(3).permutation(D_FF)  # layer 1's own neuron j sits at ORDER[j] in the shared FF


def layer1_order():
    return LayerOrder("ffmerge.decoder.w0_1.order1", ORDER, ["layers.1.mlp.fc1"], "layers.1.mlp.fc2")


def expose(model: ir.Model, name: str) -> ir.Model:
    """Make an intermediate value (e.g. a layer's hidden activation) a graph output too."""
    value = next(n.outputs[0] for n in model.graph if n.outputs[0].name == name)
    model.graph.outputs.append(value)
    return model


def with_shapes(model: ir.Model) -> ir.Model:
    """Record every value's shape, as the exporter does."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model)))


@pytest.mark.parametrize("shapes", [True, False])
def test_the_layer_sees_its_hidden_units_in_its_own_order_and_computes_the_same_ff(shapes):
    model, ff = tg.shared_pair()
    if shapes:
        model = with_shapes(model)
    p = PermuteGather(tg.ff_targets(ff), [layer1_order()])
    result = p(expose(model, "a1"))  # a1: layer 1's hidden activation, Relu(W_in x + b_in)
    assert result.modified and p.counts == {"gathers": 2}  # out of fc1 into its order, into fc2 back
    gathers = [n for n in result.model.graph if n.op_type == "Gather"]
    assert all(not n.inputs[0].is_initializer() for n in gathers)  # activations, never weights
    # whole rows: the hidden axis goes to the front for the Gather (onnxruntime's last-axis Gather is
    # slow); a graph that records no ranks gets the plain last-axis Gather
    assert [n.attributes["axis"].as_int() for n in gathers] == ([0, 0] if shapes else [-1, -1])
    # back into the output projection without a second Transpose: Gemm reads the rows as transA
    assert tg.ops(result.model).count("Transpose") == (3 if shapes else 0)
    gemms = [n for n in result.model.graph if n.op_type == "Gemm"]
    assert [n.attributes["transA"].as_int() for n in gemms] == ([1] if shapes else [])
    # a graph where layer 1 stores the shared FF in its own order: the same hidden units, the same output
    own = expose(tg.parse(tg.ff_stack([ff, tg.permuted(ff, ORDER)])), "a1")
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    sess = lambda m: tg.session(m).run(None, {"x": x})
    (y, a1), (y_own, a1_own) = sess(result.model), sess(own)
    np.testing.assert_allclose(a1, a1_own, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, y_own, rtol=1e-5, atol=1e-5)


def test_requires_the_shared_tensors_and_the_modules_boundaries():
    ff = tg.random_ff(D, D_FF, 0)
    model = FoldWeightTransposes()(tg.parse(tg.ff_stack([ff, ff]), tg.layer_scopes(2))).model  # no ShareMerged
    with pytest.raises(PreconditionError, match="ShareMerged first"):
        PermuteGather(tg.ff_targets(ff), [layer1_order()])(model)
    unscoped, ff = tg.shared_pair()
    for node in unscoped.graph:
        node.metadata_props.clear()  # an exporter that recorded no module scopes
    with pytest.raises(PreconditionError, match="cannot tell the one output of layers.1.mlp.fc1"):
        PermuteGather(tg.ff_targets(ff), [layer1_order()])(unscoped)


def test_ensures_fails_when_a_permuted_layer_computes_in_the_shared_order():
    class Idle(PermuteGather):
        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    model, ff = tg.shared_pair()
    with pytest.raises(PostconditionError, match="reaches the rest of the layer in the shared order"):
        Idle(tg.ff_targets(ff), [layer1_order()])(model)
