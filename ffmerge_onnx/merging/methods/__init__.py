"""Merge methods: how a window's aligned FF tensors become one shared FF. One registry, one function each."""

from __future__ import annotations

import torch

from ...errors import CalibrationError, InputError
from .average import AVERAGE
from .common import MergeMethod, WindowFit
from .refit import REFIT, SEQUENTIAL
from .regmean import REGMEAN

METHODS: dict[str, MergeMethod] = {m.name: m for m in (AVERAGE, REGMEAN, REFIT, SEQUENTIAL)}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; got {name!r}.")
    return METHODS[name]


def combine(fit: WindowFit, method: str) -> dict[str, torch.Tensor]:
    """One FF for the window (role name -> tensor, PyTorch layout, the parameters' dtype)."""
    m = get_method(method)
    if m.needs_calibration and fit.calibration is None:
        raise CalibrationError(f"Merge method {method} fits on calibration data: pass --calibration PATH.")
    values = m.combine(fit, **m.params)
    dtype = fit.aligned[0]
    return {k: v.to(dtype[k].dtype) for k, v in values.items()}


__all__ = ["METHODS", "MergeMethod", "WindowFit", "combine", "get_method"]
