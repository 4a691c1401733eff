"""ONNX pipeline on every family's tiny model: sharing survives simplification, outputs match."""

import json
import shutil

import numpy as np
import onnx
import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import Window, adapter_for, merge, task_of
from ffmerge_onnx.cli import main
from ffmerge_onnx.errors import EXIT_VALIDATION, OutputExistsError
from ffmerge_onnx.onnx.build import BuildOptions, build, untied_copy
from ffmerge_onnx.onnx.files import sharing
from ffmerge_onnx.onnx.validate import check_outputs
from ffmerge_onnx.pipeline import ExportOptions, export
from ffmerge_onnx.runtime import session_settings

SLOW = pytest.mark.slow
# phi3: gate and up fused in one matrix
FAMILIES = [
    "gpt2",
    "vit",
    "bert",
    "bert-cls",
    pytest.param("marian", marks=SLOW),
    "llama",
    pytest.param("phi3", marks=SLOW),
]


def merged(model_type, windows=((1, 3),)):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    return merge(
        model,
        [Window(s, a, b) for s in adapter.stack_names() for a, b in windows],
        calibration=tm.calibration(model),
        progress=False,
    )


def shared_names(result):
    return {name for w in result.manifest.windows for name in w.shared.values()}


# every family runs both modes in the full suite; the quick subset keeps fold on GPT-2,
# gather on the gated FF
GATHER_QUICK = ("llama",)
FOLD_SLOW = ("llama", "bert-cls", "bert", "vit")  # bert: gather in the convert test; vit: the image accuracy test


def _modes():
    for f in FAMILIES:
        name, marks = (f.values[0], list(f.marks)) if hasattr(f, "values") else (f, [])
        yield pytest.param("fold", name, marks=marks or ([SLOW] if name in FOLD_SLOW else []))
        yield pytest.param("gather", name, marks=marks or ([] if name in GATHER_QUICK else [pytest.mark.slow]))


@pytest.mark.parametrize("mode, model_type", list(_modes()))
def test_each_merged_tensor_exists_once_and_outputs_match(model_type, mode, tmp_path):
    merge_result = merged(model_type)
    result = build(merge_result, tmp_path, BuildOptions(mode=mode))
    assert all("SharingSafeSimplify" in c for c in result.passes.values())
    names_needed = shared_names(merge_result)
    found = set()
    for f in [f for f in result.files if f.endswith(".onnx")]:
        stats = sharing(tmp_path / f)
        assert stats["duplicated_tensors"] == 0
        inits = {t.name for t in onnx.load(str(tmp_path / f)).graph.initializer}
        found |= {n for n in names_needed if n in inits or n + ".T" in inits}
        if mode == "gather":
            assert stats["order_gathers"] > 0
    assert found == names_needed
    # outputs (CPU) against PyTorch in both modes, through the validator
    check = check_outputs(tmp_path, merge_result.model, "cpu", session_settings(mode)["session_config_entries"])
    assert check.status == "pass", check.detail
    assert max(r["max_abs"] for r in check.detail["rows"]) < 1e-4


@pytest.mark.slow  # quick subset under 3 minutes
def test_unmerged_export_keeps_k_copies_and_detect_shares_them(tmp_path):
    """The paper's practice (k equal copies) and how `share` repairs it without a manifest."""
    result = merged("gpt2")
    build(untied_copy(result), tmp_path / "u", BuildOptions(share=False))
    assert (
        sharing(tmp_path / "u" / "model.onnx")["duplicated_tensors"] == 2 * 2
    )  # 2 FF weights x (k-1); biases are under the 1024-element threshold
    assert main(["share", str(tmp_path / "u" / "model.onnx"), "-o", str(tmp_path / "s.onnx")]) == 0
    assert sharing(tmp_path / "s.onnx")["duplicated_tensors"] == 0
    assert (tmp_path / "s.onnx").stat().st_size < (tmp_path / "u" / "model.onnx").stat().st_size


