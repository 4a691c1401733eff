"""The linear block replacement baseline of tools/alternatives.py, on known answers."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from alternatives import best_replacement, fit_map, influence_drop, layer_inputs, replace_block, skip_corrections

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.quality.search import fidelity


def silent(model_type: str, layers=(1, 2)):
    """A model whose layers `layers` add nothing to the residual stream (attention and FF outputs zero)."""
    model = tm.build(model_type, gentle=True)
    block = adapter_for(model).layers(model, "decoder")
    with torch.no_grad():
        for i in layers:
            attn = block[i].attn.c_proj if model_type == "gpt2" else block[i].self_attn.o_proj
            for module in (attn, adapter_for(model).projection(block[i], "out")):
                for p in module.parameters():
                    p.zero_()
    return model


def test_a_block_that_does_nothing_is_replaced_by_the_identity_without_loss():
    model = silent("llama")
    cal = tm.calibration(model, n=64)
    inputs = layer_inputs(model, cal, "decoder")
    linear = fit_map(inputs, 1, 2)
    assert torch.allclose(linear.weight, torch.eye(32), atol=1e-3) and linear.bias.abs().max() < 1e-3
    x = tm.inputs(model)
    replaced = replace_block(copy.deepcopy(model), "decoder", 1, 2, linear)
    assert adapter_for(replaced).num_layers(replaced, "decoder") == 2
    assert (
        replaced.num_parameters()
        == model.num_parameters()
        - 2 * sum(p.numel() for p in adapter_for(model).layers(model, "decoder")[1].parameters())
        + 32 * 32
        + 32
    )
    assert torch.allclose(tm.output(replaced, x), tm.output(model, x), atol=1e-3)


def test_the_search_finds_the_silent_block_and_a_block_at_the_end_is_handled():
    model = silent("gpt2", layers=(2, 3))
    score = fidelity(model, list(tm.calibration(model, seed=11)))
    found = best_replacement(model, "decoder", 2, tm.calibration(model, n=64), score, higher_is_better=True)
    assert found["best"] == [2, 3] and len(found["rows"]) == 3
    best = next(r for r in found["rows"] if r["start"] == 2)  # the stack's last two layers: a hook after layer 1
    assert best["score"] > 0.999


@pytest.mark.slow
def test_block_influence_drops_the_silent_layers_wherever_they_are():
    model = silent("llama", layers=(0, 2))  # not adjacent: ShortGPT drops by influence, not by position
    cal = tm.calibration(model, n=64)
    found = influence_drop(model, "decoder", 2, cal)
    assert found["dropped"] == [0, 2]
    assert found["influence"][0] < 1e-6 and found["influence"][2] < 1e-6 and min(found["influence"][1::2]) > 1e-4
    x = tm.inputs(model)
    assert torch.allclose(tm.output(found["model"], x), tm.output(model, x), atol=1e-4)
    assert adapter_for(model).num_layers(model, "decoder") == 4  # the model itself is not changed


def _exit_drift(merged, original, cal, end: int) -> float:
    a, b = layer_inputs(merged, cal, "decoder"), layer_inputs(original, cal, "decoder")
    return float(sum((x[end + 1] - y[end + 1]).pow(2).sum() for x, y in zip(a, b)))


def test_skip_corrections_are_zero_without_drift_and_shrink_a_merges_drift():
    model = tm.build("llama")
    cal = tm.calibration(model, n=64)
    same = copy.deepcopy(model)  # nothing merged: nothing to correct
    left = skip_corrections(same, model, "decoder", [1, 2], cal)
    assert left == [0.0, 0.0]
    for i in (1, 2):
        skip = adapter_for(same).layers(same, "decoder")[i].ffmerge_skip
        assert skip.weight.abs().max() < 1e-5 and skip.bias.abs().max() < 1e-5
    merged = merge(copy.deepcopy(model), [Window("decoder", 1, 2)], calibration=cal, progress=False).model
    before, params = _exit_drift(merged, model, cal, 2), merged.num_parameters()
    left = skip_corrections(merged, model, "decoder", [1, 2], cal)
    assert merged.num_parameters() == params + 2 * (32 * 32 + 32)
    assert all(0 < v < 1 for v in left)
    assert _exit_drift(merged, model, cal, 2) < 0.8 * before  # least squares: never above; 0.64 measured
