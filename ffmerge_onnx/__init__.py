"""ffmerge-onnx: merge Transformer feed-forward sublayers and ship them as smaller ONNX models.

The layers, lowest first (a module imports only from its own layer and the ones before it):
families (what a model looks like) -> merging (calibrate, align, combine, tie) -> onnx (export,
passes, runtime, validate) -> quality (evaluate, search, recovery) -> pipeline -> cli."""

from ._version import __version__
from .families import Adapter, adapter_for, registry, task_of
from .merging import MergeResult, Window, drop_layers, load_merged, merge, parse_windows, save_merged

__all__ = [
    "Adapter",
    "MergeResult",
    "Window",
    "__version__",
    "adapter_for",
    "drop_layers",
    "load_merged",
    "merge",
    "parse_windows",
    "registry",
    "save_merged",
    "task_of",
]
