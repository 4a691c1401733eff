"""Output safety: the lock, refusals of targets that touch an input, the final no-replace move, and
nothing left behind on failure, --overwrite or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import errors
from ffmerge_onnx.errors import InputError, OutputBusyError, OutputExistsError
from ffmerge_onnx.fsutil import atomic_dir, check_target, guarded_output

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ffmerge_onnx.fsutil import guarded_output
    with guarded_output(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_a_second_process_cannot_take_the_same_output(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match="Another ffmerge-onnx run"), guarded_output(target):
            pass
    finally:
        holder.kill()
        holder.wait()
    with guarded_output(target), atomic_dir(target) as tmp:  # free again once the holder is gone
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file, no temp folder left


def test_the_lock_is_reentrant_within_one_run(tmp_path):
    with guarded_output(tmp_path / "out"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not the temp folder's private mode


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared"), atomic_dir(target) as tmp:
        (tmp / "mine").write_text("x")
        target.mkdir()  # another tool wrote here meanwhile
        (target / "theirs").write_text("y")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_overwrite_leaves_nothing_behind(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "old").write_text("old")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_name_of_255_bytes_works_and_256_is_refused_up_front(tmp_path):
    with guarded_output(tmp_path / ("x" * 255)) as target, atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / ("x" * 255) / "f").exists()
    with pytest.raises(InputError, match="255 bytes"):
        check_target(tmp_path / ("y" * 256), overwrite=False)


def test_folders_made_for_the_output_go_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), guarded_output(tmp_path / "a" / "b" / "out"):
        raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == []


def test_targets_that_touch_an_input_are_refused(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for target in (model, model.parent, model / "out", tmp_path):
        with pytest.raises(InputError, match="input"):
            check_target(target, overwrite=True, inputs=[model])
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(InputError, match="input"):  # through a symlink too
        check_target(tmp_path / "link", overwrite=True, inputs=[model])
    assert check_target(tmp_path / "other", overwrite=False, inputs=[model, "gpt2"]) == (tmp_path / "other").resolve()


@pytest.mark.slow
def test_two_concurrent_converts_to_one_output(tmp_path):
    """One finishes and its output is whole; the other stops at once with exit 2 and touches nothing."""
    tm.build("gpt2").save_pretrained(tmp_path / "gpt2")
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "cal.pt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from ffmerge_onnx.cli import entry; entry()", "convert", str(tmp_path / "gpt2"),
           "-o", str(out), "--layers", "1-2", "--calibration", str(tmp_path / "cal.pt"), "--calibration-tokens", "200"]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".ffmerge-lock-") for p in tmp_path.iterdir()):
        assert time.time() < deadline and first.poll() is None, "the first run never took its lock"
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert first.poll() is None, "the first run ended before the second reached the lock; the test proves nothing"
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == errors.EXIT_USAGE and "Another ffmerge-onnx run" in second.stdout + second.stderr
    assert (out / "report.json").exists() and (out / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.pt", "gpt2", "out"]


@pytest.mark.slow
def test_sigterm_mid_export_cleans_up_like_ctrl_c(tmp_path):
    tm.build("gpt2").save_pretrained(tmp_path / "gpt2")
    torch.save(torch.randint(3, tm.VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "cal.pt")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-c", "from ffmerge_onnx.cli import entry; entry()", "convert", str(tmp_path / "gpt2"),
           "-o", str(work / "out"), "--layers", "1-2", "--calibration", str(tmp_path / "cal.pt"),
           "--calibration-tokens", "200"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TMPDIR": str(temp), "COLUMNS": "200"})  # fmt: skip
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "exporting the baselines" in line or "measuring" in line:
            break
    assert any(p.name.startswith("ffmerge-unmerged-") for p in temp.iterdir()), "".join(seen)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_TERMINATED, "".join(seen) + rest
    assert "terminated" in rest
    assert list(work.iterdir()) == [], "output, temporary folder or lock left beside the target"
    ours = [p.name for p in temp.iterdir() if "ffmerge" in p.name]  # libraries keep their own caches there
    assert ours == [], "temporary folders left in TMPDIR"


def test_run_maps_sigterm_to_its_exit_code(monkeypatch):
    from ffmerge_onnx import cli

    def terminate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(cli, "app", terminate)
    code, err = cli.run(["merge"])
    assert code == errors.EXIT_TERMINATED and isinstance(err, errors.Terminated)
    assert signal.getsignal(signal.SIGTERM) is not cli._on_sigterm  # the handler is restored
    assert Path.cwd().exists()
