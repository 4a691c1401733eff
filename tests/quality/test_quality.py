"""Evaluators on inputs with known answers; window search on a planted-redundancy model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_models as tm
import torch
from tiny_models import plant

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.errors import InputError
from ffmerge_onnx.onnx.build import BuildOptions, build
from ffmerge_onnx.quality.metrics import batch_perplexity, cosine_fidelity, image_accuracy, perplexity
from ffmerge_onnx.quality.plan import layers_needed
from ffmerge_onnx.quality.runners import Runner, TorchRunner, runner
from ffmerge_onnx.quality.search import fidelity, search


class Uniform(Runner):
    def __init__(self, vocab):
        self.vocab = vocab
        self.starts = []

    def __call__(self, inputs):
        ids = inputs["input_ids"]
        self.starts.append(ids.shape[1])
        return torch.zeros(*ids.shape, self.vocab)


class Oracle(Runner):
    """Knows the whole sequence: puts all mass on the true next token."""

    def __init__(self, seq, vocab):
        self.seq, self.vocab = seq, vocab
        self.windows = []

    def __call__(self, inputs):
        ids = inputs["input_ids"][0]
        n = len(self.seq)
        # find where this chunk starts in the sequence
        begin = next(b for b in range(n) if torch.equal(self.seq[b : b + len(ids)], ids))
        self.windows.append((begin, begin + len(ids)))
        logits = torch.full((1, len(ids), self.vocab), -50.0)
        for j in range(len(ids)):
            if begin + j + 1 < n:
                logits[0, j, self.seq[begin + j + 1]] = 50.0
        return logits


@pytest.mark.parametrize("window,stride", [(64, 64), (16, 8), (16, 16), (7, 3), (200, 50)])
def test_perplexity_known_answers_and_every_token_scored_once(window, stride):
    seq = torch.randperm(100, generator=torch.Generator().manual_seed(0))  # distinct tokens: chunks locate uniquely
    uniform = perplexity(Uniform(100), seq, window=window, stride=stride, progress=False)
    assert uniform.tokens == len(seq) - 1
    assert uniform.perplexity == pytest.approx(100.0, rel=1e-12)
    oracle = Oracle(seq, 100)
    result = perplexity(oracle, seq, window=window, stride=stride, progress=False)
    assert result.tokens == len(seq) - 1 and result.perplexity == pytest.approx(1.0, abs=1e-12)
    # each window scores from where the last one stopped, with >= window - stride tokens of context
    step = min(stride, window - 1)
    scored_to = 1
    for begin, end in oracle.windows:
        assert end - begin <= window and scored_to - begin >= min(scored_to, window - step)
        scored_to = end
    assert scored_to == len(seq)


@pytest.mark.slow
def test_perplexity_equals_the_model_loss_and_onnx_matches_pytorch(tmp_path):
    model = tm.build("gpt2", gentle=True)
    seq = torch.randint(3, tm.VOCAB, (60,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = model(input_ids=seq[None], labels=seq[None], use_cache=False).loss
    direct = perplexity(TorchRunner(model), seq, window=64, progress=False)
    assert direct.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    merged = tm.build("gpt2", gentle=True)
    result = merge(merged, [Window("decoder", 1, 2)], calibration=tm.calibration(merged), progress=False)
    torch_ppl = perplexity(TorchRunner(merged), seq, window=32, stride=16, progress=False)
    for kv in (False, True):
        build(result, tmp_path / str(kv), BuildOptions(kv_cache=kv))
        onnx_ppl = perplexity(runner(tmp_path / str(kv)), seq, window=32, stride=16, progress=False)
        assert onnx_ppl.perplexity == pytest.approx(torch_ppl.perplexity, rel=1e-5)
    assert batch_perplexity(
        model, [{"input_ids": seq[None], "attention_mask": torch.ones(1, 60, dtype=torch.long)}]
    ) == pytest.approx(direct.perplexity, rel=1e-9)


def test_cosine_fidelity():
    a = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    assert cosine_fidelity(a, 3 * a) == pytest.approx(1.0)
    assert cosine_fidelity(a, -a) == pytest.approx(-1.0)
    b = a.clone()
    b[:, 0] = 0
    assert cosine_fidelity(a, b) < 1.0


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
@pytest.mark.parametrize("mode", ["full", "aligned"])
def test_window_search_finds_the_planted_window(model_type, mode):
    model = tm.build(model_type, gentle=True)
    stack = adapter_for(model).stack_names()[-1]
    plant(model, stack, 2, 3, 0.0)
    cal = tm.calibration(model)
    # fidelity to the original: on random weights perplexity says nothing about a merge's damage
    score = fidelity(model, list(tm.calibration(model, seed=11)))
    result = search(model, 2, cal, score, higher_is_better=True, mode=mode, top=1, progress=False)
    assert result["best"] == [2, 3]
    assert result["best_by_alignment"] == [2, 3]
    rows = {(r["start"], r["end"]): r for r in result["rows"]}
    assert rows[(2, 3)]["align_score"] == max(r["align_score"] for r in rows.values())
    if mode == "full":
        assert all(r["score"] is not None for r in rows.values())
        # the planted window merges without loss
        original = score(model)
        assert rows[(2, 3)]["score"] == pytest.approx(original, rel=1e-5)
    else:
        assert sum(r["score"] is not None for r in rows.values()) == 1


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_best_drop_finds_the_layers_that_do_nothing(model_type):
    """Pre-norm layers whose attention and FF outputs are zero pass the residual through: dropping
    them is lossless, and the drop search must find them."""
    from ffmerge_onnx.quality.search import best_drop

    model = tm.build(model_type, gentle=True)
    adapter = adapter_for(model)
    stack = adapter.stack_names()[-1]
    with torch.no_grad():
        for i in (1, 2):
            layer = adapter.layers(model, stack)[i]
            attn_out = layer.attn.c_proj if model_type == "gpt2" else layer.self_attn.o_proj
            for module in (attn_out, adapter.projection(layer, "out")):
                for p in module.parameters():
                    p.zero_()
    score = fidelity(model, list(tm.calibration(model, seed=11)))
    result = best_drop(model, stack, 2, score, higher_is_better=True, progress=False)
    assert result["best"] == [1, 2] and len(result["rows"]) == adapter.num_layers(model, stack) - 1
    best = next(r for r in result["rows"] if r["start"] == 1)
    assert best["score"] == pytest.approx(1.0, abs=1e-6)
    assert adapter.num_layers(model, stack) == len(adapter.layers(model, stack))  # input unchanged


def test_layers_needed_counts_the_delta_corrections_kept():
    model = tm.build("llama")
    total = sum(p.numel() for p in model.parameters())
    ff = sum(p.numel() for p in adapter_for(model).ff_params(adapter_for(model).layers(model, "decoder")[0]).values())
    assert layers_needed(model, 2 * ff / total, ["decoder"]) == 2  # 2 FF sublayers removed = merging 3
    # with half of each merged-away FF kept as delta corrections, removing one FF's worth takes merging 3
    assert layers_needed(model, ff / total, ["decoder"]) == 1
    assert layers_needed(model, ff / total, ["decoder"], kept=0.5) == 2


def saved_with_text(tmp_path, model_type, words, seed):
    """A tiny model with a word tokenizer saved in tmp_path/orig, and tmp_path/text.txt."""
    model = tm.build(model_type, gentle=True)
    tok = tm.word_tokenizer()
    model.save_pretrained(tmp_path / "orig")
    tok.save_pretrained(tmp_path / "orig")
    (tmp_path / "text.txt").write_text(tm.word_text(words, seed=seed))
    return model, tok


@pytest.mark.slow  # quick subset under 3 minutes
def test_evaluate_and_search_cli(tmp_path):
    import json

    from ffmerge_onnx.cli import main
    from ffmerge_onnx.pipeline import ExportOptions, export

    model, tok = saved_with_text(tmp_path, "gpt2", words=400, seed=4)
    # search: aligned mode scores only the top window; outputs JSON and a PNG
    assert (
        main(
            [
                "search",
                str(tmp_path / "orig"),
                "--merge-count",
                "2",
                "--mode",
                "aligned",
                "--top",
                "1",
                "--calibration",
                str(tmp_path / "text.txt"),
                "--calibration-tokens",
                "300",
                "--validation",
                str(tmp_path / "text.txt"),
                "--validation-tokens",
                "300",
                "-o",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    found = json.loads((tmp_path / "s" / "search.json").read_text())
    assert found["k"] == 2 and len(found["rows"]) == 3 and found["best"] == found["best_by_alignment"]
    assert (tmp_path / "s" / "search.png").read_bytes()[:4] == b"\x89PNG"
    # evaluate: the same perplexity on the merged PyTorch checkpoint and its ONNX export
    result = merge(model, [Window("decoder", *found["best"])], calibration=tm.calibration(model), progress=False)
    export(result, tmp_path / "out", ExportOptions(compare=False), preprocessor=tok, log=lambda s: None)
    values = []
    for target in (tmp_path / "out", tmp_path / "out" / "reference"):
        assert (
            main(
                [
                    "evaluate",
                    str(target),
                    "--data",
                    str(tmp_path / "text.txt"),
                    "--window",
                    "32",
                    "--json",
                    str(tmp_path / "e.json"),
                ]
            )
            == 0
        )
        values.append(json.loads((tmp_path / "e.json").read_text())["perplexity"])
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert (
        main(["search", str(tmp_path / "orig"), "-o", str(tmp_path / "s2")]) == 2
    )  # neither --merge-count nor --reduction


@pytest.mark.slow  # quick subset under 3 minutes
def test_evaluate_image_accuracy_on_pytorch_and_onnx(tmp_path):
    """Image classifiers: accuracy over class subfolders, the same on the merged checkpoint and its export."""
    import json

    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from ffmerge_onnx.cli import main
    from ffmerge_onnx.pipeline import ExportOptions, export

    model = tm.build("vit", gentle=True)
    proc = ViTImageProcessor(do_resize=True, size={"height": 16, "width": 16})
    rng = np.random.default_rng(0)
    for label in list(model.config.label2id)[:3]:
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / label / f"{i}.png"
            )
    result = merge(model, [Window("encoder", 1, 2)], calibration=tm.calibration(model), progress=False)
    export(result, tmp_path / "out", ExportOptions(compare=False), preprocessor=proc, log=lambda s: None)
    values = []
    for target in (tmp_path / "out", tmp_path / "out" / "reference"):
        assert (
            main(["evaluate", str(target), "--data", str(tmp_path / "imgs"), "--json", str(tmp_path / "e.json")]) == 0
        )
        result = json.loads((tmp_path / "e.json").read_text())
        assert result["metric"] == "accuracy" and result["images"] == 18
        values.append(result["value"])
    # the answer by hand: argmax of the PyTorch logits against each folder's label
    want = 0
    for label in list(model.config.label2id)[:3]:
        files = sorted((tmp_path / "imgs" / label).iterdir())
        pixels = proc(images=[Image.open(f) for f in files], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want += int((model(pixel_values=pixels).logits.argmax(-1) == model.config.label2id[label]).sum())
    assert values[0] == values[1] == want / 18
    (tmp_path / "imgs" / "not-a-class").mkdir()
    assert main(["evaluate", str(tmp_path / "out"), "--data", str(tmp_path / "imgs")]) == 2


@pytest.mark.slow  # quick subset under 3 minutes
def test_evaluate_text_accuracy_on_pytorch_and_onnx(tmp_path):
    """Text classifiers: accuracy over a `text<TAB>label` file, the same on the merged checkpoint and its export."""
    import json

    from ffmerge_onnx.cli import main
    from ffmerge_onnx.pipeline import ExportOptions, export
    from ffmerge_onnx.quality.evaluate import read_labelled

    model = tm.build("bert-cls", gentle=True)
    tok = tm.word_tokenizer()
    result = merge(model, [Window("encoder", 1, 2)], calibration=tm.calibration(model), progress=False)
    texts = [tm.word_text(3 + i % 7, seed=i) for i in range(20)]  # lengths differ: batches are padded
    with torch.no_grad():
        predicted = [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    names = model.config.id2label
    wrong = {2, 5, 11}  # these rows get a label the model does not predict
    rows = [
        f"{t}\t{names[(p + 1) % 3] if i in wrong else names[p] if i % 2 else p}"  # names and ids both work
        for i, (t, p) in enumerate(zip(texts, predicted))
    ]
    (tmp_path / "data.tsv").write_text("\n".join(rows) + "\n")
    export(result, tmp_path / "out", ExportOptions(compare=False), preprocessor=tok, log=lambda s: None)
    for target in (tmp_path / "out", tmp_path / "out" / "reference"):
        assert (
            main(["evaluate", str(target), "--data", str(tmp_path / "data.tsv"), "--json", str(tmp_path / "e.json")])
            == 0
        )
        result = json.loads((tmp_path / "e.json").read_text())
        assert result["task"] == "text-classification" and result["texts"] == 20
        assert result["value"] == (20 - len(wrong)) / 20
    (tmp_path / "bad.tsv").write_text("w5 w6\tnot-a-class\n")
    with pytest.raises(InputError, match="not one of the model's classes"):
        read_labelled(tmp_path / "bad.tsv", model.config.label2id)
    assert main(["evaluate", str(tmp_path / "out"), "--data", str(tmp_path / "bad.tsv")]) == 2
    assert main(["evaluate", str(tmp_path / "out")]) == 2  # no --data: says what file to give


def _merged_llama():
    model = tm.build("llama", gentle=True)
    return merge(model, [Window("decoder", 1, 2)], calibration=tm.calibration(model), progress=False).model


def test_finetune_keeps_ties_trains_everything_and_restores_the_best_state():
    from ffmerge_onnx.quality.finetune import finetune

    model = _merged_llama()
    layers = adapter_for(model).layers(model, "decoder")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshots, scores = [], iter([5.0, 3.0, 4.0, 9.0])

    def score(m):
        snapshots.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return next(scores)

    batches = list(tm.calibration(model))
    result = finetune(model, batches, score, higher_is_better=False, steps=6, lr=1e-3, eval_every=2, progress=False)
    assert [h["step"] for h in result.history] == [0, 2, 4, 6] and result.best_step == 2
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert getattr(layers[1].mlp, name).weight is getattr(layers[2].mlp, name).weight
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], snapshots[1][n]) for n in now)  # the best state (step 2) is restored
    changed = [n for n in now if not torch.equal(now[n], before[n])]
    assert any("mlp" in n for n in changed) and any("self_attn" in n for n in changed)


def test_finetune_resumes_where_it_stopped(tmp_path):
    from ffmerge_onnx.quality.finetune import finetune

    batches = list(tm.calibration(tm.build("llama")))

    def score(m):
        return batch_perplexity(m, batches[:1])

    a = _merged_llama()
    finetune(a, batches, score, higher_is_better=False, steps=8, lr=1e-3, eval_every=4, progress=False)
    b = _merged_llama()
    finetune(b, batches, score, higher_is_better=False, steps=4, lr=1e-3, eval_every=4, output=tmp_path, progress=False)
    resumed = finetune(
        b, batches, score, higher_is_better=False, steps=8, lr=1e-3, eval_every=4, output=tmp_path, progress=False
    )
    assert [h["step"] for h in resumed.history] == [0, 4, 8]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_finetune_stops_at_its_time_budget_and_records_training_seconds():
    from ffmerge_onnx.quality.finetune import finetune

    model = _merged_llama()
    batches = list(tm.calibration(model))
    result = finetune(
        model,
        batches,
        lambda m: 1.0,
        higher_is_better=False,
        steps=1000,
        lr=1e-3,
        eval_every=50,
        progress=False,
        budget_s=1e-9,
    )
    assert [h["step"] for h in result.history] == [0, 1]
    assert result.history[0]["seconds"] == 0.0 < result.history[1]["seconds"] < 60


@pytest.mark.parametrize("model_type", ["bert", "bert-cls"])  # the classifier is scored on its logits
def test_distill_objective_moves_a_merged_encoder_toward_the_original(model_type):
    import copy

    from ffmerge_onnx.quality.finetune import finetune

    original = tm.build(model_type)
    model = copy.deepcopy(original)
    merge(model, [Window("encoder", 0, 3)], align="none", progress=False)  # 4 unrelated FFs averaged: far off
    batches = list(tm.calibration(original))
    score = fidelity(original, batches)
    start = score(model)
    result = finetune(
        model,
        batches,
        score,
        higher_is_better=True,
        steps=30,
        lr=1e-3,
        eval_every=10,
        objective="distill",
        original=original,
        progress=False,
    )
    assert start < 0.7 and result.best_score > 0.95 and score(model) == pytest.approx(result.best_score)


def test_merge_cli_with_recovery_finetune_records_it_and_reloads(tmp_path):
    import json

    from ffmerge_onnx import load_merged
    from ffmerge_onnx.cli import main

    saved_with_text(tmp_path, "llama", words=600, seed=5)
    assert (
        main(
            [
                "merge",
                str(tmp_path / "orig"),
                "-o",
                str(tmp_path / "m"),
                "--layers",
                "1-2",
                "--calibration",
                str(tmp_path / "text.txt"),
                "--calibration-tokens",
                "300",
                "--finetune-steps",
                "4",
                "--lr",
                "1e-3",
                "--finetune-data",
                str(tmp_path / "text.txt"),
                "--finetune-tokens",
                "300",
                "--finetune-objective",
                "kl",
                "--finetune-train",
                "merged",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "m" / "ffmerge.json").read_text())["finetune"]
    assert record["steps"] == 4 and record["objective"] == "kl" and record["train"] == "merged"
    assert record["rows"] == 2  # a causal LM's default: small steps
    assert record["score"] == "perplexity"
    reloaded = load_merged(tmp_path / "m").model  # the fingerprint follows the fine-tuned weights
    layers = adapter_for(reloaded).layers(reloaded, "decoder")
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight


@pytest.mark.parametrize("train", ["merged", "merged+norms"])
@pytest.mark.parametrize("objective", ["kl", "kl+layers"])
def test_distillation_recovery_trains_only_what_the_merge_changed(train, objective):
    import copy

    from ffmerge_onnx.quality.finetune import finetune

    original = tm.build("llama")
    model = copy.deepcopy(original)
    shared = merge(
        model, [Window("decoder", 1, 2)], calibration=tm.calibration(model), progress=False
    ).shared_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = list(tm.calibration(original))

    def kl_to_original(m):
        with torch.no_grad():
            total = 0.0
            for b in batches:
                a = torch.log_softmax(original(input_ids=b["input_ids"], use_cache=False).logits, -1)
                c = torch.log_softmax(m(input_ids=b["input_ids"], use_cache=False).logits, -1)
                total += float(torch.nn.functional.kl_div(c, a, log_target=True, reduction="batchmean"))
            return total

    start = kl_to_original(model)
    result = finetune(
        model,
        batches,
        kl_to_original,
        higher_is_better=False,
        steps=20,
        lr=1e-3,
        eval_every=5,
        objective=objective,
        original=original,
        train=train,
        shared=shared,
        progress=False,
    )
    assert result.best_score < 0.8 * start
    layers = adapter_for(model).layers(model, "decoder")
    assert layers[1].mlp.down_proj.weight is layers[2].mlp.down_proj.weight
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        expected = ("layers.1.mlp" in n) or (train == "merged+norms" and "norm" in n)
        assert moved == expected, n


def test_from_merge_recovery_freezes_what_runs_before_the_first_merged_layer_in_smaller_steps():
    """train=from-merge on a llama merged at 2-3: the embeddings and layers 0-1 stay as they were (their
    backward pass is skipped), the rest trains; rows=1 turns 6 batches of 4 rows into 24 steps' worth."""
    import copy

    from ffmerge_onnx.quality.finetune import earlier_parameters, recover

    original = tm.build("llama")
    model = copy.deepcopy(original)
    result = merge(model, [Window("decoder", 2, 3)], calibration=tm.calibration(model), progress=False)
    batches = list(tm.calibration(original))
    layers = adapter_for(model).layers(model, "decoder")
    earlier = earlier_parameters(model, result.first_merged_layers(), batches[0])
    names = {n for n, p in model.named_parameters() if id(p) in earlier}
    assert names == {n for n, _ in model.named_parameters() if "embed" in n or ".layers.0." in n or ".layers.1." in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = recover(result, original, batches, batches, steps=24, lr=1e-3, eval_every=24, train="from-merge", rows=1,
                  progress=False)  # fmt: skip
    assert out.history[-1]["step"] == 24 and result.manifest.finetune["rows"] == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in names), n
    assert layers[2].mlp.up_proj.weight is layers[3].mlp.up_proj.weight
    with pytest.raises(InputError, match="needs a merged model"):
        recover(type(result).unchanged(copy.deepcopy(original)), original, batches, batches, steps=1,
                train="from-merge", progress=False)  # fmt: skip


