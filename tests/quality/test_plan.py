"""Automatic windows and method (quality/plan.py): at least the asked reduction, the planted window found,
a method per window chosen on validation, and held-out evaluation data never read for a choice."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import tiny_models as tm
import torch
from tiny_models import plant

from ffmerge_onnx.cli import main
from ffmerge_onnx.errors import EXIT_VALIDATION, InputError, WindowError
from ffmerge_onnx.merging import ff_param_count
from ffmerge_onnx.quality import goal, plan


def test_window_sets_cover_every_split_of_the_merged_away_layers():
    score = {(0, 1): 0.9, (1, 2): 0.2, (2, 3): 0.8, (3, 4): 0.3, (0, 2): 0.1, (1, 3): 0.4, (2, 4): 0.5}
    ranked = plan.window_sets(5, 2, lambda w: sum(score[p] for p in plan.window_pairs(*w, "first")))
    sets = [ws for _, ws in ranked]
    assert len(sets) == len(set(sets))
    for ws in sets:
        assert sum(b - a for a, b in ws) == 2 and all(a < b for a, b in ws)
        assert all(ws[i][1] < ws[i + 1][0] for i in range(len(ws) - 1))  # disjoint, in order
    # one window of 3 at 3 starts, two windows of 2 at 3 placements: 0-1+2-3, 0-1+3-4, 1-2+3-4
    assert len(sets) == 6
    assert ranked[0][1] == ((0, 1), (2, 3)) and ranked[0][0] == pytest.approx(0.85)
    # the second pick is the best single window, (0.8 + 0.5) / 2, not the second best set (0-1 + 3-4: 0.6)
    assert [ws for _, ws in plan.shortlist(ranked, 2)] == [((0, 1), (2, 3)), ((2, 4),)]


def test_spread_screens_single_windows_at_every_depth():
    rows = plan.spread(30, 3, lambda w: float(w[0]), 12)
    starts = [ws[0][0] for _, ws in rows]
    assert starts[0] == 0 and starts[-1] == 26 and len(starts) == 12 and starts == sorted(set(starts))
    assert all(ws == ((a, a + 3),) and value == a / 3 for (value, ws), a in zip(rows, starts))
    assert [ws for _, ws in plan.spread(5, 2, lambda w: 0.0, 12)] == [((0, 2),), ((1, 3),), ((2, 4),)]


def test_layers_needed_removes_at_least_the_reduction():
    model = tm.build("gpt2")
    per_layer = ff_param_count(model, "decoder")
    total = model.num_parameters()
    for reduction in (0.01, per_layer / total, 1.5 * per_layer / total, 2.5 * per_layer / total):
        m = plan.layers_needed(model, reduction, ["decoder"])
        assert m * per_layer >= reduction * total * (1 - 1e-12) and (m - 1) * per_layer < reduction * total
    with pytest.raises(WindowError, match="at most 3 can go"):
        plan.layers_needed(model, 0.9, ["decoder"])
    with pytest.raises(WindowError, match=r"in \(0, 1\)"):
        plan.layers_needed(model, 0.0, ["decoder"])


def _planted_model():
    model = tm.build("llama", gentle=True)
    plant(model, "decoder", 1, 2, 0.0)  # layer 2 is a permuted copy of layer 1: merging them loses nothing
    return model


def test_choose_finds_the_planted_window_and_a_method_per_window(monkeypatch):
    model = _planted_model()
    reduction = ff_param_count(model, "decoder") / model.num_parameters()  # one layer merged away
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal, val = tm.calibration(model), list(tm.calibration(model, seed=11))
    chosen = plan.choose(model, cal, val, stacks=["decoder"], reduction=reduction, progress=False, log=lambda _: None)
    assert chosen.windows == [(1, 2)] and chosen.methods[0] in plan.CANDIDATE_METHODS
    screen = [t for t in chosen.trials if t.stage == "screen"]  # every set, average, alignments from the ranking
    best = (max if chosen.higher_is_better else min)(screen, key=lambda t: t.score)
    assert len(screen) == 3 and best.windows == [(1, 2)]
    assert {t.methods[0] for t in chosen.trials if t.stage == "method"} == set(plan.CANDIDATE_METHODS)
    assert chosen.score == pytest.approx(chosen.original_score, rel=1e-5)  # the planted copy merges exactly
    assert chosen.removed_fraction == pytest.approx(reduction)
    assert plan.Plan.from_dict(json.loads(json.dumps(chosen.to_dict()))) == chosen  # as report.json keeps it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed
    aligning = []  # apply reuses the alignment choose made on the same unchanged model
    merge_module = importlib.import_module("ffmerge_onnx.merging.merge")
    real = merge_module._alignments
    monkeypatch.setattr(merge_module, "_alignments", lambda *a, **k: aligning.append(1) or real(*a, **k))
    result = plan.apply(model, chosen, cal)
    assert not aligning and "aligned" not in chosen.to_dict()
    assert [(w.start, w.end, w.method) for w in result.manifest.windows] == [(1, 2, chosen.methods[0])]
    assert result.plan["windows"] == [(1, 2)]


def test_choose_refuses_delta_without_windows_and_needs_a_reduction():
    model = tm.build("gpt2")
    cal = tm.calibration(model)
    with pytest.raises(InputError, match="--layers A-B"):
        plan.choose(model, cal, list(cal), stacks=["decoder"], reduction=0.1, method="delta", log=lambda _: None)
    with pytest.raises(InputError, match="--reduction"):
        plan.choose(model, cal, list(cal), stacks=["decoder"], log=lambda _: None)


@pytest.fixture
def saved_lm(tmp_path):
    model = _planted_model()
    model.save_pretrained(tmp_path / "lm")
    tm.word_tokenizer().save_pretrained(tmp_path / "lm")
    for name, seed in (("cal.txt", 1), ("val.txt", 2), ("eval_a.txt", 3), ("eval_b.txt", 4)):
        (tmp_path / name).write_text(tm.word_text(400, seed=seed))
    return tmp_path, ff_param_count(model, "decoder") / model.num_parameters()


def _convert(folder, reduction, out, eval_name, *extra):
    return main(["convert", str(folder / "lm"), "--reduction", f"{reduction:.6f}", "--calibration",
                 str(folder / "cal.txt"), "--validation", str(folder / "val.txt"), "--calibration-tokens", "300",
                 "--validation-tokens", "300", "--max-loss", "0.5", "--eval-data", str(folder / eval_name),
                 "--no-compare", "-o", str(out), *extra])  # fmt: skip


@pytest.mark.slow
def test_convert_reduction_plans_on_validation_never_on_the_eval_data(saved_lm, monkeypatch):
    folder, reduction = saved_lm
    reads = []
    real = goal.evaluate

    def spy(spec, **kwargs):
        reads.append(kwargs.get("data"))
        return real(spec, **kwargs)

    monkeypatch.setattr(goal, "evaluate", spy)  # the only reader of the eval data, after the plan is fixed
    assert _convert(folder, reduction, folder / "a", "eval_a.txt") == 0
    assert _convert(folder, reduction, folder / "b", "eval_b.txt") == 0
    a, b = (json.loads((folder / x / "report.json").read_text()) for x in "ab")
    assert a["plan"] == b["plan"]  # another evaluation set, the same choices and validation scores
    assert a["plan"]["windows"] == [[1, 2]] and a["quality"]["windows"] == [f"decoder 1-2 ({a['plan']['methods'][0]})"]
    assert a["quality"]["params_removed_fraction"] >= reduction * (1 - 1e-6)
    assert a["quality"]["merged_onnx"] != b["quality"]["merged_onnx"]  # the evaluation sets do differ
    assert set(reads) == {folder / "eval_a.txt", folder / "eval_b.txt"}
    md = (folder / "a" / "report.md").read_text()
    assert "## windows and method (chosen on validation data)" in md and "## quality goal" in md


@pytest.mark.slow
def test_on_miss_best_writes_the_model_marked_and_exits_1(saved_lm, monkeypatch):
    folder, reduction = saved_lm
    real = goal.score
    monkeypatch.setattr(goal, "score", lambda *a, **k: {**real(*a, **k), "merged_onnx": math.inf})
    assert _convert(folder, reduction, folder / "miss", "eval_a.txt", "--recovery-minutes", "0.01") == EXIT_VALIDATION
    assert not (folder / "miss").exists()
    code = _convert(folder, reduction, folder / "best", "eval_a.txt", "--recovery-minutes", "0.01", "--on-miss", "best")
    assert code == EXIT_VALIDATION
    report = json.loads((folder / "best" / "report.json").read_text())
    assert report["quality"]["ok"] is False and "--recovery-minutes" in report["quality"]["advice"]
    assert (folder / "best" / "report.md").read_text().startswith("# QUALITY GOAL MISSED")
    recovery = report["quality"]["recovery"]
    assert recovery["budget_minutes"] == pytest.approx(0.01) and recovery["steps_run"] >= 1
    assert "history" not in recovery


def test_automatic_choices_refuse_bad_combinations(saved_lm, tmp_path):
    folder = saved_lm[0]
    args = ["convert", str(folder / "lm"), "--calibration", str(folder / "cal.txt"), "-o", str(tmp_path / "x")]
    assert main([*args, "--layers", "1-2", "--reduction", "0.5"]) == 2  # the window removes less than asked
    assert main([*args, "--reduction", "0.1", "--eval-data", str(folder / "cal.txt"), "--max-loss", "0.1"]) == 2
    assert main([*args, "--layers", "auto"]) == 2  # auto windows need --reduction
    assert not (tmp_path / "x").exists()
