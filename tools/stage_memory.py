"""Run a command and report, per stage of its log, the wall time and the peak resident memory of the
process itself and of its whole process tree (onnxruntime measuring processes included). The process's
anonymous memory (RssAnon: heap, not file pages the kernel can drop and read again, such as memory-mapped
weights) is reported beside its RSS.

A stage starts at every line the command prints (progress bars are not lines). RSS is sampled from
/proc every 0.1 s; the command's own VmHWM (its true peak) is printed at the end.

    .venv/bin/python tools/stage_memory.py --json stages.json -- .venv/bin/ffmerge-onnx convert MODEL -o out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stages = [{"stage": "start", "t0": 0.0, "rss": 0, "anon": 0, "tree": 0}]
    lock, done = threading.Lock(), threading.Event()
    hwm = [0]

    def sample():
        while not done.is_set():
            rss, anon = _status(proc.pid, "VmRSS"), _status(proc.pid, "RssAnon")
            tree = sum(_status(p, "VmRSS") for p in _tree(proc.pid))
            hwm[0] = max(hwm[0], _status(proc.pid, "VmHWM"))
            with lock:
                s = stages[-1]
                s["rss"], s["anon"], s["tree"] = max(s["rss"], rss), max(s["anon"], anon), max(s["tree"], tree)
            time.sleep(a.interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for line in proc.stdout:
        sys.stdout.write(line)
        text = line.strip()
        if text:
            with lock:
                stages.append({"stage": text[:90], "t0": time.time() - start, "rss": 0, "anon": 0, "tree": 0})
    code = proc.wait()
    done.set()
    thread.join()
    end = time.time() - start
    for s, nxt in zip(stages, [*stages[1:], {"t0": end}]):
        s["seconds"] = nxt["t0"] - s["t0"]
    print(
        "\n| stage (from the log line that starts it) | seconds | peak RSS GB | peak anonymous GB | peak tree RSS GB |"
    )
    print("|---|---|---|---|---|")
    for s in stages:
        if s["seconds"] >= 0.5 or s["rss"]:
            print(f"| {s['stage']} | {s['seconds']:.1f} | {s['rss'] / 1e9:.2f} | {s['anon'] / 1e9:.2f} | "
                  f"{s['tree'] / 1e9:.2f} |")  # fmt: skip
    anon = max(s["anon"] for s in stages)
    print(f"\nexit {code}; {end:.0f} s; the command's VmHWM {hwm[0] / 1e9:.2f} GB, peak anonymous {anon / 1e9:.2f} GB")
    if a.json:
        a.json.write_text(json.dumps({"command": cmd, "exit": code, "seconds": end, "vmhwm": hwm[0],
                                      "stages": stages}, indent=2))  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
