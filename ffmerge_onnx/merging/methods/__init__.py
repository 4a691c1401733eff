"""Merge methods: how a window's aligned FF tensors become one shared FF (and, for `delta`, per-layer
corrections). One registry, one function each; a method declares its parameters and their defaults."""

from __future__ import annotations

from ...errors import CalibrationError, InputError
from .average import AVERAGE
from .common import MergeMethod, WindowFit
from .delta import DELTA, Combined, Delta
from .refit import REFIT, SEQUENTIAL
from .regmean import REGMEAN

METHODS: dict[str, MergeMethod] = {m.name: m for m in (AVERAGE, REGMEAN, REFIT, SEQUENTIAL, DELTA)}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; got {name!r}.")
    return METHODS[name]


def method_params(method: str, given: dict | None = None) -> dict:
    """The method's parameters: its declared defaults, overridden by `given` (unknown names refused)."""
    m = get_method(method)
    unknown = set(given or {}) - set(m.params)
    if unknown:
        raise InputError(
            f"Merge method {method} takes {', '.join(m.params) or 'no parameters'}; got {sorted(unknown)}."
        )
    return {**m.params, **(given or {})}


def combine(fit: WindowFit, method: str, params: dict | None = None) -> Combined:
    """One FF for the window (role name -> tensor, PyTorch layout, the parameters' dtype), and the
    per-layer corrections of methods that make them."""
    m = get_method(method)
    if m.needs_calibration and fit.calibration is None:
        raise CalibrationError(f"Merge method {method} fits on calibration data: pass --calibration PATH.")
    out = m.combine(fit, **method_params(method, params))
    out = out if isinstance(out, Combined) else Combined(out)
    dtypes = fit.dtypes()
    out.shared = {k: v.to(dtypes[k]) for k, v in out.shared.items()}
    dtype = next(iter(dtypes.values()))
    for per_layer in out.deltas.values():
        for d in per_layer.values():
            d.up, d.down = d.up.to(dtype), d.down.to(dtype)
            d.bias = d.bias.to(dtype) if d.bias is not None else None
    return out


__all__ = ["METHODS", "Combined", "Delta", "MergeMethod", "WindowFit", "combine", "get_method", "method_params"]
