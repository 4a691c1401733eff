"""Bad inputs get typed errors and documented exit codes; nothing half-written; unsafe files refused.

The table of bad inputs in docs/bad_inputs.md is produced by test_bad_input_table
(FFMERGE_WRITE_DOCS=1 rewrites it; otherwise the test checks it is current)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_models as tm
import torch
from onnx import TensorProto, helper, numpy_helper

from ffmerge_onnx import Window, errors, merge
from ffmerge_onnx.cli import run
from ffmerge_onnx.pipeline import ExportOptions, export

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_inputs.md"


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def external_model(folder: Path, location: str, length: int = 64) -> Path:
    """A one-MatMul model whose weight lives in external data at `location`."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny GPT-2, calibration tensors, and a folder written by convert (external data)."""
    root = tmp_path_factory.mktemp("hard")
    model = tm.build("gpt2")
    model.save_pretrained(root / "gpt2")
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), root / "cal.pt")
    bert = tm.build("bert")
    result = merge(bert, [Window("encoder", 1, 3)], calibration=tm.calibration(bert), progress=False)
    export(result, root / "converted", ExportOptions(compare=False, external_data=True), log=lambda s: None)
    return root


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _cases(root: Path):
    """(description, argv builder) for each bad input; builders prepare files under root/case."""
    gpt2, cal = root / "gpt2", root / "cal.pt"

    def merge_argv(*extra, model=None, calibration=None):
        return [
            "merge",
            str(model or gpt2),
            "-o",
            str(root / "case" / "out"),
            "--calibration",
            str(calibration or cal),
            "--calibration-tokens",
            "200",
            *extra,
        ]

    def empty_txt(c):
        (c / "empty.txt").write_text("")
        return merge_argv(calibration=c / "empty.txt")

    def short_pt(c):
        torch.save(torch.randint(3, 90, (1, 8)), c / "short.pt")
        return merge_argv(calibration=c / "short.pt")

    def images_for_text(c):
        from PIL import Image

        (c / "img").mkdir()
        Image.new("RGB", (8, 8)).save(c / "img" / "a.png")
        return merge_argv(calibration=c / "img")

    def floats_for_text(c):
        torch.save(torch.randn(4, 3, 8, 8), c / "px.pt")
        return merge_argv(calibration=c / "px.pt")

    def pickled_code(c):
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(c / "pwned"),))

        torch.save({"input_ids": Evil()}, c / "evil.pt", _use_new_zipfile_serialization=True)
        return merge_argv(calibration=c / "evil.pt")

    def text_without_tokenizer(c):
        (c / "t.txt").write_text("some words " * 200)
        return merge_argv(calibration=c / "t.txt")

    def no_config(c):
        (c / "m").mkdir()
        return merge_argv(model=c / "m")

    def t5(c):
        import transformers as T

        T.T5Model(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)).save_pretrained(
            c / "t5"
        )
        return merge_argv("--align", "none", model=c / "t5")

    def exists(c):
        (c / "out").mkdir()
        return merge_argv("--layers", "1-2")

    def converted(c):
        return fresh_copy(root / "converted", c / "conv")

    def truncated_onnx(c):
        d = converted(c)
        data = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(data[: len(data) // 2])
        return ["validate", str(d), "--no-compare"]

    def truncated_data(c):
        d = converted(c)
        data = (d / "model.onnx.data").read_bytes()
        (d / "model.onnx.data").write_bytes(data[: len(data) - 100])
        return ["validate", str(d), "--no-compare"]

    def escaping_data(c):
        d = converted(c)
        external_model(d, "../../etc/passwd")
        return ["validate", str(d), "--no-compare"]

    def changed_reference(c):
        d = converted(c)
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / "reference" / "model.safetensors"))
        key = next(k for k in state if k.endswith("intermediate.dense.bias"))
        state[key] = state[key] + 1.0
        save_file(state, str(d / "reference" / "model.safetensors"), metadata={"format": "pt"})
        return ["validate", str(d), "--no-compare"]

    def wrong_reference(c):
        d = converted(c)
        return ["validate", str(d), "--no-compare", "--reference", str(gpt2)]

    def not_converted(c):
        return ["validate", str(c)]

    def random_bytes(c):
        (c / "x.onnx").write_bytes(random.Random(0).randbytes(4096))  # fixed: the table must not change
        return ["share", str(c / "x.onnx"), "-o", str(c / "y.onnx")]

    def share_onto_input(c):
        d = converted(c)
        return ["share", str(d / "model.onnx"), "-o", str(d / "model.onnx"), "--overwrite"]

    return [
        ("model path does not exist", lambda c: merge_argv(model=c / "nope"), errors.InputError),
        ("model folder without config.json", no_config, errors.InputError),
        ("unsupported architecture (T5)", t5, errors.UnsupportedArchitectureError),
        ("window out of range", lambda c: merge_argv("--layers", "2-9"), errors.WindowError),
        ("windows overlap", lambda c: merge_argv("--layers", "0-1,1-2"), errors.WindowError),
        ("window of one layer", lambda c: merge_argv("--layers", "2-2"), errors.WindowError),
        ("window reversed", lambda c: merge_argv("--layers", "3-1"), errors.WindowError),
        ("calibration file empty", empty_txt, errors.CalibrationError),
        ("calibration shorter than the token budget", short_pt, errors.CalibrationError),
        ("calibration images for a text model", images_for_text, errors.CalibrationError),
        ("calibration float tensors for a text model", floats_for_text, errors.CalibrationError),
        ("calibration .pt that runs code when unpickled", pickled_code, errors.CalibrationError),
        ("text calibration, model has no tokenizer", text_without_tokenizer, errors.CalibrationError),
        ("output folder exists", exists, errors.OutputExistsError),
        ("validate: folder with no model in it", not_converted, errors.InputError),
        ("validate: truncated model.onnx", truncated_onnx, errors.CorruptModelError),
        ("validate: truncated external data file", truncated_data, errors.CorruptModelError),
        ("validate: external data at ../../etc/passwd", escaping_data, errors.UnsafeModelError),
        ("validate: reference weights changed after writing", changed_reference, errors.ManifestError),
        ("validate: reference of another model", wrong_reference, errors.InputError),
        ("share: random bytes as .onnx", random_bytes, errors.CorruptModelError),
        ("share: output would overwrite the input", share_onto_input, errors.InputError),
        ("unknown option value", lambda c: ["convert", "--permutations", "zip"], None),
    ]


