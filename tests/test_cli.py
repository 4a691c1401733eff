import json

import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import errors
from ffmerge_onnx.cli import main


@pytest.fixture
def tiny_gpt2(tmp_path):
    model = tm.build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    cal = tmp_path / "cal.pt"
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), cal)
    return tmp_path / "gpt2", cal


def test_merge_cli_writes_manifest_and_smaller_model(tiny_gpt2, tmp_path):
    model_dir, cal = tiny_gpt2
    out = tmp_path / "out"
    rc = main(
        [
            "merge",
            str(model_dir),
            "-o",
            str(out),
            "--layers",
            "1-3",
            "--calibration",
            str(cal),
            "--calibration-tokens",
            "200",
            "--anchor",
            "middle",
        ]
    )
    assert rc == 0
    manifest = json.loads((out / "ffmerge.json").read_text())
    assert manifest["windows"][0]["anchor_layer"] == 2 and manifest["adapter"] == "gpt2"
    assert manifest["calibration"]["tokens"] == 256
    assert (out / "permutations.safetensors").exists()
    assert (out / "model.safetensors").stat().st_size < (model_dir / "model.safetensors").stat().st_size
    # an existing output folder is refused, and left as it was
    before = sorted(p.name for p in out.iterdir())
    assert main(["merge", str(model_dir), "-o", str(out), "--layers", "1-3", "--align", "none"]) == errors.EXIT_USAGE
    assert sorted(p.name for p in out.iterdir()) == before


def test_analyze_cli_writes_json_and_png(tiny_gpt2, tmp_path):
    model_dir, cal = tiny_gpt2
    out = tmp_path / "an"
    assert (
        main(["analyze", str(model_dir), "--calibration", str(cal), "-o", str(out), "--calibration-tokens", "100"]) == 0
    )
    data = json.loads((out / "similarity.json").read_text())
    corr = data["stacks"]["decoder"]["matched_correlation"]
    cka = data["stacks"]["decoder"]["cka"]
    assert len(corr) == 4 and corr[0][0] == 1.0 and corr[1][2] == corr[2][1]
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in cka for v in row)
    assert (out / "similarity_decoder.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,code",
    [
        (["merge", "/nonexistent/model", "-o", "x", "--align", "none"], errors.EXIT_USAGE),
        (["merge", "--layers", "3-1", "-o", "x", "--align", "none"], errors.EXIT_USAGE),
        (["merge", "--bogus-flag"], errors.EXIT_USAGE),
    ],
)
def test_bad_input_gets_usage_exit_code(args, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == code
    assert not (tmp_path / "x").exists()


def test_unsupported_architecture(tmp_path):
    import transformers as T

    T.T5Model(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)).save_pretrained(
        tmp_path / "t5"
    )
    assert main(["merge", str(tmp_path / "t5"), "-o", str(tmp_path / "o"), "--align", "none"]) == errors.EXIT_USAGE


def test_a_failing_pass_postcondition_reaches_the_user_as_a_validation_failure(tiny_gpt2, tmp_path, monkeypatch):
    """A pass whose promise does not hold (here: ShareMerged shares nothing) ends the run with exit 1,
    a message naming the pass, and nothing written; not as onnx-ir's PassError and not as a bug (exit 3)."""
    import onnx_ir as ir

    from ffmerge_onnx.cli import run
    from ffmerge_onnx.onnx.passes import PostconditionError, ShareMerged

    monkeypatch.setattr(ShareMerged, "call", lambda self, model: ir.passes.PassResult(model, modified=False))
    model_dir, cal = tiny_gpt2
    out = tmp_path / "out"
    code, err = run(
        [
            "convert",
            str(model_dir),
            "-o",
            str(out),
            "--layers",
            "1-2",
            "--calibration",
            str(cal),
            "--calibration-tokens",
            "200",
            "--no-compare",
        ]
    )
    assert code == errors.EXIT_VALIDATION and isinstance(err, PostconditionError), err
    assert str(err).startswith("ShareMerged: merged tensor ffmerge.decoder.w1_2.")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.slow
def test_a_merged_folder_converts_as_it_is_and_merges_further_only_when_asked(tiny_gpt2, tmp_path):
    """convert MERGED_FOLDER exports the merged model with its ties (no second merge, no random weights);
    --layers adds a window beside the recorded one."""
    from ffmerge_onnx.merging import load_merged

    model_dir, _ = tiny_gpt2
    merged = tmp_path / "merged"
    assert main(["merge", str(model_dir), "-o", str(merged), "--layers", "0-1", "--align", "none"]) == 0
    out = tmp_path / "out"
    assert main(["convert", str(merged), "-o", str(out), "--no-compare"]) == 0
    manifest = json.loads((out / "ffmerge.json").read_text())
    assert [(w["start"], w["end"]) for w in manifest["windows"]] == [(0, 1)]
    assert manifest["source"] == str(model_dir)  # the original stays the baseline
    reference = load_merged(out / "reference").model
    expected = load_merged(merged).model
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), expected.state_dict().values()))
    more = tmp_path / "more"
    assert main(["merge", str(merged), "-o", str(more), "--layers", "2-3", "--align", "none"]) == 0
    windows = json.loads((more / "ffmerge.json").read_text())["windows"]
    assert [(w["start"], w["end"]) for w in windows] == [(0, 1), (2, 3)]
