"""What a model looks like: architecture adapters (data), loading, and the built-in models and data."""

from . import infer  # noqa: F401 - registers adapter inference with adapter_for
from .adapter import Adapter, Role, adapter_for, modality, registry, supported_model_types, task_of

__all__ = ["Adapter", "Role", "adapter_for", "modality", "registry", "supported_model_types", "task_of"]
