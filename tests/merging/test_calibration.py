import contextlib

import pytest
import tiny_models
import torch

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.merging import calibration as calibrate


def _no_stop(monkeypatch):
    monkeypatch.setattr(calibrate, "_stopping_after", lambda _modules: contextlib.nullcontext())


def _counting(modules):
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in modules]
    return calls, handles


@pytest.mark.parametrize(("model_type", "stack"), [("llama", "decoder"), ("falcon", "decoder"), ("marian", "encoder")])
def test_calibration_stops_after_the_last_layer_it_reads_with_the_same_statistics(monkeypatch, model_type, stack):
    model = tiny_models.build(model_type)
    adapter = adapter_for(model)
    cal = tiny_models.calibration(model, n=8)
    pairs = [(f"{stack}.0.pre", f"{stack}.1.pre"), (f"{stack}.0.out", f"{stack}.1.out")]
    later = adapter.layers(model, stack)[2:]
    calls, handles = _counting(later)
    (early,) = calibrate.collect(model, adapter, cal, pairs, progress=False)
    assert calls[0] == 0  # layers after the window never ran
    _no_stop(monkeypatch)
    (full,) = calibrate.collect(model, adapter, cal, pairs, progress=False)
    assert calls[0] == len(later) * len(cal.batches)
    for h in handles:
        h.remove()
    assert early.n == full.n > 0
    for a, b in [(early.sum, full.sum), (early.sumsq, full.sumsq), (early.cross, full.cross)]:
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["regmean", "sequential", "delta"])
def test_fitted_merges_equal_with_and_without_stopping_early(monkeypatch, method):
    def merged_state():
        model = tiny_models.build("llama", gentle=True)
        cal = tiny_models.calibration(model, n=8)
        merge(model, [Window("decoder", 0, 1)], method=method, calibration=cal, progress=False)
        return model.state_dict()

    early = merged_state()
    _no_stop(monkeypatch)
    full = merged_state()
    for k in full:
        torch.testing.assert_close(early[k], full[k], rtol=0, atol=0)
