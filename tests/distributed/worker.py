"""Run by torchrun in tests/distributed: one job per call, rank 0 saves what the test compares.

python -m torch.distributed.run --standalone --nproc-per-node 2 worker.py JOB OUT
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny_models as tm

from ffmerge_onnx import adapter_for, distributed
from ffmerge_onnx.merging import Window, merge
from ffmerge_onnx.merging import calibration as calibrate
from ffmerge_onnx.merging.merge import _alignments
from ffmerge_onnx.quality.finetune import finetune

STEPS = 5


def statistics() -> dict:
    """Moments of layer 1 against layers 2 and 3 (FF hidden), and the alignment of window 1-3."""
    model = tm.build("llama", gentle=True)
    cal = tm.calibration(model, n=24)
    pairs = [("decoder.1.pre", "decoder.2.pre"), ("decoder.1.pre", "decoder.3.pre")]
    adapter = adapter_for(model)
    (moments,) = calibrate.collect(model, adapter, cal, pairs, progress=False)
    window = Window("decoder", 1, 3)
    found = _alignments(model, adapter, [window], "first", "correlation", cal, False, calibrate.DEFAULT_MAX_STAT_BYTES)
    return {
        "moments": moments.state_dict(),
        "perms": {i: torch.as_tensor(m.perm) for i, m in found[window].items()},
    }


def recovered(shard: bool = False, steps: int = STEPS, output: Path | None = None) -> dict:
    """A merged tiny Llama after `steps` steps of lm recovery on 4-row batches (with padding); with
    `output`, progress is saved there (and resumed from there)."""
    model = tm.build("llama", gentle=True)
    cal = tm.calibration(model, n=24)
    model = merge(model, [Window("decoder", 1, 2)], calibration=cal, progress=False).model

    def score(_m):  # improves at every evaluation, also across a resume, so the last state is the best
        return time.time()

    finetune(model, cal.batches, score, higher_is_better=True, steps=steps, lr=1e-3, eval_every=1, progress=False,
             shard=shard, output=output)  # fmt: skip
    layers = adapter_for(model).layers(model, "decoder")
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight, "ties broken by recovery"
    return {n: p.detach().clone() for n, p in model.named_parameters()}


JOBS = {
    "statistics": statistics,
    "recovered": recovered,
    "sharded": lambda: recovered(shard=True),
    "three_steps_saved": lambda: recovered(steps=3, output=Path(sys.argv[3])),
    "sharded_three_steps_saved": lambda: recovered(shard=True, steps=3, output=Path(sys.argv[3])),
}

if __name__ == "__main__":
    job, out = sys.argv[1], Path(sys.argv[2])
    distributed.start()
    result = JOBS[job]()
    if distributed.world().main:
        torch.save(result, out)
    distributed.stop()
