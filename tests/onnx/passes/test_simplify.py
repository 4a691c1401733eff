"""SharingSafeSimplify: the simplifier runs, but cannot turn a shared tensor into copies."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxslim
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import (
    FoldWeightTransposes,
    LayerOrder,
    PermuteGather,
    PostconditionError,
    PreconditionError,
    SharingSafeSimplify,
)
from ffmerge_onnx.onnx.passes.base import digest_groups

D, D_FF = 4, 6


def gathered():
    model, ff = tg.shared_pair()
    order = LayerOrder(
        "ffmerge.decoder.w0_1.order1", np.array([1, 2, 0, 4, 5, 3]), ["layers.1.mlp.fc1"], "layers.1.mlp.fc2"
    )
    return PermuteGather(tg.ff_targets(ff), [order])(model).model


def tied():
    """A tied embedding: read by Gather and, transposed, by the output MatMul (the Transpose is left in)."""
    w = np.random.default_rng(0).standard_normal((40, D)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
tied (int64[N] ids) => (float[N, 40] logits)
<{tg.tensor("w", w)}>
{{
  e = Gather(w, ids)
  t = Transpose(w)
  logits = MatMul(e, t)
}}
"""
    return FoldWeightTransposes()(tg.parse(text)).model


def copies(model: ir.Model) -> int:
    return sum(len(v) for v in digest_groups(model.graph).values() if v[0].const_value.size >= 40 * D)


def test_plain_onnxsim_writes_a_tied_weight_out_twice():
    """Why the pass exists: onnxsim's constant folding turns the tied Transpose into a second copy."""
    import onnxsim

    simplified, _ = onnxsim.simplify(ir.serde.serialize_model(tied()))
    plain = ir.from_proto(simplified)
    assert "Transpose" not in tg.ops(plain) and copies(plain) == 2


@pytest.mark.parametrize("simplifier", ["onnxslim", "onnxsim"])
def test_a_tied_weight_stays_once(simplifier):
    model = tied()
    ids = np.array([1, 7, 39])
    before = tg.session(model).run(None, {"ids": ids})[0]
    result = SharingSafeSimplify(simplifier, protect_elements=D)(model)
    assert copies(result.model) == 1 and "Transpose" in tg.ops(result.model)
    np.testing.assert_allclose(tg.session(result.model).run(None, {"ids": ids})[0], before, rtol=1e-6)


@pytest.mark.parametrize("simplifier", ["onnxslim", "onnxsim"])
def test_shared_tensors_and_activation_gathers_survive_simplification(simplifier):
    model = gathered()
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    before = tg.run(model, x)
    p = SharingSafeSimplify(simplifier, protect_elements=D)
    result = p(model)
    assert tg.ops(result.model).count("Gather") == 2
    assert max(len(v) for v in digest_groups(result.model.graph).values()) == 1  # every tensor once
    assert p.counts["nodes_after"] <= p.counts["nodes_before"]
    assert result.modified == (p.counts["nodes_after"] != p.counts["nodes_before"])
    np.testing.assert_allclose(tg.run(result.model, x), before, rtol=1e-6, atol=1e-6)


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

    def duplicating(self, proto: onnx.ModelProto, simplifier: str) -> onnx.ModelProto:
        out = onnxslim.slim(proto)  # then one reader gets its own copy of the shared weight
        node = next(n for n in out.graph.node if name in n.input)
        out.graph.initializer.append(onnx.numpy_helper.from_array(shared, name + ".copy"))
        node.input[list(node.input).index(name)] = name + ".copy"
        return out

    monkeypatch.setattr(SharingSafeSimplify, "_run", duplicating)
    with pytest.raises(PostconditionError, match="exists 2 times after simplification"):
        SharingSafeSimplify("onnxslim", protect_elements=D)(model)


def _fixing(sizes: dict[str, int]):
    """A simplifier that fixes the first input's first dim (as onnxslim does to Megatron-BERT's sequence length)."""
    real = SharingSafeSimplify._run

    def run(self, proto: onnx.ModelProto, simplifier: str) -> onnx.ModelProto:
        out = real(proto, simplifier)
        if simplifier in sizes:
            out.graph.input[0].type.tensor_type.shape.dim[0].dim_value = sizes[simplifier]
        return out

    return run


def test_onnxslim_fixing_a_dynamic_size_falls_back_to_onnxsim(monkeypatch):
    model = gathered()
    dims = list(model.graph.inputs[0].shape)
    monkeypatch.setattr(SharingSafeSimplify, "_run", _fixing({"onnxslim": 64}))
    simplify = SharingSafeSimplify("onnxslim", protect_elements=D)
    out = simplify(model).model
    assert simplify.counts["fallback_to_onnxsim"] == 1 and list(out.graph.inputs[0].shape) == dims


def test_ensures_fails_when_a_dynamic_size_is_fixed(monkeypatch):
    monkeypatch.setattr(SharingSafeSimplify, "_run", _fixing({"onnxslim": 64, "onnxsim": 64}))
    with pytest.raises(PostconditionError, match="changed shape"):
        SharingSafeSimplify("onnxslim", protect_elements=D)(gathered())
