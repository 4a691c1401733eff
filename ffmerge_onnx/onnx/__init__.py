"""Export to ONNX, rewrite so every merged FF tensor is one initializer, simplify, run and validate."""

from .build import BuildOptions, build, share_file, untied_copy
from .validate import validate

__all__ = ["BuildOptions", "build", "share_file", "untied_copy", "validate"]