def test_layer_distillation_matches_each_layer_to_the_original_past_the_dropped_ones():
    """kl+layers on a model whose layers 1-2 do nothing: dropping them loses nothing, so the loss is
    zero when layers after the gap are matched to the original's shifted layers (and not otherwise)."""
    import copy

    from ffmerge_onnx import drop_layers
    from ffmerge_onnx.quality.finetune import _kl_layers_loss, layer_map

    original = tm.build("llama", gentle=True)
    layers = adapter_for(original).layers(original, "decoder")
    with torch.no_grad():
        for i in (1, 2):
            layers[i].self_attn.o_proj.weight.zero_()
            layers[i].mlp.down_proj.weight.zero_()
    dropped = drop_layers(copy.deepcopy(original), "decoder", [1, 2]).model
    merged = merge(
        copy.deepcopy(original), [Window("decoder", 2, 3)], calibration=tm.calibration(original), progress=False
    ).model
    assert layer_map(dropped, original, {1, 2}) == [0, 1, 4]
    assert layer_map(merged, original) == [0, 1, 2, 3, 4]
    batch = tm.inputs(original)
    with torch.no_grad():
        assert float(_kl_layers_loss(original, {1, 2})(dropped, batch)) < 1e-10
        other = drop_layers(copy.deepcopy(original), "decoder", [0, 1]).model  # layer 0 does something
        assert layer_map(other, original, {0, 1}) == [0, 3, 4]
        assert float(_kl_layers_loss(original, {0, 1})(other, batch)) > 1e-3
    with pytest.raises(InputError, match="do not line up"):  # no record of the gap: the layers cannot be lined up
        _kl_layers_loss(original)(dropped, batch)