@pytest.mark.slow  # quick subset under 3 minutes
def test_detect_finds_permuted_copies(tmp_path):
    """A checkpoint whose layers store the shared FF in their own neuron order."""
    import onnxruntime as ort

    from ffmerge_onnx.merging import permute_ff

    result = merged("llama")
    model = result.model
    clone = untied_copy(result)
    adapter = adapter_for(clone.model)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(5))
    permute_ff(adapter, adapter.layers(clone.model, "decoder")[2], perm)
    build(clone, tmp_path / "u", BuildOptions(share=False))
    assert main(["share", str(tmp_path / "u" / "model.onnx"), "-o", str(tmp_path / "s.onnx")]) == 0
    x = tm.inputs(model)
    feed = {k: v.numpy() for k, v in x.items()}
    a = ort.InferenceSession(str(tmp_path / "u" / "model.onnx")).run(None, feed)[0]
    b = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, feed)[0]
    np.testing.assert_array_equal(a, b)
    g = onnx.load(str(tmp_path / "s.onnx")).graph
    assert sum(1 for n in g.node if n.op_type == "Gather" and n.input[1].endswith(".order")) == 3
    assert sharing(tmp_path / "s.onnx")["duplicated_tensors"] == 0


@pytest.mark.slow  # quick subset under 3 minutes (about 40 s each here)
def test_convert_writes_folder_and_validate_passes_then_fails_on_broken_graph(tmp_path):
    result = merged("bert")
    out = tmp_path / "out"
    report = export(result, out, ExportOptions(mode="gather"), log=lambda s: None)
    assert report["ok"]
    for name in ("model.onnx", "report.json", "report.md", "ffmerge.json", "ort_session_settings.json", "reference"):
        assert (out / name).exists(), name
    settings = json.loads((out / "ort_session_settings.json").read_text())
    # prepacking stays on (onnxruntime >= 1.23 packs a shared weight once); gather needs no settings either
    assert settings["session_config_entries"] == {}
    assert settings["environment"] == {"MALLOC_TRIM_THRESHOLD_": "131072"}
    # side by side: this tiny model was never saved, so untied copies stand in for the original
    table = report["side_by_side"]
    assert not table["original"] and table["baseline"].startswith("untied copies")
    (row,) = table["rows"].values()
    assert set(row["figures"]) == {"merged", "unmerged_defaults", "paper_practice"}
    # gather adds each permuted layer's order (int64) to the weights, and about ten small nodes per layer
    # to the graph: a few KB, visible against this tiny model's 25 KB merged away only
    assert row["weight_saving_over_away"] > 0.9 and row["file_saving_over_away"] > 0.7, row
    checks = {c["name"]: c for c in report["checks"]}
    assert (
        checks["memory_vs_unmerged"]["status"] == "skipped"
        and "too small" in checks["memory_vs_unmerged"]["detail"]["reason"]
    )
    assert "| model.onnx prefill | unmerged, onnxruntime defaults |" in (out / "report.md").read_text()
    assert (
        main(["validate", str(out), "--no-compare", "--json", str(tmp_path / "v.json"), "--providers", "cpu,cuda"]) == 0
    )
    checks = {c["name"]: c["status"] for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["outputs[cpu]"] == "pass" and checks["sharing"] == "pass"
    assert checks.get("outputs[cuda]") in ("skipped", "pass")
    # a near-copy of a merged tensor for one layer (outputs still match): the sharing gate has no
    # allowance a small model could hide it in
    near = tmp_path / "near"
    shutil.copytree(out, near)
    m = onnx.load(str(near / "model.onnx"))
    t = next(t for t in m.graph.initializer if t.name.startswith("ffmerge.") and "fc_in.weight" in t.name)
    a = onnx.numpy_helper.to_array(t)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.nextafter(a, np.float32(1)), "near_copy"))
    user = next(n for n in m.graph.node if t.name in n.input)
    user.input[list(user.input).index(t.name)] = "near_copy"
    onnx.save(m, str(near / "model.onnx"))
    assert main(["validate", str(near), "--no-compare", "--json", str(tmp_path / "n.json")]) == EXIT_VALIDATION
    checks = {c["name"]: c for c in json.loads((tmp_path / "n.json").read_text())["checks"]}
    assert checks["outputs[cpu]"]["status"] == "pass" and checks["sharing"]["status"] == "fail"
    assert checks["sharing"]["detail"]["initializers_over_params_and_buffers"] > 1.01
    # break the graph: perturb one shared weight above tolerance
    m = onnx.load(str(out / "model.onnx"))
    t = next(t for t in m.graph.initializer if t.name.startswith("ffmerge.") and "fc_out.weight" in t.name)
    a = onnx.numpy_helper.to_array(t).copy()
    a[0, 0] += 0.5
    t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    onnx.save(m, str(out / "model.onnx"))
    assert main(["validate", str(out), "--no-compare"]) == EXIT_VALIDATION


