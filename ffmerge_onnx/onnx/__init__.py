"""Export to ONNX, rewrite so every merged FF tensor is one initializer, simplify, run and validate."""

from .build import BuildOptions, build, share_file, untied_copy
from .runtime import MODES, open_session, session_settings
from .validate import validate

__all__ = [
    "MODES",
    "BuildOptions",
    "build",
    "open_session",
    "session_settings",
    "share_file",
    "untied_copy",
    "validate",
]
