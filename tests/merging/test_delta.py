"""The `delta` merge method: a shared FF plus each layer's low-rank corrections."""

from __future__ import annotations

import copy
import itertools

import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import Window, adapter_for, load_merged, merge, save_merged
from ffmerge_onnx.errors import InputError
from ffmerge_onnx.merging import ff_param_count
from ffmerge_onnx.merging.lowrank import LowRankDelta

# Conv1D with biases, gated, Linear with biases, gate and up fused in one matrix
FAMILIES = ["gpt2", "llama", "bert", pytest.param("phi3", marks=pytest.mark.slow)]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def window(model):
    return [Window(adapter_for(model).stack_names()[-1], 1, 3)]


@pytest.mark.parametrize(
    "init,rounds,joint",
    [
        ("fit", 0, {}),
        ("fit", 1, {}),
        ("svd", 0, {}),
        ("fit", 0, {"shared_rounds": 2, "ranks": "pooled"}),
        ("fit", 0, {"shared_rounds": 2, "ranks": "pooled", "weighting": "none"}),
    ],
)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_full_rank_delta_reproduces_every_original_layer(model_type, init, rounds, joint):
    original = tm.build(model_type, gentle=True)
    x = tm.inputs(original)
    want = tm.output(original, x)
    model = copy.deepcopy(original)
    result = merge(model, window(model), calibration=tm.calibration(model, n=64), method="delta",
                   params={"rank": 48, "init": init, "rounds": rounds, **joint}, progress=False)  # fmt: skip
    adapter = adapter_for(model)
    plain = tm.output(merge(copy.deepcopy(original), window(model), calibration=tm.calibration(model, n=64),
                            method="regmean", progress=False).model, x)  # fmt: skip
    assert rel_err(plain, want) > 1e-2  # merging three random FFs changes the output
    assert rel_err(tm.output(model, x), want) < 1e-4  # the corrections undo it
    layers = adapter.layers(model, window(model)[0].stack)
    assert isinstance(adapter.projection(layers[2], "out"), LowRankDelta)
    assert adapter.ff_params(layers[1])["fc_out.weight"] is adapter.ff_params(layers[3])["fc_out.weight"]
    assert result.manifest.windows[0].deltas == (
        {"in": 32, "gate": 32, "out": 32} if adapter.gated else {"in": 32, "out": 32}
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_rank_zero_delta_is_the_plain_merge(model_type):
    base = tm.build(model_type, gentle=True)
    cal = tm.calibration(base, n=64)
    a = merge(copy.deepcopy(base), window(base), calibration=cal, method="delta", params={"rank": 0}, progress=False)
    b = merge(copy.deepcopy(base), window(base), calibration=cal, method="regmean", progress=False)
    x = tm.inputs(base)
    assert torch.equal(tm.output(a.model, x), tm.output(b.model, x))
    assert not a.delta_parameters() and a.manifest.windows[0].deltas == {}


def test_parameters_removed_count_the_corrections_and_the_budget_holds():
    model = tm.build("llama", gentle=True)
    before = model.num_parameters()
    ff = ff_param_count(model, "decoder")
    result = merge(model, window(model), calibration=tm.calibration(model, n=64), method="delta",
                   params={"budget": 0.3}, progress=False)  # fmt: skip
    deltas = sum(p.numel() for p in result.delta_parameters())
    assert 0 < deltas <= 0.3 * 2 * ff  # 2 FF sublayers merged away (k = 3)
    assert before - model.num_parameters() == 2 * ff - deltas
    assert result.merged_away_bytes() == 4 * (2 * ff - deltas)
    out = result.manifest.windows[0].deltas["out"]  # pooled: one rank per layer, the window's total fixed
    rank = sum(out) / 3 if isinstance(out, list) else out  # the largest mean rank within the budget
    assert 3 * (rank + 1) * 3 * (32 + 48) > 0.3 * 2 * ff


@pytest.mark.parametrize("ranks", ["equal", "pooled"])
def test_save_and_load_keep_the_corrections_and_the_ties(tmp_path, ranks):
    model = tm.build("gpt2", gentle=True)
    result = merge(model, window(model), calibration=tm.calibration(model, n=64), method="delta",
                   params={"rank": 4, "ranks": ranks, "shared_rounds": 1}, progress=False)  # fmt: skip
    recorded = result.manifest.windows[0].deltas
    if ranks == "pooled":  # one rank per layer, summing to what equal ranks would spend
        per_layer = [r if isinstance(r, list) else [r] * 3 for r in recorded.values()]
        assert all(len(r) == 3 and sum(r) == 12 and min(r) >= 1 for r in per_layer), recorded
        assert any(len(set(r)) > 1 for r in per_layer), recorded
    else:
        assert recorded == {"in": 4, "out": 4}
    save_merged(result, tmp_path / "m")
    loaded = load_merged(tmp_path / "m")
    x = tm.inputs(model)
    assert torch.equal(tm.output(loaded.model, x), tm.output(model, x))
    assert loaded.model.num_parameters() == model.num_parameters()
    adapter = adapter_for(loaded.model)
    layers = adapter.layers(loaded.model, "decoder")
    assert adapter.ff_params(layers[1])["fc_in.weight"] is adapter.ff_params(layers[2])["fc_in.weight"]
    assert layers[1].mlp.c_fc.delta_up is not layers[2].mlp.c_fc.delta_up


def test_bad_parameters_are_refused():
    model = tm.build("gpt2")
    cal = tm.calibration(model)
    for params, message in (({"budget": 1.5}, "delta-budget"), ({"base": "zip"}, "base must be one of"),
                            ({"init": "x"}, "init must be one of"), ({"colour": 1}, "takes rank"),
                            ({"ranks": "some"}, "ranks must be one of"), ({"shared_rounds": -1}, "0 or more"),
                            ({"weighting": "loud"}, "weighting must be one of")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            merge(copy.deepcopy(model), window(model), calibration=cal, method="delta", params=params, progress=False)


def test_recovery_can_train_only_the_corrections():
    from ffmerge_onnx.quality.finetune import finetune

    original = tm.build("llama")
    model = copy.deepcopy(original)
    result = merge(model, window(model), calibration=tm.calibration(model, n=64), method="delta",
                   params={"rank": 2}, progress=False)  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = list(tm.calibration(original))
    scores = iter([3.0, 2.0, 1.0, 0.5])  # improving, so the last state is kept
    finetune(model, batches, lambda m: next(scores), higher_is_better=False, steps=3, lr=1e-2, eval_every=1, objective="kl",
             original=original, train="deltas", shared=result.shared_parameters(),
             deltas=result.delta_parameters(), progress=False)  # fmt: skip
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".delta_" in n for n in moved)


def _objective(targets, covs, w, qs, scales=None):
    scales = scales or [torch.ones(len(w), dtype=w.dtype)] * len(targets)
    return sum(
        float(((e := (d := s[:, None] * (t - w)) - q @ (q.T @ d)) @ c * e).sum())
        for t, q, c, s in zip(targets, qs, covs, scales)
    )


@pytest.mark.parametrize("pooled,scaled", [(False, False), (True, False), (True, True)])
def test_the_joint_shared_fit_lowers_the_corrections_error_every_round(pooled, scaled):
    from ffmerge_onnx.merging.methods.delta import _joint, _subspaces

    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=g, dtype=torch.float64)
    targets = [base + 0.5 * torch.randn(24, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    covs = []
    for scale in (1.0, 3.0, 0.3, 1.5):  # layers see inputs of different sizes and shapes
        x = (
            scale
            * torch.randn(200, 16, generator=g, dtype=torch.float64)
            @ torch.randn(16, 16, generator=g, dtype=torch.float64)
        )
        covs.append(x.T @ x / len(x))
    w = sum(t @ c for t, c in zip(targets, covs)) @ torch.linalg.inv(sum(covs))  # the Gram-weighted mean
    # output rows that count unequally, differently in each layer
    scales = [torch.rand(24, generator=g, dtype=torch.float64) * 2 + 0.1 for _ in targets] if scaled else None

    def error(w):
        return _objective(targets, covs, w, _subspaces([t - w for t in targets], covs, 3, pooled, scales), scales)

    errors = [error(w)]
    for _ in range(4):
        w = _joint(targets, covs, w, 3, 1, ridge=0.0, pooled=pooled, scales=scales)
        errors.append(error(w))
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.9 * errors[0]


def test_pooled_ranks_spend_the_same_total_rank_where_it_removes_the_most_error():
    from ffmerge_onnx.merging.methods.delta import _subspaces

    g = torch.Generator().manual_seed(1)
    covs = [torch.eye(16, dtype=torch.float64)] * 3
    diffs = [s * torch.randn(24, 16, generator=g, dtype=torch.float64) for s in (0.1, 1.0, 1.5)]
    w = torch.zeros(24, 16, dtype=torch.float64)
    equal, pooled = (_subspaces(diffs, covs, 4, p) for p in (False, True))
    assert [q.shape[1] for q in equal] == [4, 4, 4]
    ranks = [q.shape[1] for q in pooled]
    assert sum(ranks) == 12 and ranks[0] == 1 and ranks[2] > ranks[1] > 1
    for q in pooled:
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-10)
    assert _objective(diffs, covs, w, pooled) < _objective(diffs, covs, w, equal)


def test_output_weighting_is_each_units_first_order_effect_on_the_ff_output():
    from ffmerge_onnx.merging.methods.delta import _importance

    model = tm.build("llama")
    fit = tm.shuffled_window(model, "decoder", calibration=tm.calibration(model, n=16))
    aligned = fit.aligned
    cap = fit.capture()
    got = _importance(fit, cap, ["in", "gate"])
    for pos, i in enumerate((1, 2, 3)):  # h = silu(gate) * up, in the aligned order
        a = aligned[pos]
        x = cap.input_rows(i, bias=False)
        gate, up = x @ a["gate.weight"].double().T, x @ a["fc_in.weight"].double().T
        sig = torch.sigmoid(gate)
        norms = (a["fc_out.weight"].double() ** 2).sum(0)
        want = {"in": (torch.nn.functional.silu(gate) ** 2).mean(0) * norms,
                "gate": ((sig * (1 + gate * (1 - sig)) * up) ** 2).mean(0) * norms}  # fmt: skip
        for p, w in want.items():
            torch.testing.assert_close(got[p][pos] ** 2, w.clamp_min(1e-6 * float(w.max())), rtol=1e-4, atol=0)
