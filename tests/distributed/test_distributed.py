"""Several processes on the CPU (gloo), as torchrun starts them: statistics, recovery, writing, failure."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models as tm
import torch

from ffmerge_onnx import adapter_for

WORKER = Path(__file__).with_name("worker.py")
CLI = str(Path(sys.executable).with_name("ffmerge-onnx"))


def torchrun(*args, n: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *map(str, args)]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def _ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow  # two processes
def test_statistics_summed_over_ranks_equal_one_process(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from worker import statistics

    _ok(torchrun(WORKER, "statistics", tmp_path / "two.pt"))
    two, one = torch.load(tmp_path / "two.pt"), statistics()
    assert int(two["moments"]["n"]) == int(one["moments"]["n"]) > 0
    for key, value in one["moments"].items():
        if key == "n":
            continue
        scale = value.abs().max()
        assert (two["moments"][key] - value).abs().max() <= 1e-10 * scale, key
    assert set(two["perms"]) == set(one["perms"]) == {1, 2, 3}
    for i in one["perms"]:
        assert torch.equal(two["perms"][i], one["perms"][i])


@pytest.mark.slow  # two processes, several seconds each
@pytest.mark.parametrize("job", ["recovered", "sharded"])
def test_ddp_and_fsdp_recovery_match_one_process_and_keep_ties(tmp_path, job):
    sys.path.insert(0, str(WORKER.parent))
    from worker import recovered

    _ok(torchrun(WORKER, job, tmp_path / "two.pt"))
    two, one = torch.load(tmp_path / "two.pt"), recovered()
    start = dict(tm.build("llama", gentle=True).named_parameters())
    assert set(two) == set(one)
    moved = 0
    for name, value in one.items():
        assert torch.allclose(two[name], value, rtol=0, atol=1e-5), (name, (two[name] - value).abs().max())
        moved += name in start and not torch.equal(value, start[name])
    assert moved > 10  # training changed the weights, so the match says something


@pytest.mark.slow  # two processes, several seconds each
@pytest.mark.parametrize("job", ["three_steps_saved", "sharded_three_steps_saved"])
def test_progress_saved_by_two_ranks_resumes_in_one_process(tmp_path, job):
    """Rank 0 saves whole tensors (gathered from the shards under FSDP): 3 steps on 2 ranks, then 2 more
    in one process, equal 5 steps in one process."""
    sys.path.insert(0, str(WORKER.parent))
    from worker import recovered

    _ok(torchrun(WORKER, job, tmp_path / "unused.pt", tmp_path / "state"))
    assert (tmp_path / "state" / "finetune_state.pt").is_file() and not list((tmp_path / "state").glob("*.tmp"))
    resumed, straight = recovered(output=tmp_path / "state"), recovered()
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, rtol=0, atol=1e-5), name


def _merge_args(tmp_path, out, steps=3):
    return ["merge", tmp_path / "orig", "-o", out, "--layers", "1-2", "--method", "average",
            "--calibration", tmp_path / "text.txt", "--calibration-tokens", "300",
            "--finetune-steps", steps, "--lr", "1e-3", "--finetune-data", tmp_path / "text.txt",
            "--finetune-tokens", "300"]  # fmt: skip


def _saved(tmp_path):
    model = tm.build("llama", gentle=True)
    model.save_pretrained(tmp_path / "orig")
    tm.word_tokenizer().save_pretrained(tmp_path / "orig")
    (tmp_path / "text.txt").write_text(tm.word_text(600, seed=5))


@pytest.mark.slow  # two processes, several seconds each
def test_torchrun_merge_writes_once_what_one_process_writes(tmp_path):
    from ffmerge_onnx import load_merged
    from ffmerge_onnx.cli import main

    _saved(tmp_path)
    run = torchrun(CLI, *_merge_args(tmp_path, tmp_path / "two"))
    _ok(run)
    assert run.stderr.count("wrote ") + run.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    assert main([str(a) for a in _merge_args(tmp_path, tmp_path / "one")]) == 0
    two, one = load_merged(tmp_path / "two").model, load_merged(tmp_path / "one").model
    layers = adapter_for(two).layers(two, "decoder")
    assert layers[1].mlp.down_proj.weight is layers[2].mlp.down_proj.weight
    a, b = dict(two.named_parameters()), dict(one.named_parameters())
    assert max(float((a[n] - b[n]).detach().abs().max()) for n in a) < 1e-5
    assert not list(tmp_path.glob(".ffmerge-*"))


@pytest.mark.slow  # two processes
def test_other_commands_refuse_torchrun(tmp_path):
    run = torchrun(CLI, "inspect", "gpt2", n=2, timeout=120)
    assert run.returncode != 0
    assert "under torchrun only merge and convert run" in run.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes, several seconds each
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_run_ends_every_rank_non_zero_with_no_output(tmp_path, victim):
    """Both ranks started with torchrun's environment; one is killed while fine-tuning."""
    _saved(tmp_path)
    port = _free_port()
    args = [CLI, *map(str, _merge_args(tmp_path, tmp_path / "out", steps=100_000))]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}  # fmt: skip
        ranks.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _fine_tuning(ranks):
            time.sleep(0.5)
        assert all(p.poll() is None for p in ranks), "a rank ended before the kill"
        time.sleep(2)
        ranks[victim].send_signal(signal.SIGKILL)
        codes = [p.wait(timeout=120) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    survivor = ranks[1 - victim].stdout.read()
    assert codes[victim] == -signal.SIGKILL
    assert codes[1 - victim] == 5, survivor[-2000:]
    assert "another process of this torchrun job failed" in survivor
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".ffmerge-tmp-*"))
    for lock in tmp_path.glob(".ffmerge-lock-*"):  # left by a SIGKILLed rank 0; the kernel freed its hold
        with lock.open() as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _fine_tuning(ranks) -> bool:
    """Whether both ranks' processes are past loading (they hold their gloo sockets)."""
    return all(_tcp_sockets(p.pid) >= 1 for p in ranks)


def _tcp_sockets(pid: int) -> int:
    try:
        return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
