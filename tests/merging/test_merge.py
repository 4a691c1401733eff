import copy

import pytest
import tiny_models as tm
import torch
from safetensors.torch import save_file
from tiny_models import plant

from ffmerge_onnx import Window, adapter_for, drop_layers, load_merged, merge, save_merged
from ffmerge_onnx.errors import CalibrationError, WindowError
from ffmerge_onnx.merging import ff_param_count, permute_ff
from ffmerge_onnx.merging.checkpoint import canonical_state

ALL = [*tm.TINY, "phi3", "modernbert"]  # and two with gate and up fused in one matrix


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("model_type", ALL)
def test_random_permutation_of_one_ff_is_exact(model_type):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    x = tm.inputs(model)
    y0 = tm.output(model, x)
    for stack in adapter.stack_names():
        layer = adapter.layers(model, stack)[2]
        permute_ff(adapter, layer, torch.randperm(adapter.ff_dim(layer), generator=torch.Generator().manual_seed(3)))
    assert rel_err(tm.output(model, x), y0) <= 1e-5


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "vit", "llama", "marian"])
def test_planted_redundancy_is_found_and_merging_costs_no_more_than_the_noise(model_type):
    noise = 0.01
    model = tm.build(model_type, gentle=True)
    adapter = adapter_for(model)
    stack = adapter.stack_names()[-1]
    perm = plant(model, stack, 1, 2, noise)
    x = tm.inputs(model)
    y_noisy = tm.output(model, x)
    clean = tm.build(model_type, gentle=True)
    plant(clean, stack, 1, 2, 0.0)
    y_clean = tm.output(clean, x)
    result = merge(model, [Window(stack, 1, 2)], calibration=tm.calibration(model, n=64), progress=False)
    found = result.permutations[f"{stack}.2"]
    # the planted layer's neuron perm[q] moved to q's place; alignment must undo it exactly
    assert torch.equal(perm[found], torch.arange(len(perm)))
    assert result.manifest.windows[0].scores["2"] > 0.8
    merge_change = float((tm.output(model, x) - y_noisy).abs().max())
    noise_change = float((y_clean - y_noisy).abs().max())
    assert merge_change <= noise_change


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bart"])
def test_unique_parameters_drop_by_k_minus_1_ff_per_window(model_type):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    before = model.num_parameters()
    windows = [Window(s, 0, 1) for s in adapter.stack_names()] + [Window(s, 2, 3) for s in adapter.stack_names()]
    merge(model, windows, align="none", progress=False)
    ff = ff_param_count(model, adapter.stack_names()[0])
    assert before - model.num_parameters() == ff * len(windows)
    layers = adapter.layers(model, adapter.stack_names()[0])
    assert adapter.ff_params(layers[0])["fc_in.weight"] is adapter.ff_params(layers[1])["fc_in.weight"]
    assert adapter.ff_params(layers[1])["fc_in.weight"] is not adapter.ff_params(layers[2])["fc_in.weight"]


def test_vanilla_merge_averages_without_permuting():
    model = tm.build("gpt2")
    adapter = adapter_for(model)
    layers = adapter.layers(model, "decoder")
    expected = torch.stack([adapter.ff_params(layers[i])["fc_out.weight"].detach().clone() for i in (1, 2, 3)]).mean(0)
    result = merge(model, [Window("decoder", 1, 3)], align="none", progress=False)
    torch.testing.assert_close(adapter.ff_params(layers[2])["fc_out.weight"].detach(), expected)
    assert all(torch.equal(p, torch.arange(48)) for p in result.permutations.values())


@pytest.mark.parametrize("anchor,expected", [("first", 1), ("middle", 2), ("last", 3)])
def test_anchor_choice(anchor, expected):
    model = tm.build("bert")
    result = merge(model, [Window("encoder", 1, 3)], anchor=anchor, calibration=tm.calibration(model), progress=False)
    rec = result.manifest.windows[0]
    assert rec.anchor_layer == expected and rec.scores[str(expected)] == 1.0
    assert torch.equal(result.permutations[f"encoder.{expected}"], torch.arange(48))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "marian", "vit"])
def test_save_load_roundtrip_keeps_ties_and_shrinks_file(model_type, tmp_path):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    stack = adapter.stack_names()[0]
    # the unmerged model saved the same way (its own ties, e.g. embeddings, written once)
    save_file(canonical_state(model)[0], str(tmp_path / "unmerged.safetensors"))
    result = merge(model, [Window(stack, 0, 2)], calibration=tm.calibration(model), progress=False)
    save_merged(result, tmp_path / "m")
    loaded = load_merged(tmp_path / "m").model
    x = tm.inputs(model)
    assert torch.equal(tm.output(loaded, x), tm.output(model, x))
    assert loaded.num_parameters() == model.num_parameters()
    layers = adapter.layers(loaded, stack)
    for role in adapter.roles():
        assert adapter.ff_params(layers[0])[role.name] is adapter.ff_params(layers[2])[role.name]
    saved = (tmp_path / "m" / "model.safetensors").stat().st_size
    saving = (tmp_path / "unmerged.safetensors").stat().st_size - saved
    ff_bytes = 4 * ff_param_count(model, stack)
    assert 2 * ff_bytes <= saving <= 2 * ff_bytes + 1024  # + the smaller JSON header


def test_window_errors():
    model = tm.build("gpt2")
    for windows, msg in (
        ([Window("decoder", 1, 1)], "at least 2"),
        ([Window("decoder", 2, 5)], "out of range"),
        ([Window("decoder", 0, 2), Window("decoder", 2, 3)], "overlap"),
        ([Window("encoder", 0, 1)], "stacks"),
    ):
        with pytest.raises(WindowError, match=msg):
            merge(model, windows, align="none", progress=False)
    with pytest.raises(CalibrationError):
        merge(model, [Window("decoder", 0, 1)], progress=False)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "marian"])
def test_layer_drop_baseline_gives_a_valid_smaller_model(model_type, tmp_path):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    stack = adapter.stack_names()[-1]
    layer_params = sum(p.numel() for p in adapter.layers(model, stack)[1].parameters())
    before = model.num_parameters()
    result = drop_layers(model, stack, [1, 2])
    assert adapter.num_layers(model, stack) == 2
    assert before - model.num_parameters() == 2 * layer_params
    x = tm.inputs(model)
    y = tm.output(model, x)
    assert torch.isfinite(y).all()
    save_merged(result, tmp_path / "d")
    assert torch.equal(tm.output(load_merged(tmp_path / "d").model, x), y)


@pytest.mark.slow
def test_trials_sharing_an_alignment_cache_align_once_and_merge_the_same(monkeypatch):
    from ffmerge_onnx.merging import calibration as calibrate

    model = tm.build("llama", gentle=True)
    cal = tm.calibration(model)
    window = [Window("decoder", 1, 2)]
    plain = merge(copy.deepcopy(model), window, calibration=cal, progress=False)
    passes = []
    real = calibrate.collect
    monkeypatch.setattr(calibrate, "collect", lambda *a, **k: passes.append(1) or real(*a, **k))
    cache = {}
    cached = [merge(copy.deepcopy(model), window, calibration=cal, method=m, progress=False, alignments=cache)
              for m in ("average", "regmean", "average")]  # fmt: skip
    assert len(passes) == 1 and len(cache) == 1
    for key in plain.permutations:
        assert torch.equal(plain.permutations[key], cached[2].permutations[key])
    x = tm.inputs(model)
    assert torch.equal(tm.output(plain.model, x), tm.output(cached[2].model, x))
