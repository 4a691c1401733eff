"""DedupeConstants: initializers with equal content become one; a merged tensor keeps its stable name."""

import numpy as np
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import DedupeConstants, PostconditionError


def equal_masks():
    """Two layers reading equal constants (the exporter writes GPT-Neo's causal mask once per layer)."""
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 4] x) => (float[N, 4] y)
<{tg.tensor("layer0_w", w)}, {tg.tensor("merged", w)}, {tg.tensor("other", w + 1)}>
{{
  a = MatMul(x, layer0_w)
  b = MatMul(a, merged)
  y = MatMul(b, other)
}}
"""
    model = tg.parse(text)
    value = model.graph.initializers.pop("merged")  # the ONNX text format takes no dots in names
    value.name = "ffmerge.decoder.w0_1.w"
    model.graph.register_initializer(value)
    return model


def test_equal_initializers_become_one_and_the_merged_name_stays():
    model = equal_masks()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    before = tg.run(model, x)
    p = DedupeConstants()
    result = p(model)
    assert result.modified and p.counts == {"initializers_removed": 1}
    assert set(result.model.graph.initializers) == {"ffmerge.decoder.w0_1.w", "other"}
    np.testing.assert_array_equal(tg.run(result.model, x), before)


def test_ensures_fails_when_copies_remain(monkeypatch):
    monkeypatch.setattr(
        DedupeConstants, "call", lambda self, model: __import__("onnx_ir").passes.PassResult(model, False)
    )
    with pytest.raises(PostconditionError, match="equal content"):
        DedupeConstants()(equal_masks())
