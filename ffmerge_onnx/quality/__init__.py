"""Quality: evaluate (PyTorch or ONNX), search windows, recover by fine-tuning, analyze similarity."""

from .finetune import OBJECTIVES, SCHEDULES, TRAINABLE
from .search import SEARCH_MODES

__all__ = ["OBJECTIVES", "SCHEDULES", "SEARCH_MODES", "TRAINABLE"]