def test_translation_scores_known_answers():
    from ffmerge_onnx.errors import InputError
    from ffmerge_onnx.quality.metrics import translation_scores

    refs = ["the cat sat on the mat today", "a dog ran in the park after lunch"]
    same = translation_scores(refs, refs)
    assert same["BLEU"] == pytest.approx(100.0) and same["chrF"] == pytest.approx(100.0)
    none = translation_scores(["xq zv", "wk yj"], refs)
    assert none["BLEU"] == pytest.approx(0.0, abs=1e-9) and none["chrF"] < 5
    half = translation_scores(["the cat sat on the mat", "a cat ran in the street after dinner"], refs)
    assert 0 < half["BLEU"] < 100 and none["chrF"] < half["chrF"] < 100
    with pytest.raises(InputError, match="2 references"):
        translation_scores(["x"], refs)


def test_read_pairs(tmp_path):
    from ffmerge_onnx.errors import InputError
    from ffmerge_onnx.quality.translate import read_pairs

    f = tmp_path / "pairs.tsv"
    f.write_text("Hallo Welt\tHello world\n\nDanke\tThanks\n", encoding="utf-8")
    assert read_pairs(f) == (["Hallo Welt", "Danke"], ["Hello world", "Thanks"])
    f.write_text("no tab here\n")
    with pytest.raises(InputError, match="pairs.tsv:1"):
        read_pairs(f)


