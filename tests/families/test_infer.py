"""Adapter inference: it reproduces every reviewed adapter, infers the model types no JSON describes,
refuses the unsafe ones with the reason, and those it infers go through merge -> ONNX -> validate."""

from __future__ import annotations

import json
import re

import pytest
import tiny_models as tm

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.cli import main
from ffmerge_onnx.errors import EXIT_USAGE, UnsupportedArchitectureError
from ffmerge_onnx.families.adapter import registered
from ffmerge_onnx.families.infer import infer_adapter
from ffmerge_onnx.onnx.validate import unique_param_bytes
from ffmerge_onnx.pipeline import ExportOptions, export

REVIEWED = [*tm.TINY, *(t for t in tm.INFERRED if registered(t))]  # xlm-roberta, mbart, qwen3: reviewed types
NEW = [t for t in tm.INFERRED if not registered(tm.build(t).config.model_type)]
QUICK = {"olmo"}  # one inferred decoder in the quick subset; the other 48 types in the full suite


def resolved(adapter, model) -> dict:
    """What an adapter means on a model: the modules and sizes it resolves to."""
    config = model.config
    out = {"task": adapter.task_of(model), "layout": adapter.layout, "bias": adapter.bias, "gated": adapter.gated,
           "fused": adapter.fused,
           "position_offset": adapter.position_offset, "extra_tokens": adapter.extra_tokens,
           "max_positions": adapter.max_positions(config)}  # fmt: skip
    for stack in adapter.stack_names():
        layer = adapter.layers(model, stack)[0]
        out[stack] = {
            "path": adapter.stack_path(model, stack),
            "layers": adapter.num_layers(model, stack),
            "config_layers": adapter.config_layers(config, stack),
            "attention": adapter.attention(config, stack),
            "projections": {
                p: adapter.projection_path(layer, p) for p in ("in", "gate", "out") if adapter.projections[p]
            },
            "roles": [(r.name, r.hidden_axis) for r in adapter.roles()],
            "ff_dim": adapter.ff_dim(layer),
            "d_model": adapter.d_model(config, stack),
        }
    return out


@pytest.mark.parametrize("model_type", REVIEWED)
def test_inference_reproduces_every_reviewed_adapter(model_type):
    model = tm.build(model_type)
    inferred = infer_adapter(model)
    assert inferred.name.startswith("inferred:")
    assert resolved(inferred, model) == resolved(adapter_for(model), model)


def test_at_least_forty_model_types_and_ten_without_json():
    assert len(NEW) >= 10 and len(set(REVIEWED) | set(NEW)) >= 40


def quick_or_slow(types):
    return [t if t in QUICK else pytest.param(t, marks=pytest.mark.slow) for t in types]


@pytest.mark.parametrize("model_type", quick_or_slow(NEW))
def test_inferred_adapter_agrees_with_the_config_and_survives_json(model_type):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    assert adapter.name == f"inferred:{model.config.model_type}"
    for stack in adapter.stack_names():
        layer = adapter.layers(model, stack)[0]
        assert adapter.config_layers(model.config, stack) == adapter.num_layers(model, stack) == 4
        assert adapter.d_ff(model.config, stack) == adapter.ff_dim(layer)
        assert adapter.d_model(model.config, stack) == adapter.model_dim(layer)
    again = type(adapter).from_json(json.loads(json.dumps(adapter.to_json())))
    assert resolved(again, model) == resolved(adapter, model)


@pytest.mark.parametrize("model_type", list(tm.REFUSED))
def test_unsafe_or_unsupported_types_are_refused_with_the_reason(model_type):
    model = tm.build(model_type)
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(tm.REFUSED[model_type][2])):
        adapter_for(model)


@pytest.mark.parametrize("model_type", quick_or_slow(NEW))
def test_inferred_type_merges_exports_and_validates(model_type, tmp_path):
    """Window 1-2 of every stack: outputs match PyTorch, zero duplicated tensors, and the merged model
    holds one FF sublayer fewer per stack."""
    model = tm.build(model_type)
    adapter = adapter_for(model)
    before = unique_param_bytes(model)
    ff = {s: sum(p.numel() * p.element_size() for p in adapter.ff_params(adapter.layers(model, s)[1]).values())
          for s in adapter.stack_names()}  # fmt: skip
    result = merge(model, [Window(s, 1, 2) for s in adapter.stack_names()], calibration=tm.calibration(model),
                   progress=False)  # fmt: skip
    assert unique_param_bytes(result.model) == before - sum(ff.values())
    report = export(result, tmp_path / "out", ExportOptions(compare=False), log=lambda s: None)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and checks["outputs[cpu]"]["status"] == "pass" and checks["sharing"]["status"] == "pass"
    for row in checks["sharing"]["detail"]["files"].values():
        assert row["duplicated_tensors"] == 0
    assert (tmp_path / "out" / "reference" / "adapter.json").is_file()  # the folder carries its structure


def test_an_ambiguous_block_is_refused_with_the_way_to_write_an_adapter():
    from types import SimpleNamespace

    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.side = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="toy", hidden_size=8, num_hidden_layers=2)
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(UnsupportedArchitectureError, match="found 2 projections from the FF width") as e:
        infer_adapter(Toy())
    assert "--adapter-out FILE" in str(e.value) and "--adapter FILE" in str(e.value)