def test_convert_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path):
    result = merged("gpt2")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export(result, tmp_path / "exists", ExportOptions(), log=lambda s: None)
    assert list((tmp_path / "exists").iterdir()) == []
    leftovers = [p for p in tmp_path.iterdir() if p.name != "exists"]
    assert leftovers == []


@pytest.mark.slow  # quick subset under 3 minutes
def test_external_data_forced(tmp_path):
    merge_result = merged("gpt2")
    result = build(merge_result, tmp_path, BuildOptions(external_data=True))
    assert result.files == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx").stat().st_size < 50_000
    assert check_outputs(tmp_path, merge_result.model, "cpu", {}).status == "pass"


def _greedy_onnx(folder, model, prompt, steps):
    """Greedy decoding through the with-past files, the way an ORTModel drives them; each step's logits."""
    import onnxruntime as ort

    def sess(name):
        return ort.InferenceSession(str(folder / name))

    ids = prompt.numpy()
    out = []
    if task_of(model) == "causal-lm":
        s = sess("model.onnx")
        past_names = [i.name for i in s.get_inputs() if i.name.startswith("past_key_values.")]
        shape = {i.name: i.shape for i in s.get_inputs()}
        past = {n: np.zeros((1, shape[n][1], 0, shape[n][3]), np.float32) for n in past_names}
        length, step = 0, ids
        for _ in range(steps):
            n = step.shape[1]
            feeds = {
                "input_ids": step,
                "attention_mask": np.ones((1, length + n), np.int64),
                "position_ids": np.arange(length, length + n)[None],
                **past,
            }
            logits, *present = s.run(None, feeds)
            past = dict(zip(past_names, present))
            length += n
            step = logits[:, -1:].argmax(-1)
            out.append(logits[0, -1])
        return out
    enc, first, later = sess("encoder_model.onnx"), sess("decoder_model.onnx"), sess("decoder_with_past_model.onnx")
    mask = np.ones_like(ids)
    hidden = enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    step = np.array([[model.config.decoder_start_token_id]])
    logits, *present = first.run(
        None, {"input_ids": step, "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
    )
    names = [i.name for i in later.get_inputs() if i.name.startswith("past_key_values.")]
    past = dict(zip(names, present))
    for _ in range(steps):
        step = logits[:, -1:].argmax(-1)
        out.append(logits[0, -1])
        logits, *present_dec = later.run(None, {"input_ids": step, "encoder_attention_mask": mask, **past})
        for n, v in zip([n for n in names if ".decoder." in n], present_dec):
            past[n] = v
    return out


def _greedy_torch_without_cache(model, prompt, steps):
    out = []
    seq = prompt if task_of(model) == "causal-lm" else torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(steps):
            if task_of(model) == "causal-lm":
                logits = model(input_ids=seq, use_cache=False).logits
            else:
                logits = model(input_ids=prompt, decoder_input_ids=seq, use_cache=False).logits
            nxt = logits[:, -1:].argmax(-1)
            out.append(logits[0, -1].numpy())
            seq = torch.cat([seq, nxt], dim=1)
    return out


@pytest.mark.parametrize(
    "model_type",
    ["gpt2", pytest.param("llama", marks=pytest.mark.slow), pytest.param("marian", marks=pytest.mark.slow)],
)
def test_kv_cache_export_matches_and_greedy_decoding_agrees(model_type, tmp_path):
    merge_result = merged(model_type)
    model = merge_result.model
    result = build(merge_result, tmp_path, BuildOptions(kv_cache=True))
    files = [f for f in result.files if f.endswith(".onnx")]
    assert files == (
        ["model.onnx"]
        if model_type != "marian"
        else ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
    )
    for f in files:
        assert sharing(tmp_path / f)["duplicated_tensors"] == 0
    layers = model.config.num_hidden_layers if model_type != "marian" else model.config.decoder_layers
    inputs = [i.name for i in onnx.load(str(tmp_path / files[-1])).graph.input]
    outputs = [o.name for o in onnx.load(str(tmp_path / files[-1])).graph.output]
    if model_type == "marian":
        assert inputs[:2] == ["input_ids", "encoder_attention_mask"]
        assert f"past_key_values.{layers - 1}.encoder.value" in inputs
        assert outputs == ["logits"] + [f"present.{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")]
    else:
        assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
        assert f"past_key_values.{layers - 1}.value" in inputs
        assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    check = check_outputs(tmp_path, model, "cpu", session_settings("fold")["session_config_entries"], kv_cache=True)
    assert check.status == "pass", check.detail
    assert {tuple(r["case"]) for r in check.detail["rows"]} >= {(1, 7, 0), (3, 1, 32)}  # empty past and one-token steps
    prompt = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = _greedy_torch_without_cache(model, prompt, 8)
    got = _greedy_onnx(tmp_path, model, prompt, 8)
    assert [int(a.argmax()) for a in got] == [int(a.argmax()) for a in expected]
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_convert_measures_against_the_original_model(tmp_path):
    """Through the CLI from a saved model: the manifest's source loads, so the baseline is the original
    (distinct weights), exported by the same pipeline and run with onnxruntime's defaults; --no-prepack
    writes the old setting."""
    model = tm.build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "cal.pt")
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "gpt2"), "-o", str(out), "--layers", "1-2", "--calibration",
                 str(tmp_path / "cal.pt"), "--calibration-tokens", "200", "--no-prepack", "--kv-cache"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["side_by_side"]["original"] and str(tmp_path / "gpt2") in report["side_by_side"]["baseline"]
    assert set(report["side_by_side"]["rows"]) == {"model.onnx prefill", "model.onnx decode"}
    assert {c["name"]: c["status"] for c in report["checks"]}["size_vs_unmerged"] == "pass"
    settings = json.loads((out / "ort_session_settings.json").read_text())
    assert settings["session_config_entries"] == {"session.disable_prepacking": "1"}


