"""`average`: the paper's uniform mean of the window's aligned FF tensors."""

from __future__ import annotations

import torch

from .common import MergeMethod, WindowFit


def average(fit: WindowFit) -> dict[str, torch.Tensor]:
    return fit.average()


AVERAGE = MergeMethod(
    "average", "uniform mean of the aligned FF sublayers (the paper)", average, needs_calibration=False
)
