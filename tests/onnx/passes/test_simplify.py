"""SharingSafeSimplify: the simplifier runs, but cannot fold a shared tensor into per-layer copies."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxslim
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import (
    LayerOrder,
    PermuteGather,
    PostconditionError,
    PreconditionError,
    SharingSafeSimplify,
)
from ffmerge_onnx.onnx.passes.base import digest_groups
from ffmerge_onnx.runtime import FOLDING_OFF

D, D_FF = 4, 6


def gathered():
    model, ff = tg.shared_pair()
    order = LayerOrder(
        "ffmerge.decoder.w0_1.order1", np.arange(D_FF)[::-1].copy(), ["layers.1.mlp.fc1", "layers.1.mlp.fc2"]
    )
    return PermuteGather(tg.ff_targets(ff), [order])(model).model


def copies(model: ir.Model) -> int:
    return max(len(v) for v in digest_groups(model.graph).values())


def test_plain_onnxslim_folds_gathers_on_weights_into_copies():
    """Why the pass exists: the simplifier's constant folding writes the gathered weight out per layer."""
    model = gathered()
    slim = ir.from_proto(onnxslim.slim(ir.serde.serialize_model(model)))
    assert "Gather" not in tg.ops(slim) and len(slim.graph.initializers) > len(model.graph.initializers) - 1


@pytest.mark.parametrize("simplifier", ["onnxslim", "onnxsim"])
def test_gathers_and_sharing_survive_simplification(simplifier):
    model = gathered()
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    before = tg.run(model, x, FOLDING_OFF)
    p = SharingSafeSimplify(simplifier, protect_elements=D)
    result = p(model)
    assert tg.ops(result.model).count("Gather") == 3 and copies(result.model) == 1
    assert p.counts["protected"] == 5  # 4 shared tensors + the order
    assert p.counts["nodes_after"] <= p.counts["nodes_before"]
    assert result.modified == (p.counts["nodes_after"] != p.counts["nodes_before"])
    np.testing.assert_allclose(tg.run(result.model, x, FOLDING_OFF), before, rtol=1e-6, atol=1e-6)


def test_requires_the_simplifier_to_be_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxsim" else real(name, *a))
    with pytest.raises(PreconditionError, match="pip install onnxsim"):
        SharingSafeSimplify("onnxsim")(gathered())


def test_ensures_fails_when_the_simplifier_copies_a_protected_tensor(monkeypatch):
    model = gathered()
    name = "ffmerge.decoder.w0_1.fc_in.weight.T"
    shared = model.graph.initializers[name].const_value.numpy()

    def duplicating(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        out = onnxslim.slim(proto)  # then one reader gets its own copy of the shared weight
        node = next(n for n in out.graph.node if name in n.input)
        out.graph.initializer.append(onnx.numpy_helper.from_array(shared, name + ".copy"))
        node.input[list(node.input).index(name)] = name + ".copy"
        return out

    monkeypatch.setattr(SharingSafeSimplify, "_run", duplicating)
    with pytest.raises(PostconditionError, match="exists 2 times after simplification"):
        SharingSafeSimplify("onnxslim", protect_elements=D)(model)