def _row(description, argv, code, err, root):
    msg = str(err).replace(str(root), "<tmp>").splitlines()[0] if err is not None else ""
    if len(msg) > 150:
        msg = msg[:147] + "..."
    kind = type(err).__name__ if err is not None else ""
    cmd = argv[0]
    return f"| {description} | `{cmd}` | {code} | {kind} | {msg.replace('|', '/')} |"


def test_bad_input_table(work, monkeypatch):
    rows = ["| bad input | command | exit | error | message |", "|---|---|---|---|---|"]
    for i, (description, make, expected) in enumerate(_cases(work)):
        case = work / "case"
        if case.exists():
            shutil.rmtree(case)
        case.mkdir()
        argv = make(case)
        before = tree_digest(work / "gpt2")
        monkeypatch.chdir(case)
        code, err = run(argv)
        if expected is None:
            assert code == errors.EXIT_USAGE, description
        else:
            assert isinstance(err, expected), (description, err)
            assert code == expected.exit_code == errors.EXIT_USAGE, description
        assert tree_digest(work / "gpt2") == before, "an input changed"
        assert not (case / "pwned").exists(), "pickled code ran"
        assert not any(p.name.startswith(".out.tmp") for p in case.iterdir()), "temporary output left behind"
        if expected is not errors.OutputExistsError:
            assert not (case / "out").exists(), description
        rows.append(_row(description, argv, code, err, work))
    table = "\n".join(rows) + "\n"
    text = (
        "# Bad inputs and what they get\n\nProduced by `tests/test_hardening.py::test_bad_input_table`"
        " (`FFMERGE_WRITE_DOCS=1` rewrites it). Exit codes: 0 ok, 1 validation failed, 2 usage or bad"
        " input, 3 internal error, 4 out of memory or disk, 130 interrupted.\n\n" + table
    )
    if os.environ.get("FFMERGE_WRITE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/bad_inputs.md is out of date: run with FFMERGE_WRITE_DOCS=1"


def test_out_of_memory_gets_its_own_exit_code(work, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(sys.modules["ffmerge_onnx.pipeline"], "merge", boom)
    code, err = run(["merge", str(work / "gpt2"), "-o", str(tmp_path / "o"), "--align", "none"])
    assert code == errors.EXIT_RESOURCES and isinstance(err, MemoryError)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_escaping_external_data_is_refused_without_opening_the_file(tmp_path):
    """Python's audit hook sees every open(); the checker must reject before any of them."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(secret, tmp_path / "a" / "b" / "link.bin")
    cases = {
        "../../etc/passwd": "passwd",
        "/etc/passwd": "passwd",
        "../../secret.bin": "secret.bin",
        "link.bin": "secret.bin",
    }
    for location, needle in cases.items():
        model = external_model(tmp_path / "a" / "b", location)
        script = f"""
import sys
opened = []
sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" and args and {needle!r} in str(args[0]) else None)
from ffmerge_onnx.cli import run
code, err = run(["share", {str(model)!r}, "-o", {str(tmp_path / "o.onnx")!r}])
print(code, type(err).__name__, len(opened))
"""
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
        assert out.stdout.split()[-3:] == ["2", "UnsafeModelError", "0"], (location, out.stdout, out.stderr[-2000:])
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_interrupt_mid_export_leaves_no_output_and_untouched_inputs(work, tmp_path):
    model_dir = work / "gpt2"
    before = tree_digest(model_dir), hashlib.sha256((work / "cal.pt").read_bytes()).hexdigest()
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-c",
        "from ffmerge_onnx.cli import entry; entry()",
        "convert",
        str(model_dir),
        "-o",
        str(out),
        "--layers",
        "1-2",
        "--calibration",
        str(work / "cal.pt"),
        "--calibration-tokens",
        "200",
    ]
    env = {**os.environ, "COLUMNS": "200"}
    # a job started in the background (`cmd &` without job control) inherits SIGINT ignored, and so
    # would the CLI: give it Ctrl-C's default handling, as in a terminal
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - the test starts no threads
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "exporting to ONNX" in line:
            break
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert temps and (temps[0] / "reference").is_dir(), "export had not started"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_INTERRUPTED, "".join(seen) + rest
    assert "interrupted" in rest
    assert list(tmp_path.iterdir()) == []
    assert (tree_digest(model_dir), hashlib.sha256((work / "cal.pt").read_bytes()).hexdigest()) == before


@pytest.mark.slow
def test_fuzz_validate_and_share_never_crash_or_hang():
    """Mutated and truncated ONNX files: a pass, a failed validation or a typed error, every time."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz_onnx.py"), "--cases", "25", "--seed", "2"],
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
    )
    summary = [line for line in out.stdout.splitlines() if line.startswith(("validate:", "share:", "cases tried"))]
    print("\n".join(summary))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "cases tried 50; crashes 0; hangs 0" in out.stdout
