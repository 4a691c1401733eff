"""ffmerge-onnx: merge Transformer feed-forward sublayers and ship them as smaller ONNX models."""

__version__ = "0.1.0"

from .adapters import Adapter, adapter_for, registry, task_of  # noqa: E402
from .merge import Window, drop_layers, merge, parse_windows  # noqa: E402
from .storage import load_merged, save_merged  # noqa: E402

__all__ = [
    "Adapter",
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
