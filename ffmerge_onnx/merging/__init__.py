"""Calibrate, align, combine and tie: the merge in PyTorch."""

from .checkpoint import load_merged, save_merged
from .data import Calibration, load_calibration
from .merge import MergeResult, drop_layers, ff_param_count, merge, permute_ff
from .methods import METHODS
from .windows import Window, parse_windows, windows_for

__all__ = [
    "METHODS",
    "Calibration",
    "MergeResult",
    "Window",
    "drop_layers",
    "ff_param_count",
    "load_calibration",
    "load_merged",
    "merge",
    "parse_windows",
    "permute_ff",
    "save_merged",
    "windows_for",
]
