"""Measure one ONNX model in a fresh process, the way a server holds it.

Figures (bytes are growth over the process after its imports, so the interpreter, numpy and
onnxruntime themselves are not counted):
- peak: the highest RSS over session creation and the first run (VmHWM, reset after the imports
  through /proc/self/clear_refs);
- steady: RSS after the first run, as the process holds it (glibc may keep freed scratch);
- steady_trimmed: the same after malloc_trim(0), i.e. live memory;
- latency_ms: median over repeated runs after the first.
`measure` runs the probe in `repeats` fresh interpreters (optionally with extra environment, e.g.
MALLOC_TRIM_THRESHOLD_) and takes the median of each figure. The probe runs as a script with
`python -I memprobe.py MODEL FEEDS.npz`: it imports numpy and onnxruntime only, not this package."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIGURES = ("peak", "steady", "steady_trimmed", "latency_ms")


def _trim() -> None:
    """Return freed heap pages to the OS, so RSS shows live memory rather than allocator slack."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0); if refused, the peak includes the imports."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def probe(model: str, feeds: str, entries: dict[str, str], runs: int, provider: str, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    data = dict(np.load(feeds))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    _trim()
    start = _status("VmRSS")
    _reset_peak()
    sess = ort.InferenceSession(model, so, providers=[provider])
    sess.run(None, data)
    peak = _status("VmHWM")
    steady = _status("VmRSS")
    _trim()
    steady_trimmed = _status("VmRSS")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, data)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "start": start,
        "peak": peak - start,
        "steady": steady - start,
        "steady_trimmed": steady_trimmed - start,
        "latency_ms": statistics.median(times) if times else None,
        "providers": sess.get_providers(),
    }


def measure(
    model: Path,
    feeds: Path,
    entries: dict[str, str] | None = None,
    runs: int = 20,
    *,
    provider: str = "CPUExecutionProvider",
    threads: int = 1,
    env: dict[str, str] | None = None,
    repeats: int = 3,
    timeout: float = 900,
) -> dict:
    """Run `probe` in `repeats` fresh interpreters; the median of each figure."""
    # -I and the file path: the probe imports numpy and onnxruntime only, not this package (or torch)
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), str(model), str(feeds)]
    cmd += ["--runs", str(runs), "--provider", provider, "--threads", str(threads)]
    cmd += ["--entries", json.dumps(entries or {})]
    results = []
    for _ in range(repeats):
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})}
        )
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--entries", default="{}")
    a = ap.parse_args()
    print(json.dumps(probe(a.model, a.feeds, json.loads(a.entries), a.runs, a.provider, a.threads)))


if __name__ == "__main__":
    main()
