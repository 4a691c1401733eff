"""Measure one ONNX model in a fresh process: RSS after session creation and after the
first run, and the median latency. Run as `python -I memprobe.py MODEL FEEDS.npz` (no package imports)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _trim() -> None:
    """Return freed heap pages to the OS, so RSS shows live memory rather than allocator slack."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    _trim()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def probe(model: str, feeds: str, entries: dict[str, str], runs: int, provider: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    data = dict(np.load(feeds))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # steady timings on small shared machines
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    rss_start = _rss()
    sess = ort.InferenceSession(model, so, providers=[provider])
    rss_session = _rss()
    sess.run(None, data)
    rss_first_run = _rss()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, data)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "rss_start": rss_start,
        "rss_session": rss_session,
        "rss_first_run": rss_first_run,
        "session_bytes": rss_session - rss_start,
        "first_run_bytes": rss_first_run - rss_start,
        "latency_ms": statistics.median(times) if times else None,
        "providers": sess.get_providers(),
    }


def measure(
    model: Path,
    feeds: Path,
    entries: dict[str, str] | None = None,
    runs: int = 20,
    provider: str = "CPUExecutionProvider",
    timeout: float = 900,
    repeats: int = 3,
) -> dict:
    """Run `probe` in `repeats` fresh interpreters; the median of each number."""
    # -I and the file path: the probe imports numpy and onnxruntime only, not this package (or torch)
    cmd = [
        sys.executable,
        "-I",
        str(Path(__file__).resolve()),
        str(model),
        str(feeds),
        "--runs",
        str(runs),
        "--provider",
        provider,
        "--entries",
        json.dumps(entries or {}),
    ]
    results = []
    for _ in range(repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    merged = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "providers"}
    merged["providers"] = results[0]["providers"]
    return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("feeds")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--entries", default="{}")
    a = ap.parse_args()
    print(json.dumps(probe(a.model, a.feeds, json.loads(a.entries), a.runs, a.provider)))


if __name__ == "__main__":
    main()
