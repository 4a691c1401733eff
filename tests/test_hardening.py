"""Bad inputs get typed errors and documented exit codes; nothing half-written; unsafe files refused.

The table of bad inputs in docs/bad_inputs.md is produced by test_bad_input_table
(FFMERGE_WRITE_DOCS=1 rewrites it; otherwise the test checks it is current)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import hostile_cases
import numpy as np
import onnx
import pytest
import tiny_models as tm
import torch
from onnx import TensorProto, helper, numpy_helper

from ffmerge_onnx import Window, errors, merge
from ffmerge_onnx.cli import run
from ffmerge_onnx.families.loading import load_model
from ffmerge_onnx.merging import save_merged
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
    """A saved tiny GPT-2 (with and without a tokenizer), calibration tensors and text, a folder written
    by merge and one written by convert (external data)."""
    root = tmp_path_factory.mktemp("hard")
    model = tm.build("gpt2")
    model.save_pretrained(root / "gpt2")
    model.save_pretrained(root / "gpt2tok")
    tm.word_tokenizer().save_pretrained(root / "gpt2tok")
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), root / "cal.pt")
    (root / "text.txt").write_text(tm.word_text(600))
    loaded = load_model(str(root / "gpt2"))
    save_merged(merge(loaded, [Window("decoder", 1, 2)], align="none", progress=False), root / "merged")
    bert = tm.build("bert")
    result = merge(bert, [Window("encoder", 1, 3)], calibration=tm.calibration(bert), progress=False)
    export(result, root / "converted", ExportOptions(compare=False, external_data=True), log=lambda s: None)
    return root


def _row(description, argv, code, err, root):
    msg = str(err).replace(str(root), "<tmp>").splitlines()[0] if err is not None and str(err) else ""
    if len(msg) > 150:
        msg = msg[:147] + "..."
    kind = type(err).__name__ if err is not None else ""
    cmd = f"`{argv[0]}`" if isinstance(argv, list) else "Python API"
    return f"| {description} | {cmd} | {code} | {kind} | {msg.replace('|', '/')} |"


def _attempt(argv):
    """(exit code, error) from the CLI, or from a Python API call mapped the same way."""
    if isinstance(argv, list):
        return run(argv)
    try:
        argv()
    except errors.FFMergeError as e:
        return e.exit_code, e
    except Exception as e:  # noqa: BLE001 - an untyped error is what the table must catch
        return errors.EXIT_INTERNAL, e
    return errors.EXIT_OK, None


def _temp_leftovers() -> set[str]:
    prefixes = ("ffmerge-unmerged-", "ffmerge-cal-", ".ffmerge-")  # what the commands make (tools make others)
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(prefixes)}


@pytest.mark.slow  # quick subset under 3 minutes (about 40 s each here)
def test_bad_input_table(work, monkeypatch):
    """Every case: the typed error it should get with exit 2, no change to any input, nothing left behind."""
    rows = ["| bad input | command | exit | error | message |", "|---|---|---|---|---|"]
    problems = []
    shared_before = {name: tree_digest(work / name) for name in ("gpt2", "gpt2tok", "merged", "converted")}
    temp_before = _temp_leftovers()
    all_cases = hostile_cases.cases(work)
    assert len(all_cases) >= 150
    for description, make, expected in all_cases:
        case = work / "case"
        if case.exists():
            shutil.rmtree(case)
        case.mkdir()
        monkeypatch.chdir(case)
        argv = make(case)
        held = case / ".held"
        fd = int(held.read_text()) if held.exists() else None
        before = tree_digest(case)
        code, err = _attempt(argv)
        if fd is not None:
            os.close(fd)
        wanted = errors.EXIT_USAGE if expected is None else expected.exit_code
        if (expected is not None and not isinstance(err, expected)) or code != wanted:
            problems.append(f"{description}: exit {code}, {type(err).__name__}: {str(err)[:300]}")
        if tree_digest(case) != before:
            problems.append(f"{description}: the case folder changed (an input was modified or output written)")
        leftovers = [p.name for p in case.iterdir() if p.name.startswith(".ffmerge-") and fd is None]
        if leftovers:
            problems.append(f"{description}: left {leftovers}")
        if (case / "pwned").exists():
            problems.append(f"{description}: pickled code ran")
        rows.append(_row(description, argv, code, err, work))
    assert {name: tree_digest(work / name) for name in shared_before} == shared_before, "a shared input changed"
    assert _temp_leftovers() <= temp_before, "temporary folders left behind"
    assert not problems, "\n".join(problems)
    exits = [r.split(" | ")[2] for r in rows[2:]]
    text = (
        "# Bad inputs and what they get\n\nProduced by `tests/test_hardening.py::test_bad_input_table` from "
        "`tests/hostile_cases.py` (`FFMERGE_WRITE_DOCS=1` rewrites it). Exit codes: 0 ok, 1 validation failed, "
        "2 usage or bad input, 3 internal error, 4 out of memory or disk, 130 interrupted, 143 terminated.\n\n"
        f"{len(exits)} cases; exit 3 (a bug) in {exits.count('3')}. For each: no input changed, no output, "
        "temporary folder or lock file left behind, no pickled code run.\n\n" + "\n".join(rows) + "\n"
    )
    if os.environ.get("FFMERGE_WRITE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/bad_inputs.md is out of date: run with FFMERGE_WRITE_DOCS=1"


def test_out_of_memory_gets_its_own_exit_code(work, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(sys.modules["ffmerge_onnx.pipeline"], "merge", boom)
    code, err = run(["merge", str(work / "gpt2"), "-o", str(tmp_path / "o"), "--align", "none", "--method", "average"])
    assert code == errors.EXIT_RESOURCES and isinstance(err, MemoryError)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried..."),
        OSError(28, "No space left on device"),
        Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
    ids=["torch out of memory", "ENOSPC without a file name", "safetensors disk full"],
)
def test_resources_get_exit_4_however_the_library_says_it(work, monkeypatch, tmp_path, error):
    def boom(*a, **k):
        raise error

    monkeypatch.setattr(sys.modules["ffmerge_onnx.pipeline"], "merge", boom)
    args = ["--align", "none", "--layers", "1-2", "--method", "average"]
    code, err = run(["merge", str(work / "gpt2"), "-o", str(tmp_path / "o"), *args])
    assert code == errors.EXIT_RESOURCES and err is error
    assert list(tmp_path.iterdir()) == []


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
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".ffmerge-tmp-")]
    assert temps and (temps[0] / "reference").is_dir(), "export had not started"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_INTERRUPTED, "".join(seen) + rest
    assert "interrupted" in rest
    assert list(tmp_path.iterdir()) == []
    assert (tree_digest(model_dir), hashlib.sha256((work / "cal.pt").read_bytes()).hexdigest()) == before


@pytest.mark.slow
def test_fuzz_validate_and_share_never_crash_or_hang():
    """Mutated ONNX files, manifests and configs: a pass, a failed validation or a typed error, every time."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz_onnx.py"), "--cases", "25", "--seed", "2"],
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
    )
    summary = [
        line
        for line in out.stdout.splitlines()
        if line.startswith(("validate:", "share:", "manifest:", "config:", "cases tried"))
    ]
    print("\n".join(summary))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "cases tried 100; crashes 0; hangs 0" in out.stdout