@pytest.mark.slow
def test_greedy_translation_loop_matches_generate_and_the_onnx_export(tmp_path):
    """One greedy loop for PyTorch and ONNX: equal to transformers' generate on the merged model,
    and the exported encoder/decoder give the same tokens."""
    from ffmerge_onnx.quality.runners import OnnxSeq2Seq, TorchSeq2Seq
    from ffmerge_onnx.quality.translate import greedy_ids

    model = tm.build("marian")
    result = merge(
        model,
        [Window(s, 1, 3) for s in adapter_for(model).stack_names()],
        calibration=tm.calibration(model),
        progress=False,
    )
    model.generation_config.eos_token_id = 2
    model.generation_config.bad_words_ids = [[0]]  # never the pad/start token, as Marian's config says
    model.generation_config.forced_eos_token_id = None  # the loop does not force eos at the length limit
    batch = tm.inputs(model, batch=3, seq=7)
    torch_model = TorchSeq2Seq(model)
    assert (torch_model.ids.start, torch_model.ids.eos, torch_model.ids.forbid) == (0, 2, (0,))
    got = greedy_ids(torch_model, batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    with torch.no_grad():
        ref = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            do_sample=False,
            num_beams=1,
            max_new_tokens=10,
            min_length=0,
        )
    expected = []
    for row in ref[:, 1:].tolist():
        expected.append(row[: row.index(2) + 1] if 2 in row else row)
    assert got == expected
    assert all(0 not in row for row in got) and max(len(r) for r in got) > 1
    build(result, tmp_path, BuildOptions())
    model.config.save_pretrained(tmp_path)
    model.generation_config.save_pretrained(tmp_path)
    assert greedy_ids(OnnxSeq2Seq(tmp_path), batch["input_ids"], batch["attention_mask"], max_new_tokens=10) == got


