"""convert --max-loss: the exported model and the original scored on held-out data; a met goal is
reported, a missed one writes nothing and exits 1 with the shortfall and what would help."""

from __future__ import annotations

import json

import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import errors
from ffmerge_onnx.cli import main
from ffmerge_onnx.quality import goal
from ffmerge_onnx.quality.evaluate import evaluate


@pytest.fixture
def tiny_lm(tmp_path):
    tm.build("gpt2").save_pretrained(tmp_path / "gpt2")
    tm.word_tokenizer().save_pretrained(tmp_path / "gpt2")
    cal = tmp_path / "cal.pt"
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), cal)
    text = tmp_path / "eval.txt"
    text.write_text(tm.word_text(300, seed=7))
    return tmp_path / "gpt2", cal, text


def convert_args(model, cal, text, out, max_loss):
    return ["convert", str(model), "--layers", "1-2", "--calibration", str(cal), "--calibration-tokens", "200",
            "--max-loss", str(max_loss), "--eval-data", str(text), "--no-compare", "-o", str(out)]  # fmt: skip


@pytest.mark.slow
def test_a_met_goal_is_reported_with_the_three_scores(tiny_lm, tmp_path):
    model, cal, text = tiny_lm
    out = tmp_path / "out"
    assert main(convert_args(model, cal, text, out, 0.9)) == 0
    report = json.loads((out / "report.json").read_text())
    q = report["quality"]
    assert q["metric"] == "perplexity" and q["ok"] and q["max_loss"] == 0.9 and q["data"] == str(text)
    assert q["original"] == pytest.approx(evaluate(str(model), data=text, progress=False)["value"], rel=1e-9)
    assert q["merged_onnx"] == pytest.approx(q["merged_pytorch"], rel=1e-4)  # the same model, two runtimes
    assert q["relative_loss"] == pytest.approx(q["merged_onnx"] / q["original"] - 1)
    method = report["plan"]["methods"][0]  # --method auto, the default: chosen on validation data
    assert q["windows"] == [f"decoder 1-2 ({method})"] and 0 < q["params_removed_fraction"] < 0.5
    assert "## quality goal" in (out / "report.md").read_text()


@pytest.mark.slow  # quick subset under 3 minutes
def test_a_missed_goal_writes_nothing_and_states_the_shortfall(tiny_lm, tmp_path, monkeypatch, capsys):
    model, cal, text = tiny_lm
    real = goal.score

    def worse(*args, **kwargs):  # the same scores, with the ONNX model's perplexity 30 % above the original's
        scores = real(*args, **kwargs)
        return {**scores, "merged_onnx": scores["original"] * 1.3}

    monkeypatch.setattr(goal, "score", worse)
    out = tmp_path / "out"
    assert main(convert_args(model, cal, text, out, 0.1)) == errors.EXIT_VALIDATION
    err = " ".join(capsys.readouterr().err.split())
    assert "quality goal missed" in err and "loss 30.00% exceeds the goal 10.00% by 20.00% points" in err
    assert "--recovery-minutes" in err and not out.exists()


@pytest.mark.parametrize(
    ("metric", "original", "merged", "loss"),
    [("perplexity", 20.0, 22.0, 0.10), ("accuracy", 0.9, 0.81, 0.10), ("embedding cosine to original", 1.0, 0.95, 0.05),
     ("BLEU", 30.0, 33.0, -0.10)],
)  # fmt: skip
def test_relative_loss_follows_the_metric_direction(metric, original, merged, loss):
    assert goal.relative_loss(metric, original, merged) == pytest.approx(loss)


def test_goal_inputs_are_checked_before_any_work(tmp_path):
    with pytest.raises(errors.InputError, match=r"in \[0, 1\)"):
        goal.check_goal_inputs("causal-lm", 1.5, None)
    with pytest.raises(errors.InputError, match="needs --eval-data"):
        goal.check_goal_inputs("seq2seq-lm", 0.05, None)
    with pytest.raises(errors.InputError, match="does not exist"):
        goal.check_goal_inputs("causal-lm", 0.05, tmp_path / "missing.txt")
