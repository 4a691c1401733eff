"""Time one layer pair's alignment at a given FF width (default Llama-3-8B's 14,336): the float64
statistics for a block of tokens, the correlation matrix, and the linear assignment, on synthetic
activations where the second layer is a permuted, noisy copy of the first (so the answer is known).

    .venv/bin/python tools/benchmark_alignment.py --d-ff 14336 --tokens 1024
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ffmerge_onnx.merging.align import match
from ffmerge_onnx.merging.stats import Moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--noise", type=float, default=1.0)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.d_ff, generator=g)
    perm = torch.randperm(a.d_ff, generator=g)
    y = x[:, perm] + a.noise * torch.randn(a.tokens, a.d_ff, generator=g)
    moments = Moments({"a": a.d_ff, "b": a.d_ff}, [("a", "b")])
    t0 = time.perf_counter()
    moments.update({"a": x, "b": y})
    t1 = time.perf_counter()
    corr = moments.correlation("a", "b", release=True)  # as merge() reads it
    t2 = time.perf_counter()
    found = match(corr)
    t3 = time.perf_counter()
    right = float(np.mean(perm.numpy()[found.perm] == np.arange(a.d_ff)))  # y[:, j] copies x[:, perm[j]]
    print(f"d_ff {a.d_ff}, {a.tokens} tokens: statistics {t1 - t0:.1f} s ({(t1 - t0) / a.tokens * 1e3:.1f} ms/token), "
          f"correlation {t2 - t1:.1f} s, assignment {t3 - t2:.1f} s; alignment per pair (correlation + assignment) "
          f"{t3 - t1:.1f} s; planted matching recovered {right:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
