"""ShareMerged: the k copies of a merged FF tensor become one initializer with the manifest's stable name."""

import numpy as np
import onnx_ir as ir
import pytest
import tiny_graphs as tg

from ffmerge_onnx.onnx.passes import PostconditionError, PreconditionError, ShareMerged

D, D_FF = 4, 6


def test_k_equal_copies_become_one_initializer_per_merged_tensor():
    model, ff = tg.k_copies(3)
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    before = tg.run(model, x)
    p = ShareMerged(tg.ff_targets(ff, layers=(0, 1, 2)))
    result = p(model)
    inits = result.model.graph.initializers
    assert result.modified and p.counts == {"duplicates_merged": 8, "renamed": 4}
    # weights were folded transposed: their stable names say so
    assert {
        "ffmerge.decoder.w0_1.fc_in.weight.T",
        "ffmerge.decoder.w0_1.fc_out.weight.T",
        "ffmerge.decoder.w0_1.fc_in.bias",
        "ffmerge.decoder.w0_1.fc_out.bias",
    } == set(inits)
    np.testing.assert_array_equal(tg.run(result.model, x), before)
    assert not ShareMerged(tg.ff_targets(ff, layers=(0, 1, 2)))(result.model).modified  # nothing left to do


def test_equal_values_outside_the_window_are_not_taken():
    """Layer 2 holds the same values but is not in the window (scopes say so): it keeps its own tensors."""
    model, ff = tg.k_copies(3)
    result = ShareMerged(tg.ff_targets(ff, layers=(0, 1)))(model)
    assert {"l2_w_in.T", "l2_b_in", "l2_w_out.T", "l2_b_out"} <= set(result.model.graph.initializers)


def test_requires_folded_transposes():
    ff = tg.random_ff(D, D_FF, 0)
    model = tg.parse(tg.ff_stack([ff, ff]), tg.layer_scopes(2))
    with pytest.raises(PreconditionError, match="FoldWeightTransposes first"):
        ShareMerged(tg.ff_targets(ff))(model)


def test_ensures_fails_when_a_copy_is_still_read_in_the_window():
    class Idle(ShareMerged):
        def call(self, model):  # renames the first copy but leaves the second in place
            for t in self.targets:
                for name in ("l0_w_in.T", "l0_b_in", "l0_w_out.T", "l0_b_out"):
                    v = model.graph.initializers.get(name)
                    if v is not None and np.array_equal(v.const_value.numpy(), t.forms().get(t.name + ".T", t.value)):
                        model.graph.initializers.pop(name)
                        v.name = t.name + (".T" if name.endswith(".T") else "")
                        model.graph.register_initializer(v)
            return ir.passes.PassResult(model, modified=True)

    model, ff = tg.k_copies(2)
    with pytest.raises(PostconditionError, match="also read in the window"):
        Idle(tg.ff_targets(ff))(model)


def test_ensures_fails_when_a_merged_tensor_is_missing():
    model, _ = tg.k_copies(2)
    other = tg.random_ff(D, D_FF, seed=9)  # values the graph does not hold
    with pytest.raises(PostconditionError, match="not in the exported graph"):
        ShareMerged(tg.ff_targets(other))(model)