def test_linear_schedule_warms_up_then_falls_to_zero_by_steps_or_time_budget():
    from ffmerge_onnx.quality.finetune import lr_factor

    assert [lr_factor(s, 4, 100, 0.0, None, "constant") for s in (1, 2, 4, 50, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 4, 9, 0.0, None, "linear") for s in (1, 4, 7, 9)] == pytest.approx([0.25, 6 / 9, 3 / 9, 1 / 9])
    # with a time budget the rate reaches zero when the time is spent, whatever the step count
    assert lr_factor(10, 4, 10**9, 45.0, 60.0, "linear") == pytest.approx(0.25)
    assert lr_factor(10, 4, 10**9, 61.0, 60.0, "linear") == 0.0
    assert lr_factor(10, 4, 10**9, 45.0, 60.0, "constant") == 1.0


def test_finetune_applies_the_schedule_to_the_optimizer(monkeypatch):
    from ffmerge_onnx.quality.finetune import finetune

    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    model = _merged_llama()
    batches = list(tm.calibration(model))
    finetune(
        model,
        batches,
        lambda m: 1.0,
        higher_is_better=False,
        steps=20,
        lr=1e-3,
        eval_every=50,
        progress=False,
        schedule="linear",
    )
    # warmup is 2 steps here (steps // 10), then 1e-3 * (1 - (step - 1) / 20)
    assert seen == pytest.approx([5e-4] + [1e-3 * (1 - (s - 1) / 20) for s in range(2, 21)])
    with pytest.raises(InputError, match="schedule must be one of"):
        finetune(model, batches, lambda m: 1.0, higher_is_better=False, steps=2, progress=False, schedule="cosine")


def test_image_accuracy_counts_right_answers():
    from transformers import ViTImageProcessor

    class Oracle(torch.nn.Module):  # predicts the class from the mean pixel
        def forward(self, pixel_values):
            return torch.nn.functional.one_hot((pixel_values.mean((1, 2, 3)) > 0).long(), 2).float()

    proc = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    images = np.concatenate([np.zeros((5, 8, 8), np.uint8), np.full((5, 8, 8), 255, np.uint8)])
    labels = np.array([0] * 5 + [1] * 5)
    run = lambda inputs: Oracle()(**inputs)
    assert image_accuracy(run, proc, images, labels, batch_size=3, progress=False) == 1.0
    labels[:2] = 1
    assert image_accuracy(run, proc, images, labels, batch_size=4, progress=False) == 0.8
