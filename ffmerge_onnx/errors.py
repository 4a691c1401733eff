"""Typed errors. Each one says what went wrong and what to do next.

Exit codes of the CLI: 0 ok, 1 validation failed, 2 usage / bad input, 3 internal error,
4 out of memory or disk, 5 another process of a torchrun job failed, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). The graph passes' own pre- and postcondition errors
(subclasses of onnx-ir's) live in `onnx/passes/base.py`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VALIDATION = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_RESOURCES = 4
EXIT_PEER = 5  # under torchrun: another rank failed or disagreed
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


class FFMergeError(Exception):
    """Base class for every error the tool raises on purpose."""

    exit_code = EXIT_USAGE


class InputError(FFMergeError):
    """A path, model, file or option given by the user is not usable."""


class UnsupportedArchitectureError(InputError):
    """The model's family has no adapter."""


class WindowError(InputError):
    """A merge window is out of range, overlapping or too small."""


class CalibrationError(InputError):
    """Calibration data is missing, empty, too short or of the wrong kind."""


class ManifestError(InputError):
    """A manifest is malformed or does not match the model it is applied to."""


class OutputExistsError(InputError):
    """The output folder already exists."""


class CorruptModelError(InputError):
    """A model file is truncated, corrupted, or declares sizes its data does not have."""


class UnsafeModelError(InputError):
    """An ONNX or checkpoint file asks for something unsafe (e.g. paths outside its folder)."""


class GraphError(FFMergeError):
    """The exporter or a simplifier produced a graph the tool cannot handle (a bug or an unsupported model)."""

    exit_code = EXIT_INTERNAL


class ValidationFailed(FFMergeError):
    """An exported model does not pass validation."""

    exit_code = EXIT_VALIDATION


class OutputBusyError(InputError):
    """Another run holds the lock on the same output."""


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM; unwinds like Ctrl-C so temporary files go."""