def _fused_toy(up_first: bool, act):
    """A two-block model whose FF holds gate and up in one matrix, in either order."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = nn.Linear(8, 32, bias=False), nn.Linear(16, 8, bias=False)

        def forward(self, x):
            a, b = self.fc(x).chunk(2, dim=-1)
            up, gate = (a, b) if up_first else (b, a)
            return self.proj(act(gate) * up)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="fused-toy", hidden_size=8, num_hidden_layers=2)
            self.layers = nn.ModuleList([Block(), Block()])

    torch.manual_seed(0)
    return Toy()


@pytest.mark.parametrize("up_first", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_the_probe_tells_which_half_of_a_fused_matrix_is_the_gate(up_first, act):
    import torch.nn.functional as F

    adapter = infer_adapter(_fused_toy(up_first, getattr(F, act)))
    assert adapter.fused == (("in", "gate") if up_first else ("gate", "in"))
    assert adapter.projections["in"] == ("mlp.fc",) and adapter.projections["gate"] is None
    assert adapter.up_block() == (0 if up_first else 1)


def test_a_fused_matrix_whose_halves_cannot_be_told_apart_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="cannot tell which half"):
        infer_adapter(_fused_toy(True, lambda t: t))  # no activation: the FF is linear in both halves


def test_calibration_reads_the_up_half_of_a_fused_matrix():
    import torch

    from ffmerge_onnx.merging import calibration as calibrate

    model = tm.build("phi3")
    adapter = adapter_for(model)
    cal = tm.calibration(model)
    layer = adapter.layers(model, "decoder")[1]
    seen = []
    hook = adapter.projection(layer, "in").register_forward_hook(lambda _m, _a, out: seen.append(out))
    (moments,) = calibrate.collect(model, adapter, cal, [("decoder.1.pre", "decoder.2.pre")], progress=False)
    hook.remove()
    d = adapter.ff_dim(layer)
    ups = torch.cat([o[..., d:].reshape(-1, d) for o in seen]).double()  # gate first: the up half is the second
    masks = torch.cat([b["attention_mask"].reshape(-1) for b in cal.batches]).bool()
    mean = ups[masks].mean(0)
    assert torch.allclose(moments.mean("decoder.1.pre"), mean, atol=1e-6)


def _save_tiny(model_type, folder):
    model = tm.build(model_type)
    model.save_pretrained(folder)
    tm.word_tokenizer().save_pretrained(folder)
    return model


def test_inspect_writes_the_inferred_adapter_and_merge_takes_it_back(tmp_path):
    from ffmerge_onnx.merging import load_merged

    model = _save_tiny("olmo", tmp_path / "olmo")
    adapter = adapter_for(model)
    ff = sum(p.numel() for p in adapter.ff_params(adapter.layers(model, "decoder")[0]).values())
    args = [
        "inspect",
        str(tmp_path / "olmo"),
        "--adapter-out",
        str(tmp_path / "a.json"),
        "--json",
        str(tmp_path / "d.json"),
    ]
    assert main(args) == 0
    described = json.loads((tmp_path / "d.json").read_text())
    assert described["adapter"] == "inferred" and described["stacks"]["decoder"]["layers"] == 4
    assert described["stacks"]["decoder"]["merge_removes"]["2"]["params"] == ff
    data = json.loads((tmp_path / "a.json").read_text())
    data["name"] = "my-olmo"
    (tmp_path / "a.json").write_text(json.dumps(data))
    text = tmp_path / "cal.txt"
    text.write_text(tm.word_text(400))
    args = ["merge", str(tmp_path / "olmo"), "--adapter", str(tmp_path / "a.json"), "--layers", "1-2",
            "--calibration", str(text), "--calibration-tokens", "300", "-o", str(tmp_path / "merged")]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "merged" / "adapter.json").read_text())["name"] == "my-olmo"
    loaded = load_merged(tmp_path / "merged")
    assert adapter_for(loaded.model).name == "my-olmo" and [w.layers for w in loaded.manifest.windows] == [[1, 2]]


def test_a_refused_type_and_a_bad_adapter_file_stop_before_any_work(tmp_path, capsys):
    _save_tiny("mixtral", tmp_path / "mixtral")
    assert main(["convert", str(tmp_path / "mixtral"), "-o", str(tmp_path / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and not (tmp_path / "out").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "stacks": []}))
    args = ["merge", str(tmp_path / "mixtral"), "--adapter", str(tmp_path / "bad.json"), "-o", str(tmp_path / "m")]
    assert main(args) == EXIT_USAGE
    assert "lacks model_types" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "m").exists()


def test_swin_stages_become_stacks_of_their_own_width_and_keys():
    from ffmerge_onnx.families.adapter import _config_value
    from ffmerge_onnx.onnx.build import _suffix

    model = tm.build("swin")
    adapter = adapter_for(model)
    assert adapter.stack_names() == ["stage0", "stage1"]
    assert adapter.config_keys["num_layers"] == {"stage0": "depths.0", "stage1": "depths.1"}
    assert [adapter.d_model(model.config, s) for s in adapter.stack_names()] == [16, 32]
    assert [adapter.attention(model.config, s) for s in adapter.stack_names()] == [(2, 8), (4, 8)]
    assert _config_value(model.config, "depths.1") == 4 and _config_value(model.config, "depths.5|embed_dim") == 16
    # each stage's projections are told apart in the exported graph by the stage's index
    assert {_suffix(model, adapter, s, 2, "in") for s in adapter.stack_names()} == {
        "0.blocks.2.mlp.fc1",
        "1.blocks.2.mlp.fc1",
    }