@pytest.mark.slow  # quick subset under 3 minutes
@pytest.mark.parametrize(
    "model_type,params", [("gpt2", {}), ("llama", {"ranks": "pooled", "shared_rounds": 1})]
)  # pooled: each layer its own rank
def test_delta_export_stores_the_shared_ff_once_beside_each_layers_corrections(model_type, params, tmp_path):
    """The sharing postcondition holds with the corrections beside the shared tensors; the file holds the
    unique parameters (shared FF + corrections) within 1 %; outputs match PyTorch; gather is refused."""
    from ffmerge_onnx.errors import InputError
    from ffmerge_onnx.onnx.validate import unique_param_bytes

    model = tm.build(model_type)
    adapter = adapter_for(model)
    result = merge(model, [Window(adapter.stack_names()[-1], 1, 3)], calibration=tm.calibration(model), method="delta",
                   params={"rank": 4, **params}, progress=False)  # fmt: skip
    assert not params or any(isinstance(r, list) for r in result.manifest.windows[0].deltas.values())
    built = build(result, tmp_path, BuildOptions())
    assert built.passes["model.onnx"]["ShareMerged"]  # it ran, and its ensures held
    stats = sharing(tmp_path / "model.onnx")
    assert stats["duplicated_tensors"] == 0
    inits = {t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert all(n in inits or n + ".T" in inits for n in shared_names(result))
    projections = 3 if adapter.gated else 2
    assert sum(".delta_down" in n for n in inits) == 3 * projections  # one per layer and projection
    assert abs(stats["unique_bytes"] / unique_param_bytes(model) - 1) < 0.01
    check = check_outputs(tmp_path, model, "cpu", {})
    assert check.status == "pass", check.detail
    with pytest.raises(InputError, match="use --permutations fold"):
        build(result, tmp_path / "g", BuildOptions(mode="gather"))
