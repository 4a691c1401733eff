"""ffmerge-onnx: merge Transformer feed-forward sublayers and ship them as smaller ONNX models.

The layers, lowest first (a module imports only from its own layer and the ones before it):
errors, runtime -> families (what a model looks like) -> merging (calibrate, align, combine, tie) ->
onnx (export, passes, validate) -> quality (evaluate, search, recovery) -> pipeline -> cli.

Names below load on first use, so `import ffmerge_onnx.runtime` in a server does not import torch."""

from __future__ import annotations

import importlib

from ._version import __version__

_EXPORTS = {
    "Adapter": "families",
    "adapter_for": "families",
    "registry": "families",
    "task_of": "families",
    "MergeResult": "merging",
    "Window": "merging",
    "drop_layers": "merging",
    "load_merged": "merging",
    "merge": "merging",
    "parse_windows": "merging",
    "save_merged": "merging",
    "session": "runtime",
}

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
    "session",
    "task_of",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
